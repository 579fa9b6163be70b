"""The cheap models a deep one must beat, trained on the same training data, by name.

Each baseline names the modality it reads: evaluate refuses one that does not fit the package.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable, Sequence

import numpy as np
import torch

from deepship.config import Config
from deepship.errors import ConfigError
from deepship.evaluation.linear_probe import PROBE_MODALITY, probe_predict, require_pretrained
from deepship.evaluation.significance import mcnemar, paired_bootstrap

SIGNIFICANCE = 0.05  # McNemar p below this: the model beats (or loses to) the baseline; else they tie


def tfidf_predict(train_texts: Sequence[str], train_labels: Sequence[str], texts: Sequence[str]) -> list[str]:
    """Fit on the training texts, predict label strings for `texts`."""
    try:
        from sklearn.feature_extraction.text import TfidfVectorizer
        from sklearn.svm import LinearSVC
    except ImportError:
        raise ConfigError("--baseline tfidf needs scikit-learn; pip install 'deepship[train]'") from None
    vectorizer = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True)
    model = LinearSVC().fit(vectorizer.fit_transform(list(train_texts)), list(train_labels))
    return [str(y) for y in model.predict(vectorizer.transform(list(texts)))]


def tfidf_accuracy(train_texts: Sequence[str], train_labels: Sequence[str], texts: Sequence[str],
                   labels: Sequence[str]) -> float:
    return float(np.mean(np.asarray(tfidf_predict(train_texts, train_labels, texts)) == np.asarray(labels)))


@dataclass(frozen=True)
class BaselineFit:
    predictions: list[str]  # label strings, one per scored input
    details: dict[str, Any] = field(default_factory=dict)  # what the fit chose (e.g. C), reported beside the scores


def tfidf_baseline(cfg: Config, train_texts: Sequence[str], train_labels: Sequence[str],
                   texts: Sequence[str]) -> BaselineFit:
    return BaselineFit(tfidf_predict(train_texts, train_labels, texts))


def linear_probe_baseline(cfg: Config, train_paths: Sequence[str], train_labels: Sequence[str],
                          paths: Sequence[str]) -> BaselineFit:
    predictions, c = probe_predict(cfg, train_paths, train_labels, paths)
    return BaselineFit(predictions, {"C": c})


@dataclass(frozen=True)
class Baseline:
    name: str  # as reported: what was fitted
    modality: str  # the inputs it reads: "text" | "image"
    predict: Callable[[Config, Sequence[str], Sequence[str], Sequence[str]], BaselineFit]  # (config, train inputs,
    # their labels, inputs to predict); the config is the model's: its backbone, weights and seed
    check: Callable[[Config], None] = lambda cfg: None  # refuses a config it cannot use, before any work


BASELINES = {"tfidf": Baseline("tfidf_linear_svm", "text", tfidf_baseline),
             "linear-probe": Baseline("linear_probe", PROBE_MODALITY, linear_probe_baseline, require_pretrained)}


def get_baseline(name: str, modality: str, cfg: Config) -> Baseline:
    """The registered baseline, checked against the package's modality and config (a one-line ConfigError)."""
    if name not in BASELINES:
        raise ConfigError(f"--baseline {name}: unknown; choose one of {sorted(BASELINES)}")
    baseline = BASELINES[name]
    if baseline.modality != modality:
        raise ConfigError(f"--baseline {name}: reads {baseline.modality} inputs; this package classifies "
                          f"{modality} inputs")
    try:
        baseline.check(cfg)
    except ConfigError as exc:
        raise ConfigError(f"--baseline {name}: {exc}") from None
    return baseline


# ------------------------------------------------------------------------------ model vs baseline
def resampled_accuracy(correct: torch.Tensor, idx: torch.Tensor) -> float:
    return float(correct[idx].double().mean())


def compare_with_model(model_preds: torch.Tensor, baseline_preds: torch.Tensor, targets: torch.Tensor,
                       n_resamples: int = 1000, seed: int = 0) -> dict[str, Any]:
    """The model against the baseline on the same inputs (label indices, (N,) each): the accuracy difference
    (model - baseline) with its paired-bootstrap 95% interval, and McNemar's exact test on the inputs exactly
    one of them gets right. Paired: both score every input, so the test-set sampling noise that two separate
    intervals would each carry largely cancels. The verdict follows McNemar at `SIGNIFICANCE`."""
    model_ok, baseline_ok = model_preds == targets, baseline_preds == targets
    boot = paired_bootstrap(len(targets), partial(resampled_accuracy, baseline_ok), partial(resampled_accuracy, model_ok),
                            n_resamples, seed=seed)
    test = mcnemar(model_ok, baseline_ok)
    difference = float(model_ok.double().mean() - baseline_ok.double().mean())
    verdict = "ties" if test["p_value"] >= SIGNIFICANCE else "beats" if difference > 0 else "loses to"
    return {"n": int(len(targets)), "model_accuracy": float(model_ok.double().mean()),
            "baseline_accuracy": float(baseline_ok.double().mean()), "difference": difference, "ci95": boot["ci"],
            "paired_bootstrap_p": boot["p_value"], "mcnemar": {"model_only_correct": test["b"],
            "baseline_only_correct": test["c"], "p_value": test["p_value"], "method": test["method"]},
            "verdict": verdict}


def describe_comparison(vs: dict[str, Any], subject: str, baseline: str) -> str:
    """E.g. 'fine-tuning beats the linear probe (diff +2.5 points, 95% CI [+0.4, +4.6], McNemar p=0.039)'."""
    ci = "undefined" if vs["ci95"] is None else "[" + ", ".join(f"{100 * x:+.1f}" for x in vs["ci95"]) + "]"
    return (f"{subject} {vs['verdict']} {baseline} (diff {100 * vs['difference']:+.1f} points, 95% CI {ci}, "
            f"McNemar p={vs['mcnemar']['p_value']:.3g})")
