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
