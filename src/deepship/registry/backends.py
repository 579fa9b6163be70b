"""Pick a registry backend by URI: a plain path or `file:DIR` is the directory backend, `mlflow+<tracking uri>`
is MLflow's model registry (the optional extra, imported only when asked for)."""

from __future__ import annotations

import os
import re
from pathlib import Path

from deepship.errors import ConfigError
from deepship.registry.base import Registry
from deepship.registry.directory import DirectoryRegistry

REGISTRY_ENV = "DEEPSHIP_REGISTRY"
DEFAULT_REGISTRY = "registry"


def default_registry_uri() -> str:
    return os.environ.get(REGISTRY_ENV) or DEFAULT_REGISTRY


def open_registry(uri: str | Path | None = None) -> Registry:
    """A plain path or "file:DIR" -> DirectoryRegistry; "mlflow+<tracking uri>" -> MlflowRegistry.
    None: $DEEPSHIP_REGISTRY, else ./registry."""
    text = str(uri) if uri is not None else default_registry_uri()
    if text.startswith("mlflow+"):
        from deepship.registry.mlflow import MlflowRegistry  # the optional extra: only when asked for

        return MlflowRegistry(text)
    if text.startswith("file:"):
        return DirectoryRegistry(Path(text.removeprefix("file:").removeprefix("//")))
    if re.match(r"[A-Za-z][A-Za-z0-9+.-]*://", text):
        raise ConfigError(f"--registry {text}: unknown scheme; use a directory, file:DIR, or "
                          "mlflow+sqlite:///FILE.db / mlflow+http(s)://HOST")
    return DirectoryRegistry(Path(text))
