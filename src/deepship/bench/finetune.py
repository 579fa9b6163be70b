"""`bench finetune`: fine-tuning strategies on rt-polarity with the packaged MiniLM vs a TF-IDF baseline."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from deepship.bench.common import require_rt_polarity, rt_polarity_rows, write_csv_splits
from deepship.config import Config
from deepship.errors import ConfigError

FINETUNE_VARIANTS: dict[str, dict[str, Any]] = {
    "full": {"strategy": "full"},
    "freeze_then_unfreeze": {"strategy": "freeze_then_unfreeze", "unfreeze_epoch": 1, "head_lr": 1e-3},
    "layer_decay": {"strategy": "full", "layer_decay": 0.8, "head_lr": 2e-4},
}


def split_rt_polarity(data_dir: Path, out_dir: Path, seed: int = 0) -> tuple[Path, Path]:
    """The fixed 80/20 random split (seed 0) of rt-polarity, written as train.csv / test.csv."""
    rows = rt_polarity_rows(data_dir, seed)
    cut = int(0.8 * len(rows))
    train, test = write_csv_splits(rows, out_dir, {"train": cut, "test": len(rows) - cut})
    return train, test


def tfidf_baseline(train: Path, test: Path) -> float:
    """Test accuracy of deepship.evaluation.baseline's TF-IDF + linear SVM, the reference to beat."""
    from deepship.evaluation.baseline import tfidf_accuracy

    def read(path: Path) -> list[tuple[str, ...]]:
        with open(path, newline="", encoding="utf-8") as f:
            return list(zip(*list(csv.reader(f))[1:]))

    (x_train, y_train), (x_test, y_test) = read(train), read(test)
    return tfidf_accuracy(x_train, y_train, x_test, y_test)


def variant_config(name: str, train: Path, test: Path, out: Path, epochs: int) -> Config:
    return Config.model_validate({
        "task": "text_classification",
        "data": {"train": str(train), "test": str(test), "val_fraction": 0.1, "max_length": 64},
        "model": {"backbone": "all-MiniLM-L6-v2"},
        "finetune": {"warmup_ratio": 0.1, **FINETUNE_VARIANTS[name]},
        "train": {"max_epochs": epochs, "batch_size": 32, "lr": 1e-4, "seed": 0, "out_dir": str(out),
                  "run_name": name, "overwrite": True},
    })


def bench_finetune(data_dir: str | Path, out_dir: str = "checkpoints/bench-finetune", epochs: int = 2,
                   variants: str = ",".join(FINETUNE_VARIANTS)) -> list[dict[str, Any]]:
    """Each variant's test accuracy on the same split, beside the TF-IDF baseline's."""
    names = [v.strip() for v in variants.split(",") if v.strip()]
    unknown = sorted(set(names) - set(FINETUNE_VARIANTS))
    if unknown or not names:
        raise ConfigError(f"--variants {variants}: give a comma-separated subset of {','.join(FINETUNE_VARIANTS)}")
    folder = require_rt_polarity(data_dir, "finetune")
    import torch

    from deepship.training import fit

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    train, test = split_rt_polarity(folder, out)
    results = [{"kind": "finetune", "variant": "tfidf_linearsvc", "test_accuracy": tfidf_baseline(train, test)}]
    for name in names:
        metrics = json.loads((fit(variant_config(name, train, test, out, epochs)) / "metrics.json").read_text())
        results.append({"kind": "finetune", "variant": name, "test_accuracy": metrics["test"]["accuracy"],
                        "val_accuracy": metrics["val"]["accuracy"], "train_time_s": metrics["train_time_s"],
                        "epochs": epochs, "device": metrics["device"], "threads": torch.get_num_threads(),
                        "settings": FINETUNE_VARIANTS[name]})
        print(json.dumps(results[-1]), flush=True)
    return results
