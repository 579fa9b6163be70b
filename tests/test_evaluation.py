"""deepship.evaluation: every number against an independent computation, including the edge cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats as scipy_stats

from deepship.evaluation.calibration import calibration_errors, fit_temperature, nll, reliability_bins
from deepship.evaluation.metrics import EPS, bootstrap_values, classification_metrics, log_loss, percentile_interval
from deepship.evaluation.thresholds import (
    cost_threshold,
    expected_cost,
    per_class_thresholds,
    risk_coverage,
    threshold_for_coverage,
    threshold_for_precision,
)

LABELS = ["a", "b", "c"]
# Class "c" is never predicted; one prediction is exactly 1.0 confident and one probability is exactly 0.
PROBS = torch.tensor([[1.0, 0.0, 0.0], [0.7, 0.2, 0.1], [0.2, 0.5, 0.3], [0.1, 0.6, 0.3],
                      [0.4, 0.35, 0.25], [0.3, 0.45, 0.25], [0.5, 0.1, 0.4], [0.2, 0.45, 0.35]],
                     dtype=torch.float64)
PROBS = PROBS / PROBS.sum(1, keepdim=True)
TARGETS = torch.tensor([0, 1, 1, 1, 2, 0, 2, 2])


def hand_prf(pred: np.ndarray, target: np.ndarray, c: int) -> tuple[float, float, float]:
    tp = np.sum((pred == c) & (target == c))
    fp, fn = np.sum((pred == c) & (target != c)), np.sum((pred != c) & (target == c))
    p = tp / (tp + fp) if tp + fp else 0.0
    r = tp / (tp + fn) if tp + fn else 0.0
    return p, r, (2 * p * r / (p + r) if p + r else 0.0)


def test_metrics_match_a_hand_computation() -> None:
    m = classification_metrics(PROBS, TARGETS, LABELS)
    pred, target = PROBS.argmax(1).numpy(), TARGETS.numpy()
    assert m["accuracy"] == pytest.approx(np.mean(pred == target))
    prf = [hand_prf(pred, target, c) for c in range(3)]
    support = np.bincount(target, minlength=3)
    assert m["macro_f1"] == pytest.approx(np.mean([f for _, _, f in prf]))  # "c": never predicted, F1 0, counted
    assert m["weighted_f1"] == pytest.approx(np.sum([f * s for (_, _, f), s in zip(prf, support)]) / support.sum())
    assert m["per_class"]["c"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 3}
    assert m["per_class"]["b"]["precision"] == pytest.approx(prf[1][0])
    cm = np.zeros((3, 3), dtype=int)
    for t, p in zip(target, pred):
        cm[t, p] += 1
    assert m["confusion_matrix"] == cm.tolist()
    top2 = np.mean([t in np.argsort(-row)[:2] for row, t in zip(PROBS.numpy(), target)])
    assert m["top2_accuracy"] == pytest.approx(top2) and "top5_accuracy" not in m
    picked = PROBS.numpy()[np.arange(8), target]
    assert m["log_loss"] == pytest.approx(-np.mean(np.log(np.clip(picked, EPS, 1))))


def test_log_loss_is_finite_for_confident_mistakes() -> None:
    probs = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    assert log_loss(probs, torch.tensor([0, 1])) == pytest.approx(0.0)  # confidence exactly 1, right
    assert log_loss(probs, torch.tensor([1, 1])) == pytest.approx(-math.log(EPS) / 2)  # exactly 0, wrong: finite


def test_binary_auc_equals_the_rank_statistic() -> None:
    rng = np.random.default_rng(0)
    p1 = rng.random(200)
    y = (rng.random(200) < p1).astype(int)
    probs = torch.tensor(np.stack([1 - p1, p1], 1))
    pos, neg = p1[y == 1], p1[y == 0]
    by_hand = np.mean([(a > b) + 0.5 * (a == b) for a in pos for b in neg])  # P(score_pos > score_neg)
    assert classification_metrics(probs, torch.tensor(y), ["n", "p"])["roc_auc"] == pytest.approx(by_hand, abs=1e-6)


def test_single_class_batch_has_no_auc_but_other_metrics() -> None:
    m = classification_metrics(PROBS[:1], TARGETS[:1], LABELS)
    assert m["roc_auc"] is None and m["pr_auc"] is None and m["accuracy"] == 1.0


@pytest.mark.parametrize("n", [200, 5000])
def test_bootstrap_interval_of_accuracy_matches_the_binomial_interval(n: int) -> None:
    right = torch.tensor(np.random.default_rng(n).random(n) < 0.8)
    values = bootstrap_values(n, lambda idx: float(right[idx].double().mean()), n_resamples=1000)
    lo, hi = percentile_interval(values)
    share = float(right.double().mean())
    half_width = 1.96 * math.sqrt(share * (1 - share) / n)  # the normal approximation, by hand
    assert lo < share < hi
    assert (hi - lo) / 2 == pytest.approx(half_width, rel=0.15)


# ------------------------------------------------------------------------------- calibration
def test_ece_and_empty_bins_by_hand() -> None:
    probs = torch.tensor([[0.95, 0.05], [0.95, 0.05], [0.55, 0.45], [1.0, 0.0]], dtype=torch.float64)
    targets = torch.tensor([0, 1, 0, 0])
    bins = reliability_bins(probs, targets, n_bins=10)
    assert [b["count"] for b in bins] == [0, 0, 0, 0, 0, 1, 0, 0, 0, 3]  # 1.0 lands in the last bin
    assert bins[0]["accuracy"] is None and bins[0]["confidence"] is None  # empty, marked as such
    errors = calibration_errors(probs, targets, n_bins=10)
    # bin (0.5, 0.6]: conf 0.55, acc 1; bin (0.9, 1.0]: conf (0.95+0.95+1)/3, acc 2/3
    last_gap = abs(2 / 3 - (0.95 + 0.95 + 1.0) / 3)
    assert errors["ece"] == pytest.approx((1 * 0.45 + 3 * last_gap) / 4)
    assert errors["mce"] == pytest.approx(max(0.45, last_gap))


def calibrated_logits(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits whose softmax is the true label distribution (a perfectly calibrated model)."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, 4, generator=g, dtype=torch.float64) * 2
    targets = torch.multinomial(torch.softmax(logits, 1), 1, generator=g).squeeze(1)
    return logits, targets


def test_temperature_scaling_recovers_t3() -> None:
    logits, targets = calibrated_logits(20000, seed=0)
    overconfident = logits * 3
    t = fit_temperature(overconfident, targets)
    assert t == pytest.approx(3.0, rel=0.05)
    assert nll(overconfident, targets, t) <= nll(overconfident, targets)
    assert torch.equal((overconfident / t).argmax(1), overconfident.argmax(1))  # accuracy unchanged
    before = calibration_errors(torch.softmax(overconfident, 1), targets)["ece"]
    after = calibration_errors(torch.softmax(overconfident / t, 1), targets)["ece"]
    assert after < before / 3


# -------------------------------------------------------------------------------- thresholds
def synthetic(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    logits, targets = calibrated_logits(n, seed)
    return torch.softmax(logits, 1), targets


def test_target_precision_is_met_on_held_out_data() -> None:
    val_probs, val_targets = synthetic(20000, seed=1)
    chosen = threshold_for_precision(val_probs, val_targets, target=0.9)
    assert chosen.feasible and chosen.precision >= 0.9 and 0.0 < chosen.coverage < 1.0
    test_probs, test_targets = synthetic(20000, seed=2)
    confidence, preds = test_probs.max(1)
    answered = confidence >= chosen.value
    held_out_precision = float((preds[answered] == test_targets[answered]).double().mean())
    assert held_out_precision >= 0.9 - 0.01  # sampling slack on 20k held-out inputs
    # a lower threshold would have answered more and missed the target on the data it was chosen on
    lower = confidence.new_tensor(chosen.value) - 1e-3
    vc, vp = val_probs.max(1)
    assert float((vp[vc >= lower] == val_targets[vc >= lower]).double().mean()) < 0.9 + 2e-3


def test_infeasible_precision_is_reported_not_faked() -> None:
    probs = torch.full((100, 2), 0.5, dtype=torch.float64)  # a coin flip with no confidence signal
    targets = torch.tensor([0, 1] * 50)
    chosen = threshold_for_precision(probs, targets, target=0.95)
    assert not chosen.feasible and chosen.value is None and "no threshold reaches precision 0.95" in chosen.note


def brute_force_precision_threshold(probs: np.ndarray, targets: np.ndarray, target: float) -> tuple:
    """Every observed confidence as a candidate threshold, answering everything at or above it:
    (value, precision, coverage) of the lowest candidate reaching `target`, or None."""
    confidence, correct = probs.max(1), probs.argmax(1) == targets
    for value in sorted(set(confidence.tolist())):
        answered = confidence >= value
        if correct[answered].mean() >= target:
            return value, correct[answered].mean(), answered.mean()
    return None


@pytest.mark.parametrize("seed", range(6))
def test_precision_threshold_equals_brute_force_with_ties(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n, c = int(rng.integers(1, 400)), int(rng.integers(2, 5))
    probs = np.round(rng.dirichlet(np.ones(c) * 0.7, size=n), 1 + seed % 2)  # coarse rounding: many ties
    targets = np.where(rng.random(n) < 0.7, probs.argmax(1), rng.integers(0, c, n))
    for target in (0.5, 0.8, 0.95, 1.0):
        fast = threshold_for_precision(torch.tensor(probs), torch.tensor(targets), target)
        expected = brute_force_precision_threshold(probs, targets, target)
        if expected is None:
            assert not fast.feasible and fast.value is None
            top = probs.max(1) == probs.max()
            assert fast.precision == (probs.argmax(1) == targets)[top].mean() and fast.coverage == top.mean()
        else:
            assert fast.feasible and (fast.value, fast.precision, fast.coverage) == expected


def test_coverage_threshold_and_risk_curve() -> None:
    probs, targets = synthetic(1000, seed=3)
    chosen = threshold_for_coverage(probs, targets, target=0.8)
    assert chosen.coverage >= 0.8 and chosen.coverage < 0.81
    curve = risk_coverage(probs, targets)
    assert curve["coverage"][-1] == 1.0
    assert curve["risk"][-1] == pytest.approx(1 - float((probs.argmax(1) == targets).double().mean()))
    assert curve["risk"][99] < curve["risk"][-1]  # the most confident tenth errs less than all


def test_per_class_thresholds_flag_a_class_never_predicted() -> None:
    out = per_class_thresholds(PROBS, TARGETS, LABELS, target=0.5)
    assert not out["c"].feasible and "never predicted" in out["c"].note
    # "a" is predicted at confidences 1.0 (right), 0.7, 0.5, 0.4 (wrong): answering the top two is 50% precise
    assert out["a"].feasible and out["a"].value == pytest.approx(0.7) and out["a"].precision == pytest.approx(0.5)
    assert out["a"].coverage == pytest.approx(0.5)


def test_cost_threshold_equals_brute_force() -> None:
    rng = np.random.default_rng(4)
    p = torch.tensor(np.round(rng.random(500), 2))  # ties on purpose
    y = torch.tensor((rng.random(500) < p.numpy()).astype(int))
    def cost_by_hand(t: float, cost_fp: float, cost_fn: float) -> float:
        positive = p.numpy() >= t
        return (cost_fp * np.sum(positive & (y.numpy() == 0)) + cost_fn * np.sum(~positive & (y.numpy() == 1))) / 500

    for cost_fp, cost_fn in ((1.0, 1.0), (1.0, 5.0), (10.0, 1.0)):
        fast = cost_threshold(p, y, cost_fp, cost_fn)
        grid = sorted(set(p.tolist())) + [float("inf")]
        costs = [cost_by_hand(t, cost_fp, cost_fn) for t in grid]
        assert fast["expected_cost"] == pytest.approx(min(costs))
        assert fast["threshold"] == grid[int(np.argmin(costs))]  # the lowest threshold at the minimum
        assert expected_cost(p, y, 0.5, cost_fp, cost_fn) == pytest.approx(cost_by_hand(0.5, cost_fp, cost_fn))
    # expensive misses push the threshold down, expensive false alarms push it up
    assert cost_threshold(p, y, 1.0, 5.0)["threshold"] < cost_threshold(p, y, 10.0, 1.0)["threshold"]


@pytest.mark.gpu
def test_cpu_and_gpu_agree() -> None:
    probs, targets = synthetic(5000, seed=5)
    cpu = classification_metrics(probs, targets, ["a", "b", "c", "d"])
    gpu = classification_metrics(probs.cuda(), targets.cuda(), ["a", "b", "c", "d"])
    for key in ("accuracy", "macro_f1", "weighted_f1", "roc_auc", "pr_auc", "log_loss"):
        assert gpu[key] == pytest.approx(cpu[key], abs=1e-6), key
    assert calibration_errors(probs.cuda(), targets.cuda())["ece"] == pytest.approx(
        calibration_errors(probs, targets)["ece"], abs=1e-6)


# ----------------------------------------------------------------- decision rule (runtime.decide)
def test_decide_applies_global_per_class_and_cost_rules() -> None:
    from deepship.runtime.predictor import decide

    probs = np.array([[0.9, 0.1], [0.6, 0.4], [0.3, 0.7], [0.45, 0.55]])
    preds, conf, abstained = decide(probs, ["neg", "pos"], None)
    assert preds.tolist() == [0, 0, 1, 1] and not abstained.any()
    _, _, abstained = decide(probs, ["neg", "pos"], {"min_confidence": 0.65})
    assert abstained.tolist() == [False, True, False, True]
    # per-class: 'pos' needs 0.6; 'neg' reached no target on validation, so it always abstains
    _, _, abstained = decide(probs, ["neg", "pos"], {"per_class": {"neg": None, "pos": 0.6}})
    assert abstained.tolist() == [True, True, False, True]
    # a cost threshold of 0.35 on P(pos) turns the second row positive, with its confidence 0.4
    preds, conf, _ = decide(probs, ["neg", "pos"], {"cost": {"threshold": 0.35}})
    assert preds.tolist() == [0, 1, 1, 1] and conf.tolist() == [0.9, 0.4, 0.7, 0.55]
    # an infeasible precision target answers nothing rather than falling back to argmax at 0.5
    _, _, abstained = decide(probs, ["neg", "pos"], {"basis": "target_precision", "feasible": False,
                                                      "min_confidence": None})
    assert abstained.all()


def test_choose_thresholds_follows_the_objective() -> None:
    from deepship.config import ObjectiveConfig
    from deepship.evaluation.thresholds import choose_thresholds

    probs, targets = synthetic(3000, seed=11)
    assert choose_thresholds(probs, targets, list("abcd"), ObjectiveConfig(), "val") is None
    rule = choose_thresholds(probs, targets, list("abcd"), ObjectiveConfig(target_precision=0.9), "val")
    expected = brute_force_precision_threshold(probs.numpy(), targets.numpy(), 0.9)
    assert rule["feasible"] and rule["basis"] == "target_precision" and rule["min_confidence"] == expected[0]
    rule = choose_thresholds(probs, targets, list("abcd"), ObjectiveConfig(target_coverage=0.8), "val")
    confidence = np.sort(probs.numpy().max(1))[::-1]
    assert rule["basis"] == "target_coverage" and rule["min_confidence"] == confidence[math.ceil(0.8 * 3000) - 1]
    wrong = (probs.argmax(1) + 1) % 4  # every prediction wrong: no threshold reaches any precision
    rule = choose_thresholds(probs, wrong, list("abcd"), ObjectiveConfig(target_precision=0.5), "val")
    assert rule["feasible"] is False and rule["min_confidence"] is None and "no threshold reaches" in rule["note"]
    rule = choose_thresholds(probs, targets, list("abcd"),
                             ObjectiveConfig(target_precision=0.9, per_class_thresholds=True), "val")
    assert set(rule["per_class"]) == set("abcd")


def test_score_names_match_sklearn() -> None:
    from sklearn import metrics as sk

    from deepship.evaluation.metrics import score

    probs, targets = synthetic(500, seed=2)
    p, y = probs.numpy(), targets.numpy()
    preds = p.argmax(1)
    one_hot = np.eye(4)[y]
    expected = {"accuracy": sk.accuracy_score(y, preds), "macro_f1": sk.f1_score(y, preds, average="macro"),
                "weighted_f1": sk.f1_score(y, preds, average="weighted"),
                "macro_precision": sk.precision_score(y, preds, average="macro", zero_division=0),
                "macro_recall": sk.recall_score(y, preds, average="macro"),
                "roc_auc": sk.roc_auc_score(y, p, multi_class="ovr", average="macro"),
                "pr_auc": np.mean([sk.average_precision_score(one_hot[:, c], p[:, c]) for c in range(4)])}
    full = classification_metrics(probs, targets, list("abcd"))
    for name, value in expected.items():
        assert score(name, probs, probs.argmax(1), targets) == pytest.approx(value, abs=1e-6), name
        assert full[name] == pytest.approx(value, abs=1e-6), name


# ------------------------------------------------------------------------- champion vs challenger
def test_mcnemar_exact_p_value_by_hand_and_large_sample_approximation() -> None:
    from deepship.evaluation.significance import mcnemar

    a = torch.tensor([True] * 6 + [False] * 4)
    b = torch.tensor([False] * 6 + [False] * 4)
    result = mcnemar(a, b)  # 6 discordant pairs, all one way: p = 2 * (1/2)^6
    assert (result["b"], result["c"], result["p_value"]) == (6, 0, pytest.approx(2 / 64))
    mixed = mcnemar(torch.tensor([True] * 9 + [False] * 3 + [True] * 8), torch.tensor([False] * 9 + [True] * 3 + [True] * 8))
    assert mixed["p_value"] == pytest.approx(scipy_stats.binomtest(3, 12, 0.5).pvalue)
    assert mcnemar(a, a)["p_value"] == 1.0
    # beyond the exact range the corrected chi-square agrees with the exact binomial to ~1e-3
    big_a = torch.tensor([True] * 700 + [False] * 600)
    big_b = ~big_a
    assert mcnemar(big_a, big_b)["p_value"] == pytest.approx(scipy_stats.binomtest(600, 1300, 0.5).pvalue, rel=0.05)


def test_paired_bootstrap_sees_a_real_difference_and_not_a_fake_one() -> None:
    from deepship.evaluation.significance import paired_bootstrap

    g = torch.Generator().manual_seed(0)
    targets = torch.randint(0, 2, (400,), generator=g)
    good = torch.where(torch.rand(400, generator=g) < 0.9, targets, 1 - targets)  # ~90% right
    poor = torch.where(torch.rand(400, generator=g) < 0.7, targets, 1 - targets)  # ~70% right
    acc = lambda preds: (lambda idx: float((preds[idx] == targets[idx]).double().mean()))  # noqa: E731
    better = paired_bootstrap(400, acc(poor), acc(good), n_resamples=300)
    assert better["ci"][0] > 0.1 and better["p_value"] < 0.01
    same = paired_bootstrap(400, acc(good), acc(good), n_resamples=300)
    assert same["ci"] == [0.0, 0.0] and same["p_value"] == 1.0


# ------------------------------------------------------------------------------------ gates
def test_gates_pass_fail_and_unmeasured() -> None:
    from deepship.config import ObjectiveConfig
    from deepship.evaluation.report import gates_section

    metrics = {"macro_f1": 0.91, "accuracy": 0.95}
    latency = {"batch_1": {"p95": 12.0}}
    assert gates_section(ObjectiveConfig(), metrics, latency)["passed"] is None
    ok = gates_section(ObjectiveConfig(min=0.9, latency_budget_ms=20), metrics, latency)
    assert ok["passed"] is True and [g["passed"] for g in ok["gates"]] == [True, True]
    slow = gates_section(ObjectiveConfig(min=0.9, latency_budget_ms=10), metrics, latency)
    assert slow["passed"] is False and slow["summary"] == "FAIL: batch-1 p95 latency <= 10 ms"
    weak = gates_section(ObjectiveConfig(metric="accuracy", min=0.96), metrics, None)
    assert weak["passed"] is False and weak["gates"][0]["value"] == 0.95
    unmeasured = gates_section(ObjectiveConfig(latency_budget_ms=10), metrics, None)
    assert unmeasured["passed"] is None and "not measured" in unmeasured["summary"]


def test_objective_config_rejects_contradictions() -> None:
    from pydantic import ValidationError

    from deepship.config import ObjectiveConfig

    for bad in ({"target_precision": 0.9, "target_coverage": 0.8}, {"cost_fp": 1.0},
                {"per_class_thresholds": True}, {"metric": "auc"}, {"min": 1.5}):
        with pytest.raises(ValidationError):
            ObjectiveConfig.model_validate(bad)


@pytest.mark.parametrize("target", [{"target_precision": 0.9}, {"target_coverage": 0.8}])
def test_a_cost_rule_with_a_confidence_target_exits_2_naming_both_keys(target: dict, tmp_path, capsys) -> None:
    """The cost rule moves binary decisions off the top class, so a confidence threshold fitted on
    the top class would promise a precision or coverage the package does not deliver."""
    from deepship import cli

    from conftest import write_config, write_text_csv

    raw = {"task": "text_classification", "data": {"train": str(write_text_csv(tmp_path / "t.csv", n_per_class=5))},
           "train": {"out_dir": str(tmp_path / "runs"), "run_name": "r"},
           "objective": {"cost_fp": 1.0, "cost_fn": 5.0, **target}}
    assert cli.main(["train", "--config", str(write_config(tmp_path / "c.yaml", raw))]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "objective: cost_fp/cost_fn and " + next(iter(target)) in err[0], err
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("metric", ["roc_auc", "pr_auc"])
def test_compare_on_a_metric_undefined_in_every_resample_reports_undefined(metric: str, tmp_path) -> None:
    """A one-class slice: ROC-AUC and PR-AUC exist on no resample, so there is no interval to take."""
    from deepship.config import ObjectiveConfig
    from deepship.evaluation.evaluate import write_report
    from deepship.evaluation.report import Decisions, build_report, comparison_section

    g = torch.Generator().manual_seed(0)
    logits_a, logits_b = torch.randn(50, 2, generator=g), torch.randn(50, 2, generator=g)
    targets = torch.ones(50, dtype=torch.long)
    champion, challenger = Decisions(logits_a, 1.0, None, ["n", "p"]), Decisions(logits_b, 1.0, None, ["n", "p"])
    section = comparison_section(champion, challenger, targets, metric, {"package": "b"}, n_resamples=50)
    assert section["paired_bootstrap"] == {"ci": None, "p_value": None, "n_resamples": 0}
    assert section["difference"] is None and section["conclusion"].startswith("undefined:")
    accuracy_by_hand = float((logits_b.argmax(1) == 1).double().mean())
    assert section["challenger_metrics"]["accuracy"] == pytest.approx(accuracy_by_hand)
    report = build_report(logits_a, targets, ["n", "p"], ObjectiveConfig(metric=metric), calibration={},
                          thresholds=None, model={}, data={}, comparison=section, n_resamples=50)
    write_report(report, tmp_path)  # the schema accepts it and the page renders it
    assert "undefined" in (tmp_path / "report.html").read_text()
