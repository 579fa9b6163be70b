"""The cheap models a deep one must beat, trained on the same training data, by name.

Each baseline names the modality it reads: evaluate refuses one that does not fit the package.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from deepship.config import Config
from deepship.errors import ConfigError
from deepship.evaluation.linear_probe import PROBE_MODALITY, probe_predict, require_pretrained


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
