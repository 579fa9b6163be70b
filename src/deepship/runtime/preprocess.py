"""Evaluation-time preprocessing, torch-free (numpy, Pillow, `tokenizers`).

This is the one implementation of "raw input -> model input" used by validation during training,
by export parity checks and by serving, so what serving computes is what validation measured.
Train-time augmentation lives in torchvision (deepship.data.image) and ends in the same tensors.
"""

from __future__ import annotations

import io
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from tokenizers import Encoding, Tokenizer

from deepship.errors import DataError

IMAGE_INPUT = "pixel_values"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# --------------------------------------------------------------------------------------- images
@dataclass(frozen=True)
class ImageSpec:
    """How an image becomes a (3, size, size) float32 array; travels with the model."""

    image_size: int = 224
    resize_size: int = 256  # shorter side before the center crop (size / 0.875, as in ImageNet eval)
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: str = "bilinear"

    @classmethod
    def for_size(cls, image_size: int, **kwargs: Any) -> "ImageSpec":
        return cls(image_size=image_size, resize_size=int(round(image_size / 0.875)), **kwargs)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "image", **asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ImageSpec":
        fields = {k: v for k, v in data.items() if k != "kind"}
        fields["mean"], fields["std"] = tuple(fields["mean"]), tuple(fields["std"])
        return cls(**fields)


def load_image(source: str | Path | bytes) -> Image.Image:
    """Decode a file or bytes to RGB, honouring EXIF orientation; transparency becomes white."""
    name = "<bytes>" if isinstance(source, bytes) else str(source)
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as img:
            img.load()
            img = ImageOps.exif_transpose(img)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"{name}: cannot decode image ({exc}); remove or replace the file") from None
    return to_rgb(img)


def to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        # Dropping alpha would expose whatever colour sits under transparent pixels; composite instead.
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def resize_shorter_side(img: Image.Image, spec: ImageSpec) -> Image.Image:
    w, h = img.size
    scale = spec.resize_size / min(w, h)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return img.resize(size, Image.Resampling[spec.interpolation.upper()])


def center_offsets(size: tuple[int, int], crop: int) -> tuple[int, int]:
    """(left, top) of a centred crop x crop box in an image of `size` (w, h); rounds down."""
    return (size[0] - crop) // 2, (size[1] - crop) // 2


def resize_center_crop(img: Image.Image, spec: ImageSpec) -> Image.Image:
    img = resize_shorter_side(img, spec)
    left, top = center_offsets(img.size, spec.image_size)
    return img.crop((left, top, left + spec.image_size, top + spec.image_size))


def normalize_image(img: Image.Image, spec: ImageSpec) -> np.ndarray:
    """RGB PIL image -> (3, H, W) float32, scaled to [0, 1] then standardised by mean/std."""
    arr = np.asarray(img, dtype=np.float32) / 255.0  # (H, W, 3)
    arr = (arr - np.asarray(spec.mean, np.float32)) / np.asarray(spec.std, np.float32)
    return np.ascontiguousarray(arr.transpose(2, 0, 1))


def preprocess_image(img: Image.Image, spec: ImageSpec) -> np.ndarray:
    return normalize_image(resize_center_crop(to_rgb(img), spec), spec)


def preprocess_images(sources: Sequence[str | Path | bytes], spec: ImageSpec) -> dict[str, np.ndarray]:
    """Raw images -> {"pixel_values": (N, 3, S, S) float32}."""
    batch = np.stack([preprocess_image(load_image(s), spec) for s in sources])
    return {IMAGE_INPUT: batch}


# ----------------------------------------------------------------------------------------- text
@dataclass(frozen=True)
class TextSpec:
    """How texts become token arrays; the tokenizer file ships beside the model."""

    max_length: int = 128
    pad_to_multiple_of: int = 16
    pad_id: int = 0
    input_names: tuple[str, ...] = ("input_ids", "attention_mask", "token_type_ids")
    tokenizer_file: str = "tokenizer/tokenizer.json"
    truncation_side: str = "right"  # which end of a long text loses tokens
    lowercase: bool = field(default=False)  # informative: the tokenizer's normalizer does it

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "text", **asdict(self), "input_names": list(self.input_names)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TextSpec":
        fields = {k: v for k, v in data.items() if k != "kind"}
        fields["input_names"] = tuple(fields["input_names"])
        return cls(**fields)


class TextPreprocessor:
    """Tokenize once (`tokenize`), pad per batch (`pad`): few distinct shapes, little padding.

    Each batch is padded to its longest text rounded up to `pad_to_multiple_of` (capped at
    `max_length`): on a GPU every new sequence length costs a fresh kernel plan, so a handful of
    lengths beats both pad-to-max (mostly padding) and exact dynamic padding (many plans).
    """

    def __init__(self, tokenizer: Tokenizer, spec: TextSpec) -> None:
        self.spec = spec
        self.tokenizer = Tokenizer.from_str(tokenizer.to_str())  # own copy: we set truncation
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(max_length=spec.max_length, direction=spec.truncation_side)

    @classmethod
    def from_file(cls, path: str | Path, spec: TextSpec) -> "TextPreprocessor":
        return cls(Tokenizer.from_file(str(path)), spec)

    def tokenize(self, texts: Sequence[str]) -> list[Encoding]:
        return self.tokenizer.encode_batch([str(t) for t in texts])

    def padded_length(self, longest: int) -> int:
        m = self.spec.pad_to_multiple_of
        return min(max(m, math.ceil(longest / m) * m), self.spec.max_length)

    def pad(self, encodings: Sequence[Encoding]) -> dict[str, np.ndarray]:
        """Encodings -> {name: (N, L) int64}; L from `padded_length`."""
        length = self.padded_length(max(len(e.ids) for e in encodings))
        ids = np.full((len(encodings), length), self.spec.pad_id, dtype=np.int64)
        mask = np.zeros((len(encodings), length), dtype=np.int64)
        types = np.zeros((len(encodings), length), dtype=np.int64)
        for row, enc in enumerate(encodings):
            n = len(enc.ids)
            ids[row, :n], mask[row, :n], types[row, :n] = enc.ids, 1, enc.type_ids
        arrays = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
        return {name: arrays[name] for name in self.spec.input_names}

    def __call__(self, texts: Sequence[str]) -> dict[str, np.ndarray]:
        return self.pad(self.tokenize(texts))
