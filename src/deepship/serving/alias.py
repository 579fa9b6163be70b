"""Serving a registry reference: `serve --model registry:NAME@ALIAS --registry DIR|URI`.

The alias is resolved to a fixed, verified version when the server starts. A background task then
reads the alias every `watch_interval_s` and, when it moves, deploys the new version through the
server's ordinary reload: load and warm up beside the running model, swap one reference, keep the
old one as `previous`. A move back to the version held as `previous` is a rollback (no load).

A version that fails to load (tampered files, a missing folder, a newer package format) is logged as
a warning and the server keeps serving what it has; that version is not tried again until the alias
moves once more, so a broken deploy costs one load, not one per poll.

Every deploy (and every refused one) is an event in the registry with this server's host, port and pid.
The registry is torch-free, so this module keeps the serving path torch-free too.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from starlette.concurrency import run_in_threadpool

from deepship.errors import ConfigError, DeepshipError
from deepship.serving.schemas import ApiError

if TYPE_CHECKING:
    from deepship.registry import Registry, VersionInfo

logger = logging.getLogger("deepship.serving")

PREFIX = "registry:"


@dataclass(frozen=True)
class RegistryModel:
    """What `--model registry:NAME@ALIAS --registry URI` asks for, and where this server listens (for events)."""

    registry: str
    name: str
    alias: str | None = None
    version: int | None = None
    host: str = "127.0.0.1"
    port: int = 0

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.alias}" if self.alias else f"{self.name}:{self.version}" if self.version else self.name


@dataclass(frozen=True)
class RegistryOrigin:
    """Where a loaded package came from in the registry: shown by /v1/model, carried by every logged prediction."""

    name: str
    version: int
    alias: str | None
    lineage: dict[str, Any] = field(default_factory=dict)

    @property
    def tag(self) -> str:
        return f"{self.name}:{self.version}"

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version, "alias": self.alias, "registry_version": self.tag,
                "lineage": self.lineage}


def parse_model_option(text: str, registry: str | None, host: str = "127.0.0.1", port: int = 0) -> RegistryModel:
    """`registry:NAME@ALIAS` (watched) or `registry:NAME:VERSION` (fixed); a bad one is a ConfigError (exit 2).
    Without `registry`: the registry commands' default ($DEEPSHIP_REGISTRY, else ./registry)."""
    from deepship.registry import default_registry_uri, parse_ref

    if not text.startswith(PREFIX):
        raise ConfigError(f"--model {text}: expected registry:NAME@ALIAS, e.g. registry:topics@production "
                          "(for a package folder use --package)")
    ref = parse_ref(text)
    return RegistryModel(str(registry or default_registry_uri()), ref.name, ref.alias, ref.version, host, port)


def lineage_summary(info: VersionInfo) -> dict[str, Any]:
    """The few lineage facts an operator needs at a glance; the registry holds the rest."""
    lineage = info.lineage or {}
    return {"data_fingerprint": lineage.get("data_fingerprint"), "run_dir": lineage.get("run_dir"),
            "package_sha256": info.sha256, "registered_at": info.created}


def resolve_model(registry: Registry, model: RegistryModel, version: int | None = None) -> tuple[Path, RegistryOrigin]:
    """The verified package folder of `version` (default: what `model` names now) and its origin."""
    ref = f"{model.name}:{version}" if version is not None else model.ref
    info = registry.resolve(ref)
    return Path(info.path), RegistryOrigin(info.name, info.version, model.alias, lineage_summary(info))


class AliasDeployment:
    """Serves `model` from its registry: resolves it at startup and, for an alias, follows its moves."""

    def __init__(self, model: RegistryModel, state: Any) -> None:
        self.model, self.state = model, state  # a ServingState (state.py refers to this module: not imported here)
        self.registry: Registry | None = None  # opened at start, off the event loop
        self.seen: int | None = None  # the alias target last acted on
        self.refused: dict[str, Any] | None = None  # {"version", "reason"} while the alias points at a broken one
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        """Open the registry, load what the reference names now, and log the deploy."""
        from deepship.registry import open_registry

        started = time.perf_counter()
        self.registry = await run_in_threadpool(open_registry, self.model.registry)
        path, origin = await run_in_threadpool(resolve_model, self.registry, self.model)
        self.seen = origin.version
        self.state.package_dir = path
        await self.state.start(origin)
        await self.log_event("deploy", origin.version, load_seconds=round(time.perf_counter() - started, 3))
        if self.model.alias:
            self._task = asyncio.create_task(self.watch(), name="deepship-alias-watch")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass

    async def watch(self) -> None:
        last_problem = None
        while True:
            await asyncio.sleep(self.state.settings.watch_interval_s)
            try:
                await self.check()
                last_problem = None
            except (DeepshipError, OSError) as exc:  # e.g. the registry unmounted: say so once, keep polling
                if str(exc) != last_problem:
                    logger.warning("registry: cannot read alias %s (%s); still serving %s, polling on",
                                   self.model.ref, exc, self.serving())
                last_problem = str(exc)
            except Exception:  # noqa: BLE001 - a bug here must not end the watch (or the server)
                logger.exception("registry watch of %s failed; polling on", self.model.ref)

    async def check(self) -> None:
        """One poll: if the alias moved since the last poll, deploy its new target (once)."""
        target = await run_in_threadpool(self.registry.alias_target, self.model.name, self.model.alias)
        if target == self.seen:
            return
        self.seen, self.refused = target, None
        if target is None:
            logger.warning("registry: alias %s was removed; still serving %s", self.model.ref, self.serving())
            return
        await self.deploy(target)

    async def deploy(self, version: int) -> None:
        before, started = self.served_version(), time.perf_counter()
        try:
            previous = self.state.previous
            if previous is not None and previous.origin is not None and previous.origin.version == version:
                await self.state.rollback()  # still loaded and warm: swap back without a load
            else:
                path, origin = await run_in_threadpool(resolve_model, self.registry, self.model, version)
                await self.state.reload(path, origin)
        except (DeepshipError, ApiError) as exc:
            reason = exc.message if isinstance(exc, ApiError) else str(exc)
            self.refused = {"version": version, "reason": reason}
            logger.warning("registry: %s moved to version %d, which failed to load (%s); still serving %s",
                           self.model.ref, version, reason, self.serving())
            await self.log_event("deploy_failed", version, reason=reason)
            return
        logger.warning("registry: %s moved to version %d: now serving %s, previous %s:%s", self.model.ref, version,
                       self.serving(), self.model.name, before)
        # load_seconds: verify + load + warm-up (0 for a rollback); the rest of a move's delay is the poll's wait
        await self.log_event("deploy", version, load_seconds=round(time.perf_counter() - started, 3), **{"from": before})

    def serving(self) -> str:
        """The served model for a log line: `name:N (package version)`, or the package version alone."""
        current = self.state.current
        if current is None:
            return "nothing"
        return f"{current.origin.tag} ({current.version})" if current.origin else current.version

    def served_version(self) -> int | None:
        current = self.state.current
        return current.origin.version if current is not None and current.origin is not None else None

    async def log_event(self, event: str, version: int, **extra: Any) -> None:
        """An event in the registry's log; a registry that refuses the write must not stop serving."""
        record = {"event": event, "version": version, "alias": self.model.alias, "host": self.model.host,
                  "port": self.model.port, "pid": os.getpid(), **extra}
        try:
            await run_in_threadpool(self.registry.log_event, self.model.name, record)
        except (DeepshipError, OSError) as exc:
            logger.warning("registry: could not log the %s event of %s: %s", event, self.model.ref, exc)

    def describe(self) -> dict[str, Any]:
        """For /v1/model: what the alias points at now and, when it is not what is served, why."""
        return {"ref": self.model.ref, "alias_target": self.seen if self.model.alias else None, "refused": self.refused}
