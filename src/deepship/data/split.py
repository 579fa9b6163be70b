"""Label maps and seeded, stratified train/val splits."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from deepship.config import Config
from deepship.data.sources import Samples, read_samples
from deepship.errors import DataError


@dataclass(frozen=True)
class Splits:
    train: Samples
    val: Samples
    test: Samples | None
    classes: list[str]  # index order of the model's outputs


def build_label_map(labels: Sequence[str], source: str) -> list[str]:
    classes = sorted(set(labels))
    if len(classes) < 2:
        raise DataError(f"{source}: found {len(classes)} class(es) {classes}; a classifier needs at least 2")
    return classes


def encode_labels(samples: Samples, classes: Sequence[str], split: str) -> np.ndarray:
    index = {c: i for i, c in enumerate(classes)}
    unknown = sorted(set(samples.labels) - index.keys())
    if unknown:
        raise DataError(
            f"{samples.source} ({split}): labels {unknown[:10]} do not occur in the training data "
            f"{list(classes)[:10]}; fix the spelling or add training examples"
        )
    return np.array([index[y] for y in samples.labels], dtype=np.int64)


def stratified_split(labels: Sequence[str], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Per class, hold out round(fraction * n) samples (at least one when n >= 2); seeded."""
    rng = np.random.default_rng(seed)
    by_class: dict[str, list[int]] = {}
    for i, y in enumerate(labels):
        by_class.setdefault(y, []).append(i)
    train, val = [], []
    for y in sorted(by_class):
        idx = rng.permutation(by_class[y]).tolist()
        n_val = min(len(idx) - 1, max(1, round(fraction * len(idx)))) if len(idx) >= 2 else 0
        val += idx[:n_val]
        train += idx[n_val:]
    return sorted(train), sorted(val)


def load_splits(cfg: Config) -> Splits:
    """Read train/val/test, split val off train when absent, and check labels across splits."""
    data = cfg.data
    train = read_samples(data.train, cfg.task, data)
    if data.val is not None:
        val = read_samples(data.val, cfg.task, data)
    else:
        train_idx, val_idx = stratified_split(train.labels, data.val_fraction, cfg.train.seed)
        train, val = train.subset(train_idx), train.subset(val_idx)
    classes = build_label_map(train.labels, train.source)
    test = read_samples(data.test, cfg.task, data) if data.test is not None else None
    for name, split in (("val", val), ("test", test)):
        if split is not None:
            if len(split) == 0:
                raise DataError(f"{split.source} ({name}): no samples; lower data.val_fraction or add data")
            encode_labels(split, classes, name)  # raises on labels unseen in training
    return Splits(train, val, test, classes)
