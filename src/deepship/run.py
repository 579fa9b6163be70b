"""The run directory: what training writes, and how a finished run is read back."""

from __future__ import annotations

import json
import pickle
import shutil
import zipfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from deepship.config import Config, FinetuneConfig, parse_yaml
from deepship.errors import ConfigError, DataError, first_line
from deepship.files import atomic_write_text, write_json
from deepship.models.backbones import MODEL_CONFIG_DIR, TOKENIZER_DIR, Backbone, build_backbone, save_model_config
from deepship.models.classifier import ClassifierModule, optim_settings
from deepship.runtime.preprocess import ImageSpec, TextSpec
from deepship.yamlconf import changed_keys, flatten

FINISHED_RUN_FILES = ("best.ckpt", "last.ckpt", "metrics.json")


def class_weights(cfg: Config, classes: list[str], train_labels: list[str]) -> tuple[float, ...] | None:
    """auto: inverse frequency, scaled so that a balanced dataset gets 1.0 everywhere."""
    setting = cfg.finetune.class_weights
    if setting == "none":
        return None
    if setting == "auto":
        counts = Counter(train_labels)
        return tuple(len(train_labels) / (len(classes) * max(1, counts[c])) for c in classes)
    unknown = sorted(set(setting) - set(classes))
    if unknown:
        raise ConfigError(f"finetune.class_weights: unknown classes {unknown}; the classes are {classes}")
    return tuple(float(setting.get(c, 1.0)) for c in classes)


def loss_settings(cfg: Config, classes: list[str], train_labels: list[str]) -> dict[str, Any]:
    f = cfg.finetune
    return {"class_weights": class_weights(cfg, classes, train_labels), "label_smoothing": f.label_smoothing,
            "mixup": f.mixup, "cutmix": f.cutmix}  # the module mixes image batches only


def build_module(cfg: Config, backbone: Backbone, classes: list[str], loss: dict[str, Any],
                 data_fingerprint: str | None = None, finetune: FinetuneConfig | None = None) -> ClassifierModule:
    """`finetune`: the recipe resolved for the training data (resolve_recipe); run_info keeps the config as
    written, so a resume compares like with like."""
    run_info = {"config": cfg.model_dump(mode="json"), "labels": classes,
                "preprocessing": backbone.preprocessing.to_dict(), "data_fingerprint": data_fingerprint}
    f = finetune or cfg.finetune
    optim = optim_settings(lr=f.head_lr or cfg.train.lr, backbone_lr=f.backbone_lr or cfg.train.lr,
                           layer_decay=f.layer_decay, weight_decay=cfg.train.weight_decay, schedule=f.schedule,
                           warmup_ratio=f.warmup_ratio)
    return ClassifierModule(backbone.net, len(classes), layers=backbone.layers, optim=optim, loss=loss,
                            channels_last=backbone.channels_last, compile=cfg.train.compile, run_info=run_info,
                           nonfinite=cfg.train.nonfinite)


# ------------------------------------------------------------------------------ the run directory
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


def write_run_files(cfg: Config, run_dir: Path, classes: list[str], backbone: Backbone) -> None:
    """config.yaml, labels.json and (text) tokenizer/ and model_config/: written before training starts, so a
    finished run rebuilds its model from its own files, whatever became of model.backbone."""
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / "config.yaml", cfg.to_yaml())
    write_json(run_dir / "labels.json", classes)
    if backbone.tokenizer is not None:
        backbone.tokenizer.save_pretrained(run_dir / TOKENIZER_DIR)  # the exact files used in training
    save_model_config(backbone, run_dir / MODEL_CONFIG_DIR)


def load_checkpoint_file(path: str | Path, map_location: Any = "cpu") -> dict[str, Any]:
    """A checkpoint, weights-only: tensors and plain containers, never arbitrary pickled objects, so a crafted
    file cannot run code. Unreadable or refused files are a DataError naming the file."""
    path = Path(path)
    if path.is_dir():
        raise DataError(f"{path}: is a directory, expected a checkpoint file (.ckpt)")
    if not path.is_file():
        raise DataError(f"{path}: checkpoint not found")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise DataError(f"{path}: refused: it holds pickled objects other than tensors ({first_line(exc, 160)}); "
                        "deepship loads checkpoints weights-only; use a checkpoint written by deepship") from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as exc:
        reason = first_line(exc, 160).split(". ")[0]  # torch appends paragraphs of advice
        raise DataError(f"{path}: not a readable checkpoint ({type(exc).__name__}: {reason}); "
                        "it is truncated or corrupt: delete it, or resume from another checkpoint") from None
    if not isinstance(checkpoint, dict):
        raise DataError(f"{path}: not a Lightning checkpoint (holds a {type(checkpoint).__name__}, not a dict)")
    return checkpoint


@dataclass
class LoadedRun:
    run_dir: Path
    config: Config
    classes: list[str]
    backbone: Backbone
    module: ClassifierModule  # eval mode, weights from the checkpoint


def read_run_config(run_dir: Path) -> Config:
    path = run_dir / "config.yaml"
    if not path.is_file():
        raise DataError(f"{run_dir}: no config.yaml; is this a deepship run directory?")
    raw = parse_yaml(path.read_text())
    return Config.model_validate(raw, context={"skip_path_checks": True})


def load_run(run_dir: str | Path, checkpoint: str = "best.ckpt") -> LoadedRun:
    """Rebuild the trained model from a run directory, without downloading pretrained weights."""
    run_dir = Path(run_dir)
    cfg = read_run_config(run_dir)
    classes = json.loads((run_dir / "labels.json").read_text())
    ckpt_path = run_dir / checkpoint
    if not ckpt_path.is_file():
        raise DataError(f"{ckpt_path}: not found; train the run to completion first")
    checkpoint = load_checkpoint_file(ckpt_path)
    if "state_dict" not in checkpoint or "hyper_parameters" not in checkpoint:
        raise DataError(f"{ckpt_path}: not a deepship checkpoint (no state_dict/hyper_parameters)")
    # The checkpoint supplies every weight, so the architecture is built empty, from the run's own files.
    model_cfg = cfg.model.model_copy(update={"pretrained": False})
    backbone = build_backbone(cfg.task, model_cfg, cfg.data, len(classes), saved_run=run_dir)
    saved_spec = (checkpoint["hyper_parameters"].get("run_info") or {}).get("preprocessing")
    if saved_spec:  # what training used, not what today's code would derive
        backbone.preprocessing = (TextSpec if saved_spec["kind"] == "text" else ImageSpec).from_dict(saved_spec)
    module = build_module(cfg, backbone, classes, checkpoint["hyper_parameters"]["loss"])
    module.load_state_dict(checkpoint["state_dict"])
    module.eval()
    return LoadedRun(run_dir, cfg, classes, backbone, module)


# ---------------------------------------------------------------------------- resume safety
# Keys a resumed run may change: they decide how long to train, where records go, or where the run lives,
# never what a step computes. objective.* and monitor.* are read only after training (export, evaluate, monitor).
# The data sources are compared by the data fingerprint instead, so a moved data folder still resumes.
RESUME_SAFE_KEYS = frozenset({"train.max_epochs", "train.loggers", "train.checkpoint_every_n_steps", "train.resume",
                              "train.overwrite", "train.out_dir", "train.run_name", "data.train", "data.val",
                              "data.test"})
RESUME_SAFE_SECTIONS = ("objective.", "monitor.")
# Safe together when the global batch (per-device batch x devices x nodes) stays the same: every step then
# sees the same samples, split over another number of processes.
WORLD_KEYS = ("train.devices", "train.num_nodes", "train.batch_size", "train.strategy")


def global_batch(train: dict[str, Any]) -> int | None:
    """Samples per optimizer step across all processes; None when the device count is 'auto'."""
    devices = train.get("devices", 1)
    count = len(devices) if isinstance(devices, list) else devices if isinstance(devices, int) else None
    if count is None or train.get("strategy") == "fsdp":  # fsdp checkpoints are sharded per process count
        return None
    return train["batch_size"] * train.get("accumulate_grad_batches", 1) * count * train.get("num_nodes", 1)


def unsafe_changes(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """The dotted config keys whose change a resume cannot honour: "key: old -> new" items."""
    old, new = flatten(saved), flatten(current)
    changed = changed_keys(saved, current)
    changed = [k for k in changed if k not in RESUME_SAFE_KEYS and not k.startswith(RESUME_SAFE_SECTIONS)]
    batch = global_batch(saved.get("train", {}))
    if batch is not None and batch == global_batch(current.get("train", {})):
        changed = [k for k in changed if k not in WORLD_KEYS]
    return [f"{k}: {short(old.get(k))} -> {short(new.get(k))}" for k in changed]


def short(value: Any, limit: int = 40) -> str:
    text = json.dumps(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


FRESH_START = "or start afresh with --set train.resume=false train.overwrite=true (or another train.run_name)"


def check_resume_config(cfg: Config, path: Path, run_info: dict[str, Any]) -> None:
    """Refuse a resume whose config differs from the checkpoint's in anything but the safe keys."""
    changes = unsafe_changes(run_info.get("config") or {}, cfg.model_dump(mode="json"))
    if changes:
        raise ConfigError(f"train.resume: {path} was trained with other settings ({'; '.join(changes[:6])}); "
                          "a resume may change only train.max_epochs, train.loggers, train.checkpoint_every_n_steps "
                          "and train.devices/num_nodes with the same global batch; "
                          f"restore those values, {FRESH_START}")


def check_resume_data(path: Path, run_info: dict[str, Any], fingerprint: str) -> None:
    """Refuse a resume on other data than the checkpoint was trained on (content, labels or split)."""
    saved = run_info.get("data_fingerprint")
    if saved is not None and saved != fingerprint:
        raise ConfigError(f"train.resume: {path} was trained on other data (fingerprint {saved[:19]}, now "
                          f"{fingerprint[:19]}); resume with the data it was trained on, {FRESH_START}")


def read_run_info(path: Path) -> dict[str, Any]:
    """What a checkpoint says about the run that wrote it (config, labels, preprocessing, data fingerprint)."""
    checkpoint = load_checkpoint_file(path)
    return (checkpoint.get("hyper_parameters") or {}).get("run_info") or {}
