"""Latency of a package on this host, end to end (preprocessing + onnxruntime + decision rule):
what a caller of `Predictor.predict` waits. Warm-up calls are run and discarded first."""

from __future__ import annotations

import os
import platform
import time
from typing import Any, Sequence

import numpy as np

from deepship.runtime.predictor import Predictor


def percentiles_ms(seconds: Sequence[float]) -> dict[str, float]:
    ms = np.asarray(seconds) * 1000
    return {f"p{q}": round(float(np.percentile(ms, q)), 3) for q in (50, 95, 99)}


def time_batches(predictor: Predictor, inputs: Sequence[Any], batch_size: int, runs: int, warmup: int) -> list[float]:
    """Wall time of `runs` predict calls on consecutive batches cycling through `inputs`."""
    times = []
    for i in range(warmup + runs):
        start = (i * batch_size) % len(inputs)
        batch = [inputs[(start + j) % len(inputs)] for j in range(batch_size)]
        t0 = time.perf_counter()
        predictor.predict(batch)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return times


def measure_latency(predictor: Predictor, inputs: Sequence[Any], batch_sizes: Sequence[int] = (1, 32),
                    runs: int = 100, warmup: int = 5) -> dict[str, Any]:
    """p50/p95/p99 per batch size; larger batches get proportionally fewer runs (at least 10)."""
    out: dict[str, Any] = {"host": f"{platform.machine()} {os.cpu_count()} cores", "warmup_runs": warmup,
                           "includes": "preprocessing + onnxruntime + decision rule"}
    for size in batch_sizes:
        n = max(10, runs // size) if size > 1 else runs
        out[f"batch_{size}"] = {"runs": n, **percentiles_ms(time_batches(predictor, inputs, size, n, warmup))}
    return out
