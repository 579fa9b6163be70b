"""Writing files so that a crash never leaves half of one: temp file in the same folder, fsync, then rename."""

from __future__ import annotations

import json
import math
import os
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Callable, Iterator

TMP_SUFFIX = ".tmp"  # temp files are ".<name>.tmp" beside their target; nothing else in a run ends so


def temp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}{TMP_SUFFIX}")


def fsync_dir(folder: Path) -> None:
    """Make a rename durable: the directory entry itself must reach the disk (no-op where unsupported)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    """`write(f)` fills a temp file in the same folder; fsync; os.replace. Readers see the old or the new file,
    never a torn one, even after a power cut or SIGKILL; a failed write leaves the target untouched."""
    path = Path(path)
    tmp = temp_path(path)
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        # name the file the user knows, not our temp file (ENOSPC, EACCES, ... stay what they were)
        raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from exc
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2) + "\n")


def remove_temp_files(folder: Path) -> list[Path]:
    """Leftovers of writes that a crash interrupted (".<name>.tmp"); never read, removed on the next run."""
    if not folder.is_dir():
        return []
    stale = [p for p in folder.glob(f".*{TMP_SUFFIX}") if p.is_file()]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def finite(value: Any) -> Any:
    """NaN/inf (an undefined loss in a history row, say) become null: JSON has no NaN."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [finite(v) for v in value]
    return value


@contextmanager
def exclusive(lock_path: Path, wait: bool = True) -> Iterator[None]:
    """One holder at a time across processes (DDP ranks, sweep workers, two runs on the same files): an flock on
    `lock_path`. With wait=False a held lock raises BlockingIOError at once instead of waiting."""
    try:
        import fcntl
    except ImportError:  # not POSIX: callers' unique temp names still keep writers from mixing
        yield
        return
    with open(lock_path, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
