"""The linear-probe baseline: a logistic regression on the frozen pretrained backbone's pooled features, in
`evaluate --baseline linear-probe` and in every image run that starts from pretrained weights.

The reference computation is independent of deepship: torchvision's own mobilenet_v2 loaded from the same
state_dict file, `.features` + global average pooling, torchvision transforms, and a C chosen by hand from
sklearn cross-validation scores."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import numpy as np
import pytest
import torch

from deepship import cli
from deepship.config import Config
from deepship.evaluation.evaluate import fit_run_probe
from deepship.evaluation.linear_probe import C_GRID, extract_features, frozen_backbone, probe_predict

from conftest import SHARED_DATA, export, image_config, read_json, write_config, write_image_folder

SEED = 0
FLOWERS = SHARED_DATA / "flowers17"
NATURAL_WEIGHTS = SHARED_DATA.parent / "weights" / "mobilenet_v2_natural.safetensors"


# -------------------------------------------------------------------------------- the reference
def reference_features(weights: Path, paths: list[str], image_size: int) -> np.ndarray:
    """torchvision's mobilenet_v2 from the state_dict file: features -> global average pool, eval transforms."""
    from torchvision import transforms
    from torchvision.models import mobilenet_v2

    from deepship.runtime.preprocess import load_image

    from safetensors.torch import load_file

    model = mobilenet_v2(weights=None)
    state = load_file(str(weights)) if weights.suffix == ".safetensors" else torch.load(weights, weights_only=True)
    model.load_state_dict(state, strict=False)  # the shared backbone ships without a classifier
    model.eval()
    transform = transforms.Compose([transforms.Resize(round(image_size / 0.875)), transforms.CenterCrop(image_size),
                                    transforms.ToTensor(),
                                    transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
    with torch.no_grad():
        batch = torch.stack([transform(load_image(p)) for p in paths])
        return torch.nn.functional.adaptive_avg_pool2d(model.features(batch), 1).flatten(1).numpy()


def reference_probe(train_x: np.ndarray, train_y: list[str], x: np.ndarray) -> tuple[np.ndarray, float]:
    """Standardize + logistic regression; C: the first of the grid with the best 5-fold stratified accuracy."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    def model(c: float):
        return make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=2000))

    folds = StratifiedKFold(5, shuffle=True, random_state=SEED)
    scores = [cross_val_score(model(c), train_x, train_y, cv=folds).mean() for c in (0.1, 1.0, 10.0)]
    best = (0.1, 1.0, 10.0)[int(np.argmax(scores))]
    return model(best).fit(train_x, train_y).predict(x), best


def folder_samples(root: Path) -> tuple[list[str], list[str]]:
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in (".png", ".jpg", ".jpeg"))
    return [str(p) for p in files], [p.parent.name for p in files]


# ----------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def random_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A randomly initialised torchvision mobilenet_v2's state_dict, saved as a weights file."""
    from torchvision.models import mobilenet_v2

    torch.manual_seed(SEED)
    path = tmp_path_factory.mktemp("weights") / "mobilenet_v2_random.pth"
    torch.save(mobilenet_v2(weights=None).state_dict(), path)
    return path


@pytest.fixture(scope="module")
def pretrained_run(random_weights: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A one-epoch 32x32 image run from `random_weights`, trained through the CLI; (run dir, its stdout)."""
    root = tmp_path_factory.mktemp("probe-run")
    train = write_image_folder(root / "train", n_per_class=10, seed=1)
    raw = image_config(train, root / "runs", max_epochs=1, run_name="probe")
    raw["model"]["pretrained"] = str(random_weights)
    raw["data"]["val_fraction"] = 0.4
    raw["data"]["test"] = str(write_image_folder(root / "test", n_per_class=6, seed=4))
    config = write_config(root / "config.yaml", raw)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert cli.main(["train", "--config", str(config)]) == 0
    return root / "runs" / "probe", out.getvalue()


@pytest.fixture(scope="module")
def run_package(pretrained_run: tuple[Path, str], tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export(pretrained_run[0], tmp_path_factory.mktemp("probe-package") / "package")


def package_predictions(package: Path, paths: list[str]) -> np.ndarray:
    """The exported model's label indices (onnxruntime argmax): the model's answers, computed apart from the run."""
    from deepship.runtime.predictor import Predictor

    return Predictor.load(package).batched_logits(paths, 8).argmax(1)


def expected_comparison(model: np.ndarray, probe: np.ndarray, targets: np.ndarray) -> dict:
    """Model vs probe by hand: the accuracy difference, who alone gets which inputs right, McNemar's exact
    two-sided p-value from scipy's binomial test, and the verdict it implies."""
    from scipy.stats import binomtest

    b, c = int(np.sum((model == targets) & (probe != targets))), int(np.sum((model != targets) & (probe == targets)))
    p = binomtest(b, b + c, 0.5).pvalue if b + c else 1.0
    diff = float(np.mean(model == targets) - np.mean(probe == targets))
    return {"difference": diff, "b": b, "c": c, "p": p,
            "verdict": "ties" if p >= 0.05 else ("beats" if diff > 0 else "loses to")}


def assert_comparison(vs: dict, expected: dict) -> None:
    assert vs["difference"] == pytest.approx(expected["difference"], abs=1e-12)
    assert (vs["mcnemar"]["model_only_correct"], vs["mcnemar"]["baseline_only_correct"]) == (expected["b"], expected["c"])
    assert vs["mcnemar"]["p_value"] == pytest.approx(expected["p"], rel=1e-9)
    assert vs["verdict"] == expected["verdict"]
    assert vs["ci95"][0] <= expected["difference"] <= vs["ci95"][1]


def run_splits(run_dir: Path):
    from deepship.data.split import load_splits
    from deepship.run import read_run_config

    return load_splits(read_run_config(run_dir))


# --------------------------------------------------------------------------------------- tests
def test_probe_matches_torchvision_features_and_sklearn(random_weights: Path, tmp_path: Path) -> None:
    train_paths, train_labels = folder_samples(write_image_folder(tmp_path / "train", n_per_class=8, seed=1))
    test_paths, test_labels = folder_samples(write_image_folder(tmp_path / "test", n_per_class=4, seed=2))
    raw = image_config(tmp_path / "train", tmp_path / "runs")
    raw["model"]["pretrained"] = str(random_weights)
    cfg = Config.model_validate(raw)

    features = extract_features(frozen_backbone(cfg), test_paths, batch_size=5)  # batches of 5, 5, 2
    np.testing.assert_allclose(features, reference_features(random_weights, test_paths, 32), rtol=1e-4, atol=1e-5)
    predictions, c = probe_predict(cfg, train_paths, train_labels, test_paths)
    expected, expected_c = reference_probe(reference_features(random_weights, train_paths, 32), train_labels,
                                           reference_features(random_weights, test_paths, 32))
    assert c == expected_c and predictions == list(expected)
    assert len(set(predictions)) > 1  # not a degenerate constant answer


def test_paired_comparison_matches_mcnemar_by_scipy_and_a_normal_interval() -> None:
    from scipy.stats import binomtest

    from deepship.evaluation.baseline import compare_with_model, describe_comparison

    # 400 inputs: both right on 300, only the model on 40, only the baseline on 20, both wrong on 40
    targets = torch.arange(400) % 3
    wrong = (targets + 1) % 3
    model_ok = torch.tensor([True] * 300 + [True] * 40 + [False] * 20 + [False] * 40)
    base_ok = torch.tensor([True] * 300 + [False] * 40 + [True] * 20 + [False] * 40)
    model, base = torch.where(model_ok, targets, wrong), torch.where(base_ok, targets, wrong)

    vs = compare_with_model(model, base, targets, n_resamples=4000)
    p = binomtest(20, 60, 0.5).pvalue  # about 0.013
    assert vs["difference"] == pytest.approx(0.05) and vs["mcnemar"]["p_value"] == pytest.approx(p, rel=1e-9)
    assert (vs["model_accuracy"], vs["baseline_accuracy"]) == (pytest.approx(340 / 400), pytest.approx(320 / 400))
    assert vs["verdict"] == "beats"
    se = np.sqrt((60 / 400 - 0.05 ** 2) / 400)  # standard error of the mean of the per-input differences
    assert vs["ci95"] == pytest.approx([0.05 - 1.96 * se, 0.05 + 1.96 * se], abs=0.008)
    lo, hi = (f"{100 * x:+.1f}" for x in vs["ci95"])
    assert describe_comparison(vs, "fine-tuning", "the linear probe") == \
        f"fine-tuning beats the linear probe (diff +5.0 points, 95% CI [{lo}, {hi}], McNemar p={p:.3g})"

    reverse = compare_with_model(base, model, targets, n_resamples=500)
    assert reverse["verdict"] == "loses to" and reverse["difference"] == pytest.approx(-0.05)
    # 25 vs 20 discordant inputs: p about 0.55, the interval straddles zero
    close = torch.where(torch.tensor([True] * 355 + [False] * 45), targets, wrong)
    other = torch.where(torch.tensor([True] * 330 + [False] * 25 + [True] * 20 + [False] * 25), targets, wrong)
    tie = compare_with_model(close, other, targets, n_resamples=500)
    assert tie["verdict"] == "ties" and tie["mcnemar"]["p_value"] == pytest.approx(binomtest(25, 45, 0.5).pvalue)
    assert tie["ci95"][0] < 0 < tie["ci95"][1]


def test_run_reports_the_probe_beside_the_model(pretrained_run: tuple[Path, str], run_package: Path,
                                                random_weights: Path) -> None:
    run_dir, stdout = pretrained_run
    splits = run_splits(run_dir)
    train_x = reference_features(random_weights, splits.train.inputs, 32)
    metrics = read_json(run_dir / "metrics.json")
    probe = metrics["linear_probe"]
    lines = [x for x in stdout.splitlines() if x.startswith("linear probe (")]
    assert len(lines) == 2 and "linear_probe_skipped" not in metrics
    for split, part, line in (("val", probe, lines[0]), ("test", probe["test"], lines[1])):
        samples = getattr(splits, split)
        predictions, c = reference_probe(train_x, splits.train.labels,
                                         reference_features(random_weights, samples.inputs, 32))
        targets = np.array([splits.classes.index(y) for y in samples.labels])
        model = package_predictions(run_package, samples.inputs)
        expected = expected_comparison(model, np.array([splits.classes.index(y) for y in predictions]), targets)
        assert part["accuracy"] == pytest.approx(float(np.mean(predictions == np.asarray(samples.labels))), abs=1e-12)
        assert probe["C"] == c
        assert_comparison(part["vs_model"], expected)
        assert part["vs_model"]["model_accuracy"] == pytest.approx(metrics[split]["accuracy"], abs=1e-6)
        assert line.startswith(f"linear probe ({split}, {len(samples)} inputs): accuracy={part['accuracy']:.4f} ")
        assert f"fine-tuning {expected['verdict']} the linear probe (diff {100 * expected['difference']:+.1f} " \
               f"points, 95% CI [" in line and line.endswith(f"McNemar p={expected['p']:.3g})")
    baseline = read_json(run_dir / "report.json")["baseline"]
    assert baseline["name"] == "linear_probe" and baseline["train_samples"] == len(splits.train)
    assert baseline["accuracy"] == probe["accuracy"] and baseline["vs_model"] == probe["vs_model"]
    html = (run_dir / "report.html").read_text()
    assert "Baseline: linear_probe" in html and f"the model {probe['test']['vs_model']['verdict']} the baseline" in html


def test_evaluate_reports_the_probe_trained_on_the_package_training_split(
        pretrained_run: tuple[Path, str], run_package: Path, random_weights: Path, tmp_path: Path) -> None:
    run_dir, _ = pretrained_run
    held_out = write_image_folder(tmp_path / "held-out", n_per_class=5, seed=3)
    out = tmp_path / "report"
    assert cli.main(["evaluate", "--package", str(run_package), "--data", str(held_out), "--out", str(out),
                     "--latency-runs", "0", "--bootstrap", "50", "--baseline", "linear-probe"]) == 0
    splits = run_splits(run_dir)
    paths, labels = folder_samples(held_out)
    predictions, c = reference_probe(reference_features(random_weights, splits.train.inputs, 32), splits.train.labels,
                                     reference_features(random_weights, paths, 32))
    baseline = read_json(out / "report.json")["baseline"]
    assert baseline["name"] == "linear_probe" and baseline["C"] == c
    assert baseline["accuracy"] == pytest.approx(float(np.mean(predictions == np.asarray(labels))), abs=1e-12)
    targets = np.array([splits.classes.index(y) for y in labels])
    expected = expected_comparison(package_predictions(run_package, paths),
                                   np.array([splits.classes.index(y) for y in predictions]), targets)
    assert_comparison(baseline["vs_model"], expected)
    assert baseline["vs_model"]["n"] == len(paths) == 15


def test_runs_without_a_pretrained_image_backbone_skip_the_probe_saying_why(tiny_image_run: Path,
                                                                            tiny_text_run: Path) -> None:
    image, text = read_json(tiny_image_run / "metrics.json"), read_json(tiny_text_run / "metrics.json")
    assert image["linear_probe"] is None and image["linear_probe_skipped"].startswith("model.pretrained is false")
    assert text["linear_probe"] is None and "text run" in text["linear_probe_skipped"]
    assert read_json(tiny_image_run / "report.json")["baseline"] is None


def test_the_switch_turns_the_probe_off(random_weights: Path, tmp_path: Path) -> None:
    raw = image_config(tmp_path, tmp_path / "runs")
    raw["model"]["pretrained"] = str(random_weights)
    raw["finetune"]["linear_probe"] = False
    assert fit_run_probe(Config.model_validate(raw), splits=None) == (None, "finetune.linear_probe is false")


def test_a_probe_that_fails_costs_the_run_nothing_but_the_probe(random_weights: Path, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from deepship.data.sources import Samples
    from deepship.data.split import Splits
    from deepship.errors import ConfigError
    from deepship.evaluation import evaluate

    def no_sklearn(*args):
        raise ConfigError("the linear probe needs scikit-learn; pip install 'deepship[train]'")

    monkeypatch.setattr(evaluate, "fit_linear_probe", no_sklearn)
    raw = image_config(tmp_path, tmp_path / "runs")
    raw["model"]["pretrained"] = str(random_weights)
    samples = Samples(["a.png", "b.png"], ["red", "blue"], ["a.png", "b.png"], "train")
    probe, reason = fit_run_probe(Config.model_validate(raw), Splits(samples, samples, None, ["blue", "red"]))
    assert probe is None and reason == "the linear probe failed: the linear probe needs scikit-learn; pip install " \
                                      "'deepship[train]'"
    with pytest.raises(ConfigError, match="needs scikit-learn"):  # a head that starts from the probe needs it
        fit_run_probe(Config.model_validate(raw), Splits(samples, samples, None, ["blue", "red"]), for_head=True)


def test_a_package_whose_weights_file_is_missing_here_is_refused_before_any_work(tmp_path: Path) -> None:
    from deepship.errors import ConfigError
    from deepship.evaluation.baseline import get_baseline

    raw = image_config(tmp_path, tmp_path / "runs")
    raw["model"]["pretrained"] = str(tmp_path / "gone.safetensors")  # as a package trained elsewhere records it
    cfg = Config.model_validate(raw, context={"skip_path_checks": True})
    with pytest.raises(ConfigError, match=r"^--baseline linear-probe: model.pretrained: weights file '.*gone.safetensors' "
                                          r"not found on this host"):
        get_baseline("linear-probe", "image", cfg)


# ------------------------------------------------------------------------------ real photos
@pytest.mark.slow
@pytest.mark.skipif(not (FLOWERS.is_dir() and NATURAL_WEIGHTS.is_file()),
                    reason="needs the flowers17 photos and the pretrained MobileNetV2 weights (reference data)")
def test_probe_on_flowers17_with_a_real_pretrained_backbone(tmp_path: Path) -> None:
    raw = image_config(FLOWERS / "train", tmp_path / "runs")
    raw["model"] = {"backbone": "mobilenet_v2", "pretrained": str(NATURAL_WEIGHTS)}
    train_paths, train_labels = folder_samples(FLOWERS / "train")
    test_paths, test_labels = folder_samples(FLOWERS / "test")
    predictions, c = probe_predict(Config.model_validate(raw), train_paths, train_labels, test_paths)
    assert c in C_GRID and len(test_paths) == 240
    assert np.mean(np.asarray(predictions) == np.asarray(test_labels)) >= 0.90  # about 0.94 measured


# ------------------------------------------------------------------------------ the head from the probe
@pytest.mark.parametrize("classes", [("red", "green", "blue"), ("red", "blue")])
def test_the_probe_as_one_linear_layer_gives_its_probabilities(classes: tuple[str, ...]) -> None:
    from deepship.evaluation.linear_probe import LinearProbe, fit_probe

    rng = np.random.default_rng(0)
    labels = [classes[i % len(classes)] for i in range(60)]
    x = rng.normal(size=(60, 8)) * rng.uniform(0.5, 5, size=8) + rng.normal(size=8) * 3  # unscaled, off-center
    x[:, 0] += [3.0 * classes.index(y) for y in labels]  # some signal
    pipeline = fit_probe(x.astype(np.float32), labels, SEED)
    order = list(reversed(classes))  # any order the model's labels come in
    weight, bias = LinearProbe(backbone=None, pipeline=pipeline).as_linear(order)
    probs = torch.softmax(torch.as_tensor(x, dtype=torch.float32) @ weight.T + bias, dim=1).numpy()
    expected = pipeline.predict_proba(x)[:, [list(pipeline.classes_).index(c) for c in order]]
    np.testing.assert_allclose(probs, expected, atol=1e-4)


@pytest.mark.parametrize("head_init", ["probe", "random"])
def test_a_head_started_from_the_probe_predicts_what_the_probe_predicts(head_init: str, random_weights: Path,
                                                                       tmp_path: Path) -> None:
    """Frozen backbone, a learning rate too small to move anything: the model is its starting point. From the probe
    it answers exactly what an independently fitted probe answers; from a random head it does not."""
    train = write_image_folder(tmp_path / "train", n_per_class=10, seed=1)
    raw = image_config(train, tmp_path / "runs", max_epochs=1, lr=1e-9, run_name=head_init)
    raw["model"]["pretrained"] = str(random_weights)
    raw["data"]["val_fraction"] = 0.4
    raw["finetune"].update({"strategy": "freeze", "head_init": head_init})
    with contextlib.redirect_stdout(io.StringIO()):
        assert cli.main(["train", "--config", str(write_config(tmp_path / "config.yaml", raw))]) == 0
    run_dir = tmp_path / "runs" / head_init
    splits = run_splits(run_dir)
    expected, _ = reference_probe(reference_features(random_weights, splits.train.inputs, 32), splits.train.labels,
                                  reference_features(random_weights, splits.val.inputs, 32))
    model = package_predictions(export(run_dir, tmp_path / "package"), splits.val.inputs)
    same = [splits.classes[i] for i in model] == list(expected)
    assert same if head_init == "probe" else not same
