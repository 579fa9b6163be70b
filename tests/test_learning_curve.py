"""`deepship learning-curve`: argument checks, the verdict rule on hand-made numbers, and a tiny real curve."""

from __future__ import annotations

import csv
import json
import math
import re
from html import escape as html_escape
from pathlib import Path

import pytest
import torch

from deepship import cli
from deepship.selection.learning_curve import judge, standard_error, summarize_point

from conftest import text_config, write_config, write_text_csv


@pytest.mark.parametrize("fractions, message", [
    ("0,0.5", "--fractions: 0 is not in (0, 1]"), ("0.5,1.5", "1.5 is not in (0, 1]"),
    ("0.5,0.25", "0.25 does not exceed 0.5"), ("0.25,0.25", "0.25 does not exceed 0.25"),
    ("0.1,abc", "'abc' is not a number"), ("0.5", "at least two points"),
])
def test_bad_fractions_exit_2_with_one_line(tmp_path: Path, capsys, fractions: str, message: str) -> None:
    config = write_config(tmp_path / "c.yaml", text_config(tmp_path / "x.csv", tmp_path, tmp_path / "runs"))
    assert cli.main(["learning-curve", "--config", str(config), "--fractions", fractions]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: --fractions:") and message in err
    assert not (tmp_path / "runs").exists()  # nothing trained, nothing written


def point(n: int, value: float, se: float) -> dict:
    return {"n_train": n, "val": {"value": value, "se": se}}


def test_verdict_more_data_helps() -> None:
    # 100 -> 200 samples is one doubling; gain 0.06; SE of the gain sqrt(0.01^2 + 0.01^2) = 0.014142;
    # 0.06 - 1.96 x 0.014142 = 0.0323 > 0
    verdict = judge([point(50, 0.7, 0.02), point(100, 0.80, 0.01), point(200, 0.86, 0.01)], "accuracy")
    assert verdict["more_data_helps"] is True
    assert verdict["gain_per_doubling"] == pytest.approx(0.06) and verdict["se_per_doubling"] == pytest.approx(math.sqrt(2) * 0.01)
    assert verdict["text"].startswith("more data is likely to help: validation accuracy rose +0.0600 per doubling")
    # 100 -> 400 samples is two doublings: 0.03 per doubling, SE 0.007071; 0.03 - 0.01386 > 0
    four = judge([point(100, 0.80, 0.01), point(400, 0.86, 0.01)], "accuracy")
    assert four["more_data_helps"] is True and four["gain_per_doubling"] == pytest.approx(0.03)


def test_verdict_more_data_unlikely_to_help() -> None:
    # gain 0.02 per doubling; 1.96 x 0.014142 = 0.0277 > 0.02: within the noise
    verdict = judge([point(100, 0.80, 0.01), point(200, 0.82, 0.01)], "macro_f1")
    assert verdict["more_data_helps"] is False
    assert verdict["text"].startswith("more data is unlikely to help much: validation macro_f1 changed +0.0200")
    assert judge([point(100, 0.9, 0.0), point(200, 0.9, 0.0)], "macro_f1")["more_data_helps"] is False  # flat


def test_standard_error_by_hand() -> None:
    # one seed, interval (0.7, 0.9): half-width 0.1 / 1.959964
    assert standard_error([0.8], [(0.7, 0.9)]) == pytest.approx(0.1 / 1.959964)
    # two seeds 0.8, 0.9, both intervals of half-width 0.098 (SE 0.05): bootstrap var 0.0025 / 2;
    # seed variance (0.05^2 + 0.05^2) / 1 = 0.005, / 2 -> total sqrt(0.00125 + 0.0025)
    half = 0.05 * 1.959963984540054
    se = standard_error([0.8, 0.9], [(0.8 - half, 0.8 + half), (0.9 - half, 0.9 + half)])
    assert se == pytest.approx(math.sqrt(0.00125 + 0.0025))
    runs = [{"fraction": 0.5, "n_train": 40, "train": {"value": v, "ci95": None}, "val": {"value": v, "ci95": None}}
            for v in (0.6, 0.8)]
    summary = summarize_point(runs)
    assert summary["val"]["value"] == pytest.approx(0.7) and summary["val"]["se"] == pytest.approx(math.sqrt(0.02 / 2))


def train_accuracy_by_hand(run_dir: Path) -> float:
    """best.ckpt's accuracy on the run's training subset, with a plain loop over the run's own eval preprocessing."""
    from deepship.data.datamodule import ClassificationData
    from deepship.data.split import Splits, load_splits
    from deepship.run import load_run

    run = load_run(run_dir)
    splits = load_splits(run.config)
    data = ClassificationData(run.config, Splits(splits.train, splits.train, None, run.classes), run.backbone)
    data.setup()
    correct = total = 0
    with torch.no_grad():
        for inputs, y in data.val_dataloader():
            correct += int((run.module(**inputs).argmax(1) == y).sum())
            total += len(y)
    return correct / total


@pytest.mark.slow
def test_a_tiny_curve_trains_nested_subsets_and_scores_them(tmp_path: Path, tiny_bert_dir: Path) -> None:
    from deepship.data.split import load_splits
    from deepship.run import read_run_config

    csv_path = write_text_csv(tmp_path / "train.csv", n_per_class=60)
    config = write_config(tmp_path / "c.yaml", text_config(csv_path, tiny_bert_dir, tmp_path / "runs", max_epochs=2))
    out = tmp_path / "curve"
    assert cli.main(["learning-curve", "--config", str(config), "--fractions", "0.25,0.5,1.0", "--out", str(out),
                     "--set", "objective.metric=accuracy"]) == 0
    # val_fraction 0.2 of 60 per class leaves 48 per class: a quarter is 12, a half 24
    names = ["f0.25_s0", "f0.5_s0", "f1_s0"]
    trains = [load_splits(read_run_config(out / "runs" / n)) for n in names]
    assert [len(s.train) for s in trains] == [24, 48, 96]
    assert set(trains[0].train.origins) < set(trains[1].train.origins) < set(trains[2].train.origins)
    assert trains[0].val.origins == trains[2].val.origins
    result = json.loads((out / "learning_curve.json").read_text())
    assert [p["n_train"] for p in result["points"]] == [24, 48, 96]
    with open(out / "learning_curve.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["run_dir"] for r in rows] == [str(out / "runs" / n) for n in names]
    for row, name in zip(rows, names):
        assert float(row["train_value"]) == pytest.approx(train_accuracy_by_hand(out / "runs" / name), abs=1e-9)
        metrics = json.loads((out / "runs" / name / "metrics.json").read_text())
        assert float(row["val_value"]) == pytest.approx(metrics["val"]["accuracy"], abs=1e-6)
        assert float(row["val_ci_low"]) <= float(row["val_value"]) <= float(row["val_ci_high"])
    html = (out / "learning_curve.html").read_text()
    assert len(re.findall("<img ", html)) == 1 and not re.search(r"https?://", html)
    assert html_escape(result["verdict"]["text"]) in html
