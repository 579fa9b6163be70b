"""The cheap model a deep one must beat: TF-IDF (word 1-2 grams) + a linear SVM, on the same training data."""

from __future__ import annotations

from typing import Sequence

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
