"""Benchmarks: one JSON line per measurement, then a short table. Each figure comes with a baseline
measured in the same process, because shared machines are noisy and only ratios travel."""

from __future__ import annotations

import csv
import json
import random
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from deepship.config import Config


def timed(fn: Callable[[], Any], repeats: int = 3) -> tuple[float, Any]:
    """Best wall time of `repeats` calls (the least disturbed one) and the last result."""
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def write_synthetic_text(path: Path, rows: int, seed: int = 0) -> Path:
    """Review-like rows with a few duplicates, empties and conflicts, so every check has work to do."""
    rng = random.Random(seed)
    words = [f"w{i}" for i in range(5000)]
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        for i in range(rows):
            text = " ".join(rng.choices(words, k=rng.randint(5, 40)))
            if i % 1000 == 1:
                text = ""  # quarantined
            writer.writerow([text, rng.choice(["pos", "neg", "neutral"])])
    return path


def bench_data(rows: int = 100_000) -> list[dict[str, Any]]:
    """Validation of `rows` text rows vs merely reading them (the baseline)."""
    from deepship.data.sources import read_split
    from deepship.data.split import load_validated

    with tempfile.TemporaryDirectory() as tmp:
        path = write_synthetic_text(Path(tmp) / "rows.csv", rows)
        cfg = Config.model_validate({"task": "text_classification",
                                     "data": {"train": str(path), "max_bad_fraction": 0.05}})
        read_s, _ = timed(lambda: read_split(cfg.data.train, cfg.task, cfg.data))
        total_s, (_, report) = timed(lambda: load_validated(cfg))
    return [{"kind": "data_validation", "rows": rows, "read_s": round(read_s, 3), "read_and_validate_s": round(total_s, 3),
             "rows_per_s": round(rows / total_s), "validate_over_read": round(total_s / read_s, 2),
             "quarantined": report["totals"]["quarantined"]}]


BENCHES: dict[str, Callable[..., list[dict[str, Any]]]] = {"data": bench_data}


def print_results(results: list[dict[str, Any]]) -> None:
    for row in results:
        print(json.dumps(row))
    for row in results:
        print("  ".join(f"{k}={v}" for k, v in row.items()))
