"""fit(cfg) -> run directory: data, backbone, ClassifierModule and a lightning.Trainer wired once."""

from __future__ import annotations

import csv
import os
import random
import shutil
import signal
import sys
import time
import warnings
from pathlib import Path
from typing import IO, Any, Callable, Sequence

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback, EarlyStopping, EMAWeightAveraging, ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities.exceptions import SIGTERMException

from deepship.config import Config
from deepship.data.datamodule import ClassificationData
from deepship.data.report import write_data_report
from deepship.data.split import DataValidationError, Splits, load_validated
from deepship.data.text import TextDataset, count_truncated
from deepship.errors import ConfigError, DataError, Preempted, TrainingError
from deepship.evaluation.evaluate import write_run_report
from deepship.files import atomic_write, remove_temp_files, write_json
from deepship.models.attention import DEVICE_BACKENDS, describe_backends, fastest, measure_backends
from deepship.models.backbones import TextNet, build_backbone, load_text_tokenizer
from deepship.models.classifier import ClassifierModule
from deepship.models.finetuning import FinetuningStrategy
from deepship.run import build_module, load_checkpoint_file, loss_settings, write_run_files
from deepship.runtime.preprocess import TextPreprocessor

MONITOR = "val/macro_f1"
FINISHED_RUN_FILES = ("best.ckpt", "last.ckpt", "metrics.json")
# We write config.yaml and labels.json into the run directory before Lightning's checkpoints.
warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
HISTORY_COLUMNS = ["epoch", "train_loss", "val_loss", "val_accuracy", "val_macro_f1", "lr", "time_s"]
# Our train sampler carries its own position (ClassificationData.state_dict), which Lightning cannot see.
warnings.filterwarnings("ignore", message=r"You're resuming from a checkpoint that ended before the epoch ended")
# Test hooks for the crash tests (tests/test_reliability.py); unset in normal use.
KILL_AT_STEP_ENV = "DEEPSHIP_TEST_KILL_AT_STEP"  # SIGKILL this process once this many optimizer steps are done
KILL_IN_SAVE_ENV = "DEEPSHIP_TEST_KILL_IN_SAVE"  # SIGKILL inside the Nth checkpoint save, temp file written


def test_hook(name: str) -> int | None:
    value = os.environ.get(name)
    return int(value) if value else None


def kill_self() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


# ----------------------------------------------------------------------------------- checkpoints
def nonfinite_weights(checkpoint: dict[str, Any]) -> list[str]:
    """Names of floating-point tensors with NaN/Inf in the weights a checkpoint would carry."""
    by_device: dict[torch.device, list[tuple[str, torch.Tensor]]] = {}
    for key in ("state_dict", "current_model_state"):  # the latter: raw weights when EMA swapped its average in
        for name, value in (checkpoint.get(key) or {}).items():
            if torch.is_tensor(value) and value.is_floating_point():
                by_device.setdefault(value.device, []).append((name, value))
    bad = []
    for items in by_device.values():  # one host read per device, not one per tensor
        finite = torch.stack([torch.isfinite(value).all() for _, value in items]).tolist()
        bad += [name for (name, _), ok in zip(items, finite) if not ok]
    return bad


class AtomicCheckpointIO(TorchCheckpointIO):
    """Every checkpoint appears whole or not at all (temp file, fsync, os.replace), is refused when its weights
    are not finite, and loads weights-only, so a crafted file cannot run code."""

    def __init__(self) -> None:
        self.saves = 0

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        path = Path(path)
        bad = nonfinite_weights(checkpoint)
        if bad:
            raise TrainingError(f"{path}: not written: non-finite weights in {bad[:3]}; the previous checkpoint "
                                "is kept; lower train.lr or check the data")
        path.parent.mkdir(parents=True, exist_ok=True)
        self.saves += 1
        atomic_write(path, self._writer(checkpoint))

    def _writer(self, checkpoint: dict[str, Any]) -> Callable[[IO[bytes]], None]:
        def write(f: IO[bytes]) -> None:
            torch.save(checkpoint, f)
            if test_hook(KILL_IN_SAVE_ENV) == self.saves:
                f.flush()
                kill_self()  # as if preempted mid-save: a complete temp file, not yet renamed

        return write

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        return load_checkpoint_file(path, map_location="cpu")


# ------------------------------------------------------------------------------------- RNG states
def collect_rng_states() -> dict[str, Any]:
    """Every RNG a training step may draw from, as tensors and plain values (weights-only loadable)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    states: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate(),
                              "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss)}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    random.setstate(states["python"])
    kind, keys, pos, has_gauss, gauss = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


# ---------------------------------------------------------------------------------- callbacks
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


class FaultInjection(Callback):
    """Test hook: SIGKILL at a chosen step, after the step checkpoints before it were written."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer: L.Trainer, module: L.LightningModule, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            kill_self()


# ------------------------------------------------------------------------------------ helpers
def is_launch_rank_zero() -> bool:
    """Before a Trainer exists: is this the process that writes the run directory? torchrun sets RANK, SLURM
    SLURM_PROCID, and Lightning's own launcher NODE_RANK/LOCAL_RANK for the processes it starts."""
    for key in ("RANK", "SLURM_PROCID"):
        if key in os.environ:
            return int(os.environ[key]) == 0
    return int(os.environ.get("NODE_RANK", 0)) == 0 and int(os.environ.get("LOCAL_RANK", 0)) == 0


def release_process_group() -> None:
    """After a multi-process fit, rank 0 evaluates alone: torchmetrics would otherwise wait for the other ranks."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def resolve_precision(cfg: Config) -> str:
    """auto: bf16-mixed on CUDA with bf16, 16-mixed on older CUDA, full fp32 on CPU."""
    requested, accelerator = cfg.train.precision, cfg.train.accelerator
    if requested != "auto":
        return requested
    if torch.cuda.is_available() and accelerator in ("auto", "gpu", "cuda"):
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    return "32-true"


def describe_device(trainer: L.Trainer) -> str:
    root = trainer.strategy.root_device
    if root.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(root)})"
    return root.type


def resume_checkpoint(cfg: Config) -> Path | None:
    """train.resume: false; auto/true = the run's last.ckpt (auto starts fresh without one); or a path."""
    resume = cfg.train.resume
    if resume is False:
        return None
    path = cfg.run_dir / "last.ckpt" if resume in (True, "auto") else Path(resume)
    if path.is_file():
        return path
    if resume == "auto":
        return None
    raise ConfigError(f"train.resume: {path} not found; train first, or set train.resume to auto or false")


def prepare_run_dir(cfg: Config, resuming: bool = False) -> Path:
    """Refuse to clobber a finished run; leftovers of an aborted one (a data report) may go."""
    run_dir = cfg.run_dir
    if resuming:
        return run_dir
    if any((run_dir / name).exists() for name in FINISHED_RUN_FILES) and not cfg.train.overwrite:
        raise ConfigError(f"train.run_name: {run_dir} already holds a run; choose another run name "
                          "or pass --set train.overwrite=true to replace it")
    return run_dir


def reset_run_dir(run_dir: Path) -> None:
    if run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)


def validate_data(cfg: Config, out_dir: Path) -> tuple[Splits, dict[str, Any]]:
    """Validated splits and the data report; too many bad samples stop here, report written."""
    try:
        return load_validated(cfg)
    except DataValidationError as exc:
        path = write_data_report(exc.report, out_dir)
        raise DataError(f"{exc}; see {path} for the list, then fix or remove them or raise the limit") from None


def record_truncation(report: dict[str, Any], split: str, truncated: int, max_length: int) -> None:
    report["splits"][split]["truncated"] = truncated
    if truncated:
        report["warnings"].append(f"{split}: {truncated} texts are longer than {max_length} tokens "
                                  "and get truncated (data.max_length)")


def data_report(cfg: Config, out_dir: Path) -> dict[str, Any]:
    """`deepship data-report`: validate and write the report without training (tokenizer only, no weights)."""
    splits, report = validate_data(cfg, out_dir)
    if cfg.task == "text_classification":
        tokenizer, _, spec = load_text_tokenizer(cfg.model, cfg.data, len(splits.classes))
        preprocessor = TextPreprocessor(tokenizer.backend_tokenizer, spec)
        for name, samples in (("train", splits.train), ("val", splits.val), ("test", splits.test)):
            if samples is not None:
                record_truncation(report, name, count_truncated(preprocessor.tokenize(samples.inputs)), spec.max_length)
    write_data_report(report, out_dir)
    return report


def strip_stage(metrics: dict[str, float], stage: str) -> dict[str, float]:
    return {k.split("/", 1)[1]: float(v) for k, v in metrics.items() if k.startswith(f"{stage}/")}


LOGGER_PACKAGES = {"tensorboard": ("tensorboard", "tensorboardX"), "mlflow": ("mlflow",)}


def check_loggers(cfg: Config) -> None:
    """Optional logger backends must be installed; say so before any data is read."""
    from importlib.util import find_spec

    for name in cfg.train.loggers:
        packages = LOGGER_PACKAGES.get(name, ())
        if packages and not any(find_spec(p) for p in packages):
            raise ConfigError(f"train.loggers: '{name}' needs the {packages[0]} package; pip install {packages[0]}, "
                              "or remove it from train.loggers")


def build_loggers(cfg: Config, run_dir: Path) -> list[Any]:
    from lightning.pytorch.loggers import MLFlowLogger, TensorBoardLogger

    loggers: list[Any] = []
    for name in cfg.train.loggers:
        if name == "csv":
            loggers.append(CSVLogger(save_dir=str(run_dir), name="logs", version=""))
        elif name == "tensorboard":
            loggers.append(TensorBoardLogger(save_dir=str(run_dir), name="logs", version="tensorboard"))
        else:
            loggers.append(MLFlowLogger(experiment_name="deepship", run_name=cfg.train.run_name,
                                        tracking_uri=(run_dir / "mlruns").resolve().as_uri()))
    return loggers


def build_callbacks(cfg: Config, run_dir: Path) -> list[Callback]:
    # best.ckpt holds weights only (what export needs); last.ckpt holds the full state for resuming.
    best = ModelCheckpoint(dirpath=run_dir, filename="best", monitor=MONITOR, mode="max", save_top_k=1,
                           save_weights_only=True, auto_insert_metric_name=False)
    last = ModelCheckpoint(dirpath=run_dir, filename="last", save_top_k=1, save_last=False,
                           enable_version_counter=False)
    f = cfg.finetune
    callbacks: list[Callback] = [best, last, FinetuningStrategy(f.strategy, f.unfreeze_epoch, f.unfreeze_every),
                                 RngState()]
    if cfg.train.checkpoint_every_n_steps is not None:
        # Same file as `last`: a preempted long epoch loses at most N steps.
        callbacks.append(ModelCheckpoint(dirpath=run_dir, filename="last", save_top_k=1, enable_version_counter=False,
                                         every_n_train_steps=cfg.train.checkpoint_every_n_steps))
    if f.ema_decay is not None:
        # Validation and checkpoints (best.ckpt, hence export) use the EMA weights; last.ckpt keeps both.
        callbacks.append(EMAWeightAveraging(decay=f.ema_decay))
    if cfg.train.early_stopping_patience is not None:
        callbacks.append(EarlyStopping(MONITOR, mode="max", patience=cfg.train.early_stopping_patience))
    callbacks.append(SaveOnSigterm(run_dir / "last.ckpt"))
    callbacks.append(TimedProgressBar())
    kill_step = test_hook(KILL_AT_STEP_ENV)
    if kill_step is not None:
        callbacks.append(FaultInjection(kill_step))
    return callbacks


def build_trainer(cfg: Config, run_dir: Path, callbacks: list[Callback], steps_per_epoch: int) -> L.Trainer:
    callbacks = [*build_callbacks(cfg, run_dir), *callbacks]
    t = cfg.train
    return L.Trainer(
        accelerator=t.accelerator,
        devices=t.devices,
        num_nodes=t.num_nodes,
        strategy=t.strategy,
        # ClassificationData shards by rank itself (exact global batches, unpadded evaluation)
        use_distributed_sampler=False,
        plugins=[AtomicCheckpointIO()],
        precision=resolve_precision(cfg),
        max_epochs=cfg.train.max_epochs,
        gradient_clip_val=cfg.train.grad_clip,
        deterministic=cfg.train.deterministic,
        callbacks=callbacks,
        logger=build_loggers(cfg, run_dir) or False,
        default_root_dir=str(run_dir),
        log_every_n_steps=max(1, min(50, steps_per_epoch)),
        accumulate_grad_batches=cfg.train.accumulate_grad_batches,
        limit_train_batches=cfg.train.limit_train_batches,
        enable_progress_bar=True,
    )


def evaluate_best(cfg: Config, module: ClassifierModule, data: ClassificationData, best_path: str) -> dict[str, Any]:
    """Re-evaluate best.ckpt on val (and test), so metrics.json is what best.ckpt reproduces.

    A fresh Trainer without callbacks: the fit Trainer's EMA callback would swap its final average
    in for the checkpoint's weights during validation."""
    evaluator = L.Trainer(accelerator=cfg.train.accelerator, devices=1, precision=resolve_precision(cfg), logger=False,
                          enable_checkpointing=False, enable_model_summary=False, callbacks=[])
    metrics: dict[str, Any] = {"val": strip_stage(evaluator.validate(module, datamodule=data, ckpt_path=best_path,
                                                                     verbose=False)[0], "val")}
    if "test" in data.datasets:
        test = evaluator.test(module, datamodule=data, ckpt_path=best_path, verbose=False)[0]
        metrics["test"] = strip_stage(test, "test")
    metrics["best_epoch"] = int(load_checkpoint_file(best_path)["epoch"]) + 1
    return metrics


def val_logits(cfg: Config, module: ClassifierModule, data: ClassificationData, best_path: str
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """best.ckpt's validation logits (N, C) and targets (N,), on the training device, for report.json."""
    evaluator = L.Trainer(accelerator=cfg.train.accelerator, devices=1, precision=resolve_precision(cfg), logger=False,
                          enable_checkpointing=False, enable_model_summary=False, callbacks=[], enable_progress_bar=False)
    data.trainer = evaluator  # one process: the whole val set, whatever the fit Trainer's world size was
    outputs = evaluator.predict(module, dataloaders=data.val_dataloader(), ckpt_path=best_path)
    return torch.cat([o[0].cpu() for o in outputs]), torch.cat([o[1].cpu() for o in outputs])


# ---------------------------------------------------------------------------------------- fit
def fit_or_preempt(trainer: L.Trainer, module: ClassifierModule, data: ClassificationData, resume: Path | None,
                   run_dir: Path) -> None:
    try:
        trainer.fit(module, datamodule=data, ckpt_path=resume)
    except SIGTERMException:
        raise Preempted(f"stopped by SIGTERM at global step {trainer.global_step}; {run_dir / 'last.ckpt'} holds "
                        "the state; run the same command with --resume (or train.resume=auto) to continue") from None


def fit(cfg: Config, extra_callbacks: Sequence[Callback] = ()) -> Path:
    """Train per `cfg`, write the run directory, return its path. With several processes every rank runs
    this; only rank 0 writes files and evaluates."""
    if cfg.train.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # read once, when cuBLAS first initializes
    check_loggers(cfg)
    resume = resume_checkpoint(cfg)
    writer = is_launch_rank_zero()
    run_dir = prepare_run_dir(cfg, resuming=resume is not None or not writer)
    L.seed_everything(cfg.train.seed, workers=True, verbose=False)
    splits, report = validate_data(cfg, run_dir)  # all data errors surface before a model is built
    backbone = build_backbone(cfg.task, cfg.model, cfg.data, len(splits.classes))
    if writer:
        if resume is None:
            reset_run_dir(run_dir)  # a replaced run goes only once everything before this succeeded
        remove_temp_files(run_dir)  # what a killed save left; never read
        write_run_files(cfg, run_dir, splits.classes, backbone)

    data = ClassificationData(cfg, splits, backbone)
    data.setup("fit")
    for name, dataset in data.datasets.items():
        if isinstance(dataset, TextDataset):  # counted while tokenizing, once
            record_truncation(report, name, dataset.truncated, backbone.preprocessing.max_length)
    if writer:
        write_data_report(report, run_dir)
        for warning in report["warnings"]:
            print(f"warning: {warning}", file=sys.stderr)
    module = build_module(cfg, backbone, splits.classes, loss_settings(cfg, splits.classes, splits.train.labels),
                          report["fingerprint"])
    throughput = ThroughputCallback()
    attention = AttentionBackend(cfg.train.sdpa_backend, data.typical_text_batch())
    steps = -(-len(splits.train) // cfg.train.batch_size)
    # attention before throughput: its measurement at train start is not training time
    trainer = build_trainer(cfg, run_dir, [HistoryCallback(run_dir / "history.csv"), attention, throughput,
                                           *extra_callbacks], steps)
    fit_or_preempt(trainer, module, data, resume, run_dir)
    if not trainer.is_global_zero:
        return run_dir
    release_process_group()

    metrics = evaluate_best(cfg, module, data, trainer.checkpoint_callback.best_model_path)
    metrics.update({
        "epochs": trainer.current_epoch,
        "train_time_s": round(throughput.seconds, 3),
        "train_samples_per_s": round(throughput.samples / max(throughput.seconds, 1e-9), 2),
        "num_samples": {k: len(v) for k, v in zip(("train", "val", "test"), (splits.train, splits.val, splits.test))
                        if v is not None},
        "data_fingerprint": report["fingerprint"],
        "device": describe_device(trainer),
        # what this config needs of a GPU, for sizing boxes and batch sizes (issue 10's memory report)
        "peak_gpu_memory_mib": round(torch.cuda.max_memory_allocated() / 2**20, 1) if torch.cuda.is_available() else None,
        "precision": str(trainer.precision),
        "sdpa_backend": attention.report(),  # text: the measured attention kernel; null for images
    })
    write_json(run_dir / "metrics.json", metrics)
    logits, targets = val_logits(cfg, module, data, trainer.checkpoint_callback.best_model_path)
    write_run_report(cfg, run_dir, logits, targets, splits.classes, metrics["precision"])
    return run_dir
