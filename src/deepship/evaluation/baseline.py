"""The cheap models a deep one must beat, trained on the same training data, by name.

Each baseline names the modality it reads: evaluate refuses one that does not fit the package.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from deepship.errors import ConfigError


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
class Baseline:
    name: str  # as reported: what was fitted
    modality: str  # the inputs it reads: "text" | "image"
    predict: Callable[[Sequence[str], Sequence[str], Sequence[str]], list[str]]  # (train inputs, labels, inputs)


BASELINES = {"tfidf": Baseline("tfidf_linear_svm", "text", tfidf_predict)}


def get_baseline(name: str, modality: str) -> Baseline:
    """The registered baseline, checked against the package's modality (a one-line ConfigError otherwise)."""
    if name not in BASELINES:
        raise ConfigError(f"--baseline {name}: unknown; choose one of {sorted(BASELINES)}")
    baseline = BASELINES[name]
    if baseline.modality != modality:
        raise ConfigError(f"--baseline {name}: is a {baseline.modality} baseline; this package classifies "
                          f"{modality} inputs")
    return baseline
