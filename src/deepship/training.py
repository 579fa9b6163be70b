"""fit(cfg) -> run directory: data, backbone, ClassifierModule and a lightning.Trainer wired once."""

from __future__ import annotations

import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Any, Sequence

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, EarlyStopping, EMAWeightAveraging, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities.exceptions import SIGTERMException

from deepship.callbacks import (
    MONITOR,
    AttentionBackend,
    HistoryCallback,
    RngState,
    SaveOnSigterm,
    ThroughputCallback,
    TimedProgressBar,
    describe_device,
)
from deepship.checkpointing import AtomicCheckpointIO
from deepship.config import Config
from deepship.data.datamodule import ClassificationData
from deepship.data.report import record_truncation, validate_data, write_data_report
from deepship.data.split import Splits
from deepship.data.text import TextDataset
from deepship.errors import ConfigError, Preempted
from deepship.evaluation.evaluate import fit_run_probe, run_probe_section, write_run_report
from deepship.evaluation.linear_probe import probe_skip_reason
from deepship.files import remove_temp_files, write_json
from deepship.models.backbones import Backbone, build_backbone
from deepship.models.classifier import ClassifierModule
from deepship.models.finetuning import FinetuningStrategy, describe_recipe, load_head, resolve_recipe
from deepship.run import (
    build_module,
    check_resume_config,
    check_resume_data,
    load_checkpoint_file,
    loss_settings,
    prepare_run_dir,
    read_run_info,
    reset_run_dir,
    resume_checkpoint,
    write_run_files,
)

# We write config.yaml and labels.json into the run directory before Lightning's checkpoints.
warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
# Our train sampler carries its own position (ClassificationData.state_dict), which Lightning cannot see.
warnings.filterwarnings("ignore", message=r"You're resuming from a checkpoint that ended before the epoch ended")
# Lightning's own use of a torch API that torch deprecated; nothing a user can act on.
warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated", category=FutureWarning)


def quiet_lightning() -> None:
    """Lightning's info lines (accelerators found, tips, loop notices) go; its warnings, which use the warnings
    module, stay. deepship prints its own header and summary instead."""
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)


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
    callbacks: list[Callback] = [best, last, FinetuningStrategy(f.strategy, f.unfreeze_epoch, f.unfreeze_every,
                                                                f.freeze_bn is True), RngState()]
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
    return callbacks


def build_trainer(cfg: Config, run_dir: Path, callbacks: list[Callback], steps_per_epoch: int) -> L.Trainer:
    quiet_lightning()
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
        enable_model_summary=False,  # the header says what matters; the layer table is noise in a log
    )


def evaluation_trainer(cfg: Config) -> L.Trainer:
    """One process, no callbacks, no logger: validates and predicts with exactly the weights it is given."""
    return L.Trainer(accelerator=cfg.train.accelerator, devices=1, precision=resolve_precision(cfg), logger=False,
                     enable_checkpointing=False, enable_model_summary=False, callbacks=[], enable_progress_bar=False)


def evaluate_best(cfg: Config, module: ClassifierModule, data: ClassificationData, best_path: str,
                  predict_test: bool = False) -> tuple[dict[str, Any], dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """Re-evaluate best.ckpt on val (and test), so metrics.json is what best.ckpt reproduces, and return its
    logits (N, C) and targets (N,) per split: val for report.json, test too with `predict_test`.

    A fresh Trainer without callbacks: the fit Trainer's EMA callback would swap its final average
    in for the checkpoint's weights during validation. One process: the whole val set, whatever the fit
    Trainer's world size was."""
    evaluator = evaluation_trainer(cfg)
    metrics: dict[str, Any] = {"val": strip_stage(evaluator.validate(module, datamodule=data, ckpt_path=best_path,
                                                                     verbose=False)[0], "val")}
    if "test" in data.datasets:
        test = evaluator.test(module, datamodule=data, ckpt_path=best_path, verbose=False)[0]
        metrics["test"] = strip_stage(test, "test")
    metrics["best_epoch"] = int(load_checkpoint_file(best_path)["epoch"]) + 1
    data.trainer = evaluator
    loaders = {"val": data.val_dataloader(), **({"test": data.test_dataloader()}
                                                if predict_test and "test" in data.datasets else {})}
    outputs = {split: evaluator.predict(module, dataloaders=loader, ckpt_path=best_path)
               for split, loader in loaders.items()}
    return metrics, {split: (torch.cat([o[0].cpu() for o in out]), torch.cat([o[1].cpu() for o in out]))
                     for split, out in outputs.items()}


# ---------------------------------------------------------------------------------------- fit
def print_header(trainer: L.Trainer, splits: Splits, run_dir: Path, resume: Path | None) -> None:
    """What a user needs before the progress bar: where it runs, at what precision, on how much data."""
    sizes = ", ".join(f"{name} {len(s)}" for name, s in (("train", splits.train), ("val", splits.val),
                                                         ("test", splits.test)) if s is not None)
    processes = f" x {trainer.world_size} processes" if trainer.world_size > 1 else ""
    print(f"train: {describe_device(trainer)}{processes}, precision {trainer.precision}; samples: {sizes}")
    print(f"run directory: {run_dir}" + (f" (resuming from {resume})" if resume is not None else ""), flush=True)


def fit_or_preempt(trainer: L.Trainer, module: ClassifierModule, data: ClassificationData, resume: Path | None,
                   run_dir: Path) -> None:
    try:
        trainer.fit(module, datamodule=data, ckpt_path=resume)
    except SIGTERMException:
        raise Preempted(f"stopped by SIGTERM at global step {trainer.global_step}; {run_dir / 'last.ckpt'} holds "
                        "the state; run the same command with --resume (or train.resume=auto) to continue") from None


def prepare_data(cfg: Config, run_dir: Path, resume: Path | None, writer: bool
                 ) -> tuple[Splits, dict[str, Any], Backbone, ClassificationData]:
    """Validated data (checked against a resumed checkpoint's), the backbone, the run files, the datamodule."""
    run_info = read_run_info(resume) if resume is not None else None
    if run_info is not None:
        check_resume_config(cfg, resume, run_info)  # before any data is read
    splits, report = validate_data(cfg, run_dir)  # all data errors surface before a model is built
    if run_info is not None:
        check_resume_data(resume, run_info, report["fingerprint"])
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
    return splits, report, backbone, data


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
    splits, report, backbone, data = prepare_data(cfg, run_dir, resume, writer)
    recipe = resolve_recipe(cfg, len(splits.train), len(splits.classes))  # the auto settings, for this training set
    module = build_module(cfg, backbone, splits.classes, loss_settings(cfg, splits.classes, splits.train.labels),
                          report["fingerprint"], recipe)
    throughput = ThroughputCallback()
    attention = AttentionBackend(cfg.train.sdpa_backend, data.typical_text_batch())
    steps = -(-len(splits.train) // cfg.train.batch_size)
    # attention before throughput: its measurement at train start is not training time
    trainer = build_trainer(cfg.model_copy(update={"finetune": recipe}), run_dir,
                            [HistoryCallback(run_dir / "history.csv"), attention, throughput, *extra_callbacks], steps)
    if writer:
        print_header(trainer, splits, run_dir, resume)
        if (line := describe_recipe(cfg.finetune, recipe)) is not None:
            print(line, flush=True)
    probe, probe_skipped = fit_run_probe(cfg, splits, for_head=recipe.head_init == "probe")
    if recipe.head_init == "probe":  # a resumed run's checkpoint then replaces it
        load_head(module.net, *probe.as_linear(splits.classes))
    fit_or_preempt(trainer, module, data, resume, run_dir)
    if not trainer.is_global_zero:
        return run_dir
    release_process_group()

    # run_dir's own: a resumed run in a moved run directory remembers the old best_model_path
    compare = probe is not None and probe_skip_reason(cfg) is None  # the probe meets the model on test too
    metrics, outputs = evaluate_best(cfg, module, data, str(run_dir / "best.ckpt"), predict_test=compare)
    logits, targets = outputs["val"]
    metrics.update({
        "epochs": trainer.current_epoch,
        "train_time_s": round(throughput.seconds, 3),
        "train_samples_per_s": round(throughput.samples / max(throughput.seconds, 1e-9), 2),
        "num_samples": {k: len(v) for k, v in zip(("train", "val", "test"), (splits.train, splits.val, splits.test))
                        if v is not None},
        "data_fingerprint": report["fingerprint"],
        "device": describe_device(trainer),
        # what this config needs of a GPU, for sizing boxes and batch sizes
        "peak_gpu_memory_mib": round(torch.cuda.max_memory_allocated() / 2**20, 1) if torch.cuda.is_available() else None,
        "precision": str(trainer.precision),
        "sdpa_backend": attention.report(),  # text: the measured attention kernel; null for images
    })
    # the cheapest strong alternative, input by input against the model on the same val (and test) split
    section, skipped = run_probe_section(cfg, splits, probe, {split: o[0].argmax(1) for split, o in outputs.items()}) \
        if probe is not None else (None, probe_skipped)
    metrics["linear_probe"] = None if section is None else {k: v for k, v in section.items()
                                                            if k not in ("name", "train_samples")}
    if skipped is not None:
        metrics["linear_probe_skipped"] = skipped
    write_json(run_dir / "metrics.json", metrics)
    write_run_report(cfg, run_dir, logits, targets, splits.classes, metrics["precision"], baseline=section)
    return run_dir
