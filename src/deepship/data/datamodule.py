"""LightningDataModule over `Splits`: the only place that picks image vs text datasets."""

from __future__ import annotations

import os
import warnings
from typing import Any, Callable, Iterator, Literal, Sequence

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from deepship.config import Config
from deepship.data.cache import CachedImageDataset, build_image_cache, cache_path, cached_transform
from deepship.data.gpu_pipeline import DeviceAugment, EncodedBatch, EncodedImageDataset, collate_encoded
from deepship.data.image import CROP_SCALE, ImageDataset, collate_images, eval_transform, train_transform
from deepship.data.sources import Samples
from deepship.data.split import Splits, encode_labels
from deepship.data.text import TextCollator, TextDataset
from deepship.errors import ConfigError
from deepship.models.backbones import Backbone
from deepship.runtime.preprocess import ImageSpec, TextPreprocessor, load_image

# Length-grouped text batches are sorted within chunks of this many batches: long enough that batches are
# nearly uniform in length, short enough that an epoch still mixes short and long texts throughout.
GROUP_BATCHES = 50
JPEG_EXTENSIONS = (".jpg", ".jpeg")


def default_num_workers() -> int:
    # On a GPU box decoding must keep up with the device; on CPU the trainer competes for the cores. With
    # data.decode=gpu workers only read bytes (~10k files/s each), but PNGs and EXIF-rotated JPEGs still
    # decode there, so the same count serves both paths.
    if torch.cuda.is_available():
        return max(1, min(8, (os.cpu_count() or 2) - 1))
    return 0


def mix_seed(*parts: int) -> int:
    """One 63-bit seed from several ints (seed, epoch, index), stable across processes and Python runs."""
    value = 0
    for part in parts:
        value = (value * 1_000_003 + int(part)) % (2**63 - 1)
    return value


def group_by_length(order: list[int], lengths: Sequence[int], batch: int, generator: torch.Generator) -> list[int]:
    """Reorder so that every run of `batch` indices holds similar lengths: chunks of GROUP_BATCHES batches are
    sorted by length and cut into batches, the batches are shuffled, the one holding the longest input goes
    first (an out-of-memory shape fails at step 1, not hours in), and a short last batch stays last."""
    batches: list[list[int]] = []
    for start in range(0, len(order), batch * GROUP_BATCHES):
        chunk = sorted(order[start : start + batch * GROUP_BATCHES], key=lambda i: -lengths[i])  # stable
        batches += [chunk[k : k + batch] for k in range(0, len(chunk), batch)]
    tail = [batches.pop()] if len(batches[-1]) < batch else []
    batches = [batches[p] for p in torch.randperm(len(batches), generator=generator).tolist()] + tail
    longest = max(range(len(batches)), key=lambda b: lengths[batches[b][0]])  # each batch is sorted longest first
    batches[0], batches[longest] = batches[longest], batches[0]
    return [i for b in batches for i in b]


class EpochSampler(Sampler):
    """Training order as a pure function of (seed, epoch): a permutation, or draws with replacement when
    weighted (balanced classes). With several processes each rank takes every world-th index of the padded
    order, so rank batches together are exactly the single-process global batch. Yields (epoch, index) so
    the dataset can seed per-sample augmentation; `resume_at` skips what a checkpointed epoch already saw.
    With `lengths`, global batches (batch_size x world) are grouped by length (`group_by_length`) before the
    rank split, so every rank's batch needs about the same padded shape."""

    def __init__(self, n: int, seed: int, weights: torch.Tensor | None = None, rank: int = 0, world: int = 1,
                 lengths: Sequence[int] | None = None, batch_size: int = 1) -> None:
        self.n, self.seed, self.weights, self.rank, self.world = n, seed, weights, rank, world
        self.lengths, self.batch_size = lengths, batch_size
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
        if self.lengths is not None:
            order = group_by_length(order, self.lengths, self.batch_size * self.world, generator)
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


def eval_batch(backbone: Backbone, raw: Sequence[str]) -> dict[str, torch.Tensor]:
    """Raw inputs (image paths or texts) through exactly what validation uses during training: the
    reference the export parity gate holds the package's own preprocessing to."""
    if backbone.modality == "image":
        transform = eval_transform(backbone.preprocessing)
        return collate_images([(transform(load_image(p)), 0) for p in raw])[0]
    preprocessor = text_preprocessor(backbone)
    return TextCollator(preprocessor)([(e, 0) for e in preprocessor.tokenize(list(raw))])[0]


def resolve_decode(cfg: Config, train_paths: Sequence[str]) -> Literal["cpu", "gpu"]:
    """data.decode -> where training images are decoded and augmented. auto picks gpu with a usable CUDA
    device and mostly-JPEG training files; presets the device path lacks stay on the CPU (with a note)."""
    requested, preset = cfg.data.decode, cfg.finetune.augment
    if requested == "cpu":
        return "cpu"
    if preset in ("none", "strong"):
        if requested == "gpu":
            warnings.warn(f"data.decode=gpu: finetune.augment={preset} is a CPU-only preset (none = the serving "
                          "preprocessing; strong = per-image TrivialAugment); decoding training images on the CPU",
                          stacklevel=2)
        return "cpu"
    if requested == "gpu":
        return "gpu"
    cuda = torch.cuda.is_available() and cfg.train.accelerator in ("auto", "gpu", "cuda")
    jpegs = sum(str(p).lower().endswith(JPEG_EXTENSIONS) for p in train_paths)
    return "gpu" if cuda and jpegs * 2 >= max(1, len(train_paths)) else "cpu"


class ClassificationData(L.LightningDataModule):
    def __init__(self, cfg: Config, splits: Splits, backbone: Backbone) -> None:
        super().__init__()
        self.cfg, self.splits, self.backbone = cfg, splits, backbone
        workers = cfg.data.num_workers
        self.num_workers = default_num_workers() if workers is None else workers
        self.decode: Literal["cpu", "gpu"] = "cpu"
        self.device_augment: DeviceAugment | None = None
        if backbone.modality == "text":
            if cfg.data.cache:
                raise ConfigError("data.cache: caches decoded images; texts are already tokenized once before "
                                  "training; remove data.cache")
            preprocessor = text_preprocessor(backbone)
            self._make: Callable[[Samples, bool], Dataset] = (
                lambda s, train: TextDataset(s.inputs, self._targets(s), preprocessor))
            self.collate: Callable[[list], Any] = TextCollator(preprocessor)
            self.train_collate: Callable[[list], Any] = self.collate
        else:
            spec: ImageSpec = backbone.preprocessing
            # the cache replaces per-epoch decoding altogether (crops come from the decoded squares)
            if cfg.data.cache and cfg.data.decode == "gpu":
                warnings.warn("data.decode=gpu: data.cache is on, so training images are decoded once into the "
                              "cache and never again; data.decode does not apply", stacklevel=2)
            self.decode = "cpu" if cfg.data.cache else resolve_decode(cfg, splits.train.inputs)
            self._make = lambda s, train: self._image_dataset(s, spec, train)
            self.collate = collate_images
            self.train_collate = collate_encoded if self.decode == "gpu" else collate_images
            if self.decode == "gpu":
                self.device_augment = DeviceAugment(spec, CROP_SCALE[cfg.finetune.augment])
        self.datasets: dict[str, Dataset] = {}
        self._resume: tuple[int, int | None, int] | None = None  # (epoch, samples, batches done) mid-epoch

    def _targets(self, samples: Samples):
        return encode_labels(samples, self.splits.classes, samples.source)

    def _image_dataset(self, samples: Samples, spec: ImageSpec, train: bool) -> Dataset:
        # Validation always takes the serving preprocessing on the CPU: it measures what a package computes.
        if train and self.cfg.data.cache:
            path = cache_path(self.cfg.train.out_dir, samples.inputs, spec)
            build_image_cache(samples.inputs, spec, path, self.num_workers,
                              progress=os.environ.get("LOCAL_RANK", "0") == "0")
            return CachedImageDataset(path, self._targets(samples), cached_transform(spec, self.cfg.finetune.augment))
        if train and self.decode == "gpu":
            return EncodedImageDataset(samples.inputs, self._targets(samples))
        transform = train_transform(spec, self.cfg.finetune.augment) if train else eval_transform(spec)
        return ImageDataset(samples.inputs, self._targets(samples), transform)

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        """Lightning's hook: a gpu-decode training batch is decoded and augmented on `device` in one pass."""
        if isinstance(batch, EncodedBatch):
            assert self.device_augment is not None
            return self.device_augment(batch, device)
        return super().transfer_batch_to_device(batch, device, dataloader_idx)

    def train_lengths(self) -> list[int] | None:
        """Token counts of the training texts when batches are grouped by length; else None."""
        dataset = self.datasets["train"]
        if not self.cfg.data.group_by_length or not isinstance(dataset, TextDataset):
            return None
        return [len(e.ids) for e in dataset.encodings]

    def typical_text_batch(self) -> dict[str, torch.Tensor] | None:
        """Text: a training-size batch of the texts around the median token length, padded by the training rule
        (what a length-grouped batch looks like); None for images."""
        dataset = self.datasets["train"]
        if not isinstance(dataset, TextDataset):
            return None
        by_length = sorted(range(len(dataset)), key=lambda i: len(dataset.encodings[i].ids))
        size = min(self.cfg.train.batch_size, len(dataset))
        start = max(0, min(len(dataset) // 2 - size // 2, len(dataset) - size))
        inputs, _ = self.collate([dataset[i] for i in by_length[start:start + size]])
        return inputs

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
        done = int(trainer.fit_loop.epoch_loop.batch_progress.current.processed)  # batches trained this epoch
        # samples of the whole (global) order, counted with this run's batch size and process count
        return {"epoch": trainer.current_epoch, "batches_done": done,
                "samples_done": done * self.cfg.train.batch_size * trainer.world_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # None: a checkpoint from before samples_done; its batches are counted with today's batch size
        self._resume = (state["epoch"], state.get("samples_done"), state["batches_done"]) if state else None

    def _loader(self, dataset: Dataset, sampler: Sampler | None, collate: Callable[[list], Any]) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.cfg.train.batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            collate_fn=collate,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=self.num_workers > 0,
            # the iterator's base seed comes from here, not from the global RNG that the checkpoint restores
            generator=torch.Generator().manual_seed(self.cfg.train.seed),
        )

    def _eval_loader(self, split: str) -> DataLoader:
        rank, world = self.rank_world()
        dataset = self.datasets[split]
        return self._loader(dataset, ShardSampler(len(dataset), rank, world) if world > 1 else None, self.collate)

    def train_dataloader(self) -> DataLoader:
        rank, world = self.rank_world()
        weights = self.class_balance_weights() if self.cfg.finetune.sampler == "balanced" else None
        dataset = self.datasets["train"]
        sampler = EpochSampler(len(dataset), self.cfg.train.seed, weights, rank, world,
                               lengths=self.train_lengths(), batch_size=self.cfg.train.batch_size)
        if self._resume is not None:
            epoch, samples, batches = self._resume
            sampler.resume_at(epoch, batches * self.cfg.train.batch_size if samples is None else samples // world)
            self._resume = None
        return self._loader(SeededSamples(dataset, self.cfg.train.seed), sampler, self.train_collate)

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test")
