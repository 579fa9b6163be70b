"""Input pipeline: length-grouped text batches, and the device-side image pipeline (data.decode=gpu) run on CPU."""

from __future__ import annotations

import csv
import io
import json
import random
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from PIL import Image
from torchvision.transforms import v2

from deepship.config import Config
from deepship.data.datamodule import ClassificationData, EpochSampler, SeededSamples, resolve_decode
from deepship.data.gpu_pipeline import (
    PARAMS,
    DeviceAugment,
    EncodedImageDataset,
    collate_encoded,
    crop_boxes,
    crop_resize,
    read_encoded,
)
from deepship.data.split import load_splits
from deepship.models.backbones import build_backbone
from deepship.runtime.preprocess import ImageSpec

from conftest import image_config, write_config

CPU = torch.device("cpu")
SPEC = ImageSpec.for_size(32)


# ----------------------------------------------------------------------------------- helpers
def padded_tokens(order: list[int], lengths: list[int], batch: int) -> int:
    """Tokens a batch-longest padding would feed for this order (without rounding)."""
    return sum(max(lengths[i] for i in order[k : k + batch]) * len(order[k : k + batch])
               for k in range(0, len(order), batch))


def save_image(path: Path, arr: np.ndarray, **options) -> Path:
    Image.fromarray(arr).save(path, **options)
    return path


def encoded_batch(arrays: list[np.ndarray], params: torch.Tensor | None = None, fmt: str = "PNG"):
    """Images -> the EncodedBatch a DataLoader worker would collate (bytes for JPEG, decoded for PNG)."""
    items = []
    for k, arr in enumerate(arrays):
        buffer = io.BytesIO()
        Image.fromarray(arr).save(buffer, fmt)
        raw = buffer.getvalue()
        data = torch.frombuffer(bytearray(raw), dtype=torch.uint8) if fmt == "JPEG" else \
            v2.functional.pil_to_tensor(Image.open(io.BytesIO(raw)).convert("RGB"))
        p = params[k] if params is not None else torch.rand(PARAMS, dtype=torch.float64)
        items.append((data, p, k))
    return collate_encoded(items)


def normalized(value: torch.Tensor) -> torch.Tensor:
    return (value / 255 - torch.tensor(SPEC.mean)) / torch.tensor(SPEC.std)


# ------------------------------------------------------------------------------- text batches
def test_length_grouped_order_keeps_every_sample_and_cuts_padding() -> None:
    rng = random.Random(0)
    lengths = [rng.randint(5, 120) for _ in range(1000)]
    grouped = EpochSampler(1000, seed=1, lengths=lengths, batch_size=8)
    plain = EpochSampler(1000, seed=1)
    order = grouped.order(0)
    assert sorted(order) == list(range(1000))  # a permutation: every sample once
    assert order == grouped.order(0) and order != grouped.order(1)  # a function of (seed, epoch)
    assert padded_tokens(order, lengths, 8) < 0.7 * padded_tokens(plain.order(0), lengths, 8)
    assert lengths[order[0]] == max(lengths)  # the largest shape comes first
    starts = [lengths[order[k]] for k in range(0, 1000, 8)]
    assert starts != sorted(starts, reverse=True)  # batches are shuffled, not a length curriculum


def test_length_grouping_resumes_mid_epoch_and_shards_by_global_batch() -> None:
    lengths = [(i * 37) % 90 + 3 for i in range(50)]
    full = EpochSampler(50, seed=2, lengths=lengths, batch_size=4)
    full.set_epoch(1)
    order = list(full)
    assert len(order) == 50 and len(order[-2:]) == 2  # 12 batches of 4, then the short one of 2
    resumed = EpochSampler(50, seed=2, lengths=lengths, batch_size=4)
    resumed.resume_at(1, 12)  # three batches were trained on before the checkpoint
    resumed.set_epoch(1)
    assert list(resumed) == order[12:]
    # two ranks with batches of 2 make up exactly the single-process grouped batches of 4
    ranks = [EpochSampler(50, seed=2, rank=r, world=2, lengths=lengths, batch_size=2).order(1) for r in range(2)]
    single = full.order(1)
    for b in range(12):
        assert sorted(ranks[0][2 * b : 2 * b + 2] + ranks[1][2 * b : 2 * b + 2]) == sorted(single[4 * b : 4 * b + 4])


def write_varied_text(path: Path, n: int) -> Path:
    """Sentences of 2-60 words, label by the first word: lengths vary as in real reviews."""
    rng = random.Random(0)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        for i in range(n):
            label = "pos" if i % 2 else "neg"
            words = ["great" if label == "pos" else "awful"] + rng.choices(["the", "film", "plot", "was"],
                                                                            k=rng.randint(1, 60))
            writer.writerow([" ".join(words), label])
    return path


def text_data(train: Path, backbone: Path, group: bool) -> ClassificationData:
    cfg = Config.model_validate({"task": "text_classification", "model": {"backbone": str(backbone)},
                                 "data": {"train": str(train), "max_length": 64, "group_by_length": group},
                                 "train": {"batch_size": 8}})
    splits = load_splits(cfg)
    data = ClassificationData(cfg, splits, build_backbone(cfg.task, cfg.model, cfg.data, len(splits.classes)))
    data.setup()
    return data


def test_text_loader_groups_lengths_with_few_shapes_and_leaves_validation_alone(tmp_path: Path,
                                                                              tiny_bert_dir: Path) -> None:
    train = write_varied_text(tmp_path / "train.csv", 400)
    grouped, plain = text_data(train, tiny_bert_dir, True), text_data(train, tiny_bert_dir, False)
    shapes = [inputs["input_ids"].shape[1] for inputs, _ in grouped.train_dataloader()]
    assert all(length % 16 == 0 and length <= 64 for length in shapes) and len(set(shapes)) <= 4
    tokens = lambda data: sum(x["input_ids"].numel() for x, _ in data.train_dataloader())  # noqa: E731
    assert tokens(grouped) < 0.8 * tokens(plain)
    assert sum(len(y) for _, y in grouped.train_dataloader()) == len(grouped.datasets["train"])
    # validation: dataset order, batch-longest padding, as before
    for (a, ya), (b, yb) in zip(grouped.val_dataloader(), plain.val_dataloader()):
        assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(ya, yb)


# -------------------------------------------------------------------------- worker-side reads
def test_workers_send_plain_jpeg_bytes_and_decode_the_rest(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 255, (20, 30, 3), dtype=np.uint8)
    plain = save_image(tmp_path / "a.jpg", arr)
    gray = save_image(tmp_path / "g.jpg", arr[..., 0])
    png = save_image(tmp_path / "b.png", arr)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    rotated = tmp_path / "r.jpg"
    Image.fromarray(arr).save(rotated, exif=exif)
    assert read_encoded(plain).ndim == 1 and read_encoded(gray).ndim == 1  # nvJPEG-decodable: bytes only
    assert torch.equal(read_encoded(png), torch.from_numpy(arr).permute(2, 0, 1))
    assert read_encoded(rotated).shape == (3, 30, 20)  # decoded here, EXIF orientation applied


def test_sample_randomness_is_a_function_of_seed_epoch_and_index(tmp_path: Path) -> None:
    paths = [str(save_image(tmp_path / f"{i}.png", np.full((8, 8, 3), i % 256, np.uint8))) for i in range(400)]
    data = SeededSamples(EncodedImageDataset(paths, np.zeros(400, dtype=np.int64)), seed=5)
    assert torch.equal(data[(1, 3)][1], data[(1, 3)][1]) and not torch.equal(data[(1, 3)][1], data[(2, 3)][1])
    flips = np.mean([float(data[(0, i)][1][-1] < 0.5) for i in range(400)])
    assert 0.42 < flips < 0.58  # ~half the samples are flipped


# ------------------------------------------------------------------------ device-side augment
def test_crop_boxes_lie_inside_the_image_within_scale_and_ratio() -> None:
    sizes = torch.tensor([[64, 64], [40, 120], [300, 90]]).repeat_interleave(300, 0)
    boxes = crop_boxes(sizes, torch.rand(len(sizes), PARAMS, dtype=torch.float64), min_scale=0.25)
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= sizes[:, 1]).all() and (boxes[:, 3] <= sizes[:, 0]).all()
    assert (w >= 1).all() and (h >= 1).all() and torch.equal(boxes, boxes.round())  # whole pixels
    area = w * h / (sizes[:, 0] * sizes[:, 1])
    assert area.max() <= 1 and area.min() > 0.2 and area.min() < 0.4  # scale in [0.25, 1], up to rounding
    assert ((w / h) > 0.7).all() and ((w / h) < 1.43).all()
    # nothing fits a 4x400 strip: the centred fallback, as torchvision computes it
    strip = torch.zeros(1, 3, 4, 400)
    assert crop_boxes(torch.tensor([[4, 400]]), torch.rand(1, PARAMS, dtype=torch.float64), 0.25).tolist() == \
        [[197.0, 0.0, 202.0, 4.0]]
    assert v2.RandomResizedCrop.get_params(strip, [0.25, 1.0], [3 / 4, 4 / 3]) == (0, 197, 4, 5)


def test_crop_resize_reads_only_the_box_and_matches_antialiased_resize() -> None:
    two_tone = torch.zeros(3, 64, 64, dtype=torch.uint8)
    two_tone[:, :, 32:] = 255
    smooth = v2.functional.gaussian_blur(torch.randint(0, 256, (3, 48, 80), dtype=torch.uint8), [9, 9])
    boxes = torch.tensor([[32, 0, 64, 64], [0, 0, 32, 64], [0, 0, 80, 48]], dtype=torch.float64)
    out = crop_resize([two_tone, two_tone, smooth], boxes, 16)  # padded together: 64x80
    assert (out[0] == 255).all() and (out[1] == 0).all()  # right half, left half: nothing from outside
    reference = v2.functional.resize(smooth, [16, 16], antialias=True).float()
    assert (out[2] - reference).abs().mean() < 3  # of 255: a box filter close to torchvision's antialias


def test_device_augment_output_is_normalized_and_ignores_padding() -> None:
    # a small flat image batched with larger noisy ones: every crop of it must be exactly its colour
    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 255, (70, 50, 3), dtype=np.uint8), np.full((20, 25, 3), (200, 30, 90), np.uint8),
              rng.integers(0, 255, (33, 90, 3), dtype=np.uint8)]
    inputs, targets = DeviceAugment(SPEC, min_scale=0.25)(encoded_batch(arrays), CPU)
    pixels = inputs["pixel_values"]
    assert pixels.shape == (3, 3, 32, 32) and pixels.dtype == torch.float32 and targets.tolist() == [0, 1, 2]
    expected = normalized(torch.tensor([200.0, 30.0, 90.0]))
    assert torch.allclose(pixels[1], expected[:, None, None].expand(3, 32, 32), atol=1e-5)
    noise = pixels[[0, 2]]
    assert abs(float(noise.mean())) < 1.0 and pixels.min() >= normalized(torch.zeros(3)).min() - 1e-5


def test_device_augment_is_deterministic_and_flips_only_when_drawn() -> None:
    rng = np.random.default_rng(1)
    arrays = [rng.integers(0, 255, (40, 40, 3), dtype=np.uint8) for _ in range(2)]
    params = torch.rand(2, PARAMS, dtype=torch.float64)
    params[:, -1] = 0.9  # no flip
    augment = DeviceAugment(SPEC, min_scale=0.25)
    batch = encoded_batch(arrays, params, fmt="JPEG")
    first, again = augment(batch, CPU)[0]["pixel_values"], augment(batch, CPU)[0]["pixel_values"]
    assert torch.equal(first, again)
    flipped = params.clone()
    flipped[0, -1] = 0.1  # flip the first image only
    out = augment(encoded_batch(arrays, flipped, fmt="JPEG"), CPU)[0]["pixel_values"]
    assert torch.equal(out[0], first[0].flip(-1)) and torch.equal(out[1], first[1])
    assert not torch.equal(out[0], first[0])


@pytest.mark.gpu
def test_cuda_decode_and_crop_match_the_cpu_path() -> None:
    rng = np.random.default_rng(2)
    arrays = [rng.integers(0, 255, (h, w, 3), dtype=np.uint8) for h, w in [(120, 90), (64, 200), (300, 300)]]
    batch = encoded_batch(arrays, fmt="JPEG")
    augment = DeviceAugment(SPEC, min_scale=0.25)
    cpu = augment(batch, CPU)[0]["pixel_values"]
    cuda = augment(batch, torch.device("cuda"))[0]["pixel_values"]
    assert cuda.device.type == "cuda" and cuda.shape == cpu.shape
    assert (cuda.cpu() - cpu).abs().mean() < 0.05  # nvJPEG vs libjpeg rounding only, same crops


# ------------------------------------------------------------------------------- data.decode
def test_decode_mode_resolution(image_dir: Path) -> None:
    def cfg(decode: str, augment: str = "standard") -> Config:
        return Config.model_validate({"task": "image_classification", "data": {"train": str(image_dir),
                                      "decode": decode}, "finetune": {"augment": augment}})

    paths = [str(p) for p in image_dir.rglob("*.*")]  # half JPEG, half PNG
    expected_auto = "gpu" if torch.cuda.is_available() else "cpu"
    assert resolve_decode(cfg("auto"), paths) == expected_auto and resolve_decode(cfg("cpu"), paths) == "cpu"
    assert resolve_decode(cfg("gpu"), paths) == "gpu"
    with pytest.warns(UserWarning, match="data.decode=gpu: finetune.augment=strong"):
        assert resolve_decode(cfg("gpu", "strong"), paths) == "cpu"
    assert resolve_decode(cfg("auto"), [p for p in paths if p.endswith(".png")]) == "cpu"


class InputRecorder(Callback):
    def __init__(self) -> None:
        self.shapes: set[tuple] = set()
        self.decode = ""

    def on_train_batch_start(self, trainer, module, batch, batch_idx: int) -> None:
        inputs, _ = batch
        self.shapes.add((tuple(inputs["pixel_values"].shape), inputs["pixel_values"].dtype))
        self.decode = trainer.datamodule.decode


def test_tiny_model_learns_with_device_decode_on_cpu(image_dir: Path, tmp_path: Path) -> None:
    from deepship.config import load_config
    from deepship.training import fit

    # from scratch, BatchNorm's running statistics need ~50 steps before validation leaves chance
    raw = image_config(image_dir, tmp_path / "runs", max_epochs=10)
    raw["data"]["decode"] = "gpu"
    recorder = InputRecorder()
    run = fit(load_config(write_config(tmp_path / "c.yaml", raw)), [recorder])
    assert recorder.decode == "gpu"
    assert recorder.shapes <= {((8, 3, 32, 32), torch.float32), ((2, 3, 32, 32), torch.float32)}
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["val"]["accuracy"] >= 1 / 3 + 0.3, metrics["val"]  # chance is 1/3


# ------------------------------------------------------------------------------ uint8 memmap cache
def photo_files(folder: Path, sizes: list[tuple[int, int]], seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    return [str(save_image(folder / f"{k}.jpg", rng.integers(0, 256, (h, w, 3), dtype=np.uint8), quality=90))
            for k, (w, h) in enumerate(sizes)]


def test_cache_holds_the_runtimes_pixels_and_is_built_once(tmp_path: Path) -> None:
    from deepship.data import cache
    from deepship.runtime.preprocess import load_image, preprocess_image

    spec = ImageSpec.for_size(24)  # resize_size 27: odd, so the centre offsets are tested too
    paths = photo_files(tmp_path / "img", [(40, 30), (31, 50), (27, 27), (64, 33)])
    path = cache.cache_path(tmp_path / "out", paths, spec)
    assert cache.build_image_cache(paths, spec, path, progress=False) == path
    array = np.load(path, mmap_mode="r")
    assert array.shape == (4, 27, 27, 3) and array.dtype == np.uint8
    # the centre crop of a cached square is, pixel for pixel, the serving preprocessing (augment none)
    dataset = cache.CachedImageDataset(path, np.arange(4), cache.cached_transform(spec, "none"))
    for i, p in enumerate(paths):
        expected = torch.from_numpy(preprocess_image(load_image(p), spec))
        torch.testing.assert_close(dataset[i][0], expected, atol=1e-5, rtol=0)
    # a second build finds it; a changed file gets a new cache (the key hashes sizes and mtimes)
    stamp = path.stat().st_mtime_ns
    assert cache.build_image_cache(paths, spec, path, progress=False) == path and path.stat().st_mtime_ns == stamp
    Path(paths[0]).touch()
    assert cache.cache_path(tmp_path / "out", paths, spec) != path
    # a truncated file is rebuilt, not trusted
    path.write_bytes(path.read_bytes()[:200])
    cache.build_image_cache(paths, spec, path, progress=False)
    assert np.load(path, mmap_mode="r").shape == (4, 27, 27, 3)
    assert [p.name for p in path.parent.iterdir() if not p.name.endswith(".lock")] == [path.name]  # no temp file


def test_concurrent_cache_builds_wait_for_each_other_and_decode_once(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Two builders of one cache (DDP ranks, two runs on the same data): one builds, the other finds its file."""
    import threading

    from deepship.data import cache

    paths = photo_files(tmp_path / "img", [(50, 40)] * 6)
    path = cache.cache_path(tmp_path / "out", paths, SPEC)
    decodes, real = [], cache._Decode.__getitem__

    def slow_decode(self, i):
        decodes.append(i)
        time.sleep(0.02)  # long enough for the builds to overlap
        return real(self, i)

    monkeypatch.setattr(cache._Decode, "__getitem__", slow_decode)
    results = []
    builders = [threading.Thread(target=lambda: results.append(cache.build_image_cache(paths, SPEC, path,
                                                                                       progress=False)))
                for _ in range(2)]
    for t in builders:
        t.start()
    for t in builders:
        t.join()
    assert results == [path, path] and sorted(decodes) == list(range(6))  # one build, not two
    assert np.load(path, mmap_mode="r").shape == (6, SPEC.resize_size, SPEC.resize_size, 3)


def test_a_cache_that_does_not_fit_on_disk_is_refused_before_writing(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil
    from collections import namedtuple

    from deepship.data import cache
    from deepship.errors import ConfigError

    paths = photo_files(tmp_path / "img", [(50, 40)] * 3)
    path = cache.cache_path(tmp_path / "out", paths, SPEC)
    path.parent.mkdir(parents=True)
    stale = path.with_name(f"{cache.temp_path(path).name}.12345")
    stale.write_bytes(b"a killed build's partial file")
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda _: usage(10**6, 10**6 - 100, 100))
    with pytest.raises(ConfigError, match=r"data\.cache: 3 images at 37x37 need 0\.0 GiB in .*, which has 0\.0 GiB free"):
        cache.build_image_cache(paths, SPEC, path, progress=False)
    assert not path.exists() and not stale.exists()  # nothing half-written; the old leftover removed


def test_cached_training_samples_are_random_crops_of_the_cached_square(tmp_path: Path) -> None:
    from deepship.data import cache

    paths = photo_files(tmp_path / "img", [(80, 60)] * 3)
    path = cache.build_image_cache(paths, SPEC, cache.cache_path(tmp_path, paths, SPEC), workers=2, progress=False)
    dataset = SeededSamples(cache.CachedImageDataset(path, np.array([0, 1, 2]),
                                                     cache.cached_transform(SPEC, "standard")), seed=0)
    image, target = dataset[(0, 1)]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32 and target == 1
    assert torch.equal(dataset[(0, 1)][0], image)  # a function of (seed, epoch, index), as without the cache
    assert not torch.equal(dataset[(1, 1)][0], image)  # another epoch, another crop


def test_tiny_model_learns_from_the_cache_and_a_second_run_reuses_it(image_dir: Path, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from deepship.config import load_config
    from deepship.data import cache
    from deepship.training import fit

    builds = []
    real_decode = cache._Decode.__getitem__
    monkeypatch.setattr(cache._Decode, "__getitem__", lambda self, i: builds.append(i) or real_decode(self, i))
    runs = []
    for name in ("a", "b"):
        raw = image_config(image_dir, tmp_path / "runs", max_epochs=10 if name == "a" else 1, run_name=name)
        raw["data"]["cache"] = True
        runs.append(fit(load_config(write_config(tmp_path / f"{name}.yaml", raw))))
    files = list((tmp_path / "runs" / ".cache").glob("*.npy"))
    assert len(files) == 1 and len(builds) == np.load(files[0], mmap_mode="r").shape[0]  # decoded once, not twice
    metrics = json.loads((runs[0] / "metrics.json").read_text())
    assert metrics["val"]["accuracy"] >= 1 / 3 + 0.3, metrics["val"]  # chance is 1/3


def test_cache_on_text_is_a_config_error(text_csv: Path, tiny_bert_dir: Path, tmp_path: Path,
                                         capsys: pytest.CaptureFixture) -> None:
    from deepship import cli
    from conftest import text_config

    raw = text_config(text_csv, tiny_bert_dir, tmp_path / "runs")
    raw["data"]["cache"] = True
    assert cli.main(["train", "--config", str(write_config(tmp_path / "c.yaml", raw))]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("error: data.cache: caches decoded images")
