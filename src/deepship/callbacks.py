"""The training callbacks fit() wires in: history, progress, throughput, attention kernel, RNG state, SIGTERM."""

from __future__ import annotations

import csv
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, TQDMProgressBar
from lightning.pytorch.utilities.exceptions import SIGTERMException

from deepship.checkpointing import collect_rng_states, restore_rng_states
from deepship.errors import ConfigError
from deepship.models.attention import DEVICE_BACKENDS, describe_backends, fastest, measure_backends
from deepship.models.backbones import TextNet

MONITOR = "val/macro_f1"
HISTORY_COLUMNS = ["epoch", "train_loss", "val_loss", "val_accuracy", "val_macro_f1", "lr", "time_s"]


def describe_device(trainer: L.Trainer) -> str:
    root = trainer.strategy.root_device
    if root.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(root)})"
    return root.type


class HistoryCallback(Callback):
    """Writes history.csv, one row per finished epoch (validation has run by then)."""

    def __init__(self, path: Path) -> None:
        self.path, self.start = path, time.perf_counter()

    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        # A resumed run starts after its checkpoint's epochs: rows past those will be written again.
        if not self.path.is_file() or not trainer.is_global_zero:
            return
        with open(self.path, newline="") as f:
            rows = list(csv.reader(f))
        with open(self.path, "w", newline="") as f:
            csv.writer(f).writerows([rows[0]] + [r for r in rows[1:] if int(r[0]) <= trainer.current_epoch])

    def on_train_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        m = trainer.callback_metrics
        value = lambda key: float(m[key]) if key in m else float("nan")  # noqa: E731
        row = [trainer.current_epoch + 1, value("train/loss_epoch"), value("val/loss"), value("val/accuracy"),
               value(MONITOR), trainer.optimizers[0].param_groups[0]["lr"], round(time.perf_counter() - self.start, 3)]
        new = not self.path.exists()
        with open(self.path, "a", newline="") as f:
            writer = csv.writer(f)
            if new:
                writer.writerow(HISTORY_COLUMNS)
            writer.writerow(row)


PROGRESS_REFRESH_S = 0.5


class TimedProgressBar(TQDMProgressBar):
    """Redraws at most every PROGRESS_REFRESH_S seconds: each redraw reads the logged loss on the host (a device
    sync), which Lightning's default bar does every step."""

    def __init__(self) -> None:
        super().__init__()
        self._last = 0.0

    def _should_update(self, current: int, total: int) -> bool:
        now = time.monotonic()
        if not self.is_enabled or (current != total and now - self._last < PROGRESS_REFRESH_S):
            return False
        self._last = now
        return True

    def get_metrics(self, trainer: L.Trainer, module: L.LightningModule) -> dict[str, int | str | float | dict]:
        items = super().get_metrics(trainer, module)
        # The module's own copy: Lightning's callback_metrics may compute (and all-reduce) epoch values, a
        # collective that only rank 0, which draws the bar, would enter.
        loss = getattr(module, "last_train_loss", None)
        if loss is not None:
            items["loss"] = f"{float(loss):.4g}"  # the device sync this bar exists to ration
        return items


class ThroughputCallback(Callback):
    """Training wall time and samples/s, counted from batch shapes (no device sync)."""

    def __init__(self) -> None:
        self.samples, self.seconds, self._t0 = 0, 0.0, 0.0

    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.samples += int(batch[1].shape[0])

    def on_train_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self.seconds = time.perf_counter() - self._t0


class AttentionBackend(Callback):
    """train.sdpa_backend for text models: auto measures each SDPA backend on `batch` as training starts and keeps
    the fastest (deepship.models.attention); a named backend is checked the same way; default leaves the choice to
    PyTorch. The choice is saved in checkpoints, so a resumed run uses the same kernels. Multi-process runs keep
    PyTorch's choice (each rank would measure its own)."""

    def __init__(self, setting: str, batch: dict[str, torch.Tensor] | None) -> None:
        self.setting, self.batch = setting, batch
        self.chosen: str | None = None
        self.timings: dict[str, float | None] = {}
        self.measured_on: dict[str, str] = {}  # where the choice was measured: a resume elsewhere re-measures

    def state_dict(self) -> dict[str, Any]:
        return {"chosen": self.chosen, "timings": self.timings, "measured_on": self.measured_on}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.chosen, self.timings = state_dict.get("chosen"), state_dict.get("timings", {})
        self.measured_on = state_dict.get("measured_on", {})

    def report(self) -> dict[str, Any] | None:
        return {"setting": self.setting, "chosen": self.chosen, "ms_per_step": self.timings} if self.chosen else None

    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        net = module.net
        if not isinstance(net, TextNet) or not net.uses_sdpa or self.setting == "default" or self.batch is None:
            return
        here = {"device": describe_device(trainer), "precision": str(trainer.precision), "setting": self.setting}
        if self.chosen is not None and self.measured_on != here:  # another card, precision or setting
            self.chosen, self.timings = None, {}
        if self.chosen is None:
            if trainer.world_size > 1:
                return
            names = DEVICE_BACKENDS.get(module.device.type, ("math",)) if self.setting == "auto" else (self.setting,)
            inputs = {k: v.to(module.device) for k, v in self.batch.items()}
            self.timings = measure_backends(net, inputs, names, autocast=trainer.precision_plugin.forward_context)
            self.chosen, self.measured_on = fastest(self.timings), here
            if self.chosen is None:
                raise ConfigError(f"train.sdpa_backend: {self.setting} cannot run this model's attention on "
                                  f"{module.device.type} at precision {trainer.precision}; use auto or default")
            if trainer.is_global_zero:
                print(describe_backends(self.chosen, self.timings), file=sys.stderr)
        net.sdpa_backend = self.chosen


class RngState(Callback):
    """Checkpoints carry the RNG states; a resumed run restores them as training starts (after Lightning has
    built its iterators), so dropout and MixUp/CutMix draws continue as if never interrupted."""

    def __init__(self) -> None:
        self._pending: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        return collect_rng_states()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending = state_dict

    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if self._pending is not None:
            restore_rng_states(self._pending)
            self._pending = None


class SaveOnSigterm(Callback):
    """SIGTERM (a scheduler's preemption notice): Lightning finishes the current batch and raises
    SIGTERMException; we write last.ckpt first. Listed after EMA so the checkpoint includes this step's average."""

    def __init__(self, path: Path) -> None:
        self.path, self.saved_step = path, -1

    def _save(self, trainer: L.Trainer) -> None:
        if self.saved_step != trainer.global_step:
            trainer.save_checkpoint(self.path)  # every rank calls it (FSDP gathers); rank 0 writes
            self.saved_step = trainer.global_step

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, outputs, batch, batch_idx) -> None:
        if trainer.received_sigterm:
            self._save(trainer)

    def on_exception(self, trainer: L.Trainer, module: L.LightningModule, exception: BaseException) -> None:
        if isinstance(exception, SIGTERMException):  # e.g. the signal came during validation
            self._save(trainer)
