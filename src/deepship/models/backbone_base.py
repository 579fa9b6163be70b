"""What every backbone builder returns: the network, its modality, its preprocessing and its layer groups."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

from deepship.runtime.preprocess import ImageSpec, TextSpec


@dataclass
class Backbone:
    net: nn.Module  # forward(**inputs) -> logits (N, C)
    modality: str  # "image" | "text"
    preprocessing: ImageSpec | TextSpec
    channels_last: bool = False  # CNNs run faster in NHWC on GPUs
    tokenizer: Any = None  # text: the transformers fast tokenizer, saved with the run
    # Backbone layers bottom -> top (freezing, layer-wise LR); everything else in `net` is the head.
    layers: list[nn.Module] = field(default_factory=list)


def classification_head_name(net: nn.Module) -> str | None:
    """Qualified name of the net's last Linear, None without one. That Linear is the classifier: its input is
    the pooled embedding (exported for the monitor, probed by the linear-probe baseline)."""
    return next((name for name, m in reversed(list(net.named_modules())) if isinstance(m, nn.Linear)), None)


def classification_head(net: nn.Module) -> nn.Module:
    name = classification_head_name(net)
    if name is None:  # builders refuse such models; reaching here is a bug, not bad input
        raise ValueError(f"{type(net).__name__} has no Linear classifier")
    return net.get_submodule(name)
