"""Image samples -> tensors. Evaluation reuses the runtime's numpy preprocessing; training adds
torchvision v2 augmentation on the same decoded image."""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.transforms import v2

from deepship.runtime.preprocess import IMAGE_INPUT, ImageSpec, load_image, preprocess_image

# RandomResizedCrop's ImageNet default keeps as little as 8% of the image, which can crop the
# object out of small or centred datasets; a quarter is a safer default for fine-tuning.
CROP_SCALE = (0.25, 1.0)


def train_transform(spec: ImageSpec) -> Callable[[Image.Image], torch.Tensor]:
    return v2.Compose([
        v2.ToImage(),
        v2.RandomResizedCrop(spec.image_size, scale=CROP_SCALE, antialias=True),
        v2.RandomHorizontalFlip(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(list(spec.mean), list(spec.std)),
    ])


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
