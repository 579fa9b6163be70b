"""The prediction log: one JSON object per prediction, written off the request path, rotated by size.

Requests hand finished records to `PredictionLog.write` (a non-blocking queue put); one background
thread serializes and appends them. When the queue is full the records are dropped and counted
rather than slowing requests down: the log feeds monitoring, it must never take serving down.

Record (the prediction format `deepship predict` writes, so `deepship monitor` reads both, plus serving fields):
`{"id", "label", "confidence", "probs", "abstained", "model_version", "latency_ms", "ts",
  "request_id", "input_stats": {...}, "input"?: raw text or base64 image, only with log_inputs}`.
"""

from __future__ import annotations

import json
import os
import queue
import threading
from pathlib import Path
from typing import Any, Callable, TextIO

Record = dict[str, Any]
_STOP = object()  # queue sentinel: flush and exit


class PredictionLog:
    """Append JSON lines to `path`; beyond `max_bytes` it becomes `path.1` (`path.1` -> `path.2`, ...)."""

    def __init__(self, path: str | Path, max_bytes: int = 50 * 1024 * 1024, backups: int = 5,
                 queue_size: int = 10_000, on_drop: Callable[[int], None] | None = None) -> None:
        self.path, self.max_bytes, self.backups = Path(path), max_bytes, backups
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.dropped = 0
        self.on_drop = on_drop or (lambda n: None)
        self._queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self._file: TextIO = open(self.path, "a", encoding="utf-8")
        self._thread = threading.Thread(target=self._drain, name="deepship-predlog", daemon=True)
        self._thread.start()

    def write(self, records: list[Record]) -> None:
        """Queue one request's records; never blocks the caller."""
        try:
            self._queue.put_nowait(records)
        except queue.Full:
            self.dropped += len(records)
            self.on_drop(len(records))

    def close(self) -> None:
        """Write everything queued so far, then stop the writer thread."""
        if self._thread.is_alive():
            self._queue.put(_STOP)
            self._thread.join()
        self._file.close()

    # ------------------------------------------------------------------------------ internals
    def _drain(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                self._file.flush()
                return
            try:
                self._append(item)
            except OSError:  # disk full, file removed under us: count the loss, keep serving
                self.dropped += len(item)
                self.on_drop(len(item))
                continue
            if self._queue.empty():
                self._file.flush()  # idle: make what we have visible to readers (tail -f, the monitor)

    def _append(self, records: list[Record]) -> None:
        text = "".join(json.dumps(r, separators=(",", ":"), default=str) + "\n" for r in records)
        self._file.write(text)
        if self._file.tell() >= self.max_bytes:
            self._rotate()

    def _rotate(self) -> None:
        self._file.close()
        if self.backups == 0:
            self.path.unlink(missing_ok=True)  # no backups wanted: start over
        else:
            for index in range(self.backups - 1, 0, -1):
                older = self.path.with_name(f"{self.path.name}.{index}")
                if older.exists():
                    os.replace(older, self.path.with_name(f"{self.path.name}.{index + 1}"))
            os.replace(self.path, self.path.with_name(f"{self.path.name}.1"))
        self._file = open(self.path, "a", encoding="utf-8")


def log_path_for_worker(path: str | Path, workers: int) -> Path:
    """Several worker processes must not rotate one file under each other: each gets `<stem>.<pid><suffix>`."""
    path = Path(path)
    if workers <= 1:
        return path
    return path.with_name(f"{path.stem}.{os.getpid()}{path.suffix}")
