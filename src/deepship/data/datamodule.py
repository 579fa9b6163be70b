"""LightningDataModule over `Splits`: the only place that picks image vs text datasets."""

from __future__ import annotations

import os
from typing import Any, Callable, Iterator

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

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


def mix_seed(*parts: int) -> int:
    """One 63-bit seed from several ints (seed, epoch, index), stable across processes and Python runs."""
    value = 0
    for part in parts:
        value = (value * 1_000_003 + int(part)) % (2**63 - 1)
    return value


class EpochSampler(Sampler):
    """Training order as a pure function of (seed, epoch): a permutation, or draws with replacement when
    weighted (balanced classes). With several processes each rank takes every world-th index of the padded
    order, so rank batches together are exactly the single-process global batch. Yields (epoch, index) so
    the dataset can seed per-sample augmentation; `resume_at` skips what a checkpointed epoch already saw."""

    def __init__(self, n: int, seed: int, weights: torch.Tensor | None = None, rank: int = 0, world: int = 1) -> None:
        self.n, self.seed, self.weights, self.rank, self.world = n, seed, weights, rank, world
        self.epoch = 0
        self.resume: tuple[int, int] | None = None  # (epoch, samples of this rank's shard already trained on)

    def set_epoch(self, epoch: int) -> None:  # Lightning calls this before each epoch
        self.epoch = epoch

    def resume_at(self, epoch: int, samples: int) -> None:
        self.resume = (epoch, samples)

    def order(self, epoch: int) -> list[int]:
        generator = torch.Generator().manual_seed(mix_seed(self.seed, epoch))
        if self.weights is None:
            order = torch.randperm(self.n, generator=generator).tolist()
        else:
            order = torch.multinomial(self.weights, self.n, replacement=True, generator=generator).tolist()
        order += order[: len(self) * self.world - self.n]  # pad to a multiple of world, like DistributedSampler
        return order[self.rank :: self.world]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch, start = self.epoch, 0
        if self.resume is not None:
            if self.resume[0] == epoch:
                start = self.resume[1]
            self.resume = None  # one-shot: later epochs start from their beginning
        for index in self.order(epoch)[start:]:
            yield epoch, index

    def __len__(self) -> int:
        return -(-self.n // self.world)


class SeededSamples(Dataset):
    """Train-set view whose random augmentation depends on (seed, epoch, index) only, not on the global RNG:
    a resumed run augments every remaining sample exactly as the uninterrupted run would."""

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> Any:
        epoch, index = key
        with torch.random.fork_rng(devices=[]):  # the caller's RNG stream is left as it was
            torch.manual_seed(mix_seed(self.seed, epoch, index))
            return self.dataset[index]


class ShardSampler(Sampler):
    """Evaluation with several processes: every world-th sample, no padding, so no sample counts twice."""

    def __init__(self, n: int, rank: int, world: int) -> None:
        self.indices = list(range(rank, n, world))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


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
        self._resume: tuple[int, int] | None = None  # (epoch, batches done) from a mid-epoch checkpoint

    def _targets(self, samples: Samples):
        return encode_labels(samples, self.splits.classes, samples.source)

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        self.datasets["train"] = self._make(self.splits.train, True)
        self.datasets["val"] = self._make(self.splits.val, False)
        if self.splits.test is not None:
            self.datasets["test"] = self._make(self.splits.test, False)

    def rank_world(self) -> tuple[int, int]:
        """(global rank, world size) of the Trainer using this data now; (0, 1) outside one."""
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def class_balance_weights(self) -> torch.Tensor:
        """Each class drawn equally often: sample weight 1 / (its class count)."""
        targets = self._targets(self.splits.train)
        counts = np.bincount(targets, minlength=len(self.splits.classes))
        return torch.as_tensor(1.0 / counts[targets], dtype=torch.double)

    def state_dict(self) -> dict[str, Any]:
        """Saved in every checkpoint: how far into which epoch training got, for an exact mid-epoch resume."""
        trainer = self.trainer
        if trainer is None or not trainer.training and not trainer.validating:
            return {}
        done = trainer.fit_loop.epoch_loop.batch_progress.current.processed  # batches trained this epoch
        return {"epoch": trainer.current_epoch, "batches_done": int(done)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._resume = (state["epoch"], state["batches_done"]) if state else None

    def _loader(self, dataset: Dataset, sampler: Sampler | None) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.cfg.train.batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            collate_fn=self.collate,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=self.num_workers > 0,
            # the iterator's base seed comes from here, not from the global RNG that the checkpoint restores
            generator=torch.Generator().manual_seed(self.cfg.train.seed),
        )

    def _eval_loader(self, split: str) -> DataLoader:
        rank, world = self.rank_world()
        dataset = self.datasets[split]
        return self._loader(dataset, ShardSampler(len(dataset), rank, world) if world > 1 else None)

    def train_dataloader(self) -> DataLoader:
        rank, world = self.rank_world()
        weights = self.class_balance_weights() if self.cfg.finetune.sampler == "balanced" else None
        dataset = self.datasets["train"]
        sampler = EpochSampler(len(dataset), self.cfg.train.seed, weights, rank, world)
        if self._resume is not None:
            epoch, batches = self._resume
            sampler.resume_at(epoch, batches * self.cfg.train.batch_size)
            self._resume = None
        return self._loader(SeededSamples(dataset, self.cfg.train.seed), sampler)

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test")
