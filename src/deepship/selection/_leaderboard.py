"""Stand-in for the leaderboard writer until the real one lands: same names and signatures, minimal output."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

from deepship.files import atomic_write_text, write_json, finite
from deepship.selection.records import TrialRecord

STATE_ORDER = {"complete": 0, "pruned": 1, "over_budget": 2, "failed": 3, "running": 4}


def rank_records(records: list[TrialRecord]) -> list[TrialRecord]:
    return sorted(records, key=lambda r: (STATE_ORDER[r.state], -(r.value if r.value is not None else float("-inf")),
                                          r.number))


def write_leaderboard(sweep_dir: Path, records: list[TrialRecord], metric: str, study: Any = None) -> list[TrialRecord]:
    ranked = rank_records(records)
    rows = [r.to_dict() for r in ranked]
    write_json(Path(sweep_dir) / "leaderboard.json", finite({"metric": metric, "trials": rows}))
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(rows[0]) if rows else ["number"])
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(Path(sweep_dir) / "leaderboard.csv", out.getvalue())
    return ranked


def describe_best(records: list[TrialRecord]) -> str:
    done = [r for r in rank_records(records) if r.state == "complete"]
    if not done:
        return "best: no trial completed"
    best = done[0]
    return f"best: trial {best.number:03d} value {best.value:.4f} {best.params} ({best.run_dir})"
