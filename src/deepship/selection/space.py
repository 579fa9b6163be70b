"""The search space: sampling a trial's config keys with Optuna, and the grid a GridSampler walks."""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import optuna

from deepship.errors import ConfigError
from deepship.selection.config import ParamSpec

Space = dict[str, ParamSpec]


def is_active(spec: ParamSpec, params: dict[str, Any]) -> bool:
    """A conditional key is sampled only when every earlier key it names took one of the listed values."""
    for key, wanted in (spec.when or {}).items():
        allowed = wanted if isinstance(wanted, list) else [wanted]
        if key not in params or params[key] not in allowed:
            return False
    return True


def suggest(trial: optuna.Trial, key: str, spec: ParamSpec) -> Any:
    if spec.type == "categorical":
        return trial.suggest_categorical(key, spec.choices)
    if spec.type == "int":
        return trial.suggest_int(key, int(spec.low), int(spec.high), step=int(spec.step or 1))
    return trial.suggest_float(key, spec.low, spec.high, step=spec.step, log=spec.type == "log_float")


def sample_params(trial: optuna.Trial, space: Space) -> dict[str, Any]:
    """{dotted key: value} for the keys active in this trial, in the space's order."""
    params: dict[str, Any] = {}
    for key, spec in space.items():
        if is_active(spec, params):
            params[key] = suggest(trial, key, spec)
    return params


def apply_params(base: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    """A copy of the raw config with each `section.key` set (space keys are validated as two-part keys)."""
    raw = copy.deepcopy(base)
    for key, value in params.items():
        section, name = key.split(".", 1)
        raw.setdefault(section, {})[name] = value
    return raw


def value_grid(key: str, spec: ParamSpec) -> list[Any]:
    """Every value a grid visits for one key: the choices, or low, low+step, ... up to high."""
    if spec.type == "categorical":
        return list(spec.choices or [])
    if spec.step is None and spec.type != "int":
        raise ConfigError(f"sweep.space.{key}: the grid sampler needs a step for {spec.type} keys "
                          "(or give categorical choices); or use sampler: random or tpe")
    step = spec.step or 1
    count = int(np.floor((spec.high - spec.low) / step + 1e-9)) + 1
    values = [spec.low + i * step for i in range(count)]
    return [int(v) for v in values] if spec.type == "int" else [round(v, 12) for v in values]


def grid_search_space(space: Space) -> dict[str, list[Any]]:
    return {key: value_grid(key, spec) for key, spec in space.items()}


def grid_size(space: Space) -> int:
    return int(np.prod([len(values) for values in grid_search_space(space).values()]))
