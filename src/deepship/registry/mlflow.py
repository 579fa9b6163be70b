"""The MLflow backend: MLflow's model registry holds the versions and aliases, a local store the files.

    mlflow+sqlite:///PATH.db               MLflow's SQL registry in one SQLite file (no server)
    mlflow+http(s)://HOST:PORT?store=DIR   a running MLflow tracking server; DIR is required (see below)

What maps to what: a deepship version is an MLflow model version with the same number, whose source is
the absolute path of a verified, read-only copy of the package; its manifest digest and lineage are the
version's tags `deepship.sha256` and `deepship.lineage`; deepship aliases are MLflow aliases, one to one.
MLflow keeps no history of alias moves, so the event log (which rollback walks back) stays a JSONL file
in the store, beside the copies, with the same per-model lock file as the directory backend:

    <store>/<name>/<n>/        the package copy that MLflow version n points at
    <store>/<name>/events.jsonl, .lock, .staging/

The store defaults to `<db dir>/<db stem>-packages/` for SQLite. A server's versions point at paths, so
for http(s) the store must be a folder every host mounts at the same path (NFS, a bucket mount): it is
given in the URI, never guessed, so no host writes package copies only it can read.

The tracking and registry URIs are always passed to MLflow explicitly: left to itself MLflow would create
./mlruns or ./mlflow.db in whatever folder the command ran from.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Callable, TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit

from deepship.errors import ConfigError, DeepshipError
from deepship.files import fsync_dir
from deepship.registry.base import NAME_PATTERN, VersionInfo, check_alias, check_name, default_actor
from deepship.registry.directory import (
    DirectoryRegistry,
    copy_package,
    make_read_only,
    unlock_and_retry,
    verify_version,
    version_record,
)
from deepship.runtime.package import read_manifest, verify_files

PREFIX = "mlflow+"
SHA_TAG = "deepship.sha256"
LINEAGE_TAG = "deepship.lineage"
CREATE_ATTEMPTS = 3
INSTALL_HINT = 'pip install "deepship[mlflow]"'
T = TypeVar("T")


def parse_mlflow_uri(uri: str) -> tuple[str, Path]:
    """"mlflow+sqlite:///x.db" or "mlflow+http(s)://host?store=DIR" -> (MLflow URI, store folder).

    A relative SQLite path is made absolute here, so the registry stays the same file if the process
    changes directory later."""
    parts = urlsplit(uri.removeprefix(PREFIX))
    query = dict(parse_qsl(parts.query))
    store = query.pop("store", None)
    rest = urlencode(query)
    if parts.scheme == "sqlite":
        raw = uri.removeprefix(PREFIX).split("?", 1)[0].removeprefix("sqlite:///")
        if not raw or raw == ":memory:" or raw.startswith("sqlite:"):
            raise ConfigError(f"--registry {uri}: name a database file, e.g. mlflow+sqlite:///registry.db")
        db = Path(raw).expanduser().resolve()
        tracking = f"sqlite:///{db}" + (f"?{rest}" if rest else "")
        return tracking, Path(store).resolve() if store else db.with_name(f"{db.stem}-packages")
    if parts.scheme in ("http", "https"):
        if not store:
            raise ConfigError(f"--registry {uri}: an MLflow server needs the shared folder for package copies and "
                              f"the event log, mounted at the same path on every host: {PREFIX}{parts.scheme}://"
                              f"{parts.netloc}{parts.path}?store=/mnt/models")
        tracking = parts._replace(query=rest).geturl()
        return tracking, Path(store).resolve()
    raise ConfigError(f"--registry {uri}: unsupported MLflow URI; use {PREFIX}sqlite:///FILE.db or "
                      f"{PREFIX}http(s)://HOST:PORT?store=DIR")


def make_client(tracking: str) -> Any:
    """An MlflowClient on exactly this URI for both tracking and registry, or one line saying what to install."""
    needed = ["mlflow"] + (["sqlalchemy", "alembic"] if tracking.startswith("sqlite:") else [])
    missing = [name for name in needed if importlib.util.find_spec(name) is None]
    if missing:
        raise ConfigError(f"the MLflow registry backend needs {', '.join(missing)}: {INSTALL_HINT}")
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=tracking, registry_uri=tracking)


class MlflowRegistry(DirectoryRegistry):
    """The Registry API over MLflow's model registry.

    Inherits the directory backend's lock and event log, kept under `<store>/<name>/`; everything about
    versions and aliases is read from and written to MLflow, which stays the one source of truth for them."""

    def __init__(self, uri: str) -> None:
        tracking, store = parse_mlflow_uri(uri)
        super().__init__(store)
        self.uri = uri
        self.tracking_uri = tracking
        self.client = make_client(tracking)

    def check_alias(self, alias: str) -> str:
        """deepship's alias rule plus MLflow's reserved names, checked before anything is written."""
        check_alias(alias)
        if alias.lower() == "latest" or re.fullmatch(r"[vV]\d+", alias):
            raise ConfigError(f"alias {alias!r}: MLflow reserves 'latest' and v<number> (they name versions there); "
                              "choose another alias, e.g. production")
        return alias

    def call(self, what: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run one MLflow call; its errors become one line naming the registry (exit 2)."""
        return self.lookup(what, fn, *args, missing_ok=False, **kwargs)

    def lookup(self, what: str, fn: Callable[..., T], *args: Any, missing_ok: bool = True, **kwargs: Any) -> T | None:
        """`call`, except that a model or version MLflow does not have is None."""
        from mlflow.exceptions import MlflowException

        try:
            return fn(*args, **kwargs)
        except MlflowException as exc:
            if missing_ok and exc.error_code == "RESOURCE_DOES_NOT_EXIST":
                return None
            first = (str(exc.message).strip().splitlines() or ["(no message)"])[0]
            raise ConfigError(f"{what} in MLflow registry {self.uri}: {first}") from None

    # ----------------------------------------------------------------------------- paths
    def model_dir(self, name: str) -> Path:
        return self.root / check_name(name)

    def existing_model_dir(self, name: str) -> Path:
        self.registered_model(name)
        return self.model_dir(name)

    def registered_model(self, name: str) -> Any:
        """MLflow's record of the model (aliases included), or one line listing the models there are."""
        model = self.lookup(name, self.client.get_registered_model, check_name(name))
        if model is None:
            raise ConfigError(f"unknown model '{name}' in registry {self.uri} (models: {self.models() or 'none'}); "
                              "register a package with `deepship registry register PKG --name NAME`")
        return model

    # ------------------------------------------------------------------------------ reads
    def models(self) -> list[str]:
        """Registered models whose names deepship accepts (other tools' models may use any name)."""
        found = self.search("models", self.client.search_registered_models)
        return sorted(m.name for m in found if NAME_PATTERN.fullmatch(m.name))

    def aliases(self, name: str) -> dict[str, int]:
        aliases = self.registered_model(name).aliases or {}
        return {alias: int(version) for alias, version in aliases.items()}

    def versions(self, name: str) -> list[VersionInfo]:
        aliases = self.aliases(name)
        found = self.search(name, self.client.search_model_versions, f"name='{name}'")
        infos = [self.to_info(mv, aliases) for mv in found if SHA_TAG in (mv.tags or {})]
        return sorted(infos, key=lambda info: info.version)

    def version_info(self, name: str, version: int, verify: bool = True) -> VersionInfo:
        aliases = self.aliases(name)
        mv = self.lookup(f"{name}:{version}", self.client.get_model_version, name, str(version))
        if mv is None:
            numbers = ", ".join(str(v.version) for v in self.versions(name)) or "none"
            raise ConfigError(f"{name}:{version}: no such version in registry {self.uri} (versions: {numbers})")
        if SHA_TAG not in (mv.tags or {}):
            raise ConfigError(f"{name}:{version} in {self.uri} was not registered by deepship (no {SHA_TAG} tag); "
                              "register the package with `deepship registry register`")
        info = self.to_info(mv, aliases)
        if verify:
            verify_version(info.path, {"sha256": info.sha256})
        return info

    def to_info(self, mv: Any, aliases: dict[str, int]) -> VersionInfo:
        from datetime import datetime, timezone

        version = int(mv.version)
        created = datetime.fromtimestamp(mv.creation_timestamp / 1000, timezone.utc).isoformat()
        return VersionInfo(name=mv.name, version=version, path=Path(mv.source), sha256=mv.tags[SHA_TAG],
                           lineage=json.loads(mv.tags.get(LINEAGE_TAG) or "{}"), created=created,
                           aliases=sorted(a for a, v in aliases.items() if v == version))

    def search(self, what: str, fn: Callable[..., Any], *args: Any) -> list[Any]:
        """Every page of an MLflow search."""
        out: list[Any] = []
        token = None
        while True:
            page = self.call(what, fn, *args, page_token=token)
            out.extend(page)
            token = page.token
            if not token:
                return out

    # ----------------------------------------------------------------------------- writes
    def register(self, package_dir: str | Path, name: str, alias: str | None = None,
                 lineage: dict[str, Any] | None = None, actor: str | None = None) -> VersionInfo:
        source = Path(package_dir)
        manifest = read_manifest(source)
        verify_files(source, manifest)
        if alias is not None:
            self.check_alias(alias)
        actor = actor or default_actor()
        with self.lock(name):
            self.ensure_registered_model(name)
            expected = self.next_version(name)
            self.store_copy(source, self.model_dir(name) / str(expected), manifest)
            record = version_record(name, expected, source, manifest, lineage or {}, actor)
            version = self.create_version(name, expected, record)
            self.log_registered(name, version, record["sha256"], manifest, source, alias, actor)
        return self.version_info(name, version, verify=False)

    def ensure_registered_model(self, name: str) -> None:
        if self.lookup(name, self.client.get_registered_model, check_name(name)) is None:
            self.call(name, self.client.create_registered_model, name)
        self.model_dir(name).mkdir(parents=True, exist_ok=True)

    def next_version(self, name: str) -> int:
        """The number MLflow will give: one past both its visible versions and the copies in the store (a
        version deleted in MLflow keeps its number there, and its copy here)."""
        found = self.search(name, self.client.search_model_versions, f"name='{name}'")
        copies = [int(p.name) for p in self.model_dir(name).iterdir() if p.name.isdigit()]
        return max([0, *(int(mv.version) for mv in found), *copies]) + 1

    def store_copy(self, source: Path, final: Path, manifest: dict[str, Any]) -> None:
        """Copy and verify into .staging, then rename into place: a half copy never carries a number."""
        staging = final.parent / ".staging" / f"{final.name}.{os.getpid()}"
        if staging.parent.is_dir():  # leftovers of a register that was killed: only a lock holder stages
            shutil.rmtree(staging.parent, onerror=unlock_and_retry)
        try:
            copy_package(source, staging, manifest)
            make_read_only(staging)
            os.rename(staging, final)  # moving a folder needs it writable (its ".." entry changes)
            final.chmod(0o555)
            fsync_dir(final.parent)
        finally:
            if staging.parent.exists():
                shutil.rmtree(staging.parent, onerror=unlock_and_retry)

    def create_version(self, name: str, expected: int, record: dict[str, Any]) -> int:
        """The MLflow version whose source is the copy `<store>/<name>/<expected>`; returns its number.

        A source cannot change once created, so when MLflow hands out another number (a version deleted
        in MLflow before its copy got here, or a client writing at the same time) that version is deleted
        again and the copy renamed to the number MLflow gives next. On failure the copy goes."""
        tags = {SHA_TAG: record["sha256"], LINEAGE_TAG: json.dumps(record["lineage"], sort_keys=True)}
        copy = self.model_dir(name) / str(expected)
        try:
            for _ in range(CREATE_ATTEMPTS):
                mv = self.call(name, self.client.create_model_version, name, str(copy), run_id=None, tags=tags)
                if int(mv.version) == expected:
                    return expected
                self.call(name, self.client.delete_model_version, name, mv.version)
                expected = int(mv.version) + 1
                copy = copy.rename(copy.with_name(str(expected)))
            raise ConfigError(f"{name}: MLflow kept numbering new versions differently from the copies in {self.root}; "
                              f"another client is writing to this model in {self.uri}, register again later")
        except (DeepshipError, OSError):
            if copy.exists():
                shutil.rmtree(copy, onerror=unlock_and_retry)
            raise

    def store_alias(self, name: str, alias: str, version: int) -> None:
        """The alias move itself, in MLflow (set_alias around it checks, locks and logs the event)."""
        self.call(f"{name}@{alias}", self.client.set_registered_model_alias, name, alias, str(version))
