"""A sweep from start to leaderboard: check the base data and the latency budget once, then ask, run and tell
trials until the study holds n_trials, rewriting the leaderboard and best.json after each one."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from deepship.errors import ConfigError
from deepship.files import write_json
from deepship.selection.leaderboard import describe_best, write_leaderboard
from deepship.selection.config import SweepConfig
from deepship.selection.latency import check_budget, measure_candidates
from deepship.selection.records import TrialRecord
from deepship.selection.study import (
    grid_exhausted,
    open_study,
    prepare_sweep_dir,
    recover_interrupted,
    reseed,
    sweep_lock,
    trials_counted,
)
from deepship.selection.trials import Outcome, run_trial

BEST_FILE = "best.json"
STATES = {TrialState.COMPLETE: "complete", TrialState.PRUNED: "pruned", TrialState.FAIL: "failed"}


def check_base(sweep_cfg: SweepConfig) -> list[str]:
    """The base data, validated once: a problem every trial would hit stops the sweep (exit 2) before any trial.
    Returns the classes."""
    from deepship.data.report import validate_data

    splits, _ = validate_data(sweep_cfg.fold_config(0), sweep_cfg.sweep_dir)
    return list(splits.classes)


def trial_record(trial: optuna.trial.FrozenTrial) -> TrialRecord:
    a = trial.user_attrs
    state = "over_budget" if a.get("state") == "over_budget" else STATES.get(trial.state, "running")
    return TrialRecord(
        number=trial.number, state=state, params=dict(trial.params),
        value=trial.value if trial.state == TrialState.COMPLETE else a.get("value"), value_std=a.get("value_std"),
        interval=tuple(a["interval"]) if a.get("interval") else None, latency_p95_ms=a.get("latency_p95_ms"),
        param_count=a.get("param_count"), onnx_bytes=a.get("onnx_bytes"), train_time_s=a.get("train_time_s"),
        epochs=a.get("epochs"), backbone=a.get("backbone"), run_dir=a.get("run_dir"), reason=a.get("reason"))


def publish_results(study: optuna.Study, sweep_cfg: SweepConfig) -> list[TrialRecord]:
    """Leaderboard and best.json from the study alone (whichever worker writes last, they list every trial);
    each file is replaced atomically."""
    with sweep_lock(sweep_cfg.sweep_dir):
        records = [trial_record(t) for t in study.get_trials(deepcopy=False)]  # read under the lock: the newest wins
        ranked = write_leaderboard(sweep_cfg.sweep_dir, records, sweep_cfg.sweep.objective.metric, study)
        complete = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]
        if complete:
            best = max(complete, key=lambda t: (t.value, -t.number))
            write_json(sweep_cfg.sweep_dir / BEST_FILE, {
                "trial": best.number, "run_dir": best.user_attrs.get("best_run_dir"), "value": best.value,
                "value_std": best.user_attrs.get("value_std"), "metric": sweep_cfg.sweep.objective.metric,
                "params": dict(best.params), "trial_dir": best.user_attrs.get("run_dir")})
    return ranked


def describe_params(params: dict[str, Any]) -> str:
    return " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())


def describe_outcome(number: int, params: dict[str, Any], outcome: Outcome, metric: str, seconds: float) -> str:
    """One progress line: number, params, value or state, time."""
    if outcome.state == TrialState.COMPLETE:
        std = outcome.attrs.get("value_std")
        what = f"{metric}={outcome.value:.4f}" + (f" (std {std:.4f})" if std is not None else "")
    else:
        what = outcome.attrs.get("reason", outcome.state.name.lower())
    return f"trial {number:03d} {describe_params(params)}: {what} [{seconds:.1f} s]"


def keep_going(study: optuna.Study, sweep_cfg: SweepConfig, started: float) -> bool:
    sweep = sweep_cfg.sweep
    if sweep.timeout is not None and time.monotonic() - started > sweep.timeout:
        print(f"sweep: timeout of {sweep.timeout:g} s reached; no new trial starts")
        return False
    return trials_counted(study) < sweep.n_trials and not grid_exhausted(study)


def run_sweep(sweep_cfg: SweepConfig, resume: bool = False) -> list[TrialRecord]:
    """Run (or continue) the sweep; returns the ranked records."""
    with sweep_lock(sweep_cfg.sweep_dir):  # a second worker waits, then finds sweep.yaml and latency.json written
        prepare_sweep_dir(sweep_cfg, resume)
        classes = check_base(sweep_cfg)
        latency = measure_candidates(sweep_cfg, classes)
    for c in latency["candidates"]:
        print(f"latency: {c['backbone']} {c['size_key']}={c['size']}: p95 {c['p95']:.2f} ms, "
              f"{c['param_count']:,} parameters")
    check_budget(latency, sweep_cfg.sweep.objective.latency_budget_ms)
    study = open_study(sweep_cfg)
    recovered = recover_interrupted(study)
    if recovered:
        print(f"sweep: trials {recovered} were interrupted; their parameters run again")
    metric, started = sweep_cfg.sweep.objective.metric, time.monotonic()
    while keep_going(study, sweep_cfg, started):
        trial = study.ask()
        reseed(study, sweep_cfg.sweep, trial.number)
        t0 = time.perf_counter()
        outcome = run_trial(trial, sweep_cfg, latency)
        for key, value in outcome.attrs.items():
            trial.set_user_attr(key, value)
        study.tell(trial, outcome.value if outcome.state == TrialState.COMPLETE else None, state=outcome.state)
        print(describe_outcome(trial.number, trial.params, outcome, metric, time.perf_counter() - t0), flush=True)
        publish_results(study, sweep_cfg)
    ranked = publish_results(study, sweep_cfg)
    counts = {s: sum(r.state == s for r in ranked) for s in ("complete", "pruned", "over_budget", "failed")}
    print(f"sweep: {len(ranked)} trials (" + ", ".join(f"{n} {s}" for s, n in counts.items() if n) + ")")
    print(describe_best(ranked))
    print(f"leaderboard: {sweep_cfg.sweep_dir / 'leaderboard.json'}")
    return ranked


def read_best(sweep_dir: str | Path) -> dict[str, Any]:
    path = Path(sweep_dir) / BEST_FILE
    if not path.is_file():
        raise ConfigError(f"--best {sweep_dir}: no {BEST_FILE}; is it a sweep directory with a completed trial?")
    return json.loads(path.read_text())
