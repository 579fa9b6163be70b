"""What every registry backend offers: versions of a named model, movable aliases, an event log, a writer lock.

Torch-free and cheap to import: a serving host resolves `name@production` with the base install only.
Backends (deepship.registry.directory, deepship.registry.mlflow) implement `Registry`;
deepship.registry.backends.open_registry picks one by URI.
"""

from __future__ import annotations

import getpass
import os
import re
import socket
from abc import ABC, abstractmethod
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from deepship.errors import ConfigError, DeepshipError

REF_PREFIX = "registry:"  # `serve --model registry:NAME@ALIAS`: the prefix is accepted and dropped
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
ALIAS_PATTERN = re.compile(r"[A-Za-z][A-Za-z0-9_-]{0,63}")  # never all digits: `name:3` is a version
DEFAULT_LOCK_TIMEOUT_S = 30.0


class RegistryBusy(DeepshipError):
    """Another writer held the model's lock past the timeout (exit 1: nothing is wrong with the input,
    rerunning later succeeds)."""

    exit_code = 1


@dataclass(frozen=True)
class ModelRef:
    """`name`, `name@alias` or `name:version`; at most one of alias and version is set."""

    name: str
    alias: str | None = None
    version: int | None = None

    def __str__(self) -> str:
        return self.name + (f"@{self.alias}" if self.alias else "") + (f":{self.version}" if self.version else "")


@dataclass(frozen=True)
class VersionInfo:
    name: str
    version: int
    path: Path  # the package directory to load
    sha256: str  # the package's manifest digest (package.json's manifest_sha256)
    lineage: dict[str, Any] = field(default_factory=dict)
    created: str = ""  # ISO 8601, UTC
    aliases: list[str] = field(default_factory=list)


def check_name(name: str) -> str:
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        raise ConfigError(f"model name {name!r}: use 1-100 letters, digits, '.', '_' or '-', starting with a "
                          "letter or digit")
    return name


def check_alias(alias: str) -> str:
    if not isinstance(alias, str) or not ALIAS_PATTERN.fullmatch(alias):
        raise ConfigError(f"alias {alias!r}: use letters, digits, '_' or '-', starting with a letter "
                          "(e.g. production, challenger)")
    return alias


def parse_ref(text: str | ModelRef) -> ModelRef:
    """"name", "name@alias" or "name:3" (an optional "registry:" prefix is dropped) -> ModelRef."""
    if isinstance(text, ModelRef):
        return text
    ref = text.strip().removeprefix(REF_PREFIX)
    if "@" in ref and ":" in ref:
        raise ConfigError(f"model reference {text!r}: give an alias (name@alias) or a version (name:3), not both")
    if "@" in ref:
        name, alias = ref.split("@", 1)
        return ModelRef(check_name(name), alias=check_alias(alias))
    if ":" in ref:
        name, version = ref.split(":", 1)
        if not version.isdigit() or int(version) < 1:
            raise ConfigError(f"model reference {text!r}: the version after ':' must be a number from 1")
        return ModelRef(check_name(name), version=int(version))
    return ModelRef(check_name(ref))


def default_actor() -> str:
    """user@host of whoever changes the registry, recorded in every event."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # a container user with no passwd entry
        user = f"uid{os.getuid()}"
    return f"{user}@{socket.gethostname()}"


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat()


class Registry(ABC):
    """Named models, numbered immutable versions, aliases that move, and an append-only event log per model.

    Version numbers are never reused and versions are never deleted. Every event gets "ts", "seq"
    (strictly increasing per model) and "actor"."""

    uri: str

    @abstractmethod
    def register(self, package_dir: str | Path, name: str, alias: str | None = None,
                 lineage: dict[str, Any] | None = None, actor: str | None = None) -> VersionInfo:
        """Copy and verify a package as the model's next version; event "register" (and "alias" with `alias`)."""

    @abstractmethod
    def version_info(self, name: str, version: int, verify: bool = True) -> VersionInfo:
        """One version; `verify` re-checks every file's sha256 (PackageError naming the file)."""

    @abstractmethod
    def aliases(self, name: str) -> dict[str, int]: ...

    @abstractmethod
    def set_alias(self, name: str, alias: str, version: int, *, event: str = "alias", reason: str | None = None,
                  forced: bool = False, details: dict[str, Any] | None = None, actor: str | None = None) -> None:
        """Point `alias` at `version`; logs {"event": event, "alias", "from", "to", ...}. No-op when unchanged."""

    @abstractmethod
    def versions(self, name: str) -> list[VersionInfo]:
        """Every version, oldest first, unverified (cheap)."""

    @abstractmethod
    def models(self) -> list[str]: ...

    @abstractmethod
    def events(self, name: str) -> list[dict[str, Any]]: ...

    @abstractmethod
    def log_event(self, name: str, event: dict[str, Any], actor: str | None = None) -> dict[str, Any]:
        """Append `event` with ts, seq and actor added; returns the stored event."""

    @abstractmethod
    def lock(self, name: str, timeout: float = DEFAULT_LOCK_TIMEOUT_S) -> AbstractContextManager[None]:
        """The model's writer lock (re-entrant in the holding thread); RegistryBusy after `timeout` seconds."""

    def check_alias(self, alias: str) -> str:
        """A valid alias name for this backend (one may reserve more names than the base rule)."""
        return check_alias(alias)

    def promotion_dir(self, name: str) -> Path:
        """A new folder for one promotion's evaluation reports (default: a temporary folder)."""
        import tempfile

        return Path(tempfile.mkdtemp(prefix=f"deepship-promote-{name}-"))

    # ------------------------------------------------------------------------- shared on top
    def alias_target(self, name: str, alias: str) -> int | None:
        return self.aliases(name).get(alias)

    def resolve(self, ref: str | ModelRef, verify: bool = True) -> VersionInfo:
        """`name@alias`, `name:version`, or `name` (its newest version) -> a verified VersionInfo."""
        ref = parse_ref(ref)
        if ref.alias is not None:
            version = self.alias_target(ref.name, ref.alias)
            if version is None:
                raise ConfigError(f"{ref}: {ref.name} has no alias '{ref.alias}' in {self.uri} (aliases: "
                                  f"{sorted(self.aliases(ref.name)) or 'none'}); set one with `deepship registry alias`")
        elif ref.version is not None:
            version = ref.version
        else:
            existing = self.versions(ref.name)
            if not existing:
                raise ConfigError(f"{ref}: {ref.name} has no versions in {self.uri}; register a package first")
            version = existing[-1].version
        return self.version_info(ref.name, version, verify=verify)
