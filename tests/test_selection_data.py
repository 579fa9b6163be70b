"""data.train_fraction (nested stratified subsets) and data.cv_folds / data.cv_fold (stratified folds)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from deepship import cli
from deepship.config import load_config
from deepship.data.split import load_validated, stratified_folds, stratified_subset
from deepship.errors import ConfigError, DataError

from conftest import text_config, write_config, write_text_csv

# 40 + 12 + 3 samples; by hand, max(1, round(f * n)) per class for f = 0.1, 0.25, 0.5, 1.0:
# a: 4, 10, 20, 40   b: 1, 3, 6, 12   c: 1 (0.3 rounds to 0), 1, 2 (1.5 rounds to even), 3
LABELS = ["a"] * 40 + ["b"] * 12 + ["c"] * 3
SIZES = {0.1: {"a": 4, "b": 1, "c": 1}, 0.25: {"a": 10, "b": 3, "c": 1}, 0.5: {"a": 20, "b": 6, "c": 2},
         1.0: {"a": 40, "b": 12, "c": 3}}


def class_counts(indices: list[int], labels: list[str]) -> dict[str, int]:
    return dict(Counter(labels[i] for i in indices))


def test_subsets_have_the_stated_per_class_sizes_and_are_nested() -> None:
    previous: set[int] = set()
    for fraction, expected in SIZES.items():
        keep = stratified_subset(LABELS, fraction, seed=3)
        assert len(set(keep)) == len(keep) == sum(expected.values())
        assert class_counts(keep, LABELS) == expected
        assert previous <= set(keep), f"the {fraction} subset does not contain the smaller one"
        previous = set(keep)
    assert stratified_subset(LABELS, 0.25, seed=3) == stratified_subset(LABELS, 0.25, seed=3)
    assert stratified_subset(LABELS, 0.25, seed=3) != stratified_subset(LABELS, 0.25, seed=4)


def test_folds_are_stratified_and_balanced() -> None:
    labels = ["a"] * 23 + ["b"] * 11 + ["c"] * 7
    folds = stratified_folds(labels, 5, seed=1)
    assert len(folds) == len(labels) and set(folds) == set(range(5))
    sizes = Counter(folds)
    assert max(sizes.values()) - min(sizes.values()) <= 1
    for y, n in Counter(labels).items():
        per_fold = [sum(1 for i, f in enumerate(folds) if f == k and labels[i] == y) for k in range(5)]
        assert sum(per_fold) == n and max(per_fold) - min(per_fold) <= 1, (y, per_fold)
    assert stratified_folds(labels, 5, seed=1) != stratified_folds(labels, 5, seed=2)


@pytest.fixture
def csv_60(tmp_path: Path) -> Path:
    return write_text_csv(tmp_path / "train.csv", n_per_class=60)


def load(tmp_path: Path, csv: Path, *overrides: str):
    raw = text_config(csv, tmp_path / "unused-backbone", tmp_path / "runs")
    return load_validated(load_config(write_config(tmp_path / "c.yaml", raw), overrides))


def test_train_fraction_subsets_train_only_and_changes_the_fingerprint(tmp_path: Path, csv_60: Path) -> None:
    full, full_report = load(tmp_path, csv_60)
    part, report = load(tmp_path, csv_60, "data.train_fraction=0.25")
    # val_fraction 0.2 of 60 per class holds out 12, leaving 48; a quarter of 48 is 12 per class
    assert Counter(part.train.labels) == {"pos": 12, "neg": 12}
    assert part.val.inputs == full.val.inputs  # every fraction validates on the same samples
    assert set(part.train.origins) < set(full.train.origins)
    assert report["splits"]["train"]["used"] == 24 and "0.25 of 96" in report["splits"]["train"]["subset"]
    assert report["fingerprint"] != full_report["fingerprint"]


def test_cv_folds_partition_the_training_data(tmp_path: Path, csv_60: Path) -> None:
    plain = load(tmp_path, csv_60)[0]
    everything = set(plain.train.origins) | set(plain.val.origins)  # the pool: train before a hold-out
    vals, prints = [], set()
    for fold in range(4):
        splits, report = load(tmp_path, csv_60, "data.cv_folds=4", f"data.cv_fold={fold}")
        val, train = set(splits.val.origins), set(splits.train.origins)
        assert not val & train and val | train == everything
        assert Counter(splits.val.labels) == {"pos": 15, "neg": 15}  # 60 per class over 4 folds
        assert report["splits"]["val"]["sources"].startswith(f"fold {fold} of 4")
        vals.append(val)
        prints.add(report["fingerprint"])
    assert set().union(*vals) == everything and sum(len(v) for v in vals) == len(everything)
    assert len(prints) == 4


def test_a_class_thinner_than_the_folds_is_refused(tmp_path: Path) -> None:
    csv = write_text_csv(tmp_path / "small.csv", n_per_class=3)
    with pytest.raises(DataError, match=r"data.cv_folds=4 needs at least 4 .* lower data.cv_folds"):
        load(tmp_path, csv, "data.cv_folds=4")


@pytest.mark.parametrize("overrides, message", [
    (["data.train_fraction=0"], r"data.train_fraction: .*greater than 0"),
    (["data.train_fraction=1.5"], r"data.train_fraction: .*less than or equal to 1"),
    (["data.cv_folds=1"], r"data.cv_folds: .*greater than or equal to 2"),
    (["data.cv_folds=3", "data.cv_fold=3"], r"data.cv_fold: .*below data.cv_folds=3"),
    (["data.cv_fold=1"], r"data.cv_fold: .*set data.cv_folds too"),
    (["data.cv_folds=3", "data.val=VAL"], r"data.cv_folds: .*drop data.val or data.cv_folds"),
])
def test_bad_fraction_and_fold_keys_are_config_errors(tmp_path: Path, csv_60: Path, overrides: list[str],
                                                      message: str) -> None:
    overrides = [o.replace("VAL", str(csv_60)) for o in overrides]
    raw = text_config(csv_60, tmp_path, tmp_path / "runs")
    with pytest.raises(ConfigError, match=message):
        load_config(write_config(tmp_path / "c.yaml", raw), overrides)


def test_cv_with_data_val_exits_2_with_one_line(tmp_path: Path, csv_60: Path, capsys) -> None:
    config = write_config(tmp_path / "c.yaml", text_config(csv_60, tmp_path, tmp_path / "runs"))
    code = cli.main(["train", "--config", str(config), "--set", "data.cv_folds=3", f"data.val={csv_60}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "drop data.val or data.cv_folds" in err


def test_a_resume_with_another_fraction_or_fold_is_refused(tmp_path: Path, csv_60: Path, tiny_bert_dir: Path) -> None:
    from deepship.training import fit

    raw = text_config(csv_60, tiny_bert_dir, tmp_path / "runs", max_epochs=1)
    raw["data"].update({"cv_folds": 3, "train_fraction": 0.5})
    config = write_config(tmp_path / "c.yaml", raw)
    fit(load_config(config))
    for change in ("data.train_fraction=0.25", "data.cv_fold=1"):
        with pytest.raises(ConfigError, match=rf"other settings \({change.split('=')[0]}"):
            fit(load_config(config, ["train.resume=true", "train.max_epochs=2", change]))
