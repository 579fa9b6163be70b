"""Sweeps end to end on CPU with a tiny BERT (and MobileNetV2 at 32 px): trials are real runs, pruning really
stops a trial, failures and over-budget architectures are recorded without stopping the sweep, and a killed or
doubled sweep ends with exactly the trials it should."""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import optuna
import pytest

from deepship import cli
from deepship.selection.config import load_sweep_config
from deepship.selection.study import open_study, prepare_sweep_dir

from conftest import image_config, text_config, write_config

REPO = Path(__file__).resolve().parents[1]


def sweep_file(tmp_path: Path, base: dict[str, Any], space: dict[str, Any], name: str = "sweep", **sweep: Any) -> Path:
    raw = {**base, "sweep": {"out_dir": str(tmp_path / name), "objective": {"metric": "accuracy"}, "space": space,
                             "sampler": "random", "pruner": "none", "n_trials": 2, **sweep}}
    return write_config(tmp_path / f"{name}.yaml", raw)


def text_base(text_csv: Path, tiny_bert_dir: Path, tmp_path: Path, **train: Any) -> dict[str, Any]:
    # sdpa_backend default: `auto` picks the attention kernel by timing it, and kernels round differently, so two
    # identical trials could differ
    return text_config(text_csv, tiny_bert_dir, tmp_path / "unused",
                       **{"max_epochs": 1, "sdpa_backend": "default", **train})


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())


def history_epochs(run_dir: Path) -> int:
    with open(run_dir / "history.csv") as f:
        return len(list(csv.DictReader(f)))


def load_study(config: Path) -> optuna.Study:
    return open_study(load_sweep_config(config))


def by_number(sweep_dir: Path) -> dict[int, dict[str, Any]]:
    return {row["number"]: row for row in read_json(sweep_dir / "leaderboard.json")["trials"]}


LR_SPACE = {"train.lr": {"type": "log_float", "low": 1.0e-3, "high": 1.0e-2}}


# ------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("space, sweep, message", [
    ({"train.lrr": {"type": "float", "low": 0.1, "high": 0.2}}, {}, r"sweep.space.train.lrr: not a config key.*'lr'"),
    ({"model.backbone": {"type": "categorical", "choices": []}}, {}, r"sweep.space.model.backbone.*non-empty list"),
    ({"train.lr": {"type": "float", "low": 0.2, "high": 0.1}}, {}, r"sweep.space.train.lr.*low 0.2 is above high 0.1"),
    ({"train.lr": {"type": "log_float", "low": 0.0, "high": 0.1}}, {}, r"log_float needs low > 0"),
    ({"train.lr": {"type": "float", "low": 0.1, "high": 0.2}}, {"sampler": "grid"}, r"grid sampler needs a step"),
    ({"train.lr": {"type": "float", "low": 0.1, "high": 0.2, "when": {"model.backbone": "x"}}}, {},
     r"when: 'model.backbone' must be a space key listed before"),
])
def test_bad_sweep_configs_exit_2_with_one_line(space, sweep, message, text_csv, tiny_bert_dir, tmp_path, capsys):
    path = sweep_file(tmp_path, text_base(text_csv, tiny_bert_dir, tmp_path), space, **sweep)
    assert cli.main(["sweep", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert re.search(message, err), err
    assert not (tmp_path / "sweep" / "trials").exists()


@pytest.mark.parametrize("name, overrides, architectures", [
    ("sweep_quickstart.yaml", [], [("all-MiniLM-L6-v2", 32)]),
    ("sweep_text.yaml", ["data.train=demo:topics/train.csv", "data.val=null"], [("all-MiniLM-L6-v2", 128)]),
    ("sweep_image.yaml", [], [("mobilenet_v2", 128), ("efficientnet_b0", 128), ("resnet18", 128)]),
])
def test_shipped_sweep_configs_are_valid(name, overrides, architectures, monkeypatch):
    from deepship.selection.latency import candidate_architectures

    monkeypatch.chdir(REPO)  # base: paths are read from the current directory, as data paths are
    cfg = load_sweep_config(REPO / "configs" / name, overrides)
    assert [(a.backbone, a.size) for a in candidate_architectures(cfg)] == architectures


def test_a_budget_nobody_meets_stops_before_any_trial(text_csv, tiny_bert_dir, tmp_path, capsys):
    space = {"data.max_length": {"type": "categorical", "choices": [16, 32]}}
    path = sweep_file(tmp_path, text_base(text_csv, tiny_bert_dir, tmp_path), space,
                      objective={"metric": "accuracy", "latency_budget_ms": 1.0e-6})
    assert cli.main(["sweep", "--config", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    latency = read_json(tmp_path / "sweep" / "latency.json")["candidates"]
    fastest = min(latency, key=lambda c: c["p95"])
    assert len(err.splitlines()) == 1 and "no candidate meets it" in err
    assert f"data.max_length={fastest['size']}" in err and f"{fastest['p95']:.2f} ms" in err
    assert {c["size"] for c in latency} == {16, 32}
    assert not (tmp_path / "sweep" / "trials").exists() and not (tmp_path / "sweep" / "journal.log").exists()


def test_an_unknown_backbone_among_the_choices_stops_before_any_trial(image_dir, tmp_path, capsys):
    space = {"model.backbone": {"type": "categorical", "choices": ["mobilenet_v2", "nosuchnet"]}}
    path = sweep_file(tmp_path, image_config(image_dir, tmp_path / "unused", max_epochs=1), space)
    assert cli.main(["sweep", "--config", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "sweep.space: candidate nosuchnet @ model.image_size=32" in err
    assert "unknown image backbone 'nosuchnet'" in err and not (tmp_path / "sweep" / "trials").exists()


def test_bad_base_data_stops_the_sweep_before_any_trial(tiny_bert_dir, tmp_path, capsys):
    bad = tmp_path / "bad.csv"
    bad.write_text("text,label\nonly one class,pos\n")
    path = sweep_file(tmp_path, text_base(bad, tiny_bert_dir, tmp_path), LR_SPACE)
    assert cli.main(["sweep", "--config", str(path)]) == 2
    assert not (tmp_path / "sweep" / "trials").exists()
    assert "error:" in capsys.readouterr().err


def test_a_different_config_in_an_existing_sweep_dir_needs_resume(text_csv, tiny_bert_dir, tmp_path, capsys):
    base = text_base(text_csv, tiny_bert_dir, tmp_path)
    path = sweep_file(tmp_path, base, LR_SPACE)
    prepare_sweep_dir(load_sweep_config(path), resume=False)  # as a first run does
    other = sweep_file(tmp_path, base, {"train.lr": {"type": "log_float", "low": 1.0e-4, "high": 1.0e-2}})
    assert cli.main(["sweep", "--config", str(other)]) == 2
    err = capsys.readouterr().err
    assert "changed: sweep.space.train.lr.low" in err and "--resume" in err and "new sweep.out_dir" in err
    assert cli.main(["sweep", "--config", str(other), "--resume"]) == 2  # the space cannot change in one study
    assert "only sweep.n_trials and sweep.timeout may change" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ trials
def test_sweep_trials_are_fold_runs_with_a_leaderboard_and_best(text_csv, tiny_bert_dir, tmp_path, capsys):
    """Two grid points under 2-fold cross-validation: one trains both folds, one is an impossible config and fails
    with its reason while the sweep goes on; the winner's best fold exports through the normal export path."""
    space = {"train.lr": {"type": "categorical", "choices": [3.0e-3]},
             "train.batch_size": {"type": "categorical", "choices": [8, 0]}}  # 0: an impossible config
    path = sweep_file(tmp_path, text_base(text_csv, tiny_bert_dir, tmp_path, max_epochs=2), space, sampler="grid",
                      n_trials=5, cv_folds=2)
    assert cli.main(["sweep", "--config", str(path)]) == 0
    out = capsys.readouterr().out
    sweep = tmp_path / "sweep"
    rows = by_number(sweep)
    assert len(rows) == 2  # the grid has two points, n_trials 5 notwithstanding
    good = next(r for r in rows.values() if r["params"]["train.batch_size"] == 8)
    bad = next(r for r in rows.values() if r["params"]["train.batch_size"] == 0)
    assert bad["state"] == "failed" and "train.batch_size" in bad["reason"] and "\n" not in bad["reason"]
    assert not (sweep / "trials" / f"{bad['number']:03d}").exists()
    trial_dir = sweep / "trials" / f"{good['number']:03d}"
    folds = [read_json(trial_dir / f"fold_{i}" / "metrics.json") for i in range(2)]
    values = [m["val"]["accuracy"] for m in folds]
    assert [read_json(trial_dir / f"fold_{i}" / "metrics.json")["num_samples"]["val"] for i in range(2)] == [60, 60]
    assert good["state"] == "complete" and good["value"] == pytest.approx(sum(values) / 2)
    assert good["value_std"] == pytest.approx(abs(values[0] - values[1]) / 2 ** 0.5)  # sample std of two values
    assert good["epochs"] == 4 == sum(history_epochs(trial_dir / f"fold_{i}") for i in range(2))
    assert good["train_time_s"] == pytest.approx(sum(m["train_time_s"] for m in folds))
    latency = read_json(sweep / "latency.json")["candidates"]
    assert good["latency_p95_ms"] == latency[0]["p95"] and good["onnx_bytes"] == latency[0]["onnx_bytes"]
    assert good["param_count"] == latency[0]["param_count"] > 0
    best_fold = trial_dir / f"fold_{values.index(max(values))}"
    assert read_json(sweep / "best.json")["run_dir"] == str(best_fold)
    assert f"trial {good['number']:03d} " in out and "leaderboard:" in out

    assert cli.main(["sweep", "--best", str(sweep), "--export", str(tmp_path / "package")]) == 0
    assert capsys.readouterr().out == f"{best_fold}\n"  # nothing else on stdout
    package = read_json(tmp_path / "package" / "package.json")
    assert package["run"]["dir"] == str(best_fold.resolve()) and (tmp_path / "package" / "parity.json").is_file()


def test_a_trial_that_fails_while_training_is_recorded_and_the_sweep_goes_on(text_csv, tiny_bert_dir, tmp_path):
    """flash attention cannot run on a CPU: training raises once it starts (a valid config, unlike batch size 0)."""
    base = text_base(text_csv, tiny_bert_dir, tmp_path, accelerator="cpu")
    space = {"train.sdpa_backend": {"type": "categorical", "choices": ["flash", "default"]}}
    path = sweep_file(tmp_path, base, space, sampler="grid")
    assert cli.main(["sweep", "--config", str(path)]) == 0
    sweep = tmp_path / "sweep"
    rows = {r["params"]["train.sdpa_backend"]: r for r in by_number(sweep).values()}
    failed, done = rows["flash"], rows["default"]
    assert failed["state"] == "failed" and failed["reason"].startswith("ConfigError: train.sdpa_backend: flash cannot run")
    run_dir = sweep / "trials" / f"{failed['number']:03d}"
    assert (run_dir / "train.log").is_file() and not (run_dir / "best.ckpt").exists()
    assert done["state"] == "complete" and (sweep / "trials" / f"{done['number']:03d}" / "best.ckpt").is_file()


def val_accuracies(run_dir: Path) -> list[float]:
    with open(run_dir / "history.csv") as f:
        return [float(row["val_accuracy"]) for row in csv.DictReader(f)]


def test_a_trial_below_the_median_is_pruned(text_csv, tiny_bert_dir, tmp_path):
    """Trial 0 learns (lr 1e-2); trial 1 cannot (lr 1e-7: the initial weights' accuracy) and MedianPruner
    (one startup trial, no warm-up) stops it after the first epoch where it is below trial 0 at the same epoch
    (the tiny BERT's random initial weights differ between test sessions, so that epoch is read, not fixed)."""
    base = text_base(text_csv, tiny_bert_dir, tmp_path, max_epochs=4)
    base["finetune"]["schedule"] = "constant"
    path = sweep_file(tmp_path, base, {"train.lr": {"type": "categorical", "choices": [1.0e-2, 1.0e-7]}},
                      pruner="median", pruner_startup_trials=1, pruner_warmup_epochs=0)
    cfg = load_sweep_config(path)
    prepare_sweep_dir(cfg, resume=False)
    study = open_study(cfg)
    study.enqueue_trial({"train.lr": 1.0e-2})
    study.enqueue_trial({"train.lr": 1.0e-7})
    assert cli.main(["sweep", "--config", str(path)]) == 0
    trials = load_study(path).get_trials()
    assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED]
    sweep = tmp_path / "sweep" / "trials"
    learner, stuck = val_accuracies(sweep / "000"), val_accuracies(sweep / "001")
    # the median of one finished trial is its own value: pruned at the first epoch the stuck trial is below it
    expected = 1 + next(e for e in range(len(learner)) if e < len(stuck) and stuck[e] < learner[e])
    assert len(learner) == 4 and len(stuck) == expected < 4
    assert trials[1].intermediate_values == {e: stuck[e] for e in range(expected)}
    assert by_number(tmp_path / "sweep")[1]["state"] == "pruned"


def test_an_architecture_over_the_budget_never_trains(image_dir, tmp_path):
    """latency.json as measured before (a resumed sweep reuses it, so the test fixes the host's numbers rather than
    hoping a busy CPU keeps them apart): 10 ms at 32 px, 90 ms at 512 px, a 40 ms budget."""
    base = image_config(image_dir, tmp_path / "unused", max_epochs=1)
    space = {"model.image_size": {"type": "categorical", "choices": [32, 512]}}
    path = sweep_file(tmp_path, base, space, sampler="grid", objective={"metric": "accuracy", "latency_budget_ms": 40})
    prepare_sweep_dir(load_sweep_config(path), resume=False)
    sweep = tmp_path / "sweep"
    entry = lambda size, ms: {"backbone": "mobilenet_v2", "size_key": "model.image_size", "size": size,  # noqa: E731
                              "p50": ms, "p95": ms, "p99": ms, "param_count": 7, "onnx_bytes": 11}
    (sweep / "latency.json").write_text(json.dumps({"classes": 3, "candidates": [entry(32, 10.0), entry(512, 90.0)]}))
    assert cli.main(["sweep", "--config", str(path)]) == 0
    rows = {r["params"]["model.image_size"]: r for r in by_number(sweep).values()}
    assert rows[32]["state"] == "complete" and (sweep / "trials" / f"{rows[32]['number']:03d}" / "best.ckpt").is_file()
    assert rows[32]["latency_p95_ms"] == 10.0
    slow = rows[512]
    assert slow["state"] == "over_budget" and slow["latency_p95_ms"] == 90.0 and slow["train_time_s"] is None
    assert slow["reason"] == "over budget: p95 90.00 ms > 40 ms (mobilenet_v2 @ model.image_size=512)"
    assert not (sweep / "trials" / f"{slow['number']:03d}").exists()
    assert load_study(path).trials[slow["number"]].state == optuna.trial.TrialState.PRUNED


def test_the_same_seed_gives_the_same_sweep(text_csv, tiny_bert_dir, tmp_path):
    base = text_base(text_csv, tiny_bert_dir, tmp_path, deterministic=True)
    results = []
    # a journal file with the seed given by --set, then an SQL database with the seed in the file
    for name, storage, seed, extra in (("a", None, 0, ["--set", "sweep.seed=7"]),
                                       ("b", f"sqlite:///{tmp_path / 'b.db'}", 7, [])):
        path = sweep_file(tmp_path, base, LR_SPACE, name=name, sampler="tpe", n_trials=2, seed=seed, storage=storage)
        assert cli.main(["sweep", "--config", str(path), *extra]) == 0
        results.append([(t.params, t.value) for t in load_study(path).get_trials()])
    assert results[0] == results[1] and len({p["train.lr"] for p, _ in results[0]}) == 2
    assert (tmp_path / "a" / "journal.log").is_file() and not (tmp_path / "b" / "journal.log").exists()
    assert load_sweep_config(tmp_path / "a" / "sweep.yaml").sweep.seed == 7  # what ran, --set included


# ------------------------------------------------------------------------------------------ processes
def start_sweep(config: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    return subprocess.Popen([sys.executable, "-m", "deepship.cli", "sweep", "--config", str(config), *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)


def wait_for(condition, process: subprocess.Popen, seconds: float = 240) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert process.poll() is None, process.stdout.read()
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


@pytest.mark.slow
def test_a_killed_sweep_resumes_to_exactly_n_trials(text_csv, tiny_bert_dir, tmp_path):
    path = sweep_file(tmp_path, text_base(text_csv, tiny_bert_dir, tmp_path, max_epochs=2), LR_SPACE, n_trials=3)
    trials = tmp_path / "sweep" / "trials"
    process = start_sweep(path)
    # trial 0 finished (it is on the leaderboard) and trial 1 has started (its run directory exists)
    wait_for(lambda: (trials / "001").exists() and (tmp_path / "sweep" / "leaderboard.json").exists(), process)
    process.send_signal(signal.SIGKILL)
    process.wait()
    first = load_study(path).trials[0]
    assert first.state == optuna.trial.TrialState.COMPLETE
    checkpoint = (trials / "000" / "best.ckpt").stat().st_mtime_ns

    assert cli.main(["sweep", "--config", str(path), "--resume"]) == 0
    study = load_study(path).get_trials()
    done = [t for t in study if not t.user_attrs.get("interrupted")]
    interrupted = [t for t in study if t.user_attrs.get("interrupted")]
    assert len(done) == 3 and all(t.state == optuna.trial.TrialState.COMPLETE for t in done)
    assert [t.number for t in interrupted] == [1] and interrupted[0].state == optuna.trial.TrialState.FAIL
    assert done[0].number == 0 and done[0].value == first.value  # kept, not re-run
    assert (trials / "000" / "best.ckpt").stat().st_mtime_ns == checkpoint
    assert done[1].params == interrupted[0].params and done[1].user_attrs["retry_of"] == 1  # re-run as queued
    assert len(read_json(tmp_path / "sweep" / "leaderboard.json")["trials"]) == 4


@pytest.mark.slow
def test_two_workers_share_one_study(text_csv, tiny_bert_dir, tmp_path):
    path = sweep_file(tmp_path, text_base(text_csv, tiny_bert_dir, tmp_path), LR_SPACE, n_trials=4)
    workers = [start_sweep(path), start_sweep(path)]
    outputs = [w.communicate(timeout=600)[0] for w in workers]
    assert [w.returncode for w in workers] == [0, 0], outputs
    trials = load_study(path).get_trials()
    numbers = [t.number for t in trials]
    assert len(numbers) == len(set(numbers))
    # each worker asks while complete + running < n_trials: both may ask at the same moment once
    assert 4 <= len(trials) <= 5 and all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
    ran = sorted(int(line.split()[1]) for out in outputs for line in out.splitlines() if line.startswith("trial "))
    assert ran == numbers  # every trial ran in exactly one worker
    assert sorted(by_number(tmp_path / "sweep")) == numbers
