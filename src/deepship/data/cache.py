"""`data.cache: true`: training images decoded once into a uint8 memory-mapped array, reused by every epoch and run.

Each image is stored as the serving preprocessing's intermediate: shorter side resized to `resize_size`
(image_size / 0.875), cut to the S x S square around the runtime's centre crop: (N, S, S, 3). Workers then only slice the memmap and crop; there
is no JPEG decode and no full-size resize per sample per epoch. The centre image_size crop of a cached image is
pixel for pixel what the runtime computes (tests/test_pipeline.py), so `finetune.augment: none` stays exact;
random crops choose within the cached square rather than the whole original.

The file is `<train.out_dir>/.cache/images-<key>.npy`, the key a hash of the size and of every file's path, size
and modification time: a changed, added or removed image makes a new cache, and two runs on the same data share
one. It is written to a temp file and renamed, so a killed build leaves no half cache.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from deepship.data.image import train_transform
from deepship.errors import ConfigError
from deepship.files import exclusive, temp_path
from deepship.runtime.preprocess import ImageSpec, center_offsets, load_image, resize_shorter_side

CACHE_FORMAT = 1


def cache_key(paths: Sequence[str], spec: ImageSpec) -> str:
    digest = hashlib.sha256(f"deepship-image-cache-{CACHE_FORMAT}-{sorted(spec.to_dict().items())}-{len(paths)}".encode())
    for path in paths:
        stat = os.stat(path)
        digest.update(f"\0{path}\0{stat.st_size}\0{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:20]


def cache_path(out_dir: str | Path, paths: Sequence[str], spec: ImageSpec) -> Path:
    return Path(out_dir) / ".cache" / f"images-{cache_key(paths, spec)}.npy"


def margin(spec: ImageSpec) -> int:
    """Offset of the serving crop inside a cached square, on both axes."""
    return (spec.resize_size - spec.image_size) // 2


class _Decode(Dataset):
    """File -> (S, S, 3) uint8: decoded and resized as the runtime does, then the S x S square placed so that
    the runtime's centre crop sits at (margin, margin) inside it (a plain centre square would be one pixel off
    where both leftovers are odd)."""

    def __init__(self, paths: Sequence[str], spec: ImageSpec) -> None:
        self.paths, self.spec = list(paths), spec

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> np.ndarray:
        img = resize_shorter_side(load_image(self.paths[i]), self.spec)
        left, top = (v - margin(self.spec) for v in center_offsets(img.size, self.spec.image_size))
        size = self.spec.resize_size
        return np.asarray(img.crop((left, top, left + size, top + size)), dtype=np.uint8)


def usable(path: Path, n: int, size: int) -> bool:
    """An existing cache of the right shape (a truncated or foreign file is rebuilt, not trusted)."""
    try:
        return np.load(path, mmap_mode="r").shape == (n, size, size, 3)
    except (OSError, ValueError):
        return False


def build_image_cache(paths: Sequence[str], spec: ImageSpec, path: Path, workers: int = 0,
                      progress: bool = True) -> Path:
    """Decode `paths` once into `path` (atomically); an existing usable cache is returned as it is. Concurrent
    builders wait for each other and then find the first one's file."""
    size = spec.resize_size
    if usable(path, len(paths), size):
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with exclusive(path.with_name(path.name + ".lock")):
        if usable(path, len(paths), size):  # another process built it while this one waited
            return path
        _build(paths, spec, path, workers, progress)
    return path


def _build(paths: Sequence[str], spec: ImageSpec, path: Path, workers: int, progress: bool) -> None:
    size = spec.resize_size
    for stale in path.parent.glob(f"{temp_path(path).name}.*"):  # a killed build's leftovers (we hold the lock)
        stale.unlink(missing_ok=True)
    need, free = len(paths) * size * size * 3, shutil.disk_usage(path.parent).free
    if need > free:
        raise ConfigError(f"data.cache: {len(paths):,} images at {size}x{size} need {need / 2**30:.1f} GiB in "
                          f"{path.parent}, which has {free / 2**30:.1f} GiB free; free space, use another "
                          "train.out_dir, or set data.cache false")
    tmp = temp_path(path).with_name(f"{temp_path(path).name}.{os.getpid()}")  # never shared by two builders
    try:
        array = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(len(paths), size, size, 3))
        loader = DataLoader(_Decode(paths, spec), batch_size=64, num_workers=workers,
                            collate_fn=np.stack)
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=len(paths), desc=f"caching {len(paths):,} training images ({size}x{size} uint8)",
                       unit="img")
        done = 0
        for batch in loader:
            array[done:done + len(batch)] = batch
            done += len(batch)
            if bar is not None:
                bar.update(len(batch))
        if bar is not None:
            bar.close()
        array.flush()
        del array
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def cached_transform(spec: ImageSpec, preset: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The training transform on a cached (3, S, S) uint8 tensor. `none` (the serving preprocessing) is the
    centre crop of the cached square: the runtime's pixels exactly."""
    if preset != "none":
        return train_transform(spec, preset)
    from torchvision.transforms import v2

    m, size = margin(spec), spec.image_size
    # not v2.CenterCrop: it rounds odd leftovers up, the runtime rounds them down
    return v2.Compose([lambda image: image[:, m:m + size, m:m + size], v2.ToDtype(torch.float32, scale=True),
                       v2.Normalize(list(spec.mean), list(spec.std))])


class CachedImageDataset(Dataset):
    """Training samples from the cache: a (3, S, S) uint8 tensor through `transform` (the v2 training transform,
    which takes tensors as it takes PIL images). The memmap opens lazily, once per worker process."""

    def __init__(self, path: Path, targets: np.ndarray, transform: Callable[[Any], torch.Tensor]) -> None:
        self.path, self.targets, self.transform = Path(path), targets, transform
        self._array: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.targets)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_array": None}  # workers map the file themselves

    def image(self, i: int) -> torch.Tensor:
        if self._array is None:
            self._array = np.load(self.path, mmap_mode="r")
        return torch.from_numpy(np.array(self._array[i])).permute(2, 0, 1)  # (3, S, S) uint8, a private copy

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.transform(self.image(i)), int(self.targets[i])
