"""The sweep leaderboard: ranking, the Pareto front, the four files and the self-contained HTML."""

from __future__ import annotations

import csv
import json
import random
import re
from pathlib import Path

import pytest

from deepship.selection.leaderboard import describe_best, pareto_front, rank_records, write_leaderboard
from deepship.selection.records import TrialRecord


def records() -> list[TrialRecord]:
    return [
        TrialRecord(0, "failed", {"train.lr": 1e-2, "model.backbone": "a"}, reason="CUDA out of memory"),
        TrialRecord(1, "complete", {"train.lr": 1e-3, "model.backbone": "a"}, value=0.81, interval=(0.75, 0.86),
                    latency_p95_ms=4.0, param_count=2_200_000, onnx_bytes=9_000_000, train_time_s=30.5, epochs=3,
                    backbone="a", run_dir="sweep/trials/001"),
        TrialRecord(2, "pruned", {"train.lr": 1e-5, "model.backbone": "b"}, value=0.70, epochs=1,
                    reason="pruned at epoch 1"),
        TrialRecord(3, "over_budget", {"train.lr": 1e-4, "model.backbone": "c"}, latency_p95_ms=90.0,
                    reason="latency 90 ms > budget 20 ms"),
        TrialRecord(4, "complete", {"train.lr": 3e-4, "model.backbone": "b"}, value=0.88, value_std=0.02,
                    interval=(0.84, 0.91), latency_p95_ms=12.0, param_count=11_000_000, backbone="b"),
        TrialRecord(5, "pruned", {"train.lr": 5e-5, "model.backbone": "a"}, value=0.74),
        TrialRecord(6, "complete", {"train.lr": 2e-4, "model.backbone": "a"}, value=0.85, latency_p95_ms=3.0,
                    backbone="a"),
    ]


def test_ranking_puts_complete_by_value_then_pruned_then_failed_and_over_budget_last() -> None:
    assert [r.number for r in rank_records(records())] == [4, 6, 1, 5, 2, 0, 3]


def brute_force_front(points: list[tuple[float, float]]) -> list[int]:
    def dominates(a: tuple[float, float], b: tuple[float, float]) -> bool:
        return a[0] >= b[0] and a[1] <= b[1] and (a[0] > b[0] or a[1] < b[1])

    return [i for i, p in enumerate(points) if not any(dominates(q, p) for q in points)]


def test_pareto_front_by_hand() -> None:
    # (metric, latency): 1 beats 0 on both; 2 is slower but better; 3 is slower and worse than 2
    assert pareto_front([(0.8, 5.0), (0.85, 4.0), (0.9, 10.0), (0.88, 12.0)]) == [1, 2]
    assert pareto_front([(0.5, 1.0), (0.5, 1.0)]) == [0, 1]  # identical points do not dominate each other
    assert pareto_front([]) == []


@pytest.mark.parametrize("seed", range(30))
def test_pareto_front_matches_brute_force(seed: int) -> None:
    rng = random.Random(seed)
    points = [(rng.randint(0, 5) / 5, float(rng.randint(1, 6))) for _ in range(rng.randint(1, 15))]  # many ties
    assert pareto_front(points) == brute_force_front(points)


def test_csv_and_json_round_trip_every_value(tmp_path: Path) -> None:
    recs = records()
    ranked = write_leaderboard(tmp_path, recs, "macro_f1")
    expected_order = [4, 6, 1, 5, 2, 0, 3]
    assert [r.number for r in ranked] == expected_order
    by_number = {r.number: r for r in recs}
    with open(tmp_path / "leaderboard.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(row["trial"]) for row in rows] == expected_order and [row["rank"] for row in rows] == list("1234567")

    def number(text: str) -> float | None:
        return None if text == "" else float(text)

    for row in rows:
        r = by_number[int(row["trial"])]
        assert row["state"] == r.state and json.loads(row["params"]) == r.params
        assert number(row["value"]) == r.value and number(row["value_std"]) == r.value_std
        assert (number(row["ci_low"]), number(row["ci_high"])) == (r.interval or (None, None))
        assert number(row["latency_p95_ms"]) == r.latency_p95_ms and number(row["param_count"]) == r.param_count
        assert number(row["onnx_bytes"]) == r.onnx_bytes and number(row["train_time_s"]) == r.train_time_s
        assert row["backbone"] == r.params["model.backbone"] and row["reason"] == (r.reason or "")
    saved = json.loads((tmp_path / "leaderboard.json").read_text())
    assert saved["metric"] == "macro_f1" and [t["rank"] for t in saved["trials"]] == list(range(1, 8))
    for t in saved["trials"]:
        rank = t.pop("rank")
        interval = t["interval"]
        restored = TrialRecord(**{**t, "interval": tuple(interval) if interval else None})
        assert restored == by_number[expected_order[rank - 1]]
    md = (tmp_path / "leaderboard.md").read_text().splitlines()
    assert sum(line.startswith("| ") for line in md) == 2 + len(recs)  # header, rule, one row per trial
    assert "0.8800 [0.8400, 0.9100] ± 0.0200" in md[6]


def study_with(trials: list[TrialRecord]):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize")
    distributions = {"train.lr": optuna.distributions.FloatDistribution(1e-6, 1e-1, log=True),
                     "model.backbone": optuna.distributions.CategoricalDistribution(["a", "b", "c"])}
    for r in trials:
        if r.state == "complete":
            study.add_trial(optuna.trial.create_trial(params=r.params, distributions=distributions, value=r.value))
    return study


def img_count(text: str) -> int:
    return len(re.findall(r"<img ", text))


def test_html_is_self_contained_with_one_image_per_plot(tmp_path: Path) -> None:
    recs = records()
    write_leaderboard(tmp_path, recs, "macro_f1", study_with(recs))
    text = (tmp_path / "leaderboard.html").read_text()
    assert not re.search(r"https?://", text)
    assert re.findall(r'src="([a-z]+):', text) == ["data"] * 4
    assert img_count(text) == 4  # latency/Pareto, history, importances, per backbone
    assert "Pareto front (no other trial is both better and faster): trials 6, 4" in text


def test_html_says_why_a_plot_is_missing(tmp_path: Path) -> None:
    one = [TrialRecord(0, "complete", {"train.lr": 1e-3}, value=0.8), TrialRecord(1, "failed", reason="boom")]
    write_leaderboard(tmp_path, one, "accuracy", study_with([]))
    text = (tmp_path / "leaderboard.html").read_text()
    assert img_count(text) == 1  # only the history has something to draw
    assert "no complete trial has a latency measurement" in text
    assert "not computed: 1 complete trial(s); importances need at least 2" in text
    assert "no complete trial names its backbone" in text
    write_leaderboard(tmp_path, records(), "accuracy")
    assert "not computed: no Optuna study was given" in (tmp_path / "leaderboard.html").read_text()


def test_describe_best() -> None:
    line = describe_best(records())
    assert line.startswith("best: trial 4, 0.8800 [0.8400, 0.9100] ± 0.0200 (train.lr=0.0003, model.backbone=b)")
    assert "latency p95 12.00 ms" in line
    failed = [TrialRecord(0, "failed"), TrialRecord(1, "pruned", value=0.5), TrialRecord(2, "failed")]
    assert describe_best(failed) == "no trial completed (1 pruned, 2 failed)"
    assert describe_best([]) == "no trial completed (no trials)"


def test_no_temp_files_are_left(tmp_path: Path) -> None:
    write_leaderboard(tmp_path, records(), "macro_f1")
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"leaderboard.{e}" for e in ("csv", "html", "json", "md")]
