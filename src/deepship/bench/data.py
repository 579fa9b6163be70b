"""`bench data`: validating text rows vs merely reading them."""

from __future__ import annotations

import csv
import random
import tempfile
from pathlib import Path
from typing import Any

from deepship.bench.common import ratio, timed
from deepship.config import Config


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
             "rows_per_s": round(rows / total_s), "validate_over_read": ratio(total_s, read_s, 2),
             "quarantined": report["totals"]["quarantined"]}]
