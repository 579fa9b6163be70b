"""Fine-tuning mechanics shared by every backbone: which layers train when, and at which learning rate.

Design choice: the optimizer holds every parameter from the first step, one param group per backbone
layer (bottom to top) and one for the head, each split into decay / no-decay. Freezing only flips
`requires_grad` (AdamW skips parameters without a gradient, weight decay included), so the param
groups never change: the LR schedule covers them all, and a resume from last.ckpt restores them as
they were. Toolkits that add param groups at unfreeze time lose them, or their schedule, on resume.
"""

from __future__ import annotations

import math
from functools import partial
from typing import TYPE_CHECKING, Any, Sequence

import torch
from lightning.pytorch.callbacks import BaseFinetuning
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

if TYPE_CHECKING:
    from deepship.config import Config, FinetuneConfig

Strategy = str  # "full" | "freeze" | "freeze_then_unfreeze" | "gradual"

# ------------------------------------------------------------------------------------ recipes
# `finetune.strategy: auto` / `freeze_bn: auto` for a pretrained image backbone. Below SMALL_TRAIN_SET
# training images a full fine-tune from step 0 lets the random head's gradients distort the pretrained features
# (the case for linear-probe-then-fine-tune) and re-estimates BatchNorm statistics from a few hundred images: warm the head up on the frozen backbone, then
# train the backbone at a tenth of the head's LR with its BatchNorm statistics kept (docs/finetuning.md).
SMALL_TRAIN_SET = 5000
SMALL_DATA_BACKBONE_LR_SCALE = 0.1
# Below this many training images per class (on average) a few epochs are a few dozen optimizer steps: too few
# to train a random head, so the small-data recipe starts it from the linear probe, fitted to convergence on the
# frozen features. Measured on flowers17 (docs/finetuning.md): at 5 per class a random head ended 4-5 points
# below the probe, the probe's head tied it; at 10 per class both heads tied the probe.
FEW_SHOT_PER_CLASS = 10


def is_small_pretrained_image(cfg: Config, train_size: int) -> bool:
    return cfg.task == "image_classification" and cfg.model.pretrained is not False and train_size < SMALL_TRAIN_SET


def resolve_recipe(cfg: Config, train_size: int, num_classes: int) -> FinetuneConfig:
    """cfg.finetune with `auto` settings made concrete for this training set; values set explicitly stay.
    strategy auto: small pretrained image data -> freeze_then_unfreeze (head alone for unfreeze_epoch epochs),
    backbone_lr = head LR (head_lr, else train.lr) x 0.1; otherwise full. freeze_bn auto: true exactly when
    strategy auto picks that small-data recipe. Frozen statistics need the lower backbone LR: a full fine-tune
    at the head's LR with frozen BatchNorms collapsed on flowers17 (0.26 test accuracy), so with an explicit
    strategy auto means false. head_init auto: probe inside that recipe when there are fewer than
    FEW_SHOT_PER_CLASS training images per class, else random."""
    f = cfg.finetune
    small = f.strategy == "auto" and is_small_pretrained_image(cfg, train_size)
    few_shot = small and train_size < FEW_SHOT_PER_CLASS * num_classes
    update: dict[str, Any] = {}
    if f.strategy == "auto":
        update["strategy"] = "freeze_then_unfreeze" if small else "full"
        if small and f.backbone_lr is None:
            update["backbone_lr"] = (f.head_lr or cfg.train.lr) * SMALL_DATA_BACKBONE_LR_SCALE
    if f.freeze_bn == "auto":
        update["freeze_bn"] = small
    if f.head_init == "auto":
        update["head_init"] = "probe" if few_shot else "random"
    return f.model_copy(update=update)


def describe_recipe(requested: FinetuneConfig, resolved: FinetuneConfig) -> str | None:
    """One line for the run header saying what `strategy: auto` chose; None for an explicit strategy."""
    if requested.strategy != "auto":
        return None
    n = resolved.unfreeze_epoch
    staged = f" (the head alone for {n} epoch{'' if n == 1 else 's'})" if resolved.strategy == "freeze_then_unfreeze" \
        else ""
    lr = f", backbone_lr {resolved.backbone_lr:g}" if resolved.backbone_lr is not None else ""
    head = ", head from the linear probe" if resolved.head_init == "probe" else ""
    return f"finetune: strategy {resolved.strategy}{staged}{lr}, freeze_bn {str(resolved.freeze_bn).lower()}{head}"


def load_head(net: nn.Module, weight: torch.Tensor, bias: torch.Tensor) -> None:
    """Copy (C, D) weight and (C,) bias into the net's classification head, e.g. the linear probe's: fine-tuning
    then starts from a converged head instead of a random one, whose large early gradients would otherwise
    flow into the pretrained layers."""
    from deepship.models.backbones import classification_head

    head = classification_head(net)
    if head.weight.shape != weight.shape:
        raise ValueError(f"head is {tuple(head.weight.shape)}, the weights to load are {tuple(weight.shape)}")
    with torch.no_grad():
        head.weight.copy_(weight)
        head.bias.copy_(bias)


# ------------------------------------------------------------------------------ learning rates
def split_decay(params: Sequence[nn.Parameter], lr: float, weight_decay: float, name: str) -> list[dict[str, Any]]:
    """Decay matrices and kernels; never biases or norm scales (1-D tensors)."""
    decay = [p for p in params if p.ndim > 1]
    no_decay = [p for p in params if p.ndim <= 1]
    return [{"params": decay, "lr": lr, "weight_decay": weight_decay, "name": f"{name}/decay"},
            {"params": no_decay, "lr": lr, "weight_decay": 0.0, "name": f"{name}/no_decay"}]


def layerwise_param_groups(net: nn.Module, layers: Sequence[nn.Module], head_lr: float, backbone_lr: float,
                           layer_decay: float | None, weight_decay: float) -> list[dict[str, Any]]:
    """Layer i of n (0 = bottom) gets backbone_lr * layer_decay ** (n - i); the head gets head_lr."""
    groups: list[dict[str, Any]] = []
    in_layers: set[int] = set()
    n = len(layers)
    for i, layer in enumerate(layers):
        params = list(layer.parameters())
        in_layers.update(id(p) for p in params)
        scale = layer_decay ** (n - i) if layer_decay else 1.0
        groups += split_decay(params, backbone_lr * scale, weight_decay, f"layer{i}")
    head = [p for p in net.parameters() if id(p) not in in_layers]
    groups += split_decay(head, head_lr, weight_decay, "head")
    return [g for g in groups if g["params"]]


def lr_factor(step: int, total: int, warmup: int, schedule: str) -> float:
    """LR multiplier at `step`: linear warmup from 0, then cosine / linear decay to 0, or constant."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if schedule == "linear":
        return 1.0 - progress
    return 1.0  # constant


def build_scheduler(optimizer: torch.optim.Optimizer, schedule: str, total: int,
                    warmup_ratio: float) -> torch.optim.lr_scheduler.LRScheduler:
    if schedule == "onecycle":  # its own warmup (30%) and annealing, peak = each group's lr
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=[g["lr"] for g in optimizer.param_groups], total_steps=max(total, 2))
    warmup = int(warmup_ratio * total)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, partial(lr_factor, total=total, warmup=warmup,
                                                                schedule=schedule))


# ---------------------------------------------------------------------------------- freezing
def frozen_layer_count(strategy: Strategy, epoch: int, n_layers: int, unfreeze_epoch: int,
                       unfreeze_every: int) -> int:
    """How many backbone layers, counted from the bottom, stay frozen during `epoch` (0-based)."""
    if strategy == "full":
        return 0
    if strategy == "freeze" or epoch < unfreeze_epoch:
        return n_layers
    if strategy == "freeze_then_unfreeze":
        return 0
    unfrozen = 1 + (epoch - unfreeze_epoch) // unfreeze_every  # gradual: one more group from the top
    return max(0, n_layers - unfrozen)


def set_frozen(layers: Sequence[nn.Module], n_frozen: int, training: bool, freeze_bn: bool = False) -> None:
    """Freeze the bottom `n_frozen` layers; their BatchNorms go to eval mode (running stats kept).
    With `training`, the other layers' BatchNorms are put (back) in training mode, unless `freeze_bn`: then every
    backbone BatchNorm normalizes with its pretrained running statistics and never updates them (its scale and
    shift still train with the layer), so small batches of a small dataset cannot drag them off."""
    for i, layer in enumerate(layers):
        frozen = i < n_frozen
        for p in layer.parameters():
            p.requires_grad = not frozen
        for m in layer.modules():
            if isinstance(m, _BatchNorm) and (frozen or training or freeze_bn):
                m.train(not (frozen or freeze_bn))


class FinetuningStrategy(BaseFinetuning):
    """Lightning finetuning callback: the frozen set is a function of the epoch alone, so a resumed
    run recomputes exactly the state an uninterrupted run would have (nothing to restore)."""

    def __init__(self, strategy: Strategy, unfreeze_epoch: int = 1, unfreeze_every: int = 1,
                 freeze_bn: bool = False) -> None:
        super().__init__()
        self.strategy, self.unfreeze_epoch, self.unfreeze_every = strategy, unfreeze_epoch, unfreeze_every
        self.freeze_bn = freeze_bn

    def _apply(self, pl_module: Any, epoch: int, training: bool) -> None:
        layers = pl_module.layers
        n = frozen_layer_count(self.strategy, epoch, len(layers), self.unfreeze_epoch, self.unfreeze_every)
        set_frozen(layers, n, training, self.freeze_bn)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # BaseFinetuning would put back its epoch-0 snapshot of the param groups in on_fit_start, clobbering
        # the learning rates the optimizer state just restored; ours never change, so nothing to restore.
        pass

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        # A run resumed mid-epoch gets no on_train_epoch_start: set the frozen set for the current epoch here.
        self._apply(pl_module, trainer.current_epoch, training=True)

    def freeze_before_training(self, pl_module: Any) -> None:
        self._apply(pl_module, 0, training=False)

    def finetune_function(self, pl_module: Any, epoch: int, optimizer: torch.optim.Optimizer) -> None:
        self._apply(pl_module, epoch, training=True)  # called at every train epoch start
