"""The run directory: what training writes, and how a finished run is read back."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from deepship.config import Config, parse_yaml
from deepship.errors import DataError
from deepship.models.backbones import Backbone, build_backbone
from deepship.models.classifier import ClassifierModule


def write_json(path: Path, data: Any) -> None:
    """Write via a temp file and rename, so a crash never leaves half a JSON file."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def build_module(cfg: Config, backbone: Backbone, classes: list[str],
                 data_fingerprint: str | None = None) -> ClassifierModule:
    run_info = {"config": cfg.model_dump(mode="json"), "labels": classes,
                "preprocessing": backbone.preprocessing.to_dict(), "data_fingerprint": data_fingerprint}
    return ClassifierModule(backbone.net, len(classes), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay,
                            warmup_ratio=cfg.train.warmup_ratio, channels_last=backbone.channels_last,
                            run_info=run_info)


def write_run_files(cfg: Config, run_dir: Path, classes: list[str], backbone: Backbone) -> None:
    """config.yaml, labels.json and (text) tokenizer/: written before training starts."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(cfg.to_yaml())
    write_json(run_dir / "labels.json", classes)
    if backbone.tokenizer is not None:
        backbone.tokenizer.save_pretrained(run_dir / "tokenizer")  # the exact files used in training


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
    module = build_module(cfg, backbone, classes)
    state = torch.load(ckpt_path, map_location="cpu", weights_only=True)["state_dict"]
    module.load_state_dict(state)
    module.eval()
    return LoadedRun(run_dir, cfg, classes, backbone, module)
