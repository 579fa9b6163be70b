"""One LightningModule for every modality: named inputs in, logits out, cross-entropy on top."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Sequence

import lightning as L
import torch
from lightning.pytorch.strategies import FSDPStrategy
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn
from torchmetrics import MeanMetric, MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score

from deepship.errors import TrainingError
from deepship.models.attention import backend_context
from deepship.models.finetuning import build_scheduler, layerwise_param_groups
from deepship.models.nonfinite import NonfiniteGuard

Batch = tuple[dict[str, torch.Tensor], torch.Tensor]  # (named inputs, targets (N,))
STAGES = ("train", "val", "test")


@dataclass(frozen=True)
class OptimSettings:
    lr: float = 1e-4  # head lr, and backbone lr unless given
    backbone_lr: float | None = None
    layer_decay: float | None = None
    weight_decay: float = 0.01
    schedule: str = "cosine"
    warmup_ratio: float = 0.1


@dataclass(frozen=True)
class LossSettings:
    class_weights: tuple[float, ...] | None = None  # (C,) in label order
    label_smoothing: float = 0.0
    mixup: float = 0.0  # probability a training batch is mixed (images only)
    cutmix: float = 0.0


class BatchMixer:
    """MixUp or CutMix on a training batch, picked at random; targets become (N, C) probabilities."""

    def __init__(self, num_classes: int, mixup: float, cutmix: float) -> None:
        from torchvision.transforms import v2

        self.mixup, self.cutmix = mixup, cutmix
        self.ops = (v2.MixUp(num_classes=num_classes), v2.CutMix(num_classes=num_classes))

    def __call__(self, images: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        u = float(torch.rand(()))
        if u < self.mixup:
            return self.ops[0](images, targets)
        if u < self.mixup + self.cutmix:
            return self.ops[1](images, targets)
        return images, targets


class ClassifierModule(L.LightningModule):
    def __init__(self, net: nn.Module, num_classes: int, layers: Sequence[nn.Module] = (),
                 optim: dict[str, Any] | None = None, loss: dict[str, Any] | None = None,
                 channels_last: bool = False, compile: bool = False,
                 run_info: dict[str, Any] | None = None, nonfinite: str = "stop") -> None:
        super().__init__()
        # run_info (resolved config, labels, preprocessing) makes every checkpoint self-describing.
        self.save_hyperparameters(ignore=["net", "layers"])
        self.net = net.to(memory_format=torch.channels_last) if channels_last else net
        self.layers = list(layers)  # backbone layers bottom -> top, submodules of net (not re-registered)
        self.optim = OptimSettings(**(optim or {}))
        settings = LossSettings(**(loss or {}))
        weights = torch.tensor(settings.class_weights, dtype=torch.float32) if settings.class_weights else None
        self.loss_fn = nn.CrossEntropyLoss(weight=weights, label_smoothing=settings.label_smoothing)
        self.mixer = BatchMixer(num_classes, settings.mixup, settings.cutmix) \
            if settings.mixup + settings.cutmix > 0 else None
        # validate_args=False: the checks read tensors on the host every step; targets were validated with the data
        metrics = MetricCollection({
            "accuracy": MulticlassAccuracy(num_classes, average="micro", validate_args=False),
            "macro_f1": MulticlassF1Score(num_classes, average="macro", validate_args=False),
        })
        self.train_loss = MeanMetric(nan_strategy="disable")  # the epoch's training loss (model_step)
        # ModuleDict keys can be neither "/" paths nor Module attributes such as "train".
        self.metrics = nn.ModuleDict({f"{s}_metrics": metrics.clone(prefix=f"{s}/") for s in STAGES})
        self.guard = NonfiniteGuard(nonfinite)
        self.sync_free = False  # set at train start: fused AdamW skips bad steps on the device (no GradScaler)
        self._batch_idx = 0
        self.last_train_loss: torch.Tensor | None = None
        self._skipped_sync = 0  # counted by check_finite, the per-step path used with a GradScaler

    def configure_model(self) -> None:
        # nn.Module.compile() compiles in place: state_dict keys stay free of "_orig_mod.".
        if self.hparams.compile and getattr(self.net, "_compiled_call_impl", None) is None:
            self.net.compile()

    def forward(self, **inputs: torch.Tensor) -> torch.Tensor:
        if self.hparams.channels_last and "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].contiguous(memory_format=torch.channels_last)
        # The measured SDPA backend (text) is entered here, outside the possibly compiled net: dynamo rebuilds
        # the context after a graph break without its priority order.
        with backend_context(getattr(self.net, "sdpa_backend", None)):
            return self.net(**inputs)  # (N, C)

    def model_step(self, batch: Batch, stage: str, batch_idx: int = 0) -> torch.Tensor | None:
        inputs, targets = batch
        hard = targets
        if stage == "train" and self.mixer is not None and "pixel_values" in inputs:  # token ids cannot be mixed
            inputs = dict(inputs)
            inputs["pixel_values"], targets = self.mixer(inputs["pixel_values"], targets)
            hard = targets.argmax(1) if targets.ndim == 2 else targets
        logits = self(**inputs)  # (N, C)
        loss = self.loss_fn(logits.float(), targets)  # targets: (N,) indices or (N, C) mixed probabilities
        if stage == "train":
            self._batch_idx, self.last_train_loss = batch_idx, loss.detach()  # the progress bar reads it
            if self.sync_free:
                self.guard.observe_loss(loss)  # judged in on_before_optimizer_step, on the device
            elif not self.check_finite(loss, batch_idx):
                return None  # Lightning skips backward and the optimizer step for this batch
        metrics = self.metrics[f"{stage}_metrics"]
        metrics.update(logits.detach(), hard)
        n = hard.shape[0]
        if stage == "train":
            # The step value: this rank's loss, not prog_bar (Lightning turns prog_bar step values into Python
            # floats after every batch, a device sync per step; TimedProgressBar reads the loss when it redraws).
            self.log("train/loss_step", loss, on_step=True, on_epoch=False, batch_size=n)
            # The epoch mean leaves out steps the guard skipped (train.nonfinite=skip), without asking the host:
            # they enter with weight 0. MeanMetric syncs across ranks itself, once, at the epoch's end.
            finite = torch.isfinite(loss.detach())
            self.train_loss.update(torch.where(finite, loss.detach(), 0.0), weight=finite.float() * n)
            self.log("train/loss_epoch", self.train_loss, on_step=False, on_epoch=True)
        else:
            # sync_dist: with several processes the logged loss is the mean over all ranks
            self.log(f"{stage}/loss", loss, on_epoch=True, prog_bar=True, batch_size=n, sync_dist=True)
        self.log_dict(metrics, on_step=False, on_epoch=True, prog_bar=stage != "train", batch_size=n)
        return loss

    @property
    def skipped_steps(self) -> int:
        """Training batches skipped for a non-finite loss or gradient (train.nonfinite=skip); reads the device."""
        return self.guard.skipped + self._skipped_sync + (self.guard.unreported() if self.hparams.nonfinite == "skip"
                                                          else 0)

    def on_train_start(self) -> None:
        # After a resume the param groups are the checkpoint's: one written by a foreach AdamW (an older run)
        # keeps the per-step check. With fp16's GradScaler the scaler owns found_inf: per-step check too.
        optimizer = self.trainer.optimizers[0]
        self.sync_free = all(group.get("fused") for group in optimizer.param_groups) and \
            getattr(self.trainer.precision_plugin, "scaler", None) is None

    def configure_gradient_clipping(self, optimizer: torch.optim.Optimizer, gradient_clip_val: float | None = None,
                                    gradient_clip_algorithm: str | None = None) -> None:
        if not gradient_clip_val:
            return
        if getattr(self.trainer.precision_plugin, "scaler", None) is None:
            # Without a GradScaler (fp32, bf16) gradients are true-scale: clip them here. Lightning's mixed-precision
            # plugin refuses to clip for an optimizer built fused (it decides by how the optimizer was built, so also
            # after a resume into foreach param groups). FSDP with clipping is refused in the config.
            grads = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
            if gradient_clip_algorithm == "value":
                torch.nn.utils.clip_grad_value_(grads, gradient_clip_val, foreach=True)
            else:
                torch.nn.utils.clip_grad_norm_(grads, gradient_clip_val, foreach=True)
            return
        self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        if self.sync_free:
            self.guard.gate(optimizer, (self.trainer.global_step, self.current_epoch, self._batch_idx))

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.trainer.global_step % self.trainer.log_every_n_steps == 0:  # Lightning syncs to log here anyway
            self.guard.check()

    def on_train_epoch_end(self) -> None:
        self.guard.check()

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.guard.check()  # a stopped run raises here: no checkpoint after the bad step

    def check_finite(self, loss: torch.Tensor, batch_idx: int) -> bool:
        """Per-step variant (a host sync) for fp16 with GradScaler. NaN/Inf loss: stop (TrainingError, before any
        backward or checkpoint) or skip the batch. Every rank decides together, or DDP would hang on a gradient
        all-reduce that one rank skipped."""
        finite = self.trainer.strategy.reduce_boolean_decision(bool(torch.isfinite(loss)), all=True)
        if finite:
            return True
        where = f"global step {self.trainer.global_step} (epoch {self.current_epoch}, batch {batch_idx})"
        if self.hparams.nonfinite == "skip":
            self._skipped_sync += 1
            rank_zero_warn(f"train: non-finite loss at {where}; batch skipped (train.nonfinite=skip)")
            return False
        raise TrainingError(f"train: non-finite loss ({loss.item()}) at {where}; nothing was updated or saved "
                            "after it; lower train.lr, check the data, or set train.nonfinite=skip")

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor | None:
        return self.model_step(batch, "train", batch_idx)

    def validation_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        return self.model_step(batch, "val")

    def test_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        return self.model_step(batch, "test")

    def predict_step(self, batch: Batch, batch_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        inputs, targets = batch
        return self(**inputs).float(), targets  # (N, C) logits for the evaluation report, (N,)

    def configure_optimizers(self) -> dict[str, Any]:
        o = self.optim
        groups = layerwise_param_groups(self.net, self.layers, head_lr=o.lr, backbone_lr=o.backbone_lr or o.lr,
                                        layer_decay=o.layer_decay, weight_decay=o.weight_decay)
        # fused: one kernel for the whole update, and it can skip a non-finite step on the device (found_inf).
        # Not with fp16's GradScaler (the scaler owns found_inf, and clipping would see scaled gradients) nor
        # with FSDP (whose gradients are shards: foreach AdamW and the per-step check, without clipping).
        fused = getattr(self.trainer.precision_plugin, "scaler", None) is None \
            and not isinstance(self.trainer.strategy, FSDPStrategy) \
            and all(p.device.type in ("cuda", "cpu") and p.is_floating_point() for p in self.net.parameters())
        optimizer = torch.optim.AdamW(groups, lr=o.lr, fused=True) if fused else \
            torch.optim.AdamW(groups, lr=o.lr, foreach=True)
        total = int(self.trainer.estimated_stepping_batches)
        scheduler = build_scheduler(optimizer, o.schedule, total, o.warmup_ratio)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def optim_settings(**kwargs: Any) -> dict[str, Any]:
    """Plain dict for hparams (and checkpoints), validated by the dataclass."""
    return asdict(OptimSettings(**kwargs))
