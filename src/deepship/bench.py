"""Benchmarks: one JSON line per measurement, then a short table. Each figure comes with a baseline
measured in the same process, because shared machines are noisy and only ratios travel."""

from __future__ import annotations

import csv
import json
import random
import statistics
import tempfile
import time
from datetime import datetime, timezone
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


def rt_polarity_rows(data_dir: Path, seed: int = 0) -> list[tuple[str, str]]:
    """(text, label) for every rt-polarity sentence (latin-1 files), shuffled with `seed`."""
    rows = [(line.strip(), label) for label, suffix in (("positive", "pos"), ("negative", "neg"))
            for line in (data_dir / f"rt-polarity.{suffix}").read_text(encoding="latin-1").splitlines() if line.strip()]
    random.Random(seed).shuffle(rows)
    return rows


def write_csv_splits(rows: list[tuple[str, str]], out_dir: Path, sizes: dict[str, int]) -> list[Path]:
    """Consecutive, disjoint slices of `rows` as out_dir/<name>.csv (text,label)."""
    paths, start = [], 0
    for name, n in sizes.items():
        paths.append(out_dir / f"{name}.csv")
        with open(paths[-1], "w", newline="", encoding="utf-8") as f:
            csv.writer(f).writerows([("text", "label"), *rows[start : start + n]])
        start += n
    return paths


def split_rt_polarity(data_dir: Path, out_dir: Path, seed: int = 0) -> tuple[Path, Path]:
    """The fixed 80/20 random split (seed 0) of rt-polarity, written as train.csv / test.csv."""
    rows = rt_polarity_rows(data_dir, seed)
    cut = int(0.8 * len(rows))
    train, test = write_csv_splits(rows, out_dir, {"train": cut, "test": len(rows) - cut})
    return train, test


def tfidf_baseline(train: Path, test: Path) -> float:
    """Test accuracy of deepship.evaluation.baseline's TF-IDF + linear SVM, the reference to beat."""
    from deepship.evaluation.baseline import tfidf_accuracy

    read = lambda p: list(zip(*list(csv.reader(open(p, encoding="utf-8")))[1:]))  # noqa: E731
    (x_train, y_train), (x_test, y_test) = read(train), read(test)
    return tfidf_accuracy(x_train, y_train, x_test, y_test)


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



# --------------------------------------------------------------------------------- export
SENTENCE = "a gripping, beautifully acted film ."  # a short, real-looking review snippet


def latency_p50(predictors: dict[str, Any], runs: int, blocks: int = 4) -> dict[str, dict[str, float]]:
    """Batch 1, p50 ms: model only (session.run) and end to end (tokenize + run + softmax).

    Models take turns in blocks, not run by run: onnxruntime's idle threads spin for a moment after
    each run and would steal the 2 cores from the other model's next call.
    """
    times: dict[str, dict[str, list[float]]] = {k: {"model": [], "end_to_end": []} for k in predictors}
    for _ in range(blocks):
        for name, p in predictors.items():
            arrays = p.preprocess([SENTENCE])
            for i in range(runs // blocks + 5):
                t0 = time.perf_counter()
                p.run(arrays)
                t1 = time.perf_counter()
                p.predict([SENTENCE])
                t2 = time.perf_counter()
                if i >= 5:  # warm-up after the other model's turn
                    times[name]["model"].append((t1 - t0) * 1000)
                    times[name]["end_to_end"].append((t2 - t1) * 1000)
    return {n: {k: statistics.median(v) for k, v in t.items()} for n, t in times.items()}


def bench_export(data_dir: str = "../shared/data/rt-polarity", out_dir: str = "checkpoints/bench-export",
                 train_samples: int = 2000, val_samples: int = 1000, test_samples: int = 1000, epochs: int = 2,
                 runs: int = 200) -> list[dict[str, Any]]:
    """fp32 vs int8 packages of MiniLM fine-tuned briefly on rt-polarity: size, CPU latency, accuracy.

    Trains and exports twice through the CLI (both gates must pass), then measures both packages in
    this one process, alternating runs so machine noise hits both alike."""
    from deepship import cli
    from deepship.errors import ExportError
    from deepship.runtime.predictor import Predictor

    work = Path(out_dir)
    work.mkdir(parents=True, exist_ok=True)
    sizes = {"train": train_samples, "val": val_samples, "test": test_samples}
    train, val, test = write_csv_splits(rt_polarity_rows(Path(data_dir)), work, sizes)
    config = {"task": "text_classification",
              "data": {"train": str(train), "val": str(val), "test": str(test), "max_length": 64},
              "model": {"backbone": "all-MiniLM-L6-v2"},
              "train": {"max_epochs": epochs, "batch_size": 16, "lr": 1e-4, "accelerator": "cpu",
                        "out_dir": str(work / "runs"), "run_name": "minilm-rt", "overwrite": True}}
    (work / "config.yaml").write_text(json.dumps(config))  # JSON is YAML
    if cli.main(["train", "--config", str(work / "config.yaml")]) != 0:
        raise ExportError("bench export: training failed (see above)")
    packages = {"fp32": work / "pkg-fp32", "int8": work / "pkg-int8"}
    for name, out in packages.items():
        # rt-polarity is full of reviews near P=0.5, and which of them flip under int8 depends on the
        # trained weights: 98.4% / 97.8% agreement (2- / 1-thread training) at a 0.2-point accuracy
        # drop. The accuracy budget (1 point) is the gate that matters; agreement gets 97%.
        quantize = ["--quantize", "int8", "--min-agreement", "0.97"] if name == "int8" else []
        if cli.main(["export", "--run", str(work / "runs" / "minilm-rt"), "--out", str(out), "--overwrite", *quantize]):
            raise ExportError(f"bench export: the {name} export failed its gate (numbers above)")
    predictors = {name: Predictor.load(out) for name, out in packages.items()}
    with open(test, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    texts, labels = [r["text"] for r in rows], [r["label"] for r in rows]
    preds = {n: [x.label for b in range(0, len(texts), 64) for x in p.predict(texts[b : b + 64])]
             for n, p in predictors.items()}
    latency = latency_p50(predictors, runs)
    results = []
    for name, out in packages.items():
        parity = json.loads((out / "parity.json").read_text())
        results.append({"kind": "export", "precision": name, "size_bytes": (out / "model.onnx").stat().st_size,
                        "latency_ms_p50": round(latency[name]["model"], 3),
                        "latency_ms_p50_end_to_end": round(latency[name]["end_to_end"], 3),
                        "test_accuracy": sum(p == y for p, y in zip(preds[name], labels)) / len(labels),
                        "parity_max_abs_diff": parity["max_abs_diff"],
                        "parity_top1_agreement": parity["top1_agreement"], **sizes, "epochs": epochs})
    fp32, int8 = results
    results.append({"kind": "export_ratio", "int8_over_fp32_size": round(int8["size_bytes"] / fp32["size_bytes"], 3),
                    "int8_over_fp32_latency": round(int8["latency_ms_p50"] / fp32["latency_ms_p50"], 3),
                    "test_agreement": sum(a == b for a, b in zip(preds["fp32"], preds["int8"])) / len(texts)})
    return results


# ------------------------------------------------------------------------------- monitor
def write_synthetic_log(package_dir: Path, path: Path, rows: int, seed: int = 0) -> None:
    """`rows` prediction-log lines drawn from the package's own reference profile (no alert expected),
    one timestamp per second, in the record format serve writes."""
    import numpy as np

    from deepship.runtime.package import read_manifest

    manifest = read_manifest(package_dir)
    signals, labels = manifest["reference"]["signals"], manifest["labels"]
    rng = np.random.default_rng(seed)
    counts = np.array([signals["predicted_class"]["counts"][c] for c in labels], dtype=float)
    preds = rng.choice(len(labels), size=rows, p=counts / counts.sum())
    numeric = {k: rng.choice(v["sample"], size=rows) for k, v in signals.items() if v["kind"] == "numeric"}
    start = 1_790_000_000
    with open(path, "w", encoding="utf-8") as f:
        for i in range(rows):
            stats = {k: float(v[i]) for k, v in numeric.items() if k != "confidence"}
            f.write(json.dumps({"id": str(i), "label": labels[preds[i]], "confidence": float(numeric["confidence"][i]),
                                "abstained": False, "model_version": manifest["model_version"], "latency_ms": 5.0,
                                "ts": datetime.fromtimestamp(start + i, timezone.utc).isoformat(),
                                "probs": {}, "input_stats": stats}) + "\n")


def bench_monitor(package: str, rows: int = 1_000_000, window: int = 10_000,
                  out_dir: str = "checkpoints/bench-monitor") -> list[dict[str, Any]]:
    """Wall time of `monitor` on a prediction log of `rows` lines (read, windowed, tested, reported)."""
    from deepship.config import MonitorConfig
    from deepship.monitoring.monitor import run_monitor

    work = Path(out_dir)
    work.mkdir(parents=True, exist_ok=True)
    log = work / "predictions.jsonl"
    t0 = time.perf_counter()
    write_synthetic_log(Path(package), log, rows)
    written = time.perf_counter() - t0
    t0 = time.perf_counter()
    report = run_monitor(package, str(log), work / "report", MonitorConfig(window=window))
    seconds = time.perf_counter() - t0
    return [{"kind": "monitor", "rows": rows, "log_bytes": log.stat().st_size, "window": window,
             "windows": report["summary"]["windows"], "alerting_windows": report["summary"]["alerting_windows"],
             "monitor_seconds": round(seconds, 2), "rows_per_second": round(rows / seconds),
             "log_write_seconds": round(written, 2)}]


BENCHES: dict[str, Callable[..., list[dict[str, Any]]]] = {
    "data": bench_data, "finetune": bench_finetune, "export": bench_export, "monitor": bench_monitor}
