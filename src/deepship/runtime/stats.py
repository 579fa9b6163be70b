"""Summary statistics of raw inputs, the signals the monitor compares with the training data.

One implementation for the three places that need them: export (the reference profile of the
validation set), the server's prediction log, and `monitor` on a dataset. Torch-free.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
from PIL import Image, ImageStat
from tokenizers import Encoding

from deepship.runtime.preprocess import TextPreprocessor

TEXT_SIGNALS = ("tokens", "unk_share")  # numeric signals a text log record carries in input_stats
IMAGE_SIGNALS = ("width", "height", "brightness", "contrast")


def image_stats(img: Image.Image) -> dict[str, Any]:
    """Size, mean luminance and its spread in [0, 1] (over a small copy: lighting, exposure, blur)."""
    small = img.reduce(max(1, min(img.size) // 64)).convert("L")
    stat = ImageStat.Stat(small)
    return {"width": img.size[0], "height": img.size[1], "brightness": round(stat.mean[0] / 255, 4),
            "contrast": round(stat.stddev[0] / 255, 4)}


def unknown_token_id(preprocessor: TextPreprocessor) -> int | None:
    unk = getattr(preprocessor.tokenizer.model, "unk_token", None)
    return preprocessor.tokenizer.token_to_id(unk) if unk else None


def text_stats(preprocessor: TextPreprocessor, texts: Sequence[str],
               encodings: Sequence[Encoding] | None = None) -> list[dict[str, Any]]:
    """Tokens kept (special tokens excluded, so capped by max_length), whether the text was cut, and
    the share of unknown tokens: text from another source or language shows up in both. Pass the
    texts' `encodings` when the caller tokenized them already (once per text is enough)."""
    unk = unknown_token_id(preprocessor)
    out = []
    for text, enc in zip(texts, preprocessor.tokenize(texts) if encodings is None else encodings):
        special = np.asarray(enc.special_tokens_mask, dtype=bool)
        ids = np.asarray(enc.ids)[~special]
        tokens = int(ids.size)
        unknown = int((ids == unk).sum()) if unk is not None else 0
        out.append({"chars": len(text), "tokens": tokens, "tokens_truncated": bool(enc.overflowing),
                    "unk_share": round(unknown / tokens, 4) if tokens else 0.0})
    return out
