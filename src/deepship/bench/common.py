"""What every benchmark shares: the best-of-n timer, the output format, the rt-polarity reader."""

from __future__ import annotations

import csv
import json
import random
import time
from pathlib import Path
from typing import Any, Callable

from deepship.errors import ConfigError

RT_POLARITY_FILES = ("rt-polarity.pos", "rt-polarity.neg")


def timed(fn: Callable[[], Any], repeats: int = 3) -> tuple[float, Any]:
    """Best wall time of `repeats` calls (the least disturbed one) and the last result."""
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def print_results(results: list[dict[str, Any]]) -> None:
    """One JSON line per measurement (what scripts collect), then the same rows as a readable table."""
    for row in results:
        print(json.dumps(row))
    for row in results:
        print("  ".join(f"{k}={v}" for k, v in row.items()))


def ratio(value: float | None, base: float | None, digits: int = 3) -> float | None:
    """value / base rounded; None when either is missing or the base is zero (no figure rather than a wrong one)."""
    if not value or not base:
        return None
    return round(value / base, digits)


def require_rt_polarity(data_dir: str | Path | None, bench: str) -> Path:
    """The rt-polarity folder given with --data, checked before any work starts."""
    if data_dir is None:
        raise ConfigError(f"bench {bench}: --data DIR is required: the rt-polarity folder ({', '.join(RT_POLARITY_FILES)})")
    folder = Path(data_dir)
    missing = [name for name in RT_POLARITY_FILES if not (folder / name).is_file()]
    if missing:
        raise ConfigError(f"--data {folder}: {', '.join(missing)} missing; give the rt-polarity folder "
                          f"({', '.join(RT_POLARITY_FILES)}, one sentence per line)")
    return folder


def rt_polarity_rows(data_dir: str | Path, seed: int = 0) -> list[tuple[str, str]]:
    """(text, label) for every rt-polarity sentence (latin-1 files), shuffled with `seed`."""
    folder = Path(data_dir)
    rows = [(line.strip(), label) for label, name in zip(("positive", "negative"), RT_POLARITY_FILES)
            for line in (folder / name).read_text(encoding="latin-1").splitlines() if line.strip()]
    random.Random(seed).shuffle(rows)
    return rows


def write_csv_splits(rows: list[tuple[str, str]], out_dir: Path, sizes: dict[str, int]) -> list[Path]:
    """Consecutive, disjoint slices of `rows` as out_dir/<name>.csv (text,label)."""
    paths, start = [], 0
    for name, n in sizes.items():
        paths.append(out_dir / f"{name}.csv")
        with open(paths[-1], "w", newline="", encoding="utf-8") as f:
            csv.writer(f).writerows([("text", "label"), *rows[start : start + n]])
        start += n
    return paths
