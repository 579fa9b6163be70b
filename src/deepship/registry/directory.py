"""The directory registry: plain files any host can share (NFS, a synced bucket mount), no server.

    <registry>/models/<name>/
      model.json       {"name", "tags", "next_version", "created"}: a number, once handed out, is never reused
      versions/<n>/    read-only verified copy of a package + version.json (lineage: who, when, from what)
      aliases.json     {"production": 3, "challenger": 4}, replaced atomically
      events.jsonl     append-only, one JSON object per line, each with seq, ts, actor
      .lock            fcntl.flock writer lock; holds "pid user@host ts" of the current holder
      .staging/        copies being verified; renamed into versions/ only once every hash matched

Readers take no lock: every file they read is replaced atomically (JSON) or only appended to (events).
Writers (register, alias moves, events) hold the model's lock, so numbers and seq never collide.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from deepship.errors import ConfigError, PackageError
from deepship.files import fsync_dir, write_json
from deepship.registry.base import (
    DEFAULT_LOCK_TIMEOUT_S,
    Registry,
    RegistryBusy,
    VersionInfo,
    check_name,
    default_actor,
    utc_now,
)
from deepship.runtime.package import MANIFEST, MANIFEST_HASH_KEY, manifest_digest, read_manifest, verify_files

VERSION_FILE = "version.json"
LOCK_POLL_S = 0.05


class DirectoryRegistry(Registry):
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.uri = str(self.root)
        self._held = threading.local()  # names whose lock this thread holds: the lock is re-entrant

    # ----------------------------------------------------------------------------- paths
    def model_dir(self, name: str) -> Path:
        return self.root / "models" / check_name(name)

    def existing_model_dir(self, name: str) -> Path:
        folder = self.model_dir(name)
        if not (folder / "model.json").is_file():
            known = self.models()
            raise ConfigError(f"unknown model '{name}' in registry {self.uri} (models: {known or 'none'}); "
                              "register a package with `deepship registry register PKG --name NAME`")
        return folder

    # ------------------------------------------------------------------------------ lock
    @contextmanager
    def lock(self, name: str, timeout: float = DEFAULT_LOCK_TIMEOUT_S) -> Iterator[None]:
        held: set[str] = self._held.__dict__.setdefault("names", set())
        if name in held:
            yield
            return
        folder = self.model_dir(name)
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(folder / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            acquire(fd, folder / ".lock", timeout)
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()} {default_actor()} {utc_now()}\n".encode(), 0)
            held.add(name)
            try:
                yield
            finally:
                held.discard(name)
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    # ------------------------------------------------------------------------------ reads
    def models(self) -> list[str]:
        folder = self.root / "models"
        if not folder.is_dir():
            return []
        return sorted(p.name for p in folder.iterdir() if (p / "model.json").is_file())

    def model_record(self, name: str) -> dict[str, Any]:
        return read_json(self.existing_model_dir(name) / "model.json")

    def aliases(self, name: str) -> dict[str, int]:
        path = self.existing_model_dir(name) / "aliases.json"
        return read_json(path) if path.is_file() else {}

    def events(self, name: str) -> list[dict[str, Any]]:
        path = self.existing_model_dir(name) / "events.jsonl"
        if not path.is_file():
            return []
        lines = path.read_text(encoding="utf-8").split("\n")
        # the last element is "" after a complete final line; anything else there is a torn append
        # (a writer killed mid-line), which the next writer truncates away: not an event
        out = []
        for number, line in enumerate(lines[:-1], 1):
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                raise PackageError(f"{path}: line {number} is not JSON; the event log was edited or corrupted") from None
        return out

    def versions(self, name: str) -> list[VersionInfo]:
        folder = self.existing_model_dir(name) / "versions"
        numbers = sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit()) if folder.is_dir() else []
        return [self.version_info(name, n, verify=False) for n in numbers]

    def version_info(self, name: str, version: int, verify: bool = True) -> VersionInfo:
        folder = self.existing_model_dir(name) / "versions" / str(version)
        record_path = folder / VERSION_FILE
        if not record_path.is_file():
            numbers = [p.name for p in sorted(folder.parent.glob("[0-9]*"), key=lambda p: int(p.name))]
            raise ConfigError(f"{name}:{version}: no such version in registry {self.uri} (versions: "
                              f"{', '.join(numbers) or 'none'})")
        record = read_json(record_path)
        if verify:
            verify_version(folder, record)
        aliases = sorted(a for a, v in self.aliases(name).items() if v == version)
        return VersionInfo(name=name, version=version, path=folder, sha256=record["sha256"],
                           lineage=record.get("lineage", {}), created=record.get("created", ""), aliases=aliases)

    def promotion_dir(self, name: str) -> Path:
        """models/<name>/promotions/<UTC time to the microsecond>/: the reports a promotion decided on."""
        stamp = utc_now().replace("-", "").replace(":", "")[:22]
        folder = self.existing_model_dir(name) / "promotions" / stamp
        folder.mkdir(parents=True)
        return folder

    # ----------------------------------------------------------------------------- writes
    def register(self, package_dir: str | Path, name: str, alias: str | None = None,
                 lineage: dict[str, Any] | None = None, actor: str | None = None) -> VersionInfo:
        source = Path(package_dir)
        manifest = read_manifest(source)  # format version and the manifest's own hash: fail before a number is taken
        verify_files(source, manifest)
        if VERSION_FILE in (manifest.get("files") or {}):
            raise PackageError(f"{source}: holds a file named {VERSION_FILE}, which the registry keeps beside "
                               "each version; rename it and re-export")
        if alias is not None:
            self.check_alias(alias)
        actor = actor or default_actor()
        with self.lock(name):
            folder = self.ensure_model(name)
            version = self.take_version_number(folder)
            staging = folder / ".staging" / f"{version}.{os.getpid()}"
            try:
                copy_package(source, staging, manifest)
                record = version_record(name, version, source, manifest, lineage or {}, actor)
                write_json(staging / VERSION_FILE, record)
                make_read_only(staging)
                final = folder / "versions" / str(version)
                os.rename(staging, final)  # moving a folder needs it writable (its ".." entry changes)
                final.chmod(0o555)
                fsync_dir(folder / "versions")
            finally:
                if staging.exists():
                    shutil.rmtree(staging, onerror=unlock_and_retry)
            self.log_registered(name, version, record["sha256"], manifest, source, alias, actor)
        return self.version_info(name, version, verify=False)

    def log_registered(self, name: str, version: int, sha256: str, manifest: dict[str, Any], source: Path,
                       alias: str | None, actor: str) -> None:
        """A register's last step, under the lock: its event, then the alias it asked for."""
        self.log_event(name, {"event": "register", "version": version, "sha256": sha256,
                              "model_version": manifest.get("model_version"), "source": str(Path(source).resolve())},
                       actor=actor)
        if alias is not None:
            self.set_alias(name, alias, version, actor=actor)

    def ensure_model(self, name: str) -> Path:
        """The model's folder, with model.json created on first register (caller holds the lock)."""
        folder = self.model_dir(name)
        if not (folder / "model.json").is_file():
            write_json(folder / "model.json", {"name": name, "tags": {}, "next_version": 1, "created": utc_now()})
        (folder / "versions").mkdir(exist_ok=True)
        staging = folder / ".staging"
        if staging.is_dir():  # leftovers of a register that was killed: only a lock holder stages
            shutil.rmtree(staging, onerror=unlock_and_retry)
        staging.mkdir()
        return folder

    def take_version_number(self, folder: Path) -> int:
        """The next number, recorded as taken before anything is copied: a failed register burns it."""
        record = read_json(folder / "model.json")
        existing = [int(p.name) for p in (folder / "versions").iterdir() if p.name.isdigit()]
        version = max([int(record.get("next_version", 1)), *(n + 1 for n in existing)])
        write_json(folder / "model.json", {**record, "next_version": version + 1})
        return version

    def set_alias(self, name: str, alias: str, version: int, *, event: str = "alias", reason: str | None = None,
                  forced: bool = False, details: dict[str, Any] | None = None, actor: str | None = None) -> None:
        self.check_alias(alias)
        self.existing_model_dir(name)  # an unknown model: ConfigError before a lock folder is made for it
        with self.lock(name):
            self.version_info(name, version, verify=False)  # unknown version: ConfigError, nothing moves
            aliases = self.aliases(name)
            previous = aliases.get(alias)
            if previous == version:
                return
            self.store_alias(name, alias, version)
            entry = {"event": event, "alias": alias, "from": previous, "to": version, **(details or {})}
            if reason is not None:
                entry["reason"] = reason
            if forced:
                entry["forced"] = True
            self.log_event(name, entry, actor=actor)

    def store_alias(self, name: str, alias: str, version: int) -> None:
        """The one write of an alias move (caller holds the lock); a backend with its own alias store overrides it."""
        write_json(self.model_dir(name) / "aliases.json", {**self.aliases(name), alias: version})

    def log_event(self, name: str, event: dict[str, Any], actor: str | None = None) -> dict[str, Any]:
        if "event" not in event:
            raise ConfigError(f"event {event!r}: needs an 'event' key naming its kind (e.g. deploy)")
        self.existing_model_dir(name)
        with self.lock(name):
            path = self.existing_model_dir(name) / "events.jsonl"
            past = self.events(name)
            stored = {**event, "seq": (past[-1]["seq"] + 1) if past else 1, "ts": utc_now(),
                      "actor": actor or event.get("actor") or default_actor()}
            append_line(path, json.dumps(stored, sort_keys=False))
        return stored


# ---------------------------------------------------------------------------------- helpers
def acquire(fd: int, path: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() >= deadline:
                holder = os.pread(fd, 200, 0).decode(errors="replace").split()
                who = f"pid {holder[0]} ({holder[1]}, since {holder[2]})" if len(holder) >= 3 else "another process"
                raise RegistryBusy(f"{path}: held by {who} for more than {timeout:g} s; wait for it to finish "
                                   "and rerun (or stop that process if it hangs)") from None
            time.sleep(LOCK_POLL_S)


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise PackageError(f"{path}: not valid JSON ({exc}); the registry file was edited or corrupted") from None


def append_line(path: Path, line: str) -> None:
    """Append one line durably; a torn last line left by a killed writer is cut off first."""
    with open(path, "a+b") as f:
        size = f.seek(0, os.SEEK_END)
        if size:
            f.seek(max(0, size - 65536))
            tail = f.read()
            if not tail.endswith(b"\n"):
                cut = tail.rfind(b"\n")
                f.truncate(size - len(tail) + cut + 1 if cut >= 0 else 0)
        f.write(line.encode("utf-8") + b"\n")
        f.flush()
        os.fsync(f.fileno())


def copy_package(source: Path, staging: Path, manifest: dict[str, Any]) -> None:
    """Copy exactly the files the manifest lists (plus package.json), then verify the copy."""
    for rel in [MANIFEST, *sorted(manifest.get("files") or {})]:
        target = staging / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source / rel, target)
    copied = read_manifest(staging)
    if copied.get(MANIFEST_HASH_KEY) != manifest.get(MANIFEST_HASH_KEY):
        raise PackageError(f"{source / MANIFEST}: changed while it was being registered; register it again")
    verify_files(staging, copied)


def version_record(name: str, version: int, source: Path, manifest: dict[str, Any], extra: dict[str, Any],
                   actor: str) -> dict[str, Any]:
    """version.json: what this version is (its manifest digest) and where it came from."""
    config = manifest.get("config")
    config_hash = None if config is None else hashlib.sha256(
        json.dumps(config, sort_keys=True, separators=(",", ":")).encode("utf-8")).hexdigest()
    lineage = {
        "package": str(source.resolve()),
        "model_version": manifest.get("model_version"),
        "run_dir": (manifest.get("run") or {}).get("dir"),
        "run_name": (manifest.get("run") or {}).get("name"),
        "data_fingerprint": (manifest.get("training_data") or {}).get("fingerprint"),
        "config_sha256": config_hash,
        "registered_by": actor,
        **extra,
    }
    return {"name": name, "version": version, "sha256": manifest.get(MANIFEST_HASH_KEY) or manifest_digest(manifest),
            "format_version": manifest.get("format_version"), "created": utc_now(), "lineage": lineage}


def verify_version(folder: Path, record: dict[str, Any]) -> None:
    """A stored version loads only as registered: its manifest's digest, every file's sha256, no extra files."""
    manifest = read_manifest(folder)
    if manifest_digest(manifest) != record.get("sha256"):
        raise PackageError(f"{folder / MANIFEST}: differs from the manifest registered as this version (digest "
                           f"{record.get('sha256', '?')[:12]}...); the stored package was modified, register it anew")
    verify_files(folder, manifest)
    allowed = {MANIFEST, VERSION_FILE, *(manifest.get("files") or {})}
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path.relative_to(folder).as_posix() not in allowed:
            raise PackageError(f"{path}: not part of the registered package; the version folder was modified")


def make_read_only(folder: Path) -> None:
    """Files 0444, folders below `folder` 0555 (`folder` itself once renamed into place): a stored version is
    not edited by accident (root and chmod still can, which the hashes catch on every load)."""
    for path in sorted(folder.rglob("*"), key=lambda p: len(p.parts), reverse=True):
        path.chmod(0o555 if path.is_dir() else 0o444)


def unlock_and_retry(func: Any, path: str, _exc: Any) -> None:
    """rmtree's error hook: a read-only staging folder (killed after make_read_only) is made writable first."""
    os.chmod(os.path.dirname(path), 0o755)
    func(path)
