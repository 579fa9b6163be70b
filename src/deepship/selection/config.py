"""The sweep config: a training config (inline, or `base: FILE` plus overrides) and a `sweep:` section.

```yaml
base: configs/quickstart_text.yaml   # optional; the keys below are merged over it
train: {max_epochs: 2}
sweep:
  out_dir: sweeps/text-lr
  space: {train.lr: {type: log_float, low: 1.0e-5, high: 1.0e-3}}
```
Validated once, here: the training part by the normal Config, the sweep section by the models below,
and every space key against the Config schema. Each problem is one ConfigError line (exit 2).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Sequence

import yaml
from pydantic import BaseModel, Field, ValidationError, model_validator

from deepship.config import Config, ObjectiveMetric, _Section
from deepship.errors import ConfigError
from deepship.yamlconf import apply_overrides, format_validation_error, read_yaml_mapping

Scalar = bool | int | float | str


class ParamSpec(_Section):
    """One searched config key. float/int: low..high (log: sampled on a log scale; step: a grid); categorical:
    choices; when: only sampled when earlier space keys have these values (else the base config's value)."""

    type: Literal["float", "log_float", "int", "categorical"]
    low: float | None = None
    high: float | None = None
    step: float | None = Field(None, gt=0.0, description="float/int: sample multiples of step from low")
    choices: list[Scalar] | None = None
    when: dict[str, Scalar | list[Scalar]] | None = Field(None, description="{earlier space key: value or values}")

    @model_validator(mode="after")
    def _consistent(self) -> "ParamSpec":
        if self.type == "categorical":
            if not self.choices:
                raise ValueError("categorical needs a non-empty list of choices")
            if self.low is not None or self.high is not None or self.step is not None:
                raise ValueError("categorical takes choices, not low/high/step")
            return self
        if self.choices is not None:
            raise ValueError(f"{self.type} takes low/high, not choices (use type: categorical)")
        if self.low is None or self.high is None:
            raise ValueError(f"{self.type} needs both low and high")
        if self.low > self.high:
            raise ValueError(f"low {self.low:g} is above high {self.high:g}; swap them")
        if self.type == "log_float" and (self.low <= 0 or self.step is not None):
            raise ValueError("log_float needs low > 0 and no step (a log scale has no even grid)")
        if self.type == "int" and any(v is not None and float(v) != int(v) for v in (self.low, self.high, self.step)):
            raise ValueError("int needs whole-number low, high and step")
        return self


class SweepObjective(_Section):
    metric: ObjectiveMetric = Field("macro_f1", description="validation metric to maximize")
    latency_budget_ms: float | None = Field(None, gt=0.0, description="batch-1 onnxruntime p95 an architecture "
                                                                      "must meet on this host to be trained")


class SweepSection(_Section):
    out_dir: str = Field(min_length=1, description="the sweep directory")
    objective: SweepObjective = SweepObjective()
    space: dict[str, ParamSpec] = Field(min_length=1, description="{dotted config key: how to sample it}")
    sampler: Literal["grid", "random", "tpe"] = "tpe"
    pruner: Literal["none", "median", "hyperband"] = "median"
    pruner_startup_trials: int = Field(2, ge=0, description="median: trials that finish before any is pruned")
    pruner_warmup_epochs: int = Field(1, ge=0, description="median: epochs a trial always trains before it may "
                                                           "be pruned")
    n_trials: int = Field(10, ge=1, description="trials to finish: complete + pruned + failed")
    timeout: float | None = Field(None, gt=0.0, description="seconds; no new trial starts after it")
    seed: int = 0
    cv_folds: int | None = Field(None, ge=2, description="k: each trial trains k folds, the objective is their mean")
    storage: str | None = Field(None, description="null: <out_dir>/journal.log; a journal file path; or an SQL URL")

    @property
    def study_name(self) -> str:
        return Path(self.out_dir).name


@dataclass
class SweepConfig:
    base: dict[str, Any]  # the resolved training config (JSON-able), what every trial starts from
    config: Config  # the same, validated
    sweep: SweepSection

    @property
    def sweep_dir(self) -> Path:
        return Path(self.sweep.out_dir)

    def fold_config(self, fold: int, where: str = "sweep") -> Config:
        """The base config as fold `fold` of sweep.cv_folds trains it (the base config itself without folds)."""
        if self.sweep.cv_folds is None:
            return self.config
        try:
            return Config.model_validate(merge(self.base, {"data": {"cv_folds": self.sweep.cv_folds, "cv_fold": fold}}))
        except ValidationError as exc:
            raise ConfigError(f"{where}: sweep.cv_folds: {format_validation_error(exc, Config)}") from None

    def to_dict(self) -> dict[str, Any]:
        """What sweep.yaml holds: self-contained, re-readable by load_sweep_config."""
        return {**self.base, "sweep": self.sweep.model_dump(mode="json", exclude_none=True)}

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """Mappings merged key by key (a nested mapping is merged, anything else replaced); a new dict."""
    out = copy.deepcopy(base)
    for key, value in over.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def load_sweep_config(path: str | Path, overrides: Sequence[str] = ()) -> SweepConfig:
    """Read and validate a sweep config; `overrides` (`--set`) apply to its training keys and sweep.*."""
    path = Path(path)
    raw = read_yaml_mapping(path, "--config", "a sweep YAML such as configs/sweep_text.yaml",
                            "with a sweep: section and training keys (or base: CONFIG.yaml)")
    apply_overrides(raw, overrides)
    if not isinstance(raw.get("sweep"), dict):
        raise ConfigError(f"{path}: missing the sweep: section (out_dir, space, ...); see docs/model_selection.md")
    sweep_raw, base_path = raw.pop("sweep"), raw.pop("base", None)
    if base_path is not None:
        base_raw = read_yaml_mapping(Path(str(base_path)), f"{path}: base:", "a training config YAML",
                                     "with keys task, data, model, train")
        raw = merge(base_raw, raw)
    try:
        config = Config.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(f"{path}: {format_validation_error(exc, Config)}") from None
    try:
        sweep = SweepSection.model_validate(sweep_raw)
    except ValidationError as exc:
        raise ConfigError(f"{path}: sweep.{format_validation_error(exc, SweepSection)}") from None
    check_space_keys(sweep, path)
    sweep_cfg = SweepConfig(config.model_dump(mode="json"), config, sweep)
    sweep_cfg.fold_config(0, str(path))  # cross-validation must fit the base config (no data.val, say)
    return sweep_cfg


def config_key_section(key: str) -> tuple[type[BaseModel], str] | None:
    """'train.lr' -> (TrainConfig, 'lr') when the training Config has that key, else None."""
    section, _, name = key.partition(".")
    field = Config.model_fields.get(section)
    model = field.annotation if field is not None else None
    if not (isinstance(model, type) and issubclass(model, BaseModel)) or name not in model.model_fields:
        return None
    return model, name


def check_space_keys(sweep: SweepSection, path: Path) -> None:
    """Space keys are real `section.key` config keys; `when` refers to space keys listed before it."""
    seen: list[str] = []
    for key, spec in sweep.space.items():
        if config_key_section(key) is None:
            sections = {k: f.annotation for k, f in Config.model_fields.items()
                        if isinstance(f.annotation, type) and issubclass(f.annotation, BaseModel)}
            section = sections.get(key.partition(".")[0])
            allowed = sorted(section.model_fields) if section is not None else sorted(sections)
            raise ConfigError(f"{path}: sweep.space.{key}: not a config key; use section.key, allowed here: {allowed}")
        for other in spec.when or {}:
            if other not in seen:
                raise ConfigError(f"{path}: sweep.space.{key}.when: '{other}' must be a space key listed before "
                                  f"{key}; earlier keys: {seen}")
        seen.append(key)
