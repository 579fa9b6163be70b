"""`deepship evaluate` and the run report: packages scored through their own runtime, gates, baseline,
champion vs challenger, the decision rule export writes, the schema, and the HTML in a real browser."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax

from deepship import cli
from deepship.evaluation.schema import report_schema
from deepship.runtime.predictor import Predictor, softmax

from conftest import copy_package, export, read_json, rewrite_manifest, run_val_samples, write_image_folder, write_text_csv

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = ROOT / "docs" / "report.schema.json"
FAST = ["--latency-runs", "10", "--bootstrap", "100"]


def evaluate(package: Path, data: Path, out: Path, *extra: str) -> int:
    return cli.main(["evaluate", "--package", str(package), "--data", str(data), "--out", str(out), *FAST, *extra])


def validate_against_schema(report: dict) -> None:
    import jsonschema

    jsonschema.validate(report, json.loads(SCHEMA.read_text()))


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def write_rows(path: Path, rows: list[dict[str, str]]) -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


@pytest.fixture(scope="module")
def held_out_csv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_text_csv(tmp_path_factory.mktemp("held-out") / "test.csv", n_per_class=40, seed=7)


@pytest.fixture(scope="module")
def text_report(text_package: Path, held_out_csv: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("eval") / "report"
    assert evaluate(text_package, held_out_csv, out, "--baseline", "tfidf") == 0
    return out


# ------------------------------------------------------------------------------------- the report
def test_schema_file_is_generated_from_the_models() -> None:
    assert json.loads(SCHEMA.read_text()) == report_schema(), \
        "regenerate: python -m deepship.evaluation.schema > docs/report.schema.json"


def test_package_report_matches_the_runtime_and_validates(text_report: Path, text_package: Path,
                                                          held_out_csv: Path) -> None:
    report = read_json(text_report / "report.json")
    validate_against_schema(report)
    rows = read_rows(held_out_csv)
    predictions = Predictor.load(text_package).predict([r["text"] for r in rows])  # what a serving host answers
    hand_accuracy = np.mean([p.label == r["label"] for p, r in zip(predictions, rows)])
    assert report["metrics"]["n"] == len(rows) == 80
    assert report["metrics"]["accuracy"] == pytest.approx(hand_accuracy, abs=1e-9)
    lo, hi = report["metrics"]["ci95"]["accuracy"]
    assert lo <= report["metrics"]["accuracy"] <= hi
    assert report["model"]["model_version"] == read_json(text_package / "package.json")["model_version"]
    assert report["verdict"]["passed"] is None and report["verdict"]["gates"] == []  # the tiny config sets no gate
    lat = report["latency"]["batch_1"]
    assert lat["runs"] == 10 and 0 < lat["p50"] <= lat["p95"] <= lat["p99"]
    assert report["latency"]["batch_32"]["p50"] > lat["p50"]  # 32 inputs cost more than one
    # the temperature is the package's, and calibration after scaling is no worse in NLL on val-like data
    assert report["calibration"]["temperature"] == read_json(text_package / "package.json")["calibration"]["temperature"]
    assert [b["count"] for b in report["calibration"]["before"]["bins"]].count(0) >= 1  # empty bins are kept
    assert len(report["history"]) == 6  # learning curves from the run's history.csv


def test_tfidf_baseline_trains_on_the_package_training_split(text_report: Path, tiny_text_run: Path) -> None:
    baseline = read_json(text_report / "report.json")["baseline"]
    assert baseline["name"] == "tfidf_linear_svm"
    assert baseline["train_samples"] == read_json(tiny_text_run / "metrics.json")["num_samples"]["train"]
    assert baseline["accuracy"] > 0.8  # the toy classes differ by vocabulary: a linear model separates them


def test_run_writes_the_same_report_for_its_validation_set(tiny_text_run: Path) -> None:
    from conftest import evaluate_by_hand

    report = read_json(tiny_text_run / "report.json")
    validate_against_schema(report)
    metrics = read_json(tiny_text_run / "metrics.json")
    assert report["data"]["split"] == "val" and report["metrics"]["n"] == metrics["num_samples"]["val"]
    by_hand = evaluate_by_hand(tiny_text_run)  # best.ckpt rebuilt and scored with numpy: no thresholds in this run
    assert report["metrics"]["accuracy"] == pytest.approx(by_hand["accuracy"], abs=1e-6)
    assert report["metrics"]["macro_f1"] == pytest.approx(by_hand["macro_f1"], abs=1e-6)
    assert report["calibration"]["after"]["nll"] <= report["calibration"]["before"]["nll"] + 1e-12
    assert (tiny_text_run / "report.html").read_text().count('<img class="plot"') >= 5


# ----------------------------------------------------------------------------------------- gates
def test_failed_metric_gate_exits_4_with_the_report_written(text_package: Path, held_out_csv: Path, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture) -> None:
    rows = read_rows(held_out_csv)
    flipped = write_rows(tmp_path / "flipped.csv", [{**r, "label": "pos" if r["label"] == "neg" else "neg"} for r in rows])
    code = evaluate(text_package, flipped, tmp_path / "out", "--set", "objective.metric=accuracy",
                    "--set", "objective.min=0.6")
    assert code == 4
    report = read_json(tmp_path / "out" / "report.json")
    assert report["verdict"]["passed"] is False and report["verdict"]["gates"][0]["value"] < 0.6
    assert "verdict: FAIL: accuracy >= 0.6" in capsys.readouterr().out
    assert report["objective"]["min"] == 0.6  # the override is what the report records


def test_latency_budget_gate(text_package: Path, held_out_csv: Path, tmp_path: Path) -> None:
    assert evaluate(text_package, held_out_csv, tmp_path / "slow", "--set", "objective.latency_budget_ms=0.001") == 4
    assert evaluate(text_package, held_out_csv, tmp_path / "ok", "--set", "objective.latency_budget_ms=10000") == 0
    gate = read_json(tmp_path / "ok" / "report.json")["verdict"]["gates"][0]
    assert gate["kind"] == "latency" and gate["passed"] is True


# ------------------------------------------------------------------------ champion vs challenger
def with_thresholds(package: Path, dst: Path, thresholds: dict) -> Path:
    copy = copy_package(package, dst)
    manifest = read_json(copy / "package.json")
    manifest["thresholds"] = thresholds
    rewrite_manifest(copy, manifest)  # the decision rule is data; the model is unchanged
    return copy


def test_compare_finds_a_worse_challenger_and_no_difference_with_itself(text_package: Path, held_out_csv: Path,
                                                                        tmp_path: Path) -> None:
    assert evaluate(text_package, held_out_csv, tmp_path / "same", "--compare", str(text_package)) == 0
    same = read_json(tmp_path / "same" / "report.json")["comparison"]
    assert same["difference"] == 0 and same["mcnemar"] == {"b": 0, "c": 0, "p_value": 1.0, "method": "exact"}
    # a challenger that always says "pos" (index 1): a cost threshold of 0 on P(pos)
    labels = read_json(text_package / "package.json")["labels"]
    assert labels[1] == "pos"
    always_pos = with_thresholds(text_package, tmp_path / "always-pos", {"cost": {"threshold": 0.0}})
    assert evaluate(text_package, held_out_csv, tmp_path / "worse", "--compare", str(always_pos)) == 0
    worse = read_json(tmp_path / "worse" / "report.json")["comparison"]
    assert worse["challenger_metrics"]["accuracy"] == pytest.approx(0.5)
    assert worse["difference"] < -0.2 and worse["paired_bootstrap"]["p_value"] < 0.05
    assert worse["mcnemar"]["b"] > worse["mcnemar"]["c"] and worse["mcnemar"]["p_value"] < 0.05
    assert worse["conclusion"].startswith("challenger is worse")


# ------------------------------------------------------------------- the rule export writes
def test_export_writes_fitted_temperature_and_precision_threshold(tiny_text_run: Path, tmp_path: Path) -> None:
    from test_evaluation import brute_force_precision_threshold

    run = Path(shutil.copytree(tiny_text_run, tmp_path / "run"))
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["objective"] = {**config.get("objective", {}), "target_precision": 0.9}
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    package = export(run, tmp_path / "pkg")
    predictor = Predictor.load(package)
    val = run_val_samples(run)
    labels = predictor.labels
    targets = torch.tensor([labels.index(y) for y in val.labels])
    logits = predictor.batched_logits(val.inputs).astype(np.float64)
    # independent of export: refit T (scipy, NLL over log T) and brute-force the threshold on the package's val logits
    def nll(log_t: float) -> float:
        return -np.mean(log_softmax(logits / np.exp(log_t), axis=1)[np.arange(len(targets)), targets.numpy()])

    best = minimize_scalar(nll, bounds=(-5, 5), method="bounded", options={"xatol": 1e-8})
    # export's T is as good as scipy's optimum (the tiny model may separate val, leaving T unidentified)
    assert nll(np.log(predictor.temperature)) <= min(best.fun, nll(0.0)) + 1e-6
    probs = softmax(logits, predictor.temperature)
    expected = brute_force_precision_threshold(probs, targets.numpy(), 0.9)
    rule = predictor.thresholds
    assert rule["basis"] == "target_precision" and rule["feasible"] == (expected is not None)
    assert rule["min_confidence"] == pytest.approx(expected[0])
    predictions = predictor.predict(val.inputs)
    assert [p.abstained for p in predictions] == [p.confidence < rule["min_confidence"] for p in predictions]
    answered = [p.label == y for p, y in zip(predictions, val.labels) if not p.abstained]
    assert answered and np.mean(answered) >= 0.9  # the target holds on the data it was chosen on


# ------------------------------------------------------------------------------------- images
def test_image_package_evaluates_from_a_folder(image_package: Path, tmp_path: Path) -> None:
    folder = write_image_folder(tmp_path / "images", n_per_class=6, seed=3)
    assert evaluate(image_package, folder, tmp_path / "out") == 0
    report = read_json(tmp_path / "out" / "report.json")
    validate_against_schema(report)
    files = sorted(folder.rglob("*.*"))
    predictions = Predictor.load(image_package).predict([str(f) for f in files])
    hand = np.mean([p.label == f.parent.name for p, f in zip(predictions, files)])
    assert report["metrics"]["n"] == 18 and report["metrics"]["accuracy"] == pytest.approx(hand)


# ----------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("case", ["unknown_label", "missing_data", "bad_override", "not_objective", "baseline_images",
                                  "probe_texts", "probe_not_pretrained", "compare_other_labels"])
def test_bad_input_exits_2_with_one_clear_line_and_no_report(case: str, text_package: Path, image_package: Path,
                                                             held_out_csv: Path, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture) -> None:
    rows = read_rows(held_out_csv)
    package, data, extra = text_package, held_out_csv, []
    if case == "unknown_label":
        data = write_rows(tmp_path / "bad.csv", rows[:3] + [{"text": "a new kind of thing", "label": "meh"}])
        expected = "bad.csv row 5: label 'meh' is not one the model knows"
    elif case == "missing_data":
        data, expected = tmp_path / "nope.csv", "nope.csv: not found"
    elif case == "bad_override":
        extra, expected = ["--set", "objective.min=2"], "objective.min: Input should be less than or equal to 1"
    elif case == "not_objective":
        extra, expected = ["--set", "train.lr=0.1"], "evaluate takes objective.* keys only"
    elif case == "baseline_images":
        package, data = image_package, write_image_folder(tmp_path / "images", n_per_class=2)
        extra, expected = ["--baseline", "tfidf"], "--baseline tfidf: reads text inputs; this package classifies image"
    elif case == "probe_texts":
        extra = ["--baseline", "linear-probe"]
        expected = "--baseline linear-probe: reads image inputs; this package classifies text inputs"
    elif case == "probe_not_pretrained":  # the tiny image run trains from scratch
        package, data = image_package, write_image_folder(tmp_path / "images", n_per_class=2)
        extra, expected = ["--baseline", "linear-probe"], "--baseline linear-probe: model.pretrained is false: a linear " \
            "probe needs a pretrained backbone"
    else:
        extra, expected = ["--compare", str(image_package)], "differ from"
    out = tmp_path / "out"
    assert evaluate(package, data, out, *extra) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and expected in err[0], err
    assert not (out / "report.json").exists() and not (out / "report.html").exists()


# ------------------------------------------------------------------------------ a real browser
def find_chromium() -> str | None:
    for name in ("chromium-headless-shell", "chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    return None


@pytest.mark.skipif(find_chromium() is None, reason="no Chromium here (Debian: apt-get install chromium-headless-shell)")
def test_report_html_renders_every_plot_in_headless_chromium(text_report: Path) -> None:
    html = text_report / "report.html"
    result = subprocess.run([find_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr",
                             "--virtual-time-budget=5000", "--dump-dom", html.as_uri()],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    expected = html.read_text().count('<img class="plot"')
    assert expected == 5  # per-class, confusion, reliability, risk-coverage, learning curves
    assert f'data-plots="{expected}/{expected}"' in result.stdout  # the page's own check: every image decoded
    assert '<p class="fail">' not in result.stdout  # the page's warning banner for a broken plot
    assert "Uncaught" not in result.stderr  # no JavaScript error on the page
