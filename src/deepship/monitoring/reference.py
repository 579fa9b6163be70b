"""The reference profile: what the validation set looked like to the shipped model, stored in the
package so a serving host can be monitored with nothing but the package and its prediction log.

Numeric signals keep a sample (for KS) and quantile bins with their counts (for PSI); categorical
ones keep counts; embeddings keep a sample in `reference_embeddings.npy` (float32, no pickle).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from deepship.monitoring.drift import binned, quantile_edges, sample_rows

SAMPLE_SIZE = 2000  # values kept per numeric signal; KS against 2,000 reference values is plenty
EMBEDDING_SAMPLE = 500
EMBEDDINGS_FILE = "reference_embeddings.npy"


def numeric_profile(values: np.ndarray) -> dict[str, Any]:
    values = np.asarray(values, dtype=float)
    edges = quantile_edges(values)
    return {"kind": "numeric", "n": int(values.size), "edges": edges, "counts": binned(values, edges).tolist(),
            "mean": float(values.mean()),
            # full precision: confidences near 1 differ only in the 8th digit, and KS compares ranks
            "sample": [float(v) for v in sample_rows(values, SAMPLE_SIZE)]}


def categorical_profile(indices: np.ndarray, labels: Sequence[str]) -> dict[str, Any]:
    counts = np.bincount(np.asarray(indices, dtype=int), minlength=len(labels))
    return {"kind": "categorical", "n": int(counts.sum()), "counts": dict(zip(labels, counts.tolist()))}


def build_profile(labels: Sequence[str], preds: np.ndarray, confidence: np.ndarray, targets: np.ndarray | None,
                  stats: dict[str, np.ndarray], source: str) -> dict[str, Any]:
    """The profile from arrays (one row per reference input): decisions, confidence, input stats."""
    signals: dict[str, Any] = {"predicted_class": categorical_profile(preds, labels),
                               "confidence": numeric_profile(confidence)}
    signals |= {name: numeric_profile(values) for name, values in stats.items()}
    profile: dict[str, Any] = {"source": source, "n": int(len(preds)), "signals": signals}
    if targets is not None:
        profile["true_class"] = categorical_profile(targets, labels)
        profile["accuracy"] = float(np.mean(preds == targets))
    return profile


def stats_columns(records: Sequence[dict[str, Any]], names: Sequence[str]) -> dict[str, np.ndarray]:
    """deepship.runtime.stats records -> one float array per numeric signal present in them."""
    return {name: np.array([float(r[name]) for r in records]) for name in names if records and name in records[0]}


def write_embeddings(package_dir: Path, embeddings: np.ndarray) -> dict[str, Any]:
    sample = sample_rows(embeddings.astype(np.float32), EMBEDDING_SAMPLE)
    np.save(package_dir / EMBEDDINGS_FILE, sample, allow_pickle=False)
    return {"file": EMBEDDINGS_FILE, "n": int(len(sample)), "dim": int(sample.shape[1])}


def read_embeddings(package_dir: Path, profile: dict[str, Any]) -> np.ndarray | None:
    entry = profile.get("embeddings")
    if not entry:
        return None
    return np.load(package_dir / entry["file"], allow_pickle=False)
