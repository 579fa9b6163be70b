"""Serving options: request limits, micro-batching and the prediction log, validated once at startup.

Read from an optional YAML file (`--settings`) with `--set key=value` overrides, exactly like the
training config, so a typo (`max_batch_sise`) fails at startup instead of silently doing nothing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Sequence

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from deepship.errors import ConfigError
from deepship.yamlconf import apply_overrides, format_validation_error, read_yaml_mapping


class ServeSettings(BaseModel):
    """Everything `deepship serve` can tune besides host, port and workers."""

    model_config = ConfigDict(extra="forbid", strict=True, validate_default=True, frozen=True)

    # micro-batching: concurrent requests share one onnxruntime call
    batching: bool = Field(True, description="false: every request gets its own model call")
    max_batch_size: int = Field(32, ge=1, le=4096, description="most inputs in one model call")
    # 0 (the default): a batch leaves as soon as the model is free, with whatever queued up while it was busy:
    # no added latency when idle, full batches under load. > 0 also waits that long for more requests.
    max_wait_ms: float = Field(0.0, ge=0, le=1000, description="longest a request waits for others to join its batch")

    # request limits: each breach is a 4xx JSON error, never a 500
    max_body_bytes: int = Field(8 * 1024 * 1024, ge=1024, description="request body limit (413 beyond)")
    max_items: int = Field(64, ge=1, description="inputs (texts or images) per request")
    max_image_pixels: int = Field(4096 * 4096, ge=1, description="width * height of one image, checked before decoding")
    max_text_chars: int = Field(10_000, ge=1, description="characters of one text")
    text_overflow: Literal["truncate", "reject"] = Field(
        "truncate", description="a longer text: truncate it (the prediction says truncated: true) or reject it (413)")

    # prediction log: JSON lines written by a background thread, rotated by size
    log_path: str | None = Field(None, description="JSONL file; null: no prediction log")
    log_max_bytes: int = Field(50 * 1024 * 1024, ge=1024, description="rotate the log beyond this size")
    log_backups: int = Field(5, ge=0, description="rotated files kept (<log>.1 ... <log>.N)")
    log_inputs: bool = Field(False, description="also log the raw text / base64 image (privacy: off by default)")
    log_queue_size: int = Field(10_000, ge=1, description="records buffered for the writer; beyond, new ones are dropped")

    # lifecycle
    admin: bool = Field(False, description="enable POST /admin/reload and /admin/rollback (trusted networks only)")
    warmup: bool = Field(True, description="run one prediction before /readyz says ready")
    graceful_timeout_s: float = Field(30.0, gt=0, description="shutdown: how long in-flight requests may take")
    # serving a registry alias (--model registry:NAME@ALIAS): how often the alias is read for a new version
    watch_interval_s: float = Field(2.0, gt=0, le=3600, description="seconds between reads of the served alias")


def load_settings(path: str | Path | None = None, overrides: Sequence[str] = ()) -> ServeSettings:
    """Defaults <- YAML file <- `--set` overrides; any problem raises ConfigError (exit 2)."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        raw = read_yaml_mapping(path, "--settings", "a YAML file of serve settings (docs/serving.md)",
                                "of serve settings, e.g. max_batch_size: 32")
    raw = apply_overrides(raw, overrides)
    try:
        return ServeSettings.model_validate(raw)
    except ValidationError as exc:
        where = f"{path}: " if path is not None else "--set "
        raise ConfigError(f"{where}{format_validation_error(exc, ServeSettings)}") from None
