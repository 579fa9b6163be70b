"""`bench pipeline`: training-step throughput of the real datasets, collators and samplers, each measurement with a
ratio against a baseline measured in the same call (machines are noisy).

- `bench_text_padding`: pad-to-max_length vs length-grouped batches padded to multiples of 16 or 32; distinct
  batch shapes and the first-call cost of each (on a GPU every new sequence length plans its kernels anew).
- `bench_image_pipeline`: the CPU PIL loader vs the device-side pipeline (data.decode=gpu) vs in-memory tensors.
"""

from __future__ import annotations

import copy
import dataclasses
import io
import statistics
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader

from deepship.bench.common import ratio, require_rt_polarity, rt_polarity_rows
from deepship.config import Config
from deepship.data.cache import CachedImageDataset, build_image_cache, cache_path, cached_transform
from deepship.data.datamodule import EpochSampler, SeededSamples, default_num_workers, text_preprocessor
from deepship.data.gpu_pipeline import DeviceAugment, EncodedBatch, EncodedImageDataset, collate_encoded
from deepship.data.image import CROP_SCALE, ImageDataset, collate_images, train_transform
from deepship.data.text import TextCollator, TextDataset
from deepship.errors import ConfigError
from deepship.models.attention import sync
from deepship.models.backbones import Backbone, build_backbone
from deepship.runtime.preprocess import IMAGE_EXTENSIONS, IMAGE_INPUT, TextPreprocessor

Batch = tuple[dict[str, torch.Tensor], torch.Tensor]


# ------------------------------------------------------------------------------------ stepping
def train_steps(net: nn.Module, batches: Iterator[Batch], steps: int, device: torch.device,
                to_device: Callable[[Any], Batch]) -> list[tuple[int, int, float]]:
    """Run `steps` plain AdamW training steps; per step (batch size, shape key, seconds incl. loading)."""
    net.train()
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-5)
    records = []
    for _ in range(steps):
        start = time.perf_counter()
        inputs, targets = to_device(next(batches))
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = net(**inputs)  # (N, C)
        loss = nn.functional.cross_entropy(logits.float(), targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync(device)
        key = next(iter(inputs.values())).shape[-1]  # text: sequence length; images: the fixed size
        records.append((int(targets.shape[0]), int(key), time.perf_counter() - start))
    return records


def summarize(name: str, records: list[tuple[int, int, float]]) -> dict[str, Any]:
    """Per shape: steps, first step's seconds, and its first-call cost (first step minus the median of the
    shape's later steps; null when the shape ran once). Steady-state samples/s = all samples over all time
    less those first-call costs, so no batch (often the longest, which goes first) is left out."""
    by_shape: dict[int, list[float]] = defaultdict(list)
    for _, shape, seconds in records:
        by_shape[shape].append(seconds)
    shapes, excess = {}, 0.0
    for shape, times in sorted(by_shape.items()):
        first_call = times[0] - statistics.median(times[1:]) if len(times) > 1 else None
        excess += max(first_call or 0.0, 0.0)
        shapes[shape] = {"steps": len(times), "first_s": round(times[0], 4),
                         "first_call_s": None if first_call is None else round(first_call, 4)}
    samples, seconds = sum(r[0] for r in records), sum(r[2] for r in records)
    return {"name": name, "steps": len(records), "samples_per_s": round(samples / (seconds - excess), 2),
            "samples_per_s_with_first_calls": round(samples / seconds, 2), "distinct_shapes": len(shapes),
            "shapes": shapes}


def with_ratios(results: list[dict[str, Any]], key: str) -> list[dict[str, Any]]:
    """Every row's `key` over the first row's (the baseline)."""
    for r in results:
        r["baseline"], r["ratio"] = results[0]["name"], ratio(r[key], results[0][key])
    return results


def forever(loader: DataLoader, sampler: EpochSampler) -> Iterator[Any]:
    epoch = 0
    while True:
        sampler.set_epoch(epoch)
        yield from loader
        epoch += 1


def text_loader(dataset: TextDataset, preprocessor: TextPreprocessor, batch_size: int, grouped: bool
                ) -> Iterator[Any]:
    lengths = [len(e.ids) for e in dataset.encodings] if grouped else None
    sampler = EpochSampler(len(dataset), seed=0, lengths=lengths, batch_size=batch_size)
    loader = DataLoader(SeededSamples(dataset, 0), batch_size=batch_size, sampler=sampler,
                        collate_fn=TextCollator(preprocessor))
    return forever(loader, sampler)


# ----------------------------------------------------------------------------------------- text
def bench_text_padding(texts: list[str], labels: list[str], backbone: str = "all-MiniLM-L6-v2",
                       batch_size: int = 32, steps: int = 6, device: str = "cpu", max_length: int = 128
                       ) -> list[dict[str, Any]]:
    """Training-step samples/s of one model (same initial weights) fed four ways: pad to max_length (the
    baseline), batch-longest rounded to 16 in random order, and length-grouped rounded to 16 and to 32."""
    classes = sorted(set(labels))
    targets = np.array([classes.index(y) for y in labels])
    dev = torch.device(device)
    cfg = Config.model_validate({"task": "text_classification", "data": {"train": "bench", "max_length": max_length},
                                 "model": {"backbone": backbone}}, context={"skip_path_checks": True})
    built: Backbone = build_backbone(cfg.task, cfg.model, cfg.data, len(classes))
    initial = copy.deepcopy(built.net.state_dict())
    base = text_preprocessor(built)
    dataset = TextDataset(texts, targets, base)
    tokens = [len(e.ids) for e in dataset.encodings]
    longest = base.spec.max_length  # max_length capped by the model's positions
    results = []
    for name, multiple, grouped in (("pad_to_max_length", longest, False), ("pad_16_random_order", 16, False),
                                    ("grouped_pad_16", 16, True), ("grouped_pad_32", 32, True)):
        preprocessor = TextPreprocessor(base.tokenizer, dataclasses.replace(base.spec, pad_to_multiple_of=multiple))
        built.net.load_state_dict(initial)
        counts = {"real": 0, "fed": 0}

        def to_device(batch: Batch) -> Batch:
            mask = batch[0]["attention_mask"]  # (N, L): 1 = token, 0 = padding
            counts["real"], counts["fed"] = counts["real"] + int(mask.sum()), counts["fed"] + mask.numel()
            return {k: v.to(dev, non_blocking=True) for k, v in batch[0].items()}, batch[1].to(dev)

        records = train_steps(built.net.to(dev), text_loader(dataset, preprocessor, batch_size, grouped), steps,
                              dev, to_device)
        results.append({**summarize(name, records), "padding_share": round(1 - counts["real"] / counts["fed"], 3)})
    for r in results:
        r.update({"benchmark": "text_padding", "backbone": backbone, "batch_size": batch_size, "device": device,
                  "mean_tokens": round(float(np.mean(tokens)), 1), "p95_tokens": int(np.percentile(tokens, 95))})
    return with_ratios(results, "samples_per_s")


# ---------------------------------------------------------------------------------------- images
def list_images(folder: str | Path) -> tuple[list[str], np.ndarray]:
    """A class-per-folder tree -> (paths, integer targets by parent folder name)."""
    paths = sorted(str(p) for p in Path(folder).rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
    if not paths:
        raise ConfigError(f"--data {folder}: no images found; give a class-per-folder directory of images")
    classes = sorted({Path(p).parent.name for p in paths})
    return paths, np.array([classes.index(Path(p).parent.name) for p in paths])


def image_batches(dataset: Any, collate: Callable[[list], Any], batch_size: int, workers: int) -> Iterator[Any]:
    sampler = EpochSampler(len(dataset), seed=0)
    loader = DataLoader(SeededSamples(dataset, 0), batch_size=batch_size, sampler=sampler, collate_fn=collate,
                        num_workers=workers, pin_memory=torch.cuda.is_available(), persistent_workers=workers > 0)
    return forever(loader, sampler)


def bench_image_pipeline(folder: str, batch_size: int = 32, steps: int = 16, device: str = "cpu",
                         image_size: int = 64, workers: int | None = None) -> list[dict[str, Any]]:
    """img/s of MobileNetV2 training steps (same initial weights, augment=standard) fed from in-memory tensors
    (the baseline: no input cost), the CPU PIL loader, the device-side pipeline (data.decode=gpu) and the uint8
    memmap cache (data.cache; built before timing, as a second run finds it: its one-off build time is reported)."""
    paths, targets = list_images(folder)
    dev = torch.device(device)
    workers = default_num_workers() if workers is None else workers
    cfg = Config.model_validate({"task": "image_classification", "data": {"train": folder},
                                 "model": {"pretrained": False, "image_size": image_size}},
                                context={"skip_path_checks": True})
    built = build_backbone(cfg.task, cfg.model, cfg.data, int(targets.max()) + 1)
    initial = copy.deepcopy(built.net.state_dict())
    spec = built.preprocessing
    memory = torch.randn(batch_size, 3, image_size, image_size, device=dev)
    in_memory: Iterable[Batch] = iter(lambda: ({IMAGE_INPUT: memory}, torch.zeros(batch_size, dtype=torch.long,
                                                                                  device=dev)), None)
    augment = DeviceAugment(spec, CROP_SCALE["standard"])
    with tempfile.TemporaryDirectory(prefix="deepship-bench-cache-") as tmp:
        start = time.perf_counter()
        cached = build_image_cache(paths, spec, cache_path(tmp, paths, spec), workers, progress=False)
        build_s = time.perf_counter() - start
        results = _bench_image_feeds(built, initial, paths, targets, spec, memory, in_memory, augment, cached, dev,
                                     batch_size, steps, workers)
    for result in results:
        result.update({"benchmark": "image_pipeline", "images": len(paths), "batch_size": batch_size,
                       "image_size": image_size, "device": device, "workers": workers})
        if result["name"] == "uint8_cache":
            result["cache_build_s"] = round(build_s, 2)
    return with_ratios(results, "samples_per_s")


def _bench_image_feeds(built: Backbone, initial: dict[str, torch.Tensor], paths: list[str], targets: np.ndarray,
                       spec: Any, memory: torch.Tensor, in_memory: Iterable[Batch], augment: DeviceAugment,
                       cached: Path, dev: torch.device, batch_size: int, steps: int, workers: int
                       ) -> list[dict[str, Any]]:
    to_dev = lambda b: ({k: v.to(dev, non_blocking=True) for k, v in b[0].items()}, b[1].to(dev))  # noqa: E731
    pipelines = (
        ("in_memory_tensors", iter(in_memory), lambda b: b),
        ("cpu_pil", image_batches(ImageDataset(paths, targets, train_transform(spec, "standard")), collate_images,
                                  batch_size, workers), to_dev),
        ("device_decode", image_batches(EncodedImageDataset(paths, targets), collate_encoded, batch_size, workers),
         lambda b: augment(b, dev) if isinstance(b, EncodedBatch) else b),
        ("uint8_cache", image_batches(CachedImageDataset(cached, targets, cached_transform(spec, "standard")),
                                      collate_images, batch_size, workers), to_dev),
    )
    results = []
    for name, batches, to_device in pipelines:
        built.net.load_state_dict(initial)
        net = built.net.to(dev)
        results.append(summarize(name, train_steps(net, batches, steps, dev, to_device)))
    return results


def write_bench_jpegs(folder: str | Path, n: int = 256, size: tuple[int, int] = (320, 240), classes: int = 2,
                      seed: int = 0) -> Path:
    """Photo-sized JPEGs (smooth colour fields plus noise, quality 90) in a class-per-folder tree."""
    rng = np.random.default_rng(seed)
    root = Path(folder)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    for i in range(n):
        out = root / f"class_{i % classes}" / f"{i:05d}.jpg"
        out.parent.mkdir(parents=True, exist_ok=True)
        a, b, c = rng.uniform(0, 255, 3), rng.uniform(-200, 200, 3), rng.uniform(-200, 200, 3)
        arr = a + b * xx[..., None] + c * yy[..., None] + rng.normal(0, 12, (h, w, 3))
        buffer = io.BytesIO()
        Image.fromarray(arr.clip(0, 255).astype(np.uint8)).save(buffer, "JPEG", quality=90)
        out.write_bytes(buffer.getvalue())
    return root


# ------------------------------------------------------------------------------------- command
def bench_pipeline(modality: str, data: str | None, out_dir: str | None, backbone: str = "all-MiniLM-L6-v2",
                   batch_size: int = 32, steps: int = 16, device: str = "auto", image_size: int = 64
                   ) -> list[dict[str, Any]]:
    """Text: padding schemes on the rt-polarity folder `data`. Images: loaders on the JPEG tree `data`, or on
    photo-sized JPEGs generated under `out_dir` when there is none."""
    device = device if device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    return PIPELINE_BENCHES[modality](data, out_dir, backbone, batch_size, steps, device, image_size)


def text_pipeline(data: str | None, out_dir: str | None, backbone: str, batch_size: int, steps: int, device: str,
                  image_size: int) -> list[dict[str, Any]]:
    rows = rt_polarity_rows(require_rt_polarity(data, "pipeline --modality text"))
    rows = rows[: max(batch_size * (steps + 5) * 4, 1000)]
    return bench_text_padding([t for t, _ in rows], [y for _, y in rows], backbone, batch_size=batch_size,
                              steps=steps, device=device)


def image_pipeline(data: str | None, out_dir: str | None, backbone: str, batch_size: int, steps: int, device: str,
                   image_size: int) -> list[dict[str, Any]]:
    folder = data or str(write_bench_jpegs(Path(out_dir or "checkpoints/bench-pipeline") / "jpegs"))
    return bench_image_pipeline(folder, batch_size=batch_size, steps=steps, device=device, image_size=image_size)


PIPELINE_BENCHES = {"text": text_pipeline, "image": image_pipeline}
