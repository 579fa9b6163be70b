"""Benchmarks: one JSON line per measurement, then a short table. Each figure comes with a baseline
measured in the same process, because shared machines are noisy and only ratios travel."""

from __future__ import annotations

import csv
import json
import random
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from deepship.config import Config


def timed(fn: Callable[[], Any], repeats: int = 3) -> tuple[float, Any]:
    """Best wall time of `repeats` calls (the least disturbed one) and the last result."""
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def write_synthetic_text(path: Path, rows: int, seed: int = 0) -> Path:
    """Review-like rows with a few duplicates, empties and conflicts, so every check has work to do."""
    rng = random.Random(seed)
    words = [f"w{i}" for i in range(5000)]
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        for i in range(rows):
            text = " ".join(rng.choices(words, k=rng.randint(5, 40)))
            if i % 1000 == 1:
                text = ""  # quarantined
            writer.writerow([text, rng.choice(["pos", "neg", "neutral"])])
    return path


def bench_data(rows: int = 100_000) -> list[dict[str, Any]]:
    """Validation of `rows` text rows vs merely reading them (the baseline)."""
    from deepship.data.sources import read_split
    from deepship.data.split import load_validated

    with tempfile.TemporaryDirectory() as tmp:
        path = write_synthetic_text(Path(tmp) / "rows.csv", rows)
        cfg = Config.model_validate({"task": "text_classification",
                                     "data": {"train": str(path), "max_bad_fraction": 0.05}})
        read_s, _ = timed(lambda: read_split(cfg.data.train, cfg.task, cfg.data))
        total_s, (_, report) = timed(lambda: load_validated(cfg))
    return [{"kind": "data_validation", "rows": rows, "read_s": round(read_s, 3), "read_and_validate_s": round(total_s, 3),
             "rows_per_s": round(rows / total_s), "validate_over_read": round(total_s / read_s, 2),
             "quarantined": report["totals"]["quarantined"]}]




def print_results(results: list[dict[str, Any]]) -> None:
    for row in results:
        print(json.dumps(row))
    for row in results:
        print("  ".join(f"{k}={v}" for k, v in row.items()))


# ---------------------------------------------------------------------------- fine-tuning
FINETUNE_VARIANTS: dict[str, dict[str, Any]] = {
    "full": {"strategy": "full"},
    "freeze_then_unfreeze": {"strategy": "freeze_then_unfreeze", "unfreeze_epoch": 1, "head_lr": 1e-3},
    "layer_decay": {"strategy": "full", "layer_decay": 0.8, "head_lr": 2e-4},
}


def split_rt_polarity(data_dir: Path, out_dir: Path, seed: int = 0) -> tuple[Path, Path]:
    """The fixed 80/20 random split (seed 0) of rt-polarity, written as train.csv / test.csv."""
    rows = [(line, label) for label, suffix in (("positive", "pos"), ("negative", "neg"))
            for line in (data_dir / f"rt-polarity.{suffix}").read_text(encoding="latin-1").splitlines() if line.strip()]
    random.Random(seed).shuffle(rows)
    cut = int(0.8 * len(rows))
    paths = []
    for name, part in (("train", rows[:cut]), ("test", rows[cut:])):
        path = out_dir / f"{name}.csv"
        with open(path, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(["text", "label"])
            writer.writerows(part)
        paths.append(path)
    return paths[0], paths[1]


def tfidf_baseline(train: Path, test: Path) -> float | None:
    """TF-IDF (1-2 grams) + LinearSVC, the reference a deep model must beat; None without scikit-learn."""
    try:
        from sklearn.feature_extraction.text import TfidfVectorizer
        from sklearn.svm import LinearSVC
    except ImportError:
        return None
    read = lambda p: list(zip(*list(csv.reader(open(p, encoding="utf-8")))[1:]))  # noqa: E731
    (x_train, y_train), (x_test, y_test) = read(train), read(test)
    vectorizer = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True)
    model = LinearSVC().fit(vectorizer.fit_transform(x_train), y_train)
    return float((model.predict(vectorizer.transform(x_test)) == list(y_test)).mean())


def bench_finetune(data_dir: str = "../shared/data/rt-polarity", out_dir: str = "checkpoints/bench-finetune",
                   epochs: int = 2, variants: str = ",".join(FINETUNE_VARIANTS)) -> list[dict[str, Any]]:
    """Fine-tuning strategies on rt-polarity with the packaged MiniLM vs the TF-IDF baseline."""
    import torch

    from deepship.training import fit

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    train, test = split_rt_polarity(Path(data_dir), out)
    results = [{"kind": "finetune", "variant": "tfidf_linearsvc", "test_accuracy": tfidf_baseline(train, test)}]
    for name in variants.split(","):
        cfg = Config.model_validate({
            "task": "text_classification",
            "data": {"train": str(train), "test": str(test), "val_fraction": 0.1, "max_length": 64},
            "model": {"backbone": "all-MiniLM-L6-v2"},
            "finetune": {"warmup_ratio": 0.1, **FINETUNE_VARIANTS[name]},
            "train": {"max_epochs": epochs, "batch_size": 32, "lr": 1e-4, "seed": 0, "out_dir": str(out),
                      "run_name": name, "overwrite": True},
        })
        metrics = json.loads((fit(cfg) / "metrics.json").read_text())
        results.append({"kind": "finetune", "variant": name, "test_accuracy": metrics["test"]["accuracy"],
                        "val_accuracy": metrics["val"]["accuracy"], "train_time_s": metrics["train_time_s"],
                        "epochs": epochs, "device": metrics["device"], "threads": torch.get_num_threads(),
                        "settings": FINETUNE_VARIANTS[name]})
        print(json.dumps(results[-1]), flush=True)
    return results


BENCHES: dict[str, Callable[..., list[dict[str, Any]]]] = {"data": bench_data, "finetune": bench_finetune}
