"""YAML settings files with `--set key=value` overrides, validated by pydantic models.

Shared by the training config (`deepship.config`) and the serve settings (`deepship.serving.settings`),
so it imports neither: a torch-free server never loads the training config schema. Every problem
becomes one ConfigError line (exit 2) naming the file or dotted key and saying what is allowed.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Sequence, TypeVar, get_args

import yaml
from pydantic import BaseModel, ValidationError

from deepship.errors import ConfigError

ModelT = TypeVar("ModelT", bound=BaseModel)


class _YamlLoader(yaml.SafeLoader):
    """SafeLoader that reads 3e-4 as a float: PyYAML follows YAML 1.1, which wants 3.0e-4."""


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                   |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                   |\.[0-9_]+(?:[eE][-+][0-9]+)?
                   |[-+]?\.(?:inf|Inf|INF)
                   |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."),
)


def parse_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_YamlLoader)  # noqa: S506 - a SafeLoader subclass


def read_yaml_mapping(path: Path, option: str, example: str, mapping_of: str) -> dict[str, Any]:
    """The mapping in the YAML file `path` (an empty file is an empty mapping), given on the command line
    as `option`; `example` says what to pass instead, `mapping_of` what the mapping should hold."""
    if path.is_dir():
        raise ConfigError(f"{option} {path}: is a directory; pass {example}")
    if not path.is_file():
        raise ConfigError(f"{option} {path}: file not found; pass {example}")
    try:
        raw = parse_yaml(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}{where}: not valid YAML ({getattr(exc, 'problem', None) or exc})") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping {mapping_of}")
    return raw


def split_override(item: str) -> tuple[str, str]:
    """`a.b=value` -> ('a.b', 'value'); the value may itself hold '=' or spaces."""
    key, sep, text = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"--set '{item}': expected key=value (a dotted key, '=', then a YAML value)")
    return key, text


def apply_overrides(raw: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply `a.b.c=value` pairs in place; values are parsed as YAML scalars (3e-4, true, null)."""
    for item in overrides:
        key, text = split_override(item)
        node = raw
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {key}: '{part}' is not a section")
        try:
            node[parts[-1]] = parse_yaml(text)
        except yaml.YAMLError:
            node[parts[-1]] = text  # not valid YAML: keep the literal string
    return raw


def validate_section(model: type[ModelT], name: str, raw: dict[str, Any], overrides: Sequence[str],
                     command: str, example: str) -> ModelT:
    """One config section (evaluate's `objective`, monitor's `monitor`) with `--set NAME.KEY=VALUE`
    applied and validated like a config; other keys are refused, naming the command."""
    for item in overrides:
        if not split_override(item)[0].startswith(f"{name}."):
            raise ConfigError(f"--set {item}: {command} takes {name}.* keys only, e.g. --set {name}.{example}")
    raw = apply_overrides({name: dict(raw)}, overrides)[name]
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(f"{name}.{format_validation_error(exc, model)}") from None


def format_validation_error(err: ValidationError, model: type[BaseModel]) -> str:
    """One line: dotted key, what is wrong, what is allowed (at most three problems)."""
    parts = []
    for e in err.errors()[:3]:
        loc = _format_loc(e["loc"])
        if e["type"] == "extra_forbidden":
            allowed = sorted(_section_for(model, e["loc"][:-1]).model_fields)
            parts.append(f"{loc}: unknown key; allowed keys here: {allowed}")
        elif e["type"] == "missing":
            parts.append(f"{loc}: required key is missing")
        else:
            msg = e["msg"].removeprefix("Value error, ")
            parts.append(f"{loc}: {msg} (got {e.get('input')!r})")
    return "; ".join(parts)


def _format_loc(loc: Sequence[Any]) -> str:
    """('data', 'train', 0, 'path') -> 'data.train[0]'; union branch names ('bool', 'str') are dropped."""
    text = ""
    for i, part in enumerate(loc):
        if isinstance(part, int):
            text += f"[{part}]"
        elif part == "path" and i > 0 and isinstance(loc[i - 1], int):
            continue  # a source's path is the source itself
        elif not str(part).startswith(("bool", "str")):
            text += f".{part}" if text else str(part)
    return text


def _section_for(model: type[BaseModel], loc: Sequence[Any]) -> type[BaseModel]:
    """The model class that owns the last key of `loc`, looking through list[...] and X | None."""
    for part in loc:
        if isinstance(part, int) or str(part) not in model.model_fields:
            continue
        annotation = model.model_fields[str(part)].annotation
        for candidate in (annotation, *get_args(annotation), *(a for g in get_args(annotation) for a in get_args(g))):
            if isinstance(candidate, type) and issubclass(candidate, BaseModel):
                model = candidate
                break
    return model


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"train": {"lr": 1}} -> {"train.lr": 1}; lists stay values."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def changed_keys(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """The dotted keys whose value differs between two config trees (added and removed keys included), sorted."""
    a, b = flatten(old), flatten(new)
    return sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
