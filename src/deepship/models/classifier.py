"""One LightningModule for every modality: named inputs in, logits out, cross-entropy on top."""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import torch
from torch import nn
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score

Batch = tuple[dict[str, torch.Tensor], torch.Tensor]  # (named inputs, targets (N,))
STAGES = ("train", "val", "test")


def warmup_cosine(step: int, total: int, warmup: int) -> float:
    """LR multiplier: linear warmup from 0, then cosine decay to 0 at `total` steps."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def param_groups(net: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay matrices and kernels; never biases or norm scales (1-D tensors)."""
    decay, no_decay = [], []
    for p in net.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class ClassifierModule(L.LightningModule):
    def __init__(self, net: nn.Module, num_classes: int, lr: float = 1e-4, weight_decay: float = 0.01,
                 warmup_ratio: float = 0.1, channels_last: bool = False,
                 run_info: dict[str, Any] | None = None) -> None:
        super().__init__()
        # run_info (resolved config, labels, preprocessing) makes every checkpoint self-describing.
        self.save_hyperparameters(ignore=["net"])
        self.net = net.to(memory_format=torch.channels_last) if channels_last else net
        self.loss_fn = nn.CrossEntropyLoss()
        metrics = MetricCollection({
            "accuracy": MulticlassAccuracy(num_classes, average="micro"),
            "macro_f1": MulticlassF1Score(num_classes, average="macro"),
        })
        # ModuleDict keys can be neither "/" paths nor Module attributes such as "train".
        self.metrics = nn.ModuleDict({f"{s}_metrics": metrics.clone(prefix=f"{s}/") for s in STAGES})

    def forward(self, **inputs: torch.Tensor) -> torch.Tensor:
        if self.hparams.channels_last and "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].contiguous(memory_format=torch.channels_last)
        return self.net(**inputs)  # (N, C)

    def model_step(self, batch: Batch, stage: str) -> torch.Tensor:
        inputs, targets = batch
        logits = self(**inputs)  # (N, C)
        loss = self.loss_fn(logits.float(), targets)
        metrics = self.metrics[f"{stage}_metrics"]
        metrics.update(logits.detach(), targets)
        n = targets.shape[0]
        self.log(f"{stage}/loss", loss, on_step=stage == "train", on_epoch=True, prog_bar=True, batch_size=n)
        self.log_dict(metrics, on_step=False, on_epoch=True, prog_bar=stage != "train", batch_size=n)
        return loss

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        return self.model_step(batch, "train")

    def validation_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        return self.model_step(batch, "val")

    def test_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        return self.model_step(batch, "test")

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        optimizer = torch.optim.AdamW(param_groups(self.net, hp.weight_decay), lr=hp.lr)
        total = int(self.trainer.estimated_stepping_batches)
        warmup = int(hp.warmup_ratio * total)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: warmup_cosine(step, total, warmup))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}
