"""Image backbones: any torchvision classification model by name, described by a small family registry.

A family says, as data, where a model's classifier sits, how its backbone splits into layer groups
(bottom -> top, for freezing and layer-wise learning rates) and whether it prefers channels-last; the
preprocessing comes from the torchvision weights' own eval transform. Models of no listed family get the
generic rule: the net's last Linear is the head, the other top-level children are the groups.
"""

from __future__ import annotations

import difflib
import socket
import sys
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Iterator, Mapping

import torch
import torchvision
from torch import nn
from torchvision.models import WeightsEnum, get_model, get_model_weights, list_models

from deepship.config import ModelConfig
from deepship.errors import ConfigError, first_line
from deepship.models.backbone_base import Backbone, classification_head_name
from deepship.runtime.preprocess import ImageSpec


@dataclass(frozen=True)
class Family:
    name: str
    prefixes: tuple[str, ...]  # torchvision model names of the family start with one of these
    # The module holding the classifier; its last Linear becomes the new head. None: the top-level child
    # holding the net's last Linear.
    head: str | None
    # Backbone layer groups bottom -> top: "a" one submodule, "a+b" submodules trained together, "a.*" each
    # child of "a" (its blocks). None: the generic rule (generic_groups).
    groups: tuple[str, ...] | None
    channels_last: bool  # convolutions run faster in NHWC on GPUs (tensor cores)
    build_kwargs: Mapping[str, Any] = field(default_factory=dict)  # extra arguments for the torchvision builder
    # attributes set on the built model: what the builder itself does for an argument it refuses with weights
    set_attributes: Mapping[str, Any] = field(default_factory=dict)


FAMILIES: tuple[Family, ...] = (
    Family("mobilenet", ("mobilenet_",), "classifier", ("features.*",), True),
    Family("efficientnet", ("efficientnet_",), "classifier", ("features.*",), True),
    Family("resnet", ("resnet", "resnext", "wide_resnet"), "fc",
           ("conv1+bn1", "layer1", "layer2", "layer3", "layer4"), True),
    Family("convnext", ("convnext_",), "classifier", ("features.*",), True),
    Family("regnet", ("regnet_",), "fc", ("stem", "trunk_output.*"), True),
    # Auxiliary classifiers make the training forward return a tuple: off (deepship trains the main head). The
    # builders refuse aux_logits=False with weights and then drop them the same way. init_weights False: PyTorch's
    # default init instead of the slow truncated-normal one (with weights the builders use False too).
    Family("googlenet", ("googlenet",), None, None, False, {"init_weights": False},
           {"aux_logits": False, "aux1": None, "aux2": None}),
    Family("inception", ("inception_",), None, None, False, {"init_weights": False},
           {"aux_logits": False, "AuxLogits": None}),
)
GENERIC = Family("generic", (), None, None, False)
# `pretrained: true` takes each model's DEFAULT torchvision weights, except where pinned here. mobilenet_v2, the
# default backbone, keeps the V1 weights it has always used: its documented measurements, its offline weights
# file (mobilenet_v2-b0353104.pth) and its eval transform (resize 256) are V1's; DEFAULT is V2 (resize 232).
PINNED_WEIGHTS = {"mobilenet_v2": "IMAGENET1K_V1"}
TRUNK_MIN_BLOCKS = 4  # generic rule: a Sequential/ModuleList child with this many weighted blocks is a trunk


class ImageNet(nn.Module):
    """Gives torchvision models the named-input call used everywhere: net(pixel_values=x)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values)  # (N, 3, H, W) -> (N, C)


# ---------------------------------------------------------------------------------- names
@lru_cache(maxsize=1)
def image_model_names() -> tuple[str, ...]:
    """torchvision's classification models (not its detection, segmentation or video ones)."""
    return tuple(sorted(list_models(module=torchvision.models)))


def is_image_backbone(name: str) -> bool:
    return name in image_model_names()


def check_image_backbone(name: str) -> None:
    if is_image_backbone(name):
        return
    close = difflib.get_close_matches(name, image_model_names(), n=5, cutoff=0.6)
    hint = f"close matches: {', '.join(close)}" if close else f"choose one of {', '.join(image_model_names())}"
    raise ConfigError(f"model.backbone: unknown image backbone '{name}'; {hint} (any torchvision classification "
                      "model; see docs/backbones.md)")


def family_of(name: str) -> Family:
    return next((f for f in FAMILIES if name.startswith(f.prefixes)), GENERIC)


# ---------------------------------------------------------------------------- preprocessing
def imagenet_weights(name: str) -> WeightsEnum:
    enum = get_model_weights(name)
    return enum[PINNED_WEIGHTS[name]] if name in PINNED_WEIGHTS else enum.DEFAULT


def image_spec(name: str, image_size: int | None) -> ImageSpec:
    """The eval transform of the model's ImageNet weights (crop, resize, interpolation); a model.image_size
    keeps that transform's resize/crop ratio."""
    weights = imagenet_weights(name)
    keywords = weights.transforms.keywords  # functools.partial of torchvision's ImageClassification
    crop = int(keywords["crop_size"])
    resize = int(keywords.get("resize_size", 256))  # ImageClassification's own default
    interpolation = keywords.get("interpolation", torchvision.transforms.InterpolationMode.BILINEAR).value
    if image_size is None:
        return ImageSpec(image_size=crop, resize_size=resize, interpolation=interpolation)
    min_size = min(weights.meta.get("min_size", (1, 1)))
    if image_size < min_size:
        raise ConfigError(f"model.image_size: {image_size} is below {name}'s smallest input ({min_size} px); "
                          f"set it to at least {min_size} or leave it null ({crop})")
    return ImageSpec(image_size=image_size, resize_size=round(image_size * resize / crop), interpolation=interpolation)


# ---------------------------------------------------------------------------------- building
@contextmanager
def download_timeout(seconds: float) -> Iterator[None]:
    """urllib has no timeout by default; an offline box must fail, not hang."""
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(old)


def download_pretrained(name: str, family: Family) -> nn.Module:
    weights = imagenet_weights(name)
    try:
        with download_timeout(30):
            return get_model(name, weights=weights, **family.build_kwargs)
    except (OSError, RuntimeError) as exc:  # URLError, timeout, hash mismatch
        raise ConfigError(
            f"model.pretrained: cannot get ImageNet weights for {name} ({type(exc).__name__}); set "
            f"model.pretrained to a local state_dict file (e.g. {weights.url.rsplit('/', 1)[-1]}) "
            "or to false to train from scratch"
        ) from None


def load_torchvision_model(name: str, family: Family, pretrained: bool) -> nn.Module:
    """The ImageNet model (1000 classes), with its ImageNet weights when `pretrained`."""
    model = download_pretrained(name, family) if pretrained else get_model(name, **family.build_kwargs)
    for attribute, value in family.set_attributes.items():
        setattr(model, attribute, value)
    return model


def head_name(model: nn.Module, name: str) -> str:
    """The Linear deepship replaces: the model's last one (its classifier)."""
    head = classification_head_name(model)
    if head is None:
        raise ConfigError(f"model.backbone: '{name}' has no Linear classifier (its head is a convolution); "
                          "choose another model (docs/backbones.md)")
    return head


def replace_head(model: nn.Module, head: str, num_classes: int) -> None:
    """The last Linear -> a fresh Linear with num_classes outputs; dropout and the rest of the head stay."""
    parent, _, attr = head.rpartition(".")
    old = model.get_submodule(head)
    setattr(model.get_submodule(parent), attr, nn.Linear(old.in_features, num_classes))


def weighted(module: nn.Module | None) -> bool:
    return module is not None and any(True for _ in module.parameters())


def generic_groups(model: nn.Module, head_container: str) -> list[tuple[str, ...]]:
    """Top-level children with weights except the head's, bottom -> top; a trunk (a Sequential or ModuleList
    of at least TRUNK_MIN_BLOCKS weighted blocks) gives one group per block."""
    groups: list[tuple[str, ...]] = []
    for name, child in model.named_children():
        if name == head_container or not weighted(child):
            continue
        blocks = [f"{name}.{n}" for n, b in child.named_children() if weighted(b)] \
            if isinstance(child, (nn.Sequential, nn.ModuleList)) else []
        groups += [(b,) for b in blocks] if len(blocks) >= TRUNK_MIN_BLOCKS else [(name,)]
    return groups


def group_paths(model: nn.Module, family: Family, head_container: str) -> list[tuple[str, ...]]:
    """Each layer group as the qualified names of its submodules, bottom -> top."""
    if family.groups is None:
        return generic_groups(model, head_container)
    groups: list[tuple[str, ...]] = []
    for spec in family.groups:
        if spec.endswith(".*"):
            trunk = spec[:-2]
            groups += [(f"{trunk}.{n}",) for n, b in model.get_submodule(trunk).named_children() if weighted(b)]
        else:
            groups.append(tuple(spec.split("+")))
    return groups


def group_modules(model: nn.Module, paths: list[tuple[str, ...]]) -> list[nn.Module]:
    """One module per group; a group of several submodules is a ModuleList view (not registered in the model)."""
    modules = [[model.get_submodule(p) for p in group] for group in paths]
    return [group[0] if len(group) == 1 else nn.ModuleList(group) for group in modules]


# ---------------------------------------------------------------------------------- weights
def load_state_dict_file(path: str) -> dict[str, torch.Tensor]:
    """Weights from safetensors or a torch state_dict; never unpickles arbitrary objects."""
    if path.endswith(".safetensors"):
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(path)
        except (SafetensorError, OSError, ValueError) as exc:
            raise ConfigError(f"model.pretrained: '{path}' is not a readable safetensors file "
                              f"({first_line(exc, 160)}); re-save it with safetensors.torch.save_file") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle.UnpicklingError and friends: weights-only never runs pickled code
        raise ConfigError(f"model.pretrained: cannot load '{path}' as a weights-only state_dict "
                          f"({first_line(exc, 160)}); save it with torch.save(model.state_dict(), path) "
                          "or as .safetensors") from None
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    if not isinstance(state, dict):
        raise ConfigError(f"model.pretrained: '{path}' holds no state_dict")
    return state


def load_weights_file(model: nn.Module, path: str, name: str, backbone: tuple[str, ...],
                      dropped: tuple[str, ...] = ()) -> None:
    """Every backbone weight must come from the file (`backbone`: the layer groups' key prefixes); head weights
    of another shape (a classifier for other classes) are skipped with a note, missing ones stay as built.
    `dropped`: key prefixes of submodules the family removes (auxiliary classifiers), ignored in the file."""
    own = model.state_dict()
    state = {k: v for k, v in load_state_dict_file(path).items() if not k.startswith(dropped)}
    other_shape = [k for k, v in state.items() if k in own and tuple(v.shape) != tuple(own[k].shape)]
    wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in other_shape if k.startswith(backbone)]
    missing = [k for k in own if k not in state and k.startswith(backbone)]
    unexpected = [k for k in state if k not in own]
    if wrong or missing or unexpected:
        found = "; ".join(f"{what} {', '.join(keys[:3])}" + (f" (+{len(keys) - 3} more)" if len(keys) > 3 else "")
                          for what, keys in (("other shapes:", wrong), ("missing backbone weights:", missing),
                                             ("unexpected:", unexpected)) if keys)
        raise ConfigError(f"model.pretrained: '{path}' does not match {name} ({found}); give a state_dict of "
                          f"torchvision's {name}, or set model.backbone to the model it was saved from")
    model.load_state_dict({k: v for k, v in state.items() if k not in other_shape}, strict=False)
    if other_shape:
        print(f"note: model.pretrained: {len(other_shape)} head weights in '{path}' have another shape "
              f"({', '.join(other_shape[:3])}) and were skipped; the head is new for this task's classes",
              file=sys.stderr)


# ------------------------------------------------------------------------------------ entry
def build_image_backbone(cfg: ModelConfig, num_classes: int) -> Backbone:
    """Any torchvision classification model: pretrained per model.pretrained, a new num_classes head."""
    name = cfg.backbone
    check_image_backbone(name)
    spec = image_spec(name, cfg.image_size)
    family = family_of(name)
    model = load_torchvision_model(name, family, cfg.pretrained is True)
    head = head_name(model, name)
    paths = group_paths(model, family, family.head or head.split(".", 1)[0])
    if isinstance(cfg.pretrained, str):
        dropped = tuple(f"{attribute}." for attribute, value in family.set_attributes.items() if value is None)
        load_weights_file(model, cfg.pretrained, name, tuple(f"{p}." for group in paths for p in group), dropped)
    replace_head(model, head, num_classes)
    return Backbone(ImageNet(model), "image", spec, channels_last=family.channels_last,
                    layers=group_modules(model, paths))
