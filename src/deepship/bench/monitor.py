"""`bench monitor`: wall time of `monitor` on a synthetic prediction log of a million lines."""

from __future__ import annotations

import json
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any


def write_synthetic_log(package_dir: Path, path: Path, rows: int, seed: int = 0) -> None:
    """`rows` prediction-log lines drawn from the package's own reference profile (no alert expected),
    one timestamp per second, in the record format serve writes."""
    import numpy as np

    from deepship.runtime.package import read_manifest

    manifest = read_manifest(package_dir)
    signals, labels = manifest["reference"]["signals"], manifest["labels"]
    rng = np.random.default_rng(seed)
    counts = np.array([signals["predicted_class"]["counts"][c] for c in labels], dtype=float)
    preds = rng.choice(len(labels), size=rows, p=counts / counts.sum())
    numeric = {k: rng.choice(v["sample"], size=rows) for k, v in signals.items() if v["kind"] == "numeric"}
    start = 1_790_000_000
    with open(path, "w", encoding="utf-8") as f:
        for i in range(rows):
            stats = {k: float(v[i]) for k, v in numeric.items() if k != "confidence"}
            f.write(json.dumps({"id": str(i), "label": labels[preds[i]], "confidence": float(numeric["confidence"][i]),
                                "abstained": False, "model_version": manifest["model_version"], "latency_ms": 5.0,
                                "ts": datetime.fromtimestamp(start + i, timezone.utc).isoformat(),
                                "probs": {}, "input_stats": stats}) + "\n")


def bench_monitor(package: str, rows: int = 1_000_000, window: int = 10_000,
                  out_dir: str = "checkpoints/bench-monitor") -> list[dict[str, Any]]:
    """Wall time of `monitor` on a prediction log of `rows` lines (read, windowed, tested, reported)."""
    from deepship.config import MonitorConfig
    from deepship.monitoring.monitor import run_monitor

    work = Path(out_dir)
    work.mkdir(parents=True, exist_ok=True)
    log = work / "predictions.jsonl"
    t0 = time.perf_counter()
    write_synthetic_log(Path(package), log, rows)
    written = time.perf_counter() - t0
    t0 = time.perf_counter()
    report = run_monitor(package, str(log), work / "report", MonitorConfig(window=window))
    seconds = time.perf_counter() - t0
    return [{"kind": "monitor", "rows": rows, "log_bytes": log.stat().st_size, "window": window,
             "windows": report["summary"]["windows"], "alerting_windows": report["summary"]["alerting_windows"],
             "monitor_seconds": round(seconds, 2), "rows_per_second": round(rows / seconds),
             "log_write_seconds": round(written, 2)}]
