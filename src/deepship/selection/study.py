"""The Optuna study behind a sweep: storage, sampler, pruner, the sweep directory, and the rules that make
resuming and several workers safe.

- Storage: a journal file `<out_dir>/journal.log` by default (file-locked appends: many processes on one
  machine or a shared file system), or an SQL URL (postgresql://, sqlite:///) for many machines.
- Counting: a worker starts another trial while complete + pruned + failed + running trials < n_trials.
  Trials that a killed process left running (its pid is gone on this host) are marked failed with
  `interrupted` and do not count; their parameters are enqueued again, so the next trial re-runs them.
- Seeds: trial N samples with a generator seeded by (seed, N): the same seed gives the same sweep, and
  two workers, or a resumed sweep, never replay each other's draws.
"""

from __future__ import annotations

import os
import socket
from contextlib import AbstractContextManager
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import optuna
from optuna.trial import TrialState

from deepship.errors import ConfigError
from deepship.files import TMP_SUFFIX, atomic_write_text, exclusive
from deepship.selection.config import SweepConfig, SweepSection
from deepship.selection.space import grid_search_space
from deepship.yamlconf import changed_keys, parse_yaml

SWEEP_FILE = "sweep.yaml"
JOURNAL_FILE = "journal.log"
LOCK_FILE = ".sweep.lock"
UNNAMED_GRACE_S = 60  # a RUNNING trial without its worker's name after this long was orphaned while being asked
RESUMABLE_KEYS = {"sweep.n_trials", "sweep.timeout"}  # may change when a sweep is resumed


# ------------------------------------------------------------------------------------- building blocks
def build_storage(sweep_cfg: SweepConfig) -> optuna.storages.BaseStorage:
    url = sweep_cfg.sweep.storage
    if url is not None and "://" in url:
        try:
            return optuna.storages.RDBStorage(url)
        except (ImportError, ValueError, Exception) as exc:  # sqlalchemy raises its own ArgumentError etc.
            raise ConfigError(f"sweep.storage: cannot open '{url}' ({type(exc).__name__}: {exc}); give an SQL URL "
                              "such as sqlite:///sweep.db or postgresql://user@host/db, or null for a journal file")
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    path = Path(url) if url is not None else sweep_cfg.sweep_dir / JOURNAL_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    return JournalStorage(JournalFileBackend(str(path)))


def trial_seed(seed: int, number: int) -> int:
    return int(np.random.SeedSequence([seed, number]).generate_state(1)[0])


class SweepGridSampler(optuna.samplers.GridSampler):
    """GridSampler for an ask-and-tell loop: the loop checks is_exhausted itself, and GridSampler's own
    after_trial calls study.stop(), which only works inside study.optimize()."""

    def after_trial(self, study: optuna.Study, trial: optuna.trial.FrozenTrial, state: TrialState,
                    values: Any) -> None:
        return None


def build_sampler(sweep: SweepSection, seed: int) -> optuna.samplers.BaseSampler:
    if sweep.sampler == "grid":
        return SweepGridSampler(grid_search_space(sweep.space), seed=seed)
    if sweep.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    # the first trials explore at random; short sweeps should not spend all of their budget doing so
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=max(2, min(10, sweep.n_trials // 4)))


def build_pruner(sweep: SweepSection, max_epochs: int) -> optuna.pruners.BasePruner:
    if sweep.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=sweep.pruner_startup_trials,
                                           n_warmup_steps=sweep.pruner_warmup_epochs)
    if sweep.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=max_epochs)
    return optuna.pruners.NopPruner()


def open_study(sweep_cfg: SweepConfig) -> optuna.Study:
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # the sweep prints its own line per trial
    sweep = sweep_cfg.sweep
    return optuna.create_study(study_name=sweep.study_name, storage=build_storage(sweep_cfg),
                               sampler=build_sampler(sweep, sweep.seed),
                               pruner=build_pruner(sweep, sweep_cfg.config.train.max_epochs),
                               direction="maximize", load_if_exists=True)


def reseed(study: optuna.Study, sweep: SweepSection, number: int) -> None:
    """Random and TPE samplers hold nothing but their generator: a fresh one per trial, seeded by its number.
    (A grid sampler picks its point when the trial is asked, from the study's grid bookkeeping.)"""
    if sweep.sampler != "grid":
        study.sampler = build_sampler(sweep, trial_seed(sweep.seed, number))


# ------------------------------------------------------------------------------------- the sweep directory
def prepare_sweep_dir(sweep_cfg: SweepConfig, resume: bool) -> None:
    """A new sweep directory gets sweep.yaml; an existing one must hold this same sweep (the same command again
    continues it, as a second worker does); with --resume only n_trials and timeout may differ."""
    folder, new = sweep_cfg.sweep_dir, sweep_cfg.to_dict()
    path = folder / SWEEP_FILE
    if not path.is_file():
        # a worker started at the same moment may be writing sweep.yaml (a temp file) right now
        if folder.is_dir() and any(not p.name.endswith(TMP_SUFFIX) and p.name != LOCK_FILE for p in folder.iterdir()):
            raise ConfigError(f"sweep.out_dir: {folder} exists and holds no {SWEEP_FILE}; choose a new sweep.out_dir")
        if resume:
            raise ConfigError(f"--resume: {folder} holds no sweep yet; run without --resume to start it")
    else:
        changed = changed_keys(parse_yaml(path.read_text(encoding="utf-8")), new)
        if changed and not resume:
            raise ConfigError(f"sweep.out_dir: {folder} holds a sweep with another config (changed: "
                              f"{', '.join(changed[:5])}); pass --resume to continue it (only sweep.n_trials and "
                              "sweep.timeout may change) or choose a new sweep.out_dir")
        if set(changed) - RESUMABLE_KEYS:
            raise ConfigError(f"--resume: {folder}: {', '.join(sorted(set(changed) - RESUMABLE_KEYS)[:5])} differ from "
                              "the sweep it holds; only sweep.n_trials and sweep.timeout may change within one study; "
                              "choose a new sweep.out_dir")
        if not changed:
            return
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, sweep_cfg.to_yaml())


# ------------------------------------------------------------------------------------- workers and counting
def sweep_lock(folder: Path) -> AbstractContextManager[None]:
    """One worker at a time writes the sweep directory's shared files (sweep.yaml, latency.json, leaderboard,
    best.json): each is replaced atomically through a temp file of a fixed name, which two writers would share."""
    folder.mkdir(parents=True, exist_ok=True)
    return exclusive(folder / LOCK_FILE)


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def is_orphan(trial: optuna.trial.FrozenTrial) -> bool:
    """A RUNNING trial whose worker on this host is gone. Workers on other hosts cannot be checked: their trials
    count as running until they finish (or are failed by hand)."""
    worker = trial.user_attrs.get("worker")
    if worker is None:  # a worker names itself right after asking: one that did not was killed in between
        started = trial.datetime_start
        return started is not None and (datetime.now() - started).total_seconds() > UNNAMED_GRACE_S
    return worker.get("host") == socket.gethostname() and worker.get("pid") != os.getpid() \
        and not process_alive(int(worker.get("pid", 0)))


def recover_interrupted(study: optuna.Study) -> list[int]:
    """Mark trials of killed workers failed (`interrupted`, not counted) and enqueue their parameters again."""
    storage, recovered = study._storage, []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if not is_orphan(trial):
            continue
        try:
            storage.set_trial_user_attr(trial._trial_id, "interrupted", True)
            storage.set_trial_user_attr(trial._trial_id, "state", "failed")
            storage.set_trial_user_attr(trial._trial_id, "reason", "interrupted: its process ended; its parameters "
                                                                   "were queued again")
            claimed = storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
        except optuna.exceptions.UpdateFinishedTrialError:
            continue  # another worker starting at the same moment recovered it first
        if claimed:
            if trial.params:
                study.enqueue_trial(trial.params, user_attrs={"retry_of": trial.number})
            recovered.append(trial.number)
    return recovered


def counted(trial: optuna.trial.FrozenTrial) -> bool:
    """Trials that count toward n_trials: finished ones (not interrupted) and running ones."""
    if trial.state == TrialState.FAIL:
        return not trial.user_attrs.get("interrupted", False)
    return trial.state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)


def trials_counted(study: optuna.Study) -> int:
    return sum(counted(t) for t in study.get_trials(deepcopy=False))


def grid_exhausted(study: optuna.Study) -> bool:
    sampler = study.sampler
    return isinstance(sampler, SweepGridSampler) and sampler.is_exhausted(study)
