"""Text samples -> token tensors: tokenized once up front, padded per batch by the runtime."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from tokenizers import Encoding
from torch.utils.data import Dataset

from deepship.runtime.preprocess import TextPreprocessor


def count_truncated(encodings: Sequence[Encoding]) -> int:
    """Texts that lost tokens to max_length (the tokenizer keeps the cut-off part as `overflowing`)."""
    return sum(1 for e in encodings if e.overflowing)


class TextDataset(Dataset):
    def __init__(self, texts: Sequence[str], targets: np.ndarray, preprocessor: TextPreprocessor) -> None:
        # Tokenizing the whole split once (Rust, batched) keeps tokenization off the training loop.
        self.encodings = preprocessor.tokenize(texts)
        self.targets = targets
        self.truncated = count_truncated(self.encodings)

    def __len__(self) -> int:
        return len(self.encodings)

    def __getitem__(self, i: int) -> tuple[Encoding, int]:
        return self.encodings[i], int(self.targets[i])


class TextCollator:
    """Pads a batch with the runtime's rule (longest, rounded up to a multiple); picklable for workers."""

    def __init__(self, preprocessor: TextPreprocessor) -> None:
        self.preprocessor = preprocessor

    def __call__(self, items: list[tuple[Encoding, int]]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        encodings, targets = zip(*items)
        arrays = self.preprocessor.pad(encodings)
        return {k: torch.from_numpy(v) for k, v in arrays.items()}, torch.tensor(targets, dtype=torch.long)
