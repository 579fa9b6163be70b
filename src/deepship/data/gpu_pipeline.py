"""Image training input decoded and augmented on the training device (`data.decode: gpu`).

A CPU core decodes and crops ~500-700 JPEGs/s, so 16 cores cannot feed a GPU that trains 10,000 img/s. Here
DataLoader workers only read file bytes and draw each sample's random numbers; on the device the batch is
decoded in one call (`decode_jpeg(list, device=...)`, nvJPEG on CUDA) and RandomResizedCrop + resize is ONE
`roi_align` over the whole batch: a per-image crop/resize loop launches hundreds of small kernels and was
slower than the CPU loader (2,677 vs 4,708 img/s on an H200). Everything also runs with device=cpu, which is
how the tests check it.
"""

from __future__ import annotations

import io
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.ops import roi_align
from torchvision.transforms.v2.functional import pil_to_tensor

from deepship.runtime.preprocess import IMAGE_INPUT, ImageSpec, load_image

# torchvision 0.29 deprecates its decoders in favour of TorchCodec; decode_jpeg is still the batched nvJPEG path.
warnings.filterwarnings("ignore", message=r"The image decoding and encoding capabilities of TorchVision",
                        category=DeprecationWarning)

CROP_ATTEMPTS = 10  # RandomResizedCrop's tries at a (scale, ratio) that fits, before its centre-crop fallback
CROP_RATIO = (3 / 4, 4 / 3)  # torchvision's default aspect-ratio range
PARAMS = CROP_ATTEMPTS * 4 + 1  # per sample: (scale, log ratio, top, left) uniforms per attempt, then the flip
# Padded pixels per roi_align call: 2**26 (x3 channels x4 bytes = 0.8 GB float32). Typical batches are one
# call; batches of phone photos are split into a few calls of similar-sized images.
MAX_PADDED_PIXELS = 2**26
JPEG_MAGIC = b"\xff\xd8\xff"
EXIF_ORIENTATION = 0x0112


def read_encoded(path: str | Path) -> torch.Tensor:
    """A file as the device will take it: the raw bytes (B,) uint8 of a plain JPEG, else the image decoded
    here with the runtime's loader, (3, H, W) uint8. nvJPEG ignores EXIF orientation and CMYK, so those JPEGs
    (and PNG, WebP, ...) are decoded on the CPU, exactly as evaluation decodes them."""
    data = Path(path).read_bytes()
    if data[:3] == JPEG_MAGIC:
        try:
            with Image.open(io.BytesIO(data)) as header:  # reads the header only
                plain = header.mode in ("RGB", "L") and header.getexif().get(EXIF_ORIENTATION, 1) == 1
        except (OSError, SyntaxError, ValueError):
            plain = False  # load_image below raises a DataError naming the file
        if plain:
            return torch.frombuffer(bytearray(data), dtype=torch.uint8)
    return pil_to_tensor(load_image(data))


@dataclass
class EncodedBatch:
    """A training batch before the device has seen it. Not a tensor container Lightning knows, so
    `transfer_batch_to_device` hands it to `DeviceAugment` whole instead of copying bytes to the GPU."""

    data: list[torch.Tensor]  # per sample: (B,) JPEG bytes or (3, H, W) uint8
    params: torch.Tensor  # (N, PARAMS) float64 uniforms in [0, 1)
    targets: torch.Tensor  # (N,) int64

    def pin_memory(self) -> "EncodedBatch":  # DataLoader(pin_memory=True) calls this
        return EncodedBatch([d.pin_memory() for d in self.data], self.params.pin_memory(), self.targets.pin_memory())

    def __len__(self) -> int:
        return len(self.data)


class EncodedImageDataset(Dataset):
    """Training samples as (encoded image, random numbers, target). The random numbers are drawn here, under
    the per-sample seed `SeededSamples` sets, so augmentation is a function of (seed, epoch, index) as on
    the CPU path and a resumed run crops exactly as the uninterrupted one."""

    def __init__(self, paths: Sequence[str], targets: np.ndarray) -> None:
        self.paths, self.targets = list(paths), targets

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        return read_encoded(self.paths[i]), torch.rand(PARAMS, dtype=torch.float64), int(self.targets[i])


def collate_encoded(items: list[tuple[torch.Tensor, torch.Tensor, int]]) -> EncodedBatch:
    data, params, targets = zip(*items)
    return EncodedBatch(list(data), torch.stack(params), torch.tensor(targets, dtype=torch.long))


def decode_on(data: Sequence[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """Encoded batch -> list of (3, H_i, W_i) uint8 on `device`; all JPEGs in one batched decode call."""
    images: list[torch.Tensor | None] = [d.to(device, non_blocking=True) if d.ndim == 3 else None for d in data]
    jpegs = [i for i, d in enumerate(data) if d.ndim == 1]
    if jpegs:
        encoded = [data[i] for i in jpegs]
        try:
            decoded = decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device)
        except RuntimeError:  # a JPEG variant nvJPEG refuses: decode this batch's JPEGs on the CPU
            decoded = [pil_to_tensor(load_image(e.numpy().tobytes())).to(device) for e in encoded]
        for i, image in zip(jpegs, decoded):
            images[i] = image
    return images  # type: ignore[return-value]


def crop_boxes(sizes: torch.Tensor, params: torch.Tensor, min_scale: float,
               ratio: tuple[float, float] = CROP_RATIO) -> torch.Tensor:
    """torchvision's RandomResizedCrop.get_params, vectorized over the batch and fed our uniforms.

    sizes (N, 2) image (H, W); params (N, PARAMS) -> boxes (N, 4) float64 (x1, y1, x2, y2) in pixels."""
    n = sizes.shape[0]
    h, w = sizes[:, :1].double(), sizes[:, 1:].double()  # (N, 1)
    u = params[:, : CROP_ATTEMPTS * 4].reshape(n, CROP_ATTEMPTS, 4)
    area = h * w * (min_scale + (1 - min_scale) * u[..., 0])  # (N, A)
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(log_lo + (log_hi - log_lo) * u[..., 1])
    cw, ch = torch.round(torch.sqrt(area * aspect)), torch.round(torch.sqrt(area / aspect))
    fits = (cw > 0) & (cw <= w) & (ch > 0) & (ch <= h)  # (N, A)
    first = fits.to(torch.uint8).argmax(1, keepdim=True)  # first attempt that fits (0 if none)
    pick = lambda t: t.gather(1, first)  # noqa: E731  (N, A) -> (N, 1)
    cw, ch, u_top, u_left = pick(cw), pick(ch), pick(u[..., 2]), pick(u[..., 3])
    top, left = torch.floor(u_top * (h - ch + 1)), torch.floor(u_left * (w - cw + 1))
    # No attempt fits: the whole image, its aspect ratio clamped to the range, centred (as torchvision does).
    in_ratio = w / h
    fw = torch.where(in_ratio < ratio[0], w, torch.where(in_ratio > ratio[1], torch.round(h * ratio[1]), w))
    fh = torch.where(in_ratio < ratio[0], torch.round(w / ratio[0]), h)
    none = ~fits.any(1, keepdim=True)
    cw, ch = torch.where(none, fw, cw), torch.where(none, fh, ch)
    top = torch.where(none, torch.div(h - ch, 2, rounding_mode="floor"), top)
    left = torch.where(none, torch.div(w - cw, 2, rounding_mode="floor"), left)
    return torch.cat([left, top, left + cw, top + ch], 1)


def size_groups(sizes: torch.Tensor, max_pixels: int) -> list[list[int]]:
    """Indices in runs of similar size whose padded batch stays under `max_pixels` (largest first)."""
    order = torch.argsort(sizes[:, 0] * sizes[:, 1], descending=True).tolist()
    groups: list[list[int]] = []
    hmax = wmax = 0
    for i in order:
        h, w = int(sizes[i, 0]) + 1, int(sizes[i, 1]) + 1
        if groups and (len(groups[-1]) + 1) * max(hmax, h) * max(wmax, w) <= max_pixels:
            groups[-1].append(i)
            hmax, wmax = max(hmax, h), max(wmax, w)
        else:
            groups.append([i])
            hmax, wmax = h, w
    return groups


def pad_batch(images: Sequence[torch.Tensor]) -> torch.Tensor:
    """(3, H_i, W_i) uint8 images -> (N, 3, Hmax+1, Wmax+1) float32, each image top-left with its last row and
    column repeated once: roi_align's bilinear samples near an edge then blend in the edge pixel, not a zero."""
    sizes = torch.tensor([im.shape[1:] for im in images])  # (N, 2)
    hmax, wmax = (int(v) + 1 for v in sizes.max(0).values)
    padded = images[0].new_zeros((len(images), 3, hmax, wmax))
    for k, im in enumerate(images):  # one copy kernel per image; every later op is batched
        padded[k, :, : im.shape[1], : im.shape[2]] = im
    rows = torch.arange(len(images), device=padded.device)
    h, w = sizes[:, 0].to(padded.device), sizes[:, 1].to(padded.device)
    padded[rows, :, :, w] = padded[rows, :, :, w - 1]  # (N, 3, Hmax+1): column W_i := column W_i - 1
    padded[rows, :, h, :] = padded[rows, :, h - 1, :]  # (N, 3, Wmax+1): row H_i := row H_i - 1
    return padded.float()


def crop_resize(images: Sequence[torch.Tensor], boxes: torch.Tensor, size: int,
                max_pixels: int = MAX_PADDED_PIXELS) -> torch.Tensor:
    """Crop each image to its box and resize to (size, size): one roi_align per group of similar sizes.

    sampling_ratio=-1 averages ceil(box/size) bilinear samples per output pixel along each axis, a box filter
    that stands in for antialiased downscaling. -> (N, 3, size, size) float32 in [0, 255]."""
    device = images[0].device
    sizes = torch.tensor([im.shape[1:] for im in images])
    out = torch.empty((len(images), 3, size, size), device=device)
    for group in size_groups(sizes, max_pixels):
        padded = pad_batch([images[i] for i in group])
        rois = torch.cat([torch.arange(len(group), dtype=torch.float64)[:, None], boxes[group]], 1)  # (n, 5)
        crops = roi_align(padded, rois.float().to(device), (size, size), spatial_scale=1.0, sampling_ratio=-1,
                          aligned=True)
        out[torch.tensor(group, device=device)] = crops
    return out


class DeviceAugment:
    """EncodedBatch -> ({"pixel_values": (N, 3, S, S) float32}, targets (N,)) on `device`: decode, random
    resized crop, horizontal flip, normalize; the same crop scales and ratios as `train_transform`."""

    def __init__(self, spec: ImageSpec, min_scale: float) -> None:
        self.size, self.min_scale = spec.image_size, min_scale
        self.mean = torch.tensor(spec.mean).view(1, 3, 1, 1) * 255.0
        self.std = torch.tensor(spec.std).view(1, 3, 1, 1) * 255.0

    def __call__(self, batch: EncodedBatch, device: torch.device) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        images = decode_on(batch.data, device)
        sizes = torch.tensor([im.shape[1:] for im in images])  # (N, 2): shapes are host-side, no sync
        boxes = crop_boxes(sizes, batch.params, self.min_scale)
        pixels = crop_resize(images, boxes, self.size)  # (N, 3, S, S) in [0, 255]
        flip = (batch.params[:, -1] < 0.5).to(device, non_blocking=True)[:, None, None, None]
        pixels = torch.where(flip, pixels.flip(-1), pixels)
        pixels = (pixels - self.mean.to(device)) / self.std.to(device)
        return {IMAGE_INPUT: pixels.contiguous()}, batch.targets.to(device, non_blocking=True)
