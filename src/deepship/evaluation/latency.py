"""Latency on this host. `time_calls` is the one timing loop (warm-up calls run and discarded first); the
benchmarks, `evaluate` and the export's int8 report all time with it. Torch-free: `evaluate` runs on serving hosts."""

from __future__ import annotations

import os
import platform
import statistics
import time
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from deepship.runtime.predictor import Predictor

WARMUP = 5  # untimed calls first: lazy allocations, thread-pool start-up, caches another call cooled


def time_calls(call: Callable[[], Any], runs: int, warmup: int = WARMUP) -> list[float]:
    """Seconds of each of `runs` calls of `call`, after `warmup` untimed ones."""
    for _ in range(warmup):
        call()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return times


def time_in_turns(calls: Mapping[str, Callable[[], Any]], runs: int, blocks: int = 4,
                  warmup: int = WARMUP) -> dict[str, list[float]]:
    """`runs` timings per call, the calls taking turns in `blocks` blocks (each warmed up again) rather than run
    by run: onnxruntime's idle threads spin for a moment after each run and would steal the cores from the other
    call's next run, while noise that lasts longer than a block still hits every call alike."""
    times: dict[str, list[float]] = {name: [] for name in calls}
    per_block = -(-runs // blocks)  # ceil: at least `runs` in all
    for _ in range(blocks):
        for name, call in calls.items():
            times[name] += time_calls(call, per_block, warmup)
    return times


def median_ms(seconds: Sequence[float]) -> float:
    return statistics.median(seconds) * 1000


def percentiles_ms(seconds: Sequence[float]) -> dict[str, float | None]:
    """p50/p95/p99 in ms (linear interpolation); None each when nothing was timed."""
    ms = np.asarray(seconds, dtype=float) * 1000
    return {f"p{q}": round(float(np.percentile(ms, q)), 3) if ms.size else None for q in (50, 95, 99)}


def time_batches(predictor: Predictor, inputs: Sequence[Any], batch_size: int, runs: int, warmup: int) -> list[float]:
    """Wall time of `runs` predict calls on consecutive batches cycling through `inputs`."""
    batches = iter([[inputs[(i * batch_size + j) % len(inputs)] for j in range(batch_size)]
                    for i in range(warmup + runs)])
    return time_calls(lambda: predictor.predict(next(batches)), runs, warmup)


def measure_latency(predictor: Predictor, inputs: Sequence[Any], batch_sizes: Sequence[int] = (1, 32),
                    runs: int = 100, warmup: int = WARMUP) -> dict[str, Any]:
    """p50/p95/p99 per batch size, end to end (preprocessing + onnxruntime + decision rule: what a caller of
    `Predictor.predict` waits); larger batches get proportionally fewer runs (at least 10)."""
    out: dict[str, Any] = {"host": f"{platform.machine()} {os.cpu_count()} cores", "warmup_runs": warmup,
                           "includes": "preprocessing + onnxruntime + decision rule"}
    for size in batch_sizes:
        n = max(10, runs // size) if size > 1 else runs
        out[f"batch_{size}"] = {"runs": n, **percentiles_ms(time_batches(predictor, inputs, size, n, warmup))}
    return out
