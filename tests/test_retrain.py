"""deepship retrain: a champion trained on a few sentences of one vocabulary meets logged inputs in a new one.

The champion (tiny BERT) learns "class words" POSITIVE[:3] / NEGATIVE[:3]; production then sends sentences
whose class words are the other three of each list, which it has never seen. The labeled log is what the
challenger needs: it should beat the champion on the most recent labeled inputs by a wide margin.
"""

from __future__ import annotations

import csv
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from deepship import cli
from deepship.retrain_data import read_labeled_log, recent_holdout

from conftest import NEGATIVE, NEUTRAL, POSITIVE, export, text_config, train_run

ROOT = Path(__file__).resolve().parents[1]
NAME = "toy"
OLD_WORDS = {"pos": POSITIVE[:3], "neg": NEGATIVE[:3]}
NEW_WORDS = {"pos": POSITIVE[3:], "neg": NEGATIVE[3:]}
HOLDOUT = 0.25
T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)


def sentence(rng: random.Random, words: list[str]) -> str:
    chosen = rng.sample(NEUTRAL, 4) + rng.sample(words, 2)
    rng.shuffle(chosen)
    return " ".join(chosen)


def write_csv(path: Path, header: list[str], rows: list) -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def normalized(text: str) -> str:
    return " ".join(text.lower().split())


def write_log(package: Path, inputs: Path, out: Path, minutes: list[int], with_inputs: bool = False) -> Path:
    """predict --output on the inputs, each record's ts then set to T0 + minutes[i] (a shuffled order),
    and with `with_inputs` the raw text added as serve --log-inputs does."""
    from deepship.runtime.batch import predict_file

    with open(out, "w") as f:
        predict_file(package, inputs, f)
    texts = [r["text"] for r in read_csv(inputs)]
    records = [json.loads(line) for line in out.read_text().splitlines()]
    for record, minute, text in zip(records, minutes, texts):
        record["ts"] = (T0 + timedelta(minutes=minute)).isoformat()
        if with_inputs:
            record["input"] = text
    out.write_text("".join(json.dumps(r) + "\n" for r in records))
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, tiny_bert_dir: Path) -> SimpleNamespace:
    """A registry with the champion as toy@production, and 160 logged new-vocabulary inputs, 144 labeled."""
    from deepship.registry import open_registry

    root = tmp_path_factory.mktemp("retrain")
    rng = random.Random(0)
    champion_rows = [(sentence(rng, OLD_WORDS[y]), y) for y in ("pos", "neg") for _ in range(50)]
    rng.shuffle(champion_rows)
    champion_csv = write_csv(root / "champion.csv", ["text", "label"], champion_rows)
    run = train_run(text_config(champion_csv, tiny_bert_dir, root / "runs"), root / "champion.yaml")
    package = export(run, root / "champion-pkg")
    open_registry(root / "registry").register(package, NAME, alias="production")

    labels = [y for y in ("pos", "neg") for _ in range(80)]
    rng.shuffle(labels)
    ids = [f"n{i:03d}" for i in range(len(labels))]
    texts = [sentence(rng, NEW_WORDS[y]) for y in labels]
    inputs = write_csv(root / "new_inputs.csv", ["id", "text"], list(zip(ids, texts)))
    minutes = np.random.default_rng(1).permutation(len(ids)).tolist()  # ts order differs from log order
    log = write_log(package, inputs, root / "predictions.jsonl", minutes)
    labeled = [i for i in range(len(ids)) if i % 10 != 3]  # 16 predictions never got a label
    labels_csv = write_csv(root / "labels.csv", ["id", "label"], [(ids[i], labels[i]) for i in labeled])
    return SimpleNamespace(root=root, package=package, run=run, registry=root / "registry", inputs=inputs, log=log,
                           labels=labels_csv, ids=ids, texts=texts, truth=labels, minutes=minutes, labeled=labeled,
                           champion_texts=[t for t, _ in champion_rows])


def registry_copy(world: SimpleNamespace, tmp_path: Path) -> Path:
    return Path(shutil.copytree(world.registry, tmp_path / "registry"))


def retrain_args(world: SimpleNamespace, registry: Path, out: Path, *extra: str, labels: Path | None = None) -> list[str]:
    return ["retrain", "--champion", f"registry:{NAME}@production", "--registry", str(registry),
            "--log", str(world.log), "--labels", str(labels or world.labels), "--inputs", str(world.inputs),
            "--holdout", str(HOLDOUT), "--set", "train.max_epochs=3", "--out", str(out), *extra]


def production(registry: Path) -> int | None:
    from deepship.registry import open_registry

    return open_registry(registry).alias_target(NAME, "production")


def versions(registry: Path) -> list[int]:
    from deepship.registry import open_registry

    return [v.version for v in open_registry(registry).versions(NAME)]


# ------------------------------------------------------------------------------------ the holdout
def test_the_decision_set_is_the_most_recent_labeled_inputs_by_ts(world: SimpleNamespace) -> None:
    from deepship.runtime.predictor import Predictor

    modality = Predictor.load(world.package).modality
    batch = read_labeled_log(world.log, world.labels, ["neg", "pos"], modality, world.inputs)
    assert batch.ids == [world.ids[i] for i in world.labeled]  # log order, unlabeled ones left out
    assert batch.labels == [world.truth[i] for i in world.labeled]
    assert batch.inputs == [world.texts[i] for i in world.labeled]
    train, held = recent_holdout(batch.ts, len(batch), HOLDOUT)
    k = round(HOLDOUT * len(world.labeled))  # 36 of 144
    newest = sorted(world.labeled, key=lambda i: world.minutes[i])[-k:]  # by hand: the k latest minutes
    assert {batch.ids[i] for i in held} == {world.ids[i] for i in newest}
    assert sorted([*train, *held]) == list(range(len(batch)))


def test_equal_timestamps_fall_back_to_log_order_and_none_means_log_order() -> None:
    ts = np.array([5.0, 1.0, 5.0, 5.0, 2.0])
    assert recent_holdout(ts, 5, 0.4)[1].tolist() == [2, 3]  # the two later of the three at t=5
    assert recent_holdout(None, 5, 0.4)[1].tolist() == [3, 4]


def test_a_log_with_raw_inputs_needs_no_inputs_file(world: SimpleNamespace, tmp_path: Path) -> None:
    log = write_log(world.package, world.inputs, tmp_path / "served.jsonl", world.minutes, with_inputs=True)
    batch = read_labeled_log(log, world.labels, ["neg", "pos"], SimpleNamespace(name="text"))
    assert batch.inputs == [world.texts[i] for i in world.labeled]


# ------------------------------------------------------------------------------------- bad input
def bad_labels(tmp_path: Path, rows: list) -> Path:
    return write_csv(tmp_path / "bad_labels.csv", ["id", "label"], rows)


BAD_CASES = {
    "missing log": (lambda w, t: ["--log", str(t / "nope.jsonl")], "nope.jsonl: not found"),
    "labels match no id": (lambda w, t: ["--labels", str(bad_labels(t, [("x1", "pos"), ("x2", "neg")]))],
                           "no id matches"),
    "unknown label": (lambda w, t: ["--labels", str(bad_labels(t, [(w.ids[0], "meh")]))], "'meh' is not one of"),
    "empty decision set": (lambda w, t: ["--holdout", "0.001"], "empty decision set"),
    "class vanishes": (lambda w, t: one_class_recent(w, t), "no example of class"),
    "no raw inputs": (lambda w, t: [], "holds no raw inputs"),
    "bad holdout": (lambda w, t: ["--holdout", "1.5"], "--holdout 1.5"),
    "unknown champion": (lambda w, t: ["--champion", "registry:other@production"], "other"),
    "missing --data file": (lambda w, t: ["--data", str(t / "more.csv")], "more.csv' does not exist"),
}


def one_class_recent(world: SimpleNamespace, tmp_path: Path) -> list[str]:
    """Labels where the 10 most recent labeled inputs are all 'pos', and a holdout of exactly those 10."""
    order = sorted(range(len(world.ids)), key=lambda i: world.minutes[i])
    recent_pos = [i for i in order if world.truth[i] == "pos"][-10:]
    older = [i for i in order if i not in recent_pos and world.minutes[i] < world.minutes[recent_pos[0]]]
    rows = [(world.ids[i], world.truth[i]) for i in older + recent_pos]
    return ["--labels", str(bad_labels(tmp_path, rows)), "--holdout", str(10 / len(rows))]


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_input_exits_2_with_one_line_and_writes_nothing(case: str, world: SimpleNamespace, tmp_path: Path,
                                                             capsys) -> None:
    extra, expected = BAD_CASES[case]
    args = retrain_args(world, world.registry, tmp_path / "work")
    if case == "no raw inputs":  # predict --output keeps no raw text: without --inputs there is nothing to train on
        at = args.index("--inputs")
        del args[at:at + 2]
    args += extra(world, tmp_path)
    before = versions(world.registry)
    assert cli.main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and expected in err[0], err
    assert not (tmp_path / "work").exists()
    assert versions(world.registry) == before


def test_a_champion_package_is_adopted_only_once_the_input_is_good(world: SimpleNamespace, tmp_path: Path,
                                                                      capsys) -> None:
    from deepship.registry import open_registry

    registry = tmp_path / "fresh-registry"
    args = ["retrain", "--champion-package", str(world.package), "--name", NAME, "--registry", str(registry),
            "--log", str(tmp_path / "missing.jsonl"), "--labels", str(world.labels), "--out", str(tmp_path / "work")]
    assert cli.main(args) == 2
    assert "missing.jsonl: not found" in capsys.readouterr().err
    assert open_registry(registry).models() == [] and not (tmp_path / "work").exists()


def test_a_second_retrain_in_the_same_work_directory_exits_2_at_once(world: SimpleNamespace, tmp_path: Path,
                                                                       capsys) -> None:
    import fcntl

    out = tmp_path / "work"
    out.mkdir()
    with open(out / ".retrain.lock", "a") as held:  # what a running retrain holds
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert cli.main(retrain_args(world, world.registry, out)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "another retrain is working in it" in err[0]
    assert sorted(p.name for p in out.iterdir()) == [".retrain.lock"]


def test_logged_base64_images_become_files_with_their_bytes(tmp_path: Path) -> None:
    import base64
    import io

    from PIL import Image

    from deepship.retrain_data import LabeledBatch, materialize_images

    encoded = []
    for fmt in ("PNG", "JPEG"):
        buf = io.BytesIO()
        Image.new("RGB", (8, 8), (200, 10, 10)).save(buf, format=fmt)
        encoded.append(buf.getvalue())
    batch = LabeledBatch(["a", "b"], [base64.b64encode(b).decode() for b in encoded], ["red", "red"], None, True)
    files = materialize_images(batch, tmp_path / "images")
    assert [Path(p).suffix for p in files.inputs] == [".png", ".jpg"]
    assert [Path(p).read_bytes() for p in files.inputs] == encoded
    assert not files.encoded and files.ids == ["a", "b"]


# ------------------------------------------------------------------------------- the whole loop
def test_a_better_challenger_is_promoted_after_waiting_out_the_registry_lock(world: SimpleNamespace, tmp_path: Path,
                                                                              capsys) -> None:
    from deepship.registry import open_registry

    registry, out = registry_copy(world, tmp_path), tmp_path / "work"
    with open_registry(registry).lock(NAME):  # another writer holds the model: retrain trains, then gives up
        assert cli.main(retrain_args(world, registry, out, "--lock-timeout", "0.5")) == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "lock" in errors[0], errors
    assert versions(registry) == [1] and production(registry) == 1  # nothing registered, nothing moved
    assert (out / "run" / "metrics.json").is_file() and (out / "package" / "package.json").is_file()

    assert cli.main(retrain_args(world, registry, out)) == 0  # the rerun reuses the run and the package
    assert "resuming" not in capsys.readouterr().out
    assert versions(registry) == [1, 2] and production(registry) == 2
    report = json.loads((out / "retrain_report.json").read_text())
    d = report["decision"]
    assert d["promoted"] and d["candidate"]["value"] > d["current"]["value"] and d["diff_ci95"][0] > 0
    assert report["lineage"]["parent"] == {"name": NAME, "version": 1, "sha256": report["champion"]["sha256"]}
    info = open_registry(registry).resolve(f"{NAME}@production")
    assert info.lineage["parent"]["version"] == 1

    # the decision set by hand: the most recent 36 labeled, minus any whose text also occurs in training
    k = round(HOLDOUT * len(world.labeled))
    newest = sorted(world.labeled, key=lambda i: world.minutes[i])[-k:]
    trained = {normalized(t) for t in world.champion_texts} | {
        normalized(world.texts[i]) for i in world.labeled if i not in newest}
    expected = {world.ids[i] for i in newest if normalized(world.texts[i]) not in trained}
    assert {r["id"] for r in read_csv(out / "decision_set.csv")} == expected
    added = read_csv(out / "new_labeled.csv")
    assert {r["id"] for r in added} == {world.ids[i] for i in world.labeled if i not in newest}
    assert report["data"]["new_training"]["per_class"] == {
        y: sum(world.truth[i] == y for i in world.labeled if i not in newest) for y in ("neg", "pos")}
    assert "promoted" in (out / "retrain_report.html").read_text()


def test_a_poisoned_batch_is_refused_and_nothing_moves(world: SimpleNamespace, tmp_path: Path, capsys) -> None:
    registry, out = registry_copy(world, tmp_path), tmp_path / "work"
    rows = read_csv(world.labels)
    shuffled = [r["label"] for r in rows]
    random.Random(5).shuffle(shuffled)
    poisoned = write_csv(tmp_path / "poisoned.csv", ["id", "label"], [(r["id"], y) for r, y in zip(rows, shuffled)])
    events_before = len(events(registry))
    assert cli.main(retrain_args(world, registry, out, labels=poisoned)) == 4
    err = capsys.readouterr().err
    report = json.loads((out / "retrain_report.json").read_text())
    d = report["decision"]
    assert not d["promoted"] and production(registry) == 1
    for side in ("candidate", "current"):
        assert f"{d[side]['value']:.4f}" in err  # both numbers, on stderr and in the report
    assert d["reason"] and d["reason"] in err
    assert [e["event"] for e in events(registry)[events_before:]][-1] == "promote_refused"


def events(registry: Path) -> list[dict]:
    from deepship.registry import open_registry

    return open_registry(registry).events(NAME)


# ---------------------------------------------------------------------------------------- resume
@pytest.mark.slow
def test_a_retrain_killed_during_training_continues_from_last_ckpt(world: SimpleNamespace, tmp_path: Path) -> None:
    registry, out = registry_copy(world, tmp_path), tmp_path / "work"
    args = retrain_args(world, registry, out, "--set", "train.checkpoint_every_n_steps=1", "train.max_epochs=4")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    first = subprocess.Popen([sys.executable, "-m", "deepship.cli", *args], env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    last = out / "run" / "last.ckpt"
    deadline = time.monotonic() + 240
    while not last.exists() and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert first.poll() is None, "the retrain ended before it could be killed"
    first.send_signal(signal.SIGKILL)
    first.communicate()
    assert versions(registry) == [1] and not (out / "package").exists()

    second = subprocess.run([sys.executable, "-m", "deepship.cli", *args], env=env, capture_output=True, text=True)
    assert second.returncode == 0, second.stderr[-2000:]
    assert f"resuming from {last}" in second.stdout
    history = read_csv(out / "run" / "history.csv")
    assert [int(r["epoch"]) for r in history] == list(range(1, 5))  # every epoch once: continued, not restarted
    assert production(registry) == 2


# -------------------------------------------------------------------------------- monitor hook
def test_monitor_runs_the_on_alert_command_and_reports_its_exit_code(world: SimpleNamespace, tmp_path: Path,
                                                                     capsys) -> None:
    marker = tmp_path / "hook.txt"
    hook = f"{sys.executable} -c \"import os,sys; open(sys.argv[1],'w').write(os.environ['DEEPSHIP_MONITOR_REPORT']); " \
           f"sys.exit(5)\" {marker}"
    argv = ["monitor", "--package", str(world.package), "--current", str(world.log), "--labels", str(world.labels),
            "--out", str(tmp_path / "mon"), "--on-alert", hook]
    assert cli.main(argv) == 3  # the champion's accuracy on the new vocabulary collapsed
    assert marker.read_text() == str(tmp_path / "mon" / "monitor.json")
    assert "exited 5" in capsys.readouterr().err
