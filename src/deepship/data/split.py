"""Label maps and seeded, stratified train/val splits."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from deepship.config import Config
from deepship.data.sources import Samples, read_split
from deepship.data.validate import (
    SampleCheck,
    balance_warnings,
    check_samples,
    find_duplicates,
    find_label_conflicts,
    find_leakage,
    fingerprint,
    new_report,
    split_summary,
)
from deepship.errors import DataError


@dataclass(frozen=True)
class Splits:
    train: Samples
    val: Samples
    test: Samples | None
    classes: list[str]  # index order of the model's outputs


@dataclass(frozen=True)
class Checked:
    samples: Samples
    checks: list[SampleCheck]  # one per sample, all usable

    def subset(self, indices: Sequence[int]) -> "Checked":
        return Checked(self.samples.subset(indices), [self.checks[i] for i in indices])


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


def permute_by_class(labels: Sequence[str], rng: np.random.Generator) -> dict[str, list[int]]:
    """Each class's sample indices in a random order, classes in sorted order (one draw per class)."""
    by_class: dict[str, list[int]] = {}
    for i, y in enumerate(labels):
        by_class.setdefault(y, []).append(i)
    return {y: rng.permutation(by_class[y]).tolist() for y in sorted(by_class)}


def stratified_split(labels: Sequence[str], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Per class, hold out round(fraction * n) samples (at least one when n >= 2); seeded."""
    train, val = [], []
    for idx in permute_by_class(labels, np.random.default_rng(seed)).values():
        n_val = min(len(idx) - 1, max(1, round(fraction * len(idx)))) if len(idx) >= 2 else 0
        val += idx[:n_val]
        train += idx[n_val:]
    return sorted(train), sorted(val)


# Own random streams: at the same seed, the subset and the folds do not reuse the validation hold-out's draws.
SUBSET_STREAM, FOLD_STREAM = 1, 2


def stratified_subset(labels: Sequence[str], fraction: float, seed: int) -> list[int]:
    """Per class, keep max(1, round(fraction * n)) samples: a prefix of a seeded per-class order that does not
    depend on the fraction, so at one seed a smaller fraction's subset lies inside a larger one's."""
    keep: list[int] = []
    for idx in permute_by_class(labels, np.random.default_rng([seed, SUBSET_STREAM])).values():
        keep += idx[: max(1, round(fraction * len(idx)))]
    return sorted(keep)


def stratified_folds(labels: Sequence[str], folds: int, seed: int) -> list[int]:
    """The fold (0..folds-1) of every sample. Dealing the classes' seeded orders one after another round the
    folds makes each class's count per fold, and each fold's size, differ by at most one."""
    order = [i for idx in permute_by_class(labels, np.random.default_rng([seed, FOLD_STREAM])).values() for i in idx]
    fold = np.empty(len(order), dtype=np.int64)
    fold[order] = np.arange(len(order)) % folds
    return fold.tolist()


class DataValidationError(DataError):
    """Too many bad samples: carries the report so the caller can write it before stopping."""

    def __init__(self, message: str, report: dict[str, Any]) -> None:
        super().__init__(message)
        self.report = report


def _quarantine(name: str, samples: Samples, cfg: Config, report: dict[str, Any]) -> Checked:
    checks = check_samples(samples, cfg)
    report["splits"][name] = split_summary(samples, checks, cfg.task == "text_classification")
    report["quarantine"] += [{"split": name, "origin": o, "reason": c.reason}
                             for o, c in zip(samples.origins, checks) if c.reason]
    keep = [i for i, c in enumerate(checks) if c.reason is None]
    return Checked(samples.subset(keep), [checks[i] for i in keep])


def _hold_out_val(train: Checked, cfg: Config, report: dict[str, Any]) -> tuple[Checked, Checked]:
    """data.val_fraction of train, or with cross-validation fold data.cv_fold of data.cv_folds."""
    d, seed, labels = cfg.data, cfg.train.seed, train.samples.labels
    if d.cv_folds is None:
        tr, va = stratified_split(labels, d.val_fraction, seed)
        source = f"{d.val_fraction:g} of train (stratified, seed {seed})"
    else:
        check_fold_sizes(labels, d.cv_folds, train.samples.source)
        folds = stratified_folds(labels, d.cv_folds, seed)
        tr = [i for i, f in enumerate(folds) if f != d.cv_fold]
        va = [i for i, f in enumerate(folds) if f == d.cv_fold]
        source = f"fold {d.cv_fold} of {d.cv_folds} of train (stratified, seed {seed})"
    report["splits"]["val"] = {"sources": source, "read": len(va), "quarantined": {}}
    return train.subset(tr), train.subset(va)


def check_fold_sizes(labels: Sequence[str], folds: int, source: str) -> None:
    """Every class needs a sample in every fold, or some fold would train without that class."""
    thin = {y: n for y, n in sorted(Counter(labels).items()) if n < folds}
    if thin:
        raise DataError(f"{source}: data.cv_folds={folds} needs at least {folds} usable training samples per class; "
                        f"{dict(list(thin.items())[:5])} have fewer; lower data.cv_folds or add examples")


def _keep_fraction(train: Checked, cfg: Config, report: dict[str, Any]) -> Checked:
    keep = stratified_subset(train.samples.labels, cfg.data.train_fraction, cfg.train.seed)
    report["splits"]["train"]["subset"] = (f"{cfg.data.train_fraction:g} of {len(train.checks)} "
                                           f"(stratified, seed {cfg.train.seed})")
    return train.subset(keep)


def _remove_leakage(checked: dict[str, Checked], cfg: Config, report: dict[str, Any]) -> None:
    train = checked["train"]
    train_keys: dict[str, str] = {}
    for c, origin in zip(train.checks, train.samples.origins):
        train_keys.setdefault(c.key, origin)
    for name in ("val", "test"):
        if name not in checked:
            continue
        leaked, entry = find_leakage(train_keys, [c.key for c in checked[name].checks], checked[name].samples.origins)
        report["leakage"][name] = {**entry, "removed": cfg.data.remove_leakage and bool(leaked)}
        if leaked:
            report["warnings"].append(f"{name}: {len(leaked)} samples also occur in train"
                                      + (" (removed)" if cfg.data.remove_leakage else " (kept: data.remove_leakage=false)"))
        if leaked and cfg.data.remove_leakage:
            drop = set(leaked)
            checked[name] = checked[name].subset([i for i in range(len(checked[name].checks)) if i not in drop])


def _summarize(checked: dict[str, Checked], classes: list[str], cfg: Config, report: dict[str, Any]) -> None:
    for name, split in checked.items():
        counts = Counter(split.samples.labels)
        entry = report["splits"][name]
        entry["used"] = len(split.checks)
        entry["class_counts"] = {c: counts.get(c, 0) for c in classes}
        entry["duplicates"] = find_duplicates([c.key for c in split.checks], split.samples.origins)
        if entry["duplicates"]["count"]:
            report["warnings"].append(f"{name}: {entry['duplicates']['count']} exact duplicate samples")
        if name == "train":  # val/test counts are in the table; only training data can be too thin to learn
            report["warnings"] += balance_warnings(name, counts, classes, cfg)
    report["label_conflicts"] = find_label_conflicts(
        [([c.key for c in s.checks], s.samples.labels, s.samples.origins, s.samples.inputs) for s in checked.values()])
    if report["label_conflicts"]["count"]:
        report["warnings"].append(f"{report['label_conflicts']['count']} inputs carry conflicting labels")
    report["classes"] = classes
    report["examples"] = {c: [x for x, y in zip(checked["train"].samples.inputs, checked["train"].samples.labels)
                              if y == c][:3] for c in classes}
    report["fingerprint"] = fingerprint({n: ([c.exact for c in s.checks], s.samples.labels) for n, s in checked.items()})


def load_validated(cfg: Config) -> tuple[Splits, dict[str, Any]]:
    """Read every split, quarantine bad samples, split val off train when absent, remove leakage,
    and check labels across splits. Returns the usable splits and the data report. Too many bad samples
    stop with DataValidationError only after every check ran, so its report holds every finding."""
    data = cfg.data
    report = new_report(cfg)
    raw = {"train": data.train, "val": data.val, "test": data.test}
    checked = {name: _quarantine(name, read_split(sources, cfg.task, data), cfg, report)
               for name, sources in raw.items() if sources is not None}
    read = sum(s["read"] for s in report["splits"].values())
    t = report["totals"] = {"read": read, "quarantined": len(report["quarantine"]),
                            "bad_fraction": len(report["quarantine"]) / max(read, 1),
                            "max_bad_fraction": data.max_bad_fraction}
    try:
        splits = _check_usable(checked, cfg, report)
    except DataError as exc:
        if t["bad_fraction"] <= data.max_bad_fraction:
            raise
        report["warnings"].append(f"not checked further: {exc}")
    if t["bad_fraction"] > data.max_bad_fraction:
        raise DataValidationError(f"{t['quarantined']} of {t['read']} samples ({t['bad_fraction']:.1%}) failed "
                                  f"validation, above data.max_bad_fraction={data.max_bad_fraction:g}", report)
    return splits, report


def _check_usable(checked: dict[str, Checked], cfg: Config, report: dict[str, Any]) -> Splits:
    """Leakage, labels, duplicates, conflicts and balance of the samples that passed quarantine."""
    if "val" not in checked:
        checked["train"], checked["val"] = _hold_out_val(checked["train"], cfg, report)
    _remove_leakage(checked, cfg, report)
    if cfg.data.train_fraction < 1.0:
        # after leakage removal, which compares against the whole training pool: every fraction
        # validates on the same samples, so a learning curve's points differ only in training data
        checked["train"] = _keep_fraction(checked["train"], cfg, report)
    classes = build_label_map(checked["train"].samples.labels, checked["train"].samples.source)
    for name in ("val", "test"):
        if name in checked:
            if not checked[name].checks:
                raise DataError(f"{checked[name].samples.source} ({name}): no usable samples; see the data report")
            encode_labels(checked[name].samples, classes, name)  # raises on labels unseen in training
    _summarize(checked, classes, cfg, report)
    test = checked["test"].samples if "test" in checked else None
    return Splits(checked["train"].samples, checked["val"].samples, test, classes)


def load_splits(cfg: Config) -> Splits:
    return load_validated(cfg)[0]
