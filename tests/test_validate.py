"""Data validation: every planted defect is found, counted and handled; clean data reports nothing."""

from __future__ import annotations

import csv
import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from deepship import cli
from deepship.config import Config
from deepship.data.report import HTML_NAME, JSON_NAME, render_html
from deepship.data.split import DataValidationError, load_validated
from deepship.errors import DataError

from conftest import image_config, toy_image, train_run, write_config, write_image_folder, write_text_csv


def config(task: str, train, test=None, **data_keys) -> Config:
    data = {"train": train if isinstance(train, list) else str(train), "val_fraction": 0.2, **data_keys}
    if test is not None:
        data["test"] = str(test)
    return Config.model_validate({"task": task, "data": data})


def reasons(report: dict) -> dict[str, str]:
    return {Path(q["origin"].split(" row ")[0]).name if " row " not in q["origin"] else q["origin"].split("/")[-1]:
            q["reason"] for q in report["quarantine"]}


# ----------------------------------------------------------------------------------- images
@pytest.fixture
def defective_images(tmp_path: Path) -> tuple[Path, Path]:
    train = write_image_folder(tmp_path / "train", n_per_class=30)
    test = write_image_folder(tmp_path / "test", n_per_class=5, seed=9)
    good = (train / "red" / "red_000.jpg").read_bytes()
    (train / "red" / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (train / "green" / "empty.png").write_bytes(b"")
    (train / "blue" / "notes.jpg").write_text("this is a text file renamed .jpg")
    Image.new("RGB", (8, 8)).save(train / "blue" / "tiny.png")
    Image.new("RGB", (200, 200)).save(train / "blue" / "bomb.png")
    shutil.copy(train / "green" / "green_001.png", test / "green" / "leaked.png")  # train/test leakage
    shutil.copy(train / "red" / "red_003.png", train / "blue" / "conflict.png")  # same pixels, two labels
    (train / "purple").mkdir()
    for i in range(3):  # a 3-example class
        toy_image(np.random.default_rng(100 + i), "red").save(train / "purple" / f"p{i}.png")
    (test / "purple").mkdir()
    toy_image(np.random.default_rng(200), "red").save(test / "purple" / "p.png")
    return train, test


def test_image_defects_are_found_counted_and_handled(defective_images, monkeypatch) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)  # 200x200 is now a "decompression bomb"
    train, test = defective_images
    cfg = config("image_classification", train, test, max_bad_fraction=0.1)
    splits, report = load_validated(cfg)
    found = reasons(report)
    assert found["truncated.jpg"].startswith("truncated or corrupt image")
    assert found["empty.png"] == "zero-byte file"
    assert found["notes.jpg"].startswith("not an image")
    assert found["tiny.png"] == "too small (8x8 < data.min_image_size=16)"
    assert found["bomb.png"].startswith("decompression bomb")
    assert report["totals"]["quarantined"] == 5 and report["totals"]["read"] == 90 + 9 + 16 + 1
    assert report["splits"]["train"]["quarantined"] == {"truncated or corrupt image": 1, "zero-byte file": 1,
                                                       "not an image": 1, "too small": 1, "decompression bomb": 1}
    bad_paths = {str((train / d / f).resolve()) for d, f in [("red", "truncated.jpg"), ("green", "empty.png"),
                                                             ("blue", "notes.jpg"), ("blue", "tiny.png")]}
    assert not bad_paths & set(splits.train.inputs + splits.val.inputs)  # skipped, never trained on
    leak = report["leakage"]["test"]
    assert leak["count"] == 1 and leak["removed"] and leak["examples"][0]["sample"].endswith("leaked.png")
    assert len(splits.test) == 15 + 1 + 1 - 1  # 3 colours x 5, purple, leaked (removed)
    conflicts = report["label_conflicts"]
    assert conflicts["count"] == 1 and conflicts["examples"][0]["labels"] == {"red": 1, "blue": 1}
    assert any("train: class 'purple' has" in w and "data.min_per_class=10" in w for w in report["warnings"])
    assert report["splits"]["train"]["class_counts"]["purple"] + report["splits"]["val"]["class_counts"]["purple"] == 3


def test_clean_data_reports_zero_issues(image_dir: Path, text_csv: Path) -> None:
    for cfg in (config("image_classification", image_dir), config("text_classification", text_csv)):
        _, report = load_validated(cfg)
        assert report["quarantine"] == [] and report["totals"]["bad_fraction"] == 0
        assert report["label_conflicts"]["count"] == 0 and report["leakage"]["val"]["count"] == 0
        assert all(s["duplicates"]["count"] == 0 for s in report["splits"].values())
        assert report["warnings"] == [], report["warnings"]


# ------------------------------------------------------------------------------------- text
def write_rows(path: Path, rows: list[tuple[str, str]]) -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        writer.writerows(rows)
    return path


def test_text_defects_are_found_counted_and_handled(tmp_path: Path) -> None:
    train = write_text_csv(tmp_path / "train.csv", n_per_class=40)
    rows = list(csv.reader(open(train)))[1:]
    rows += [("   ", "pos"), ("a perfectly fine text", ""), ("Great  film", "pos"), ("great film", "neg")]
    rows += [(f"rare class example {i}", "rare") for i in range(3)]
    write_rows(train, rows)
    with open(train, "ab") as f:
        f.write(b"caf\xe9 latin-1 bytes,pos\n")  # not UTF-8
    test = write_rows(tmp_path / "test.csv", [(rows[0][0], rows[0][1]), ("brand new words here", "neg")])
    splits, report = load_validated(config("text_classification", train, test, max_bad_fraction=0.05))
    quarantine = {q["origin"].rsplit(" ", 1)[1]: q["reason"] for q in report["quarantine"]}
    assert quarantine == {str(80 + 2): "empty text", str(81 + 2): "missing label"}  # after 80 rows + header
    assert report["splits"]["train"]["non_utf8"] == 1
    assert any("\ufffd" in x for x in splits.train.inputs + splits.val.inputs)  # kept, decoded with replacement
    assert report["label_conflicts"]["count"] == 1  # "Great  film" vs "great film": same text once normalized
    assert report["leakage"]["test"]["count"] == 1 and splits.test.inputs == ["brand new words here"]
    assert any("class 'rare' has" in w for w in report["warnings"])


def test_fingerprint_tracks_labels_not_file_format(tmp_path: Path) -> None:
    train = write_text_csv(tmp_path / "a.csv", n_per_class=10)
    rows = list(csv.DictReader(open(train)))
    jsonl = tmp_path / "a.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    base = load_validated(config("text_classification", train))[1]["fingerprint"]
    assert load_validated(config("text_classification", jsonl))[1]["fingerprint"] == base
    rows[5]["label"] = "neg" if rows[5]["label"] == "pos" else "pos"
    flipped = write_rows(tmp_path / "b.csv", [(r["text"], r["label"]) for r in rows])
    assert load_validated(config("text_classification", flipped))[1]["fingerprint"] != base


def test_image_fingerprint_same_for_folder_and_table(tmp_path: Path) -> None:
    root = write_image_folder(tmp_path / "imgs", n_per_class=6)
    rows = [(p.relative_to(tmp_path).as_posix(), p.parent.name) for p in sorted(root.rglob("*.*"))]
    table = tmp_path / "index.csv"
    table.write_text("path,label\n" + "".join(f"{p},{y}\n" for p, y in rows))
    a = load_validated(config("image_classification", root))[1]["fingerprint"]
    assert load_validated(config("image_classification", table))[1]["fingerprint"] == a


def test_sources_concatenate_with_per_source_columns_and_label_map(tmp_path: Path) -> None:
    first = write_text_csv(tmp_path / "a.csv", n_per_class=10)
    second = tmp_path / "b.jsonl"
    second.write_text("".join(json.dumps({"body": f"an excellent movie {i}", "stars": "Positive"}) + "\n"
                              for i in range(5)))
    cfg = config("text_classification", [str(first), {"path": str(second), "text_column": "body",
                                                      "label_column": "stars"}],
                 label_map={"Positive": "pos"})
    splits, report = load_validated(cfg)
    assert splits.classes == ["neg", "pos"]
    assert len(splits.train) + len(splits.val) == 25
    assert report["splits"]["train"]["class_counts"]["pos"] + report["splits"]["val"]["class_counts"]["pos"] == 15


def test_hf_source_offline_fails_fast_and_clearly(monkeypatch) -> None:
    monkeypatch.setattr("deepship.data.sources.hub_reachable", lambda timeout=3.0: False)  # as on CI: no network
    cfg = config("text_classification", [{"path": "hf:deepship-test/no-such-dataset", "split": "train"}])
    start = time.perf_counter()
    with pytest.raises(DataError, match=r"hf:deepship-test/no-such-dataset \(split train\): cannot load"):
        load_validated(cfg)
    assert time.perf_counter() - start < 10  # offline: straight to the cache, no retry loop


# ------------------------------------------------------------------------- training + report
def test_defects_below_threshold_train_and_are_reported(defective_images, tmp_path: Path) -> None:
    train, test = defective_images
    raw = image_config(train, tmp_path / "runs", max_epochs=1)
    raw["data"].update({"test": str(test), "max_bad_fraction": 0.1})
    run = train_run(raw, tmp_path / "c.yaml")
    report = json.loads((run / JSON_NAME).read_text())
    assert report["totals"]["quarantined"] == 4  # the 200x200 image is fine at Pillow's real limit
    assert {Path(q["origin"]).name for q in report["quarantine"]} == {"truncated.jpg", "empty.png", "notes.jpg",
                                                                       "tiny.png"}
    page = (run / HTML_NAME).read_text()
    assert "truncated.jpg" in page and page.count("data:image/png;base64,") >= 3  # plots + thumbnails inline
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["data_fingerprint"] == report["fingerprint"] and metrics["num_samples"]["test"] == 16


def test_defects_above_threshold_stop_with_exit_2_naming_the_report(defective_images, tmp_path: Path,
                                                                     capsys) -> None:
    train, _ = defective_images
    raw = image_config(train, tmp_path / "runs")
    raw["data"]["max_bad_fraction"] = 0.01
    assert cli.main(["train", "--config", str(write_config(tmp_path / "c.yaml", raw))]) == 2
    err = capsys.readouterr().err
    report_path = tmp_path / "runs" / "tiny-image" / JSON_NAME
    assert f"see {report_path}" in err and "above data.max_bad_fraction=0.01" in err
    assert json.loads(report_path.read_text())["totals"]["quarantined"] == 4
    assert not (tmp_path / "runs" / "tiny-image" / "best.ckpt").exists()


def test_a_run_stopped_for_bad_samples_reports_every_other_finding_too(tiny_bert_dir: Path, tmp_path: Path,
                                                                        capsys) -> None:
    """Too many bad rows stop training (exit 2), but only after leakage, duplicates, conflicts and balance were
    checked: the report a user fixes the data from lists all of them at once."""
    train = write_text_csv(tmp_path / "train.csv", n_per_class=20)  # 40 good rows, rows 2..41
    good = list(csv.reader(open(train)))[1:]
    conflict = "x " + good[1][0]
    rows = good + [("", "pos")] * 3 + [(good[0][0], good[0][1])] + [(conflict, "pos"), (conflict, "neg")]
    write_rows(train, rows)  # + 3 empty texts (3/46 = 6.5% bad), 1 duplicate, 1 label conflict
    val = write_rows(tmp_path / "val.csv", [(good[5][0], good[5][1]), ("brand new words here", "neg"),
                                            ("other new words", "pos")])  # row 2 is a train text
    raw = {"task": "text_classification", "data": {"train": str(train), "val": str(val), "max_bad_fraction": 0.05,
                                                  "min_per_class": 100},
           "model": {"backbone": str(tiny_bert_dir)}, "train": {"out_dir": str(tmp_path / "runs"), "run_name": "r"}}
    assert cli.main(["train", "--config", str(write_config(tmp_path / "c.yaml", raw))]) == 2
    assert "above data.max_bad_fraction=0.05" in capsys.readouterr().err
    report = json.loads((tmp_path / "runs" / "r" / JSON_NAME).read_text())
    assert [q["origin"].rsplit(" ", 1)[1] for q in report["quarantine"]] == ["42", "43", "44"]
    assert report["leakage"]["val"]["count"] == 1
    assert report["leakage"]["val"]["examples"][0]["sample"].endswith("val.csv row 2")
    assert report["splits"]["train"]["duplicates"]["count"] == 2  # the copied row, and the conflicting pair
    assert report["label_conflicts"]["count"] == 1
    assert sum("examples (< data.min_per_class=100)" in w for w in report["warnings"]) == 2  # both classes
    assert not (tmp_path / "runs" / "r" / "best.ckpt").exists()


def test_validation_error_carries_the_report(defective_images) -> None:
    train, _ = defective_images
    with pytest.raises(DataValidationError) as info:
        load_validated(config("image_classification", train, max_bad_fraction=0.0))
    assert info.value.report["totals"]["quarantined"] == 4
    assert "<h2>Quarantine (4)</h2>" in render_html(info.value.report)


def test_data_report_command_writes_report_without_training(tiny_bert_dir: Path, tmp_path: Path, capsys) -> None:
    rows = [(f"short text number {i}", "a" if i % 2 else "b") for i in range(40)]
    rows += [("a much longer text that keeps going well past eight tokens " + str(i), "a" if i % 2 else "b")
             for i in range(10)]
    train = write_rows(tmp_path / "train.csv", rows)
    raw = {"task": "text_classification", "data": {"train": str(train), "max_length": 8},
           "model": {"backbone": str(tiny_bert_dir)}, "train": {"out_dir": str(tmp_path / "runs")}}
    out = tmp_path / "report"
    assert cli.main(["data-report", "--config", str(write_config(tmp_path / "c.yaml", raw)), "--out", str(out)]) == 0
    report = json.loads((out / JSON_NAME).read_text())
    # "short text number N" is 6 tokens with [CLS]/[SEP]; only the 10 long texts pass 8 tokens.
    assert report["splits"]["train"]["truncated"] + report["splits"]["val"]["truncated"] == 10
    assert any("get truncated (data.max_length)" in w for w in report["warnings"])
    assert (out / HTML_NAME).is_file() and not (tmp_path / "runs").exists()
    assert "0 quarantined" in capsys.readouterr().out


def test_bench_data_tiny_mode(capsys) -> None:
    assert cli.main(["bench", "data", "--rows", "1500"]) == 0
    first = json.loads(capsys.readouterr().out.splitlines()[0])
    assert first["kind"] == "data_validation" and first["rows"] == 1500
    assert first["quarantined"] == 2  # the generator plants one empty text per 1,000 rows (rows 1 and 1001)
