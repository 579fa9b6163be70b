"""LightningDataModule over `Splits`: the only place that picks image vs text datasets."""

from __future__ import annotations

import os
from typing import Any, Callable

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, WeightedRandomSampler

from deepship.config import Config
from deepship.data.image import ImageDataset, collate_images, eval_transform, train_transform
from deepship.data.sources import Samples
from deepship.data.split import Splits, encode_labels
from deepship.data.text import TextCollator, TextDataset
from deepship.models.backbones import Backbone
from deepship.runtime.preprocess import ImageSpec, TextPreprocessor


def default_num_workers() -> int:
    # On a GPU box decoding must keep up with the device; on CPU the trainer competes for the cores.
    if torch.cuda.is_available():
        return max(1, min(8, (os.cpu_count() or 2) - 1))
    return 0


def text_preprocessor(backbone: Backbone) -> TextPreprocessor:
    return TextPreprocessor(backbone.tokenizer.backend_tokenizer, backbone.preprocessing)


class ClassificationData(L.LightningDataModule):
    def __init__(self, cfg: Config, splits: Splits, backbone: Backbone) -> None:
        super().__init__()
        self.cfg, self.splits, self.backbone = cfg, splits, backbone
        workers = cfg.data.num_workers
        self.num_workers = default_num_workers() if workers is None else workers
        if backbone.modality == "text":
            preprocessor = text_preprocessor(backbone)
            self._make: Callable[[Samples, bool], Dataset] = (
                lambda s, train: TextDataset(s.inputs, self._targets(s), preprocessor))
            self.collate: Callable[[list], Any] = TextCollator(preprocessor)
        else:
            spec: ImageSpec = backbone.preprocessing
            self._make = lambda s, train: ImageDataset(
                s.inputs, self._targets(s), train_transform(spec, cfg.finetune.augment) if train else eval_transform(spec))
            self.collate = collate_images
        self.datasets: dict[str, Dataset] = {}

    def _targets(self, samples: Samples):
        return encode_labels(samples, self.splits.classes, samples.source)

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        self.datasets["train"] = self._make(self.splits.train, True)
        self.datasets["val"] = self._make(self.splits.val, False)
        if self.splits.test is not None:
            self.datasets["test"] = self._make(self.splits.test, False)

    def balanced_sampler(self) -> WeightedRandomSampler:
        """Each class drawn equally often: sample weight 1 / (its class count); seeded."""
        targets = self._targets(self.splits.train)
        counts = np.bincount(targets, minlength=len(self.splits.classes))
        weights = torch.as_tensor(1.0 / counts[targets], dtype=torch.double)
        generator = torch.Generator().manual_seed(self.cfg.train.seed)
        return WeightedRandomSampler(weights, num_samples=len(targets), replacement=True, generator=generator)

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        sampler = self.balanced_sampler() if shuffle and self.cfg.finetune.sampler == "balanced" else None
        return DataLoader(
            self.datasets[split],
            batch_size=self.cfg.train.batch_size,
            shuffle=shuffle and sampler is None,
            sampler=sampler,
            num_workers=self.num_workers,
            collate_fn=self.collate,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)
