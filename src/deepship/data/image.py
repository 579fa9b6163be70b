"""Image samples -> tensors. Evaluation reuses the runtime's numpy preprocessing; training adds
torchvision v2 augmentation on the same decoded image."""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.transforms import v2

from deepship.runtime.preprocess import IMAGE_INPUT, ImageSpec, load_image, preprocess_image

# Smallest share of the image RandomResizedCrop keeps, per preset. ImageNet recipes use 8% ("strong"),
# which can crop the object out of small or centred datasets; a quarter is the fine-tuning default.
CROP_SCALE = {"light": 0.5, "standard": 0.25, "strong": 0.08}


def train_transform(spec: ImageSpec, preset: str = "standard") -> Callable[[Image.Image], torch.Tensor]:
    """none: the evaluation transform; light/standard: crop + flip; strong: + TrivialAugment, random erasing."""
    if preset == "none":
        return eval_transform(spec)
    ops: list[Any] = [v2.ToImage(),
                      v2.RandomResizedCrop(spec.image_size, scale=(CROP_SCALE[preset], 1.0), antialias=True),
                      v2.RandomHorizontalFlip()]
    if preset == "strong":
        ops.append(v2.TrivialAugmentWide())
    ops += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(spec.mean), list(spec.std))]
    if preset == "strong":
        ops.append(v2.RandomErasing(p=0.25))
    return v2.Compose(ops)


def eval_transform(spec: ImageSpec) -> Callable[[Image.Image], torch.Tensor]:
    # The serving path's own function: validation measures exactly what a package will compute.
    return lambda img: torch.from_numpy(preprocess_image(img, spec))


class ImageDataset(Dataset):
    def __init__(self, paths: Sequence[str], targets: np.ndarray,
                 transform: Callable[[Image.Image], torch.Tensor]) -> None:
        self.paths, self.targets, self.transform = list(paths), targets, transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.transform(load_image(self.paths[i])), int(self.targets[i])


def collate_images(items: list[tuple[torch.Tensor, int]]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    images, targets = zip(*items)
    return {IMAGE_INPUT: torch.stack(images)}, torch.tensor(targets, dtype=torch.long)
