"""A sweep's leaderboard: every trial ranked, whatever its fate, as leaderboard.csv, .json, .md and .html.

Ranking: complete trials by their objective (higher is better), then pruned trials by the last value they
reported, then running, failed and over-budget trials; ties go to the earlier trial.
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from deepship.files import atomic_write_text, finite
# pareto_front is part of this module's API; it lives beside the plot that draws it
from deepship.selection.leaderboard_html import backbone_of, pareto_front, render_leaderboard_html  # noqa: F401
from deepship.selection.records import TrialRecord

if TYPE_CHECKING:
    import optuna

STATE_ORDER = {"complete": 0, "pruned": 1, "running": 2, "failed": 3, "over_budget": 4}
CSV_FIELDS = ["rank", "trial", "state", "params", "value", "value_std", "ci_low", "ci_high", "latency_p95_ms",
              "param_count", "onnx_bytes", "train_time_s", "epochs", "backbone", "run_dir", "reason"]
COLUMNS = ["rank", "trial", "state", "parameters", "{metric} [95% interval]", "latency p95 (ms)", "parameter count (M)",
           "ONNX (MB)", "training time (s)", "epochs", "reason"]


def rank_records(records: Sequence[TrialRecord]) -> list[TrialRecord]:
    """Best first: by state group, then value (missing values last in their group), then trial number."""
    def key(r: TrialRecord) -> tuple[int, float, int]:
        value = r.value if r.value is not None and math.isfinite(r.value) else -math.inf
        return STATE_ORDER.get(r.state, len(STATE_ORDER)), -value, r.number

    return sorted(records, key=key)


# ------------------------------------------------------------------------------------ formatting
def format_params(params: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())


def format_value(r: TrialRecord) -> str:
    if r.value is None:
        return "n/a"
    text = f"{r.value:.4f}"
    if r.interval is not None:
        text += f" [{r.interval[0]:.4f}, {r.interval[1]:.4f}]"
    if r.value_std is not None:
        text += f" ± {r.value_std:.4f}"  # the spread over cross-validation folds
    return text


def _number(value: float | int | None, scale: float = 1.0, digits: int = 2) -> str:
    return "" if value is None else f"{value / scale:.{digits}f}"


def display_rows(ranked: Sequence[TrialRecord]) -> list[list[str]]:
    """One row of display strings per trial, in COLUMNS order (the .md and .html tables)."""
    return [[str(rank), str(r.number), r.state, format_params(r.params), format_value(r),
             _number(r.latency_p95_ms), _number(r.param_count, 1e6), _number(r.onnx_bytes, 2**20, 1),
             _number(r.train_time_s, digits=0), "" if r.epochs is None else str(r.epochs), r.reason or ""]
            for rank, r in enumerate(ranked, 1)]


def headers(metric: str) -> list[str]:
    return [c.format(metric=metric) for c in COLUMNS]


def describe_best(records: Sequence[TrialRecord]) -> str:
    """One line for the terminal: the best complete trial, or what became of the trials when none completed."""
    ranked = rank_records(records)
    if not ranked or ranked[0].state != "complete":
        counts = ", ".join(f"{sum(r.state == s for r in ranked)} {s}" for s in STATE_ORDER
                           if any(r.state == s for r in ranked))
        return f"no trial completed ({counts or 'no trials'})"
    best = ranked[0]
    latency = f"; latency p95 {best.latency_p95_ms:.2f} ms" if best.latency_p95_ms is not None else ""
    where = f"; run {best.run_dir}" if best.run_dir else ""
    return f"best: trial {best.number}, {format_value(best)} ({format_params(best.params) or 'defaults'}){latency}{where}"


# ---------------------------------------------------------------------------------------- files
def csv_text(ranked: Sequence[TrialRecord]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_FIELDS, lineterminator="\n")
    writer.writeheader()
    for rank, r in enumerate(ranked, 1):
        low, high = r.interval if r.interval is not None else (None, None)
        writer.writerow({"rank": rank, "trial": r.number, "state": r.state, "params": json.dumps(r.params),
                         "value": r.value, "value_std": r.value_std, "ci_low": low, "ci_high": high,
                         "latency_p95_ms": r.latency_p95_ms, "param_count": r.param_count, "onnx_bytes": r.onnx_bytes,
                         "train_time_s": r.train_time_s, "epochs": r.epochs, "backbone": backbone_of(r),
                         "run_dir": r.run_dir, "reason": r.reason})
    return buf.getvalue()


def json_text(ranked: Sequence[TrialRecord], metric: str) -> str:
    trials = [{"rank": rank, **r.to_dict(), "interval": list(r.interval) if r.interval else None}
              for rank, r in enumerate(ranked, 1)]
    return json.dumps(finite({"metric": metric, "direction": "maximize", "trials": trials}), indent=2) + "\n"


def markdown_text(ranked: Sequence[TrialRecord], metric: str) -> str:
    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    head = headers(metric)
    lines = [f"# Leaderboard ({metric}, higher is better)", "", describe_best(ranked), "", line(head),
             line(["---"] * len(head)), *(line(row) for row in display_rows(ranked))]
    return "\n".join(lines) + "\n"


def write_leaderboard(sweep_dir: Path, records: list[TrialRecord], metric: str,
                      study: "optuna.Study | None" = None) -> list[TrialRecord]:
    """Write the four leaderboard files into `sweep_dir` (each atomically) and return the ranked records."""
    ranked = rank_records(records)
    sweep_dir = Path(sweep_dir)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(sweep_dir / "leaderboard.csv", csv_text(ranked))
    atomic_write_text(sweep_dir / "leaderboard.json", json_text(ranked, metric))
    atomic_write_text(sweep_dir / "leaderboard.md", markdown_text(ranked, metric))
    atomic_write_text(sweep_dir / "leaderboard.html", render_leaderboard_html(
        ranked, metric, study, describe_best(ranked), headers(metric), display_rows(ranked)))
    return ranked
