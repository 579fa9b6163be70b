"""Errors that the CLI turns into one clear line on stderr and a documented exit code."""

from __future__ import annotations


class DeepshipError(Exception):
    """Base class: a problem the user can fix; never shown with a traceback."""

    exit_code: int = 1


class ConfigError(DeepshipError):
    """Bad usage or a bad config key/value (exit 2)."""

    exit_code = 2


class DataError(DeepshipError):
    """Bad input data: missing file, unknown label, unreadable row (exit 2)."""

    exit_code = 2


class PackageError(DeepshipError):
    """A model package that cannot be trusted or read: missing file, hash mismatch, unknown format (exit 2)."""

    exit_code = 2


class ExportError(DeepshipError):
    """Export failed its parity gate or accuracy budget; no package was written (exit 1)."""

    exit_code = 1


class TrainingError(DeepshipError):
    """Training cannot go on: a non-finite loss, or weights that must not be checkpointed (exit 1)."""

    exit_code = 1


class Preempted(DeepshipError):
    """SIGTERM (a scheduler's preemption notice): last.ckpt was written, resume continues (exit 143 = 128 + 15)."""

    exit_code = 143


def first_line(exc: BaseException, limit: int = 200) -> str:
    """An exception as one short line: libraries (onnxruntime, torch) raise multi-line messages."""
    text = str(exc).strip()
    return (text.splitlines()[0][:limit] if text else "") or type(exc).__name__
