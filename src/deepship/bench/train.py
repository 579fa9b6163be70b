"""`bench train`: the toolkit's training step (ClassifierModule inside the same lightning.Trainer `fit` builds)
vs a plain PyTorch loop on the same network, batch, precision and memory format, measured in the same process.
Tiny defaults run on a 2-core CPU in about a minute; pass full sizes on a GPU.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader

from deepship.bench.common import ratio
from deepship.config import Config
from deepship.errors import TrainingError
from deepship.models.attention import sync
from deepship.models.backbones import build_backbone
from deepship.run import build_module
from deepship.training import build_trainer, describe_device, resolve_precision

WARMUP = 5  # steps excluded from timing: cudnn autotune, allocator growth, compile, first-call plans


def synthetic_config(modality: str, batch_size: int, image_size: int, seq_len: int, compile: bool, device: str,
                     out_dir: str, text_backbone: str = "all-MiniLM-L6-v2") -> Config:
    backbones = {"image": {"backbone": "mobilenet_v2", "pretrained": False, "image_size": image_size},
                 "text": {"backbone": text_backbone}}
    return Config.model_validate({
        "task": f"{modality}_classification",
        "data": {"train": "unused", "max_length": seq_len, "num_workers": 0},
        "model": backbones[modality],
        "finetune": {"warmup_ratio": 0.0},
        "train": {"batch_size": batch_size, "compile": compile, "accelerator": device, "grad_clip": None,
                  "out_dir": out_dir, "run_name": "bench-train", "loggers": []},
    }, context={"skip_path_checks": True})


def synthetic_pixels(g: torch.Generator, batch_size: int, image_size: int, seq_len: int, vocab: int
                     ) -> dict[str, torch.Tensor]:
    return {"pixel_values": torch.randn(batch_size, 3, image_size, image_size, generator=g)}


def synthetic_tokens(g: torch.Generator, batch_size: int, image_size: int, seq_len: int, vocab: int
                     ) -> dict[str, torch.Tensor]:
    ids = torch.randint(1000, vocab, (batch_size, seq_len), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids)}


SYNTHETIC_INPUTS = {"image": synthetic_pixels, "text": synthetic_tokens}


def synthetic_batch(modality: str, batch_size: int, image_size: int, seq_len: int, num_classes: int,
                    vocab: int = 30000) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """In-memory tensors (no input pipeline): the ceiling both loops are held to."""
    g = torch.Generator().manual_seed(0)
    targets = torch.randint(0, num_classes, (batch_size,), generator=g)
    return SYNTHETIC_INPUTS[modality](g, batch_size, image_size, seq_len, vocab), targets


def plain_loop(cfg: Config, num_classes: int, batch: tuple[dict[str, torch.Tensor], torch.Tensor], steps: int,
               device: torch.device) -> float:
    """samples/s of a hand-written loop: fused AdamW (as the toolkit's), autocast like the toolkit's precision."""
    backbone = build_backbone(cfg.task, cfg.model, cfg.data, num_classes)
    net = backbone.net.to(device)
    if backbone.channels_last:
        net = net.to(memory_format=torch.channels_last)
    if cfg.train.compile:
        net.compile()
    optimizer = torch.optim.AdamW(net.parameters(), lr=cfg.train.lr, fused=True)
    precision = resolve_precision(cfg)
    dtype = torch.bfloat16 if precision.startswith("bf16") else torch.float16 if precision.startswith("16") else None
    inputs = {k: v.to(device) for k, v in batch[0].items()}
    if backbone.channels_last:
        inputs["pixel_values"] = inputs["pixel_values"].contiguous(memory_format=torch.channels_last)
    targets = batch[1].to(device)
    net.train()
    start = 0.0
    for step in range(WARMUP + steps):
        if step == WARMUP:
            sync(device)
            start = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = torch.nn.functional.cross_entropy(net(**inputs).float(), targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    sync(device)
    return steps * len(targets) / (time.perf_counter() - start)


class StepTimer(L.Callback):
    """Wall time of the steps after WARMUP, synchronized at both ends only (as the plain loop is): a sync per
    step would keep the host from queueing the next step while the device runs this one."""

    def __init__(self, last: int) -> None:
        self.start, self.end, self.steps, self.last = 0.0, 0.0, 0, last

    def on_train_batch_start(self, trainer: L.Trainer, module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        if trainer.global_step == WARMUP and not self.start:
            sync(module.device)
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self.start:
            self.steps += 1
            if trainer.global_step == self.last:
                sync(module.device)
                self.end = time.perf_counter()


def toolkit_loop(cfg: Config, num_classes: int, batch: tuple[dict[str, torch.Tensor], torch.Tensor], steps: int,
                 work: Path) -> tuple[float, str, str]:
    """samples/s of ClassifierModule in the Trainer that `fit` builds (callbacks, metrics, logging)."""
    backbone = build_backbone(cfg.task, cfg.model, cfg.data, num_classes)
    module = build_module(cfg, backbone, [str(i) for i in range(num_classes)], {})
    device = torch.device("cuda" if cfg.train.accelerator in ("cuda", "gpu") else "cpu")
    # The same device-resident batch every step, as the plain loop uses: neither loop has an input
    # pipeline here (Lightning's transfer of on-device tensors is a no-op); `bench data` measures those.
    on_device = ({k: v.to(device) for k, v in batch[0].items()}, batch[1].to(device))
    loader = DataLoader([on_device] * (WARMUP + steps), batch_size=None, shuffle=False)
    timer = StepTimer(last=WARMUP + steps)
    cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"max_epochs": 1})})
    trainer = build_trainer(cfg, work, [timer], WARMUP + steps)
    trainer.fit(module, train_dataloaders=loader)
    if timer.steps != steps or timer.end <= timer.start:  # e.g. a step skipped: no figure rather than a wrong one
        raise TrainingError(f"bench train: the toolkit loop timed {timer.steps} of {steps} steps; nothing to report")
    return timer.steps * len(batch[1]) / (timer.end - timer.start), describe_device(trainer), str(trainer.precision)


def bench_train(modality: str = "image", steps: int = 20, batch_size: int = 32, image_size: int = 64, seq_len: int = 64,
                compile: bool = False, device: str = "auto", text_backbone: str = "all-MiniLM-L6-v2"
                ) -> list[dict[str, Any]]:
    """Toolkit training step vs a plain PyTorch loop on in-memory tensors (same net, batch, precision)."""
    accelerator = device if device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    with tempfile.TemporaryDirectory(prefix="deepship-bench-train-") as tmp:
        cfg = synthetic_config(modality, batch_size, image_size, seq_len, compile, accelerator, tmp, text_backbone)
        batch = synthetic_batch(modality, batch_size, image_size, seq_len, num_classes=10)
        target = torch.device("cuda" if accelerator in ("cuda", "gpu") else "cpu")
        torch.manual_seed(0)
        before = plain_loop(cfg, 10, batch, steps, target)
        torch.manual_seed(0)
        toolkit, device_name, precision = toolkit_loop(cfg, 10, batch, steps, Path(tmp))
        torch.manual_seed(0)
        after = plain_loop(cfg, 10, batch, steps, target)
    plain = max(before, after)  # the plain loop before and after: its better run is the baseline
    peak = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
    return [{"kind": "train_step", "modality": modality, "device": device_name, "precision": precision,
             "compile": compile, "batch_size": batch_size, "steps": steps,
             **{"image": {"image_size": image_size}, "text": {"seq_len": seq_len, "backbone": text_backbone}}[modality],
             "plain_samples_per_s": round(plain, 1), "toolkit_samples_per_s": round(toolkit, 1),
             "toolkit_over_plain": ratio(toolkit, plain),
             "peak_gpu_memory_mib": None if peak is None else round(peak, 1)}]
