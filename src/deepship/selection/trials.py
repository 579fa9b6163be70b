"""One trial, in this process: sample the space, validate the trial's config, check its architecture against the
latency budget, train it with training.fit (k fold runs under cross-validation) and say how it ended.

Everything the leaderboard needs is stored on the Optuna trial as user attributes, so any worker can rebuild
the leaderboard from the study alone."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import optuna
from lightning.pytorch.callbacks import Callback
from pydantic import ValidationError

from deepship.config import Config
from deepship.errors import ConfigError, Preempted, first_line
from deepship.selection.config import SweepConfig
from deepship.selection.latency import lookup_latency, trial_architecture
from deepship.selection.space import apply_params, sample_params
from deepship.yamlconf import format_validation_error

TRIALS_DIR = "trials"
LOG_FILE = "train.log"  # a trial's training output (header, progress, warnings); the sweep prints one line


class TrialPruning(Callback):
    """After each validation: report the objective to Optuna (step = epoch); when the pruner says so, ask the
    Trainer to stop after this epoch, as early stopping does, so the run directory is finished and complete."""

    def __init__(self, trial: optuna.Trial, metric: str) -> None:
        self.trial, self.key = trial, f"val/{metric}"
        self.pruned_at: int | None = None  # the 1-based epoch after which the pruner stopped the trial
        self.last: float | None = None

    def on_validation_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if trainer.sanity_checking or self.key not in trainer.callback_metrics:
            return
        self.last = float(trainer.callback_metrics[self.key])
        self.trial.report(self.last, trainer.current_epoch)
        if self.trial.should_prune():
            self.pruned_at = trainer.current_epoch + 1
            trainer.should_stop = True


@dataclass
class Outcome:
    state: optuna.trial.TrialState
    value: float | None = None
    attrs: dict[str, Any] = field(default_factory=dict)  # stored on the trial; `reason` says why it did not complete


def worker_id() -> dict[str, Any]:
    return {"host": socket.gethostname(), "pid": os.getpid()}


def trial_configs(sweep_cfg: SweepConfig, number: int, params: dict[str, Any]) -> list[Config]:
    """The trial's training configs: one run <sweep>/trials/NNN, or k fold runs <sweep>/trials/NNN/fold_i."""
    raw = apply_params(sweep_cfg.base, params)
    trials = sweep_cfg.sweep_dir / TRIALS_DIR
    # a trial number is given out once per study, so its directory is never another trial's
    train = {"resume": False, "overwrite": True}
    folds = sweep_cfg.sweep.cv_folds
    layouts = [{"out_dir": str(trials), "run_name": f"{number:03d}"}] if folds is None else \
        [{"out_dir": str(trials / f"{number:03d}"), "run_name": f"fold_{i}"} for i in range(folds)]
    configs = []
    for i, layout in enumerate(layouts):
        run = {**raw, "train": {**raw.get("train", {}), **train, **layout}}
        if folds is not None:
            run["data"] = {**run["data"], "cv_folds": folds, "cv_fold": i}
        try:
            configs.append(Config.model_validate(run))
        except ValidationError as exc:
            raise ConfigError(format_validation_error(exc, Config)) from None
    return configs


def read_value(run_dir: Path, metric: str) -> float:
    """The objective on validation as best.ckpt reproduces it: metrics.json, or report.json for metrics
    training does not log (weighted_f1, roc_auc, ...)."""
    val = json.loads((run_dir / "metrics.json").read_text())["val"]
    if metric in val:
        return float(val[metric])
    return float(json.loads((run_dir / "report.json").read_text())["metrics"][metric])


def read_interval(run_dir: Path, metric: str) -> list[float] | None:
    """The 95% bootstrap interval of the objective on validation, from the run's report.json."""
    path = run_dir / "report.json"
    if not path.is_file():
        return None
    return json.loads(path.read_text())["metrics"].get("ci95", {}).get(metric)


def fit_quietly(cfg: Config, callbacks: list[Callback]) -> Path:
    """training.fit with its header, progress bar and warnings in the run's train.log: the sweep prints one line
    per trial."""
    from deepship.training import fit

    cfg.run_dir.parent.mkdir(parents=True, exist_ok=True)
    log = cfg.run_dir.parent / f"{cfg.run_dir.name}.{LOG_FILE}"  # beside the run: fit resets the run directory
    try:
        with open(log, "w", encoding="utf-8") as out, contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            return fit(cfg, extra_callbacks=callbacks)
    finally:
        if cfg.run_dir.is_dir():  # a failed fit too: its output helps to see why
            log.replace(cfg.run_dir / LOG_FILE)


def train_trial(trial: optuna.Trial, configs: list[Config], metric: str) -> Outcome:
    """Fit each config; one run reports per epoch to the pruner, fold runs are judged by their mean only."""
    pruning = TrialPruning(trial, metric) if len(configs) == 1 else None
    values, seconds, epochs, run_dirs = [], 0.0, 0, []
    for cfg in configs:
        run_dir = fit_quietly(cfg, [pruning] if pruning is not None else [])
        values.append(read_value(run_dir, metric))
        metrics = json.loads((run_dir / "metrics.json").read_text())
        seconds, epochs = seconds + metrics["train_time_s"], epochs + metrics["epochs"]
        run_dirs.append(run_dir)
    value = statistics.fmean(values)
    attrs = {"value": value, "value_std": statistics.stdev(values) if len(values) > 1 else None,
             "fold_values": values if len(values) > 1 else None, "train_time_s": round(seconds, 3), "epochs": epochs,
             "interval": read_interval(run_dirs[0], metric) if len(run_dirs) == 1 else None,
             "run_dir": str(run_dirs[0] if len(run_dirs) == 1 else run_dirs[0].parent),
             "best_run_dir": str(run_dirs[values.index(max(values))])}
    if pruning is not None and pruning.pruned_at is not None:
        attrs["reason"] = f"pruned after epoch {pruning.pruned_at} ({metric} {pruning.last:.4f} at that epoch)"
        return Outcome(optuna.trial.TrialState.PRUNED, None, attrs)
    return Outcome(optuna.trial.TrialState.COMPLETE, value, attrs)


def run_trial(trial: optuna.Trial, sweep_cfg: SweepConfig, latency: dict[str, Any]) -> Outcome:
    """Sample, validate, check the budget, train. A problem of this trial's own (its config, a non-finite loss,
    out of memory) ends it as failed with a one-line reason; the sweep goes on."""
    trial.set_user_attr("worker", worker_id())  # a later run tells a killed worker's trials from a live one's
    params = sample_params(trial, sweep_cfg.sweep.space)
    start = time.perf_counter()
    try:
        configs = trial_configs(sweep_cfg, trial.number, params)
    except ConfigError as exc:
        return Outcome(optuna.trial.TrialState.FAIL, None, {"state": "failed", "reason": f"config: {exc}"})
    arch = trial_architecture(configs[0])
    entry = lookup_latency(latency, arch) or {}
    attrs: dict[str, Any] = {"backbone": arch.backbone, "latency_p95_ms": entry.get("p95"),
                             "param_count": entry.get("param_count"), "onnx_bytes": entry.get("onnx_bytes")}
    budget = sweep_cfg.sweep.objective.latency_budget_ms
    if budget is not None and entry.get("p95") is not None and entry["p95"] > budget:
        # PRUNED, not FAIL: samplers learn from pruned trials (TPE ranks them last) and ignore failed ones
        reason = f"over budget: p95 {entry['p95']:.2f} ms > {budget:g} ms ({arch.describe(entry['size_key'])})"
        return Outcome(optuna.trial.TrialState.PRUNED, None, {**attrs, "state": "over_budget", "reason": reason})
    try:
        outcome = train_trial(trial, configs, sweep_cfg.sweep.objective.metric)
    except (Preempted, KeyboardInterrupt):
        raise  # the sweep stops; the trial stays RUNNING and a resumed sweep runs it again
    except Exception as exc:  # noqa: BLE001 - non-finite loss, OOM, data/config of this trial: the sweep goes on
        release_memory()
        return Outcome(optuna.trial.TrialState.FAIL, None,
                       {**attrs, "state": "failed", "reason": f"{type(exc).__name__}: {first_line(exc, 300)}",
                        "train_time_s": round(time.perf_counter() - start, 3)})
    return Outcome(outcome.state, outcome.value, {**attrs, **outcome.attrs})


def release_memory() -> None:
    """After a failed trial (an OOM, say): give the next trial the device memory the failed one held."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
