"""deepship.monitoring: false alarms and power measured on resampled windows, the statistics against
independent computations, and the command end to end on logs and datasets (images and real text)."""

from __future__ import annotations

import csv
import json
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageEnhance, ImageFilter
from scipy import stats as scipy_stats

from deepship import cli
from deepship.config import MonitorConfig
from deepship.monitoring.drift import (
    chi_square_test,
    half_split_limit,
    holm,
    ks_test,
    mmd_drift,
    permutation_p_value,
    psi,
    random_splits,
    rbf_kernel,
    unbiased_mmd2,
)
from deepship.monitoring.monitor import Current, embedding_resolution, embedding_signal, evaluate_window, judge
from deepship.monitoring.reference import build_profile

from conftest import SHARED_DATA, export, read_json, write_image_folder, write_text_csv

LABELS = ["a", "b", "c", "d"]
MIX = np.array([0.4, 0.3, 0.2, 0.1])
ROOT = Path(__file__).resolve().parents[1]
RT_POLARITY = SHARED_DATA / "rt-polarity"


def draw(rng: np.random.Generator, n: int, mix: np.ndarray = MIX, token_mean: float = 20.0) -> Current:
    """Predictions and input stats of a synthetic production stream (the 'reference distribution')."""
    preds = rng.choice(len(LABELS), size=n, p=mix)
    confidence = rng.beta(6, 2, size=n)
    stats = {"tokens": rng.poisson(token_mean, size=n).astype(float), "unk_share": rng.beta(1, 60, size=n)}
    return Current("synthetic", "data", [str(i) for i in range(n)], preds, confidence, stats)


@pytest.fixture(scope="module")
def profile() -> dict:
    ref = draw(np.random.default_rng(0), 2000)
    return build_profile(LABELS, ref.preds, ref.confidence, None, ref.stats, "synthetic reference")


def alert_rate(profile: dict, windows: int, size: int, seed: int, **shift) -> float:
    rng = np.random.default_rng(seed)
    cfg = MonitorConfig(min_window=50)
    alerts = [evaluate_window(profile, draw(rng, size, **shift), LABELS, cfg, None)["state"] == "alert"
              for _ in range(windows)]
    return float(np.mean(alerts))


# ------------------------------------------------------------------- false alarms and power
@pytest.mark.parametrize("size", [100, 1000, 10000])
def test_false_alarms_stay_under_5_percent_of_200_windows_from_the_reference(profile: dict, size: int) -> None:
    rate = alert_rate(profile, 200, size, seed=size)
    # 5% plus two binomial standard deviations of sampling slack at 200 windows
    assert rate <= 0.05 + 2 * np.sqrt(0.05 * 0.95 / 200), rate


def test_a_class_mix_change_is_caught_in_90_percent_of_windows_of_1000(profile: dict) -> None:
    shifted = np.array([0.25, 0.25, 0.25, 0.25])  # PSI ~0.12 against the 40/30/20/10 reference
    assert alert_rate(profile, 200, 1000, seed=1, mix=shifted) >= 0.9


def test_longer_texts_are_caught_in_90_percent_of_windows_of_1000(profile: dict) -> None:
    assert alert_rate(profile, 200, 1000, seed=2, token_mean=26.0) >= 0.9  # "text from a different source"


def test_tiny_windows_are_reported_but_never_judged(profile: dict) -> None:
    window = evaluate_window(profile, draw(np.random.default_rng(3), 40, mix=np.array([1.0, 0, 0, 0])), LABELS,
                             MonitorConfig(), None)
    assert window["state"] == "insufficient" and window["signals"] == {}


def test_embedding_mmd_false_alarms_and_power() -> None:
    rng = torch.Generator().manual_seed(0)
    reference = torch.randn(300, 16, generator=rng)
    null = [mmd_drift(reference, torch.randn(300, 16, generator=rng), seed=i)["p_value"] < 0.01 for i in range(40)]
    shifted = [mmd_drift(reference, torch.randn(300, 16, generator=rng) + 0.3, seed=i)["p_value"] < 0.01
               for i in range(10)]
    assert np.mean(null) <= 0.1 and np.mean(shifted) >= 0.9


def embedding_window(rng: np.random.Generator, n: int, shift: float) -> Current:
    """A window from the reference distribution in every signal but the embeddings, moved by `shift`."""
    part = draw(rng, n)
    targets = np.where(rng.random(n) < 0.8, part.preds, rng.integers(0, len(LABELS), n))
    embeddings = torch.randn(n, 16, generator=torch.Generator().manual_seed(int(rng.integers(1 << 30)))) + shift
    return Current(part.source, part.kind, part.ids, part.preds, part.confidence, part.stats, targets=targets,
                   embeddings=embeddings.numpy())


def test_a_shifted_embedding_window_alerts_at_alpha_0_001_among_6_signals() -> None:
    """Holm over 6 signals needs p < 0.001 / 6 from the embedding test: 1,000 permutations (p >= 1/1001)
    could never get there; the test draws as many as the level needs when the data really differ."""
    rng = np.random.default_rng(5)
    ref = embedding_window(rng, 2000, 0.0)
    profile = build_profile(LABELS, ref.preds, ref.confidence, ref.targets, ref.stats, "synthetic reference")
    reference_embeddings = ref.embeddings[:500]
    window = evaluate_window(profile, embedding_window(rng, 1000, 0.3), LABELS, MonitorConfig(alpha=0.001),
                             reference_embeddings)
    signals = window["signals"]
    assert len(signals) == 6 and "true_class" in signals
    embedding = signals["embeddings"]
    assert embedding["p_adjusted"] == pytest.approx(6 * embedding["p_value"]) and embedding["p_adjusted"] < 0.001
    assert embedding["alert"] and [name for name, s in signals.items() if s["alert"]] == ["embeddings"]


def test_the_embedding_effect_limit_ignores_a_significant_but_tiny_shift_in_a_huge_window() -> None:
    reference = torch.randn(500, 16, generator=torch.Generator().manual_seed(0)).numpy()
    huge = (torch.randn(10000, 16, generator=torch.Generator().manual_seed(101)) + 0.06).numpy()
    signal = embedding_signal(reference, huge, resolution=embedding_resolution(0.01, 1))
    signals = {"embeddings": signal}
    judge(signals, MonitorConfig())
    assert signal["p_adjusted"] < 0.01  # the shift is real ...
    assert 0 < signal["effect"] < signal["limit"] and not signal["alert"]  # ... and smaller than val vs itself
    judge(signals, MonitorConfig(limits={"embeddings": 0.0}))
    assert signal["alert"]  # without the limit, significance alone would page someone


def test_unbiased_mmd2_and_its_limit_match_a_numpy_computation() -> None:
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(60, 5)), rng.normal(0.5, size=(40, 5))
    joint = np.concatenate([x, y]) / np.linalg.norm(np.concatenate([x, y]), axis=1, keepdims=True)
    squared = ((joint[:, None] - joint[None]) ** 2).sum(-1)
    pairs = np.sort(squared[np.triu_indices(100, 1)])
    k = np.exp(-squared / pairs[(len(pairs) - 1) // 2])  # bandwidth: the (lower) median over pairs
    kxx, kyy, kxy = k[:60, :60], k[60:, 60:], k[:60, 60:]
    by_hand = ((kxx.sum() - np.trace(kxx)) / (60 * 59) + (kyy.sum() - np.trace(kyy)) / (40 * 39) - 2 * kxy.mean())
    kernel = rbf_kernel(torch.from_numpy(x), torch.from_numpy(y))
    first = torch.zeros(100, 1, dtype=torch.bool)
    first[:60] = True
    assert float(unbiased_mmd2(kernel, first)[0]) == pytest.approx(by_hand, rel=1e-5)
    # the limit: a quantile over random halves of the reference rows, each scored the same way
    halves = [((kxx[np.ix_(a, a)].sum() - 30) / (30 * 29) + (kxx[np.ix_(b, b)].sum() - 30) / (30 * 29)
               - 2 * kxx[np.ix_(a, b)].mean())
              for a, b in (np.split(rng.permutation(60), 2) for _ in range(2000))]
    assert half_split_limit(kernel[:60, :60], quantile=0.5, splits=2000) == pytest.approx(np.median(halves), abs=2e-3)


def test_the_sequential_permutation_p_value_stops_early_only_when_far_from_significance() -> None:
    """Besag-Clifford: stop at 20 permutations reaching the observed value, p = 20 / drawn; otherwise
    p = (hits + 1) / (drawn + 1) after ceil(1/resolution) - 1."""
    kernel = rbf_kernel(torch.randn(50, 4, generator=torch.Generator().manual_seed(1)),
                        torch.randn(50, 4, generator=torch.Generator().manual_seed(2)))
    first = torch.zeros(100, 1, dtype=torch.bool)
    first[:50] = True
    observed = float(unbiased_mmd2(kernel, first)[0])
    assert permutation_p_value(kernel, 50, -1.0, 1e-4) == 20 / 20  # every permutation reaches it
    assert permutation_p_value(kernel, 50, 10.0, 1e-4) == 1 / 10000  # none does: the floor is the resolution
    p = permutation_p_value(kernel, 50, observed, 1e-3)
    splits = random_splits(100, 50, 999, torch.Generator().manual_seed(0))  # the same draws, counted in full
    hits = (unbiased_mmd2(kernel, splits) >= observed).numpy()
    drawn = int(np.argmax(np.cumsum(hits) >= 20)) + 1 if hits.sum() >= 20 else None
    assert p == (20 / drawn if drawn else (hits.sum() + 1) / 1000)


# ------------------------------------------------------------------ statistics, by hand
def test_psi_is_finite_with_empty_bins_and_zero_for_identical_shares() -> None:
    assert psi(np.array([50, 50, 0]), np.array([0, 10, 90])) < np.inf
    assert psi(np.array([10, 20, 30]), np.array([20, 40, 60])) == pytest.approx(0.0, abs=1e-4)  # up to smoothing
    r, c = np.array([0.5, 0.5]), np.array([0.8, 0.2])
    assert psi(np.array([5000, 5000]), np.array([8000, 2000])) == pytest.approx(np.sum((c - r) * np.log(c / r)), rel=1e-3)


def test_holm_matches_the_step_down_definition() -> None:
    adjusted = holm({"a": 0.01, "b": 0.04, "c": 0.03})
    assert adjusted == pytest.approx({"a": 0.03, "c": 0.06, "b": 0.06})


def test_two_sample_tests_match_scipy_and_ignore_empty_categories() -> None:
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=300), rng.normal(0.3, size=200)
    assert ks_test(x, y) == pytest.approx(tuple(scipy_stats.ks_2samp(x, y)))
    _, p = chi_square_test(np.array([30, 0, 70]), np.array([50, 0, 50]))
    assert p == pytest.approx(scipy_stats.chi2_contingency([[30, 70], [50, 50]], correction=False)[1])


# ----------------------------------------------------------------------- the command
def write_log(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def predict_log(package: Path, data: Path, out: Path) -> Path:
    assert cli.main(["predict", "--package", str(package), "--input", str(data), "--output", str(out)]) == 0
    return out


def monitor(package: Path, current: Path, out: Path, *extra: str) -> int:
    return cli.main(["monitor", "--package", str(package), "--current", str(current), "--out", str(out), *extra])


def test_export_stores_the_reference_profile_and_embeddings(text_package: Path) -> None:
    reference = read_json(text_package / "package.json")["reference"]
    assert set(reference["signals"]) == {"predicted_class", "confidence", "tokens", "unk_share"}
    assert sum(reference["signals"]["predicted_class"]["counts"].values()) == reference["n"]
    embeddings = np.load(text_package / reference["embeddings"]["file"], allow_pickle=False)
    assert embeddings.shape == (reference["n"], reference["embeddings"]["dim"])  # the head's input width
    assert "reference_embeddings.npy" in read_json(text_package / "package.json")["files"]  # hashed like the model


def test_image_package_alerts_on_darkened_and_blurred_images_not_on_fresh_ones(image_package: Path, tmp_path: Path,
                                                                               capsys: pytest.CaptureFixture) -> None:
    fresh = write_image_folder(tmp_path / "fresh", n_per_class=40, seed=11)
    assert monitor(image_package, fresh, tmp_path / "m-fresh", "--set", "monitor.window=120") == 0
    for name, change in (("dark", lambda im: ImageEnhance.Brightness(im).enhance(0.35)),
                         ("blur", lambda im: im.filter(ImageFilter.GaussianBlur(3)))):
        folder = tmp_path / name
        for f in fresh.rglob("*.*"):
            dst = folder / f.relative_to(fresh)
            dst.parent.mkdir(parents=True, exist_ok=True)
            change(Image.open(f).convert("RGB")).save(dst.with_suffix(".png"))
        assert monitor(image_package, folder, tmp_path / f"m-{name}", "--set", "monitor.window=120") == 3, name
        report = read_json(tmp_path / f"m-{name}" / "monitor.json")
        signal = "brightness" if name == "dark" else "contrast"
        assert signal in report["summary"]["signals_alerting"], report["summary"]
    assert "1 alerting" in capsys.readouterr().out


def test_log_windows_by_time_labels_join_and_performance_decay(text_package: Path, tmp_path: Path) -> None:
    data = write_text_csv(tmp_path / "held.csv", n_per_class=150, seed=21)
    log = predict_log(text_package, data, tmp_path / "preds.jsonl")
    records = [json.loads(line) for line in log.read_text().splitlines()]
    start = datetime(2026, 11, 1, tzinfo=timezone.utc)
    for i, r in enumerate(records):  # spread over three days
        r["ts"] = (start + timedelta(hours=72 * i / len(records))).isoformat()
    write_log(log, records)
    with open(data, newline="") as f:
        truth = [row["label"] for row in csv.DictReader(f)]
    labels = tmp_path / "labels.csv"
    with open(labels, "w", newline="") as f:
        csv.writer(f).writerows([["id", "label"], *[[r["id"], y] for r, y in zip(records, truth)]])
    assert monitor(text_package, log, tmp_path / "ok", "--labels", str(labels), "--set", "monitor.window=1d") == 0
    report = read_json(tmp_path / "ok" / "monitor.json")
    assert [w["n"] for w in report["windows"]] == [100, 100, 100] and report["current"]["labeled"] == 300
    perf = report["windows"][0]["performance"]
    expected = np.mean([r["label"] == y for r, y in zip(records[:100], truth[:100])])
    assert perf["accuracy"] == pytest.approx(expected) and perf["accuracy_ci95"][0] <= expected <= perf["accuracy_ci95"][1]
    # the world changes: the same predictions now mostly wrong
    flipped = tmp_path / "flipped.csv"
    with open(flipped, "w", newline="") as f:
        csv.writer(f).writerows([["id", "label"], *[[r["id"], "pos" if y == "neg" else "neg"]
                                                    for r, y in zip(records, truth)]])
    assert monitor(text_package, log, tmp_path / "decay", "--labels", str(flipped), "--set", "monitor.window=1d") == 3
    summary = read_json(tmp_path / "decay" / "monitor.json")["summary"]
    assert "accuracy" in summary["signals_alerting"] and summary["alerting_windows"] == 3
    html = (tmp_path / "decay" / "monitor.html").read_text()
    assert "model performance over time" in html and html.count('<img class="plot"') >= 5


@pytest.mark.parametrize("case", ["missing", "bad_window", "not_monitor_key", "labels_columns", "duration_no_ts"])
def test_bad_input_exits_2_with_one_line(case: str, text_package: Path, tmp_path: Path,
                                         capsys: pytest.CaptureFixture) -> None:
    data = write_text_csv(tmp_path / "d.csv", n_per_class=5, seed=1)
    current, extra = data, []
    if case == "missing":
        current, expected = tmp_path / "nope.jsonl", "nope.jsonl: not found"
    elif case == "bad_window":
        extra, expected = ["--set", "monitor.window=1w"], "monitor.window: '1w' is neither a count nor a duration"
    elif case == "not_monitor_key":
        extra, expected = ["--set", "train.lr=1"], "monitor takes monitor.* keys only"
    elif case == "labels_columns":
        bad = tmp_path / "l.csv"
        bad.write_text("key,truth\n1,pos\n")
        extra, expected = ["--labels", str(bad)], "needs columns id and label"
    else:
        extra, expected = ["--set", "monitor.window=1d"], "needs timestamps"
    assert monitor(text_package, current, tmp_path / "out", *extra) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and expected in err[0], err
    assert not (tmp_path / "out" / "monitor.json").exists()


# ------------------------------------------------------------------------- real text
@pytest.mark.slow
def test_rt_polarity_package_is_quiet_on_held_out_reviews_and_alerts_on_other_text(tmp_path: Path) -> None:
    if not RT_POLARITY.is_dir():
        pytest.skip(reason=f"{RT_POLARITY} not found (shared reference data is absent on this machine)")
    from deepship.bench import rt_polarity_rows, write_csv_splits
    from deepship.data.demo import materialize_demo

    rows = rt_polarity_rows(RT_POLARITY)
    train, val, held = write_csv_splits(rows, tmp_path, {"train": 1500, "val": 600, "test": 1000})
    config = {"task": "text_classification",
              "data": {"train": str(train), "val": str(val), "max_length": 64},
              "model": {"backbone": "all-MiniLM-L6-v2"},
              "train": {"max_epochs": 1, "batch_size": 32, "lr": 1e-4, "accelerator": "cpu",
                        "out_dir": str(tmp_path / "runs"), "run_name": "rt"}}
    (tmp_path / "config.yaml").write_text(json.dumps(config))
    assert cli.main(["train", "--config", str(tmp_path / "config.yaml")]) == 0
    package = export(tmp_path / "runs" / "rt", tmp_path / "pkg")
    assert monitor(package, held, tmp_path / "held", "--set", "monitor.window=500") == 0
    topics = materialize_demo("topics") / "test.csv"  # short generated sentences about weather, sports, ...
    assert monitor(package, topics, tmp_path / "other", "--set", "monitor.window=160") == 3
    alerting = read_json(tmp_path / "other" / "monitor.json")["summary"]["signals_alerting"]
    assert {"tokens", "embeddings"} & set(alerting), alerting


@pytest.mark.slow
def test_embedding_drift_on_real_minilm_embeddings() -> None:
    """rt-polarity reviews through the pretrained MiniLM: quiet on other reviews at every window size,
    alerting on generated topic sentences. The full measurement (200 windows per size) is
    `python tests/embedding_drift.py`; this runs a smaller one."""
    if not RT_POLARITY.is_dir():
        pytest.skip(reason=f"{RT_POLARITY} not found (the rt-polarity reference data is absent on this machine)")
    from embedding_drift import load, measure

    null_windows = 40
    results = dict(measure(*load(), null_windows=null_windows, shift_windows=20))
    slack = 2 * np.sqrt(0.05 * 0.95 / null_windows)
    for name, rates in results.items():
        if name.startswith("false alarms"):
            assert all(rate <= 0.05 + slack for rate in rates.values()), (name, rates)  # p < 0.01 included
    power = results["power, window 1000, topic sentences"]
    assert power["alert at alpha 0.01"] >= 0.9 and power["alert at alpha 0.001"] >= 0.9, results
