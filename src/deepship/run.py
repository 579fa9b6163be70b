"""The run directory: what training writes, and how a finished run is read back."""

from __future__ import annotations

import json
import pickle
import zipfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from deepship.config import Config, parse_yaml
from deepship.errors import ConfigError, DataError, first_line
from deepship.files import atomic_write_text, write_json
from deepship.models.backbones import Backbone, build_backbone
from deepship.models.classifier import ClassifierModule, optim_settings


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
    image = cfg.task == "image_classification"
    return {"class_weights": class_weights(cfg, classes, train_labels), "label_smoothing": f.label_smoothing,
            "mixup": f.mixup if image else 0.0, "cutmix": f.cutmix if image else 0.0}


def build_module(cfg: Config, backbone: Backbone, classes: list[str], loss: dict[str, Any],
                 data_fingerprint: str | None = None) -> ClassifierModule:
    run_info = {"config": cfg.model_dump(mode="json"), "labels": classes,
                "preprocessing": backbone.preprocessing.to_dict(), "data_fingerprint": data_fingerprint}
    f = cfg.finetune
    optim = optim_settings(lr=f.head_lr or cfg.train.lr, backbone_lr=f.backbone_lr or cfg.train.lr,
                           layer_decay=f.layer_decay, weight_decay=cfg.train.weight_decay, schedule=f.schedule,
                           warmup_ratio=f.warmup_ratio)
    return ClassifierModule(backbone.net, len(classes), layers=backbone.layers, optim=optim, loss=loss,
                            channels_last=backbone.channels_last, compile=cfg.train.compile, run_info=run_info,
                           nonfinite=cfg.train.nonfinite)


def write_run_files(cfg: Config, run_dir: Path, classes: list[str], backbone: Backbone) -> None:
    """config.yaml, labels.json and (text) tokenizer/: written before training starts."""
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / "config.yaml", cfg.to_yaml())
    write_json(run_dir / "labels.json", classes)
    if backbone.tokenizer is not None:
        backbone.tokenizer.save_pretrained(run_dir / "tokenizer")  # the exact files used in training


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
    # The checkpoint supplies every weight, so the architecture is built empty.
    model_cfg = cfg.model.model_copy(update={"pretrained": False})
    backbone = build_backbone(cfg.task, model_cfg, cfg.data, len(classes))
    checkpoint = load_checkpoint_file(ckpt_path)
    if "state_dict" not in checkpoint or "hyper_parameters" not in checkpoint:
        raise DataError(f"{ckpt_path}: not a deepship checkpoint (no state_dict/hyper_parameters)")
    module = build_module(cfg, backbone, classes, checkpoint["hyper_parameters"]["loss"])
    module.load_state_dict(checkpoint["state_dict"])
    module.eval()
    return LoadedRun(run_dir, cfg, classes, backbone, module)
