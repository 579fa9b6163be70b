"""Validate data before a GPU-hour is spent: quarantine bad samples, find duplicates, leakage across
splits, label conflicts and class imbalance, and fingerprint what training will actually see.

Everything found goes into one JSON-ready report (rendered by deepship.data.report); nothing here
raises for a bad sample: bad samples are listed, skipped and counted, and the caller decides
(`check_bad_fraction`) whether there are too many to go on.
"""

from __future__ import annotations

import hashlib
import io
import os
import warnings
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

from deepship.config import Config
from deepship.data.sources import Samples

EXAMPLES = 5  # examples kept per finding: enough for a person to see the pattern
REPORT_FORMAT = 1


@dataclass(frozen=True)
class SampleCheck:
    key: str  # duplicate key: hash of normalized text or of the image bytes
    exact: str  # fingerprint key: hash of the exact text or image bytes
    reason: str | None  # why the sample is quarantined; None when usable
    size: tuple[int, ...]  # text: (characters,); image: (width, height)


def _hash(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def normalize_text(text: str) -> str:
    """Case and whitespace do not make a different example."""
    return " ".join(text.lower().split())


def check_text(text: str, label: str) -> SampleCheck:
    reason = "missing label" if not label else "empty text" if not text.strip() else None
    return SampleCheck(_hash(normalize_text(text).encode()), _hash(text.encode()), reason, (len(text),))


def check_image(path: str, label: str, min_size: int) -> SampleCheck:
    """Decode fully (a truncated JPEG only fails at the end of the stream), with Pillow's bomb limit."""
    if not label:
        return SampleCheck("", "", "missing label", (0, 0))
    if not path or not os.path.isfile(path):
        return SampleCheck("", "", "missing file", (0, 0))
    data = Path(path).read_bytes()
    if not data:
        return SampleCheck("", "", "zero-byte file", (0, 0))
    key = _hash(data)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                size = img.size
                img.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        return SampleCheck(key, key, "decompression bomb (over Pillow's MAX_IMAGE_PIXELS)", (0, 0))
    except UnidentifiedImageError:
        return SampleCheck(key, key, "not an image (cannot identify the format)", (0, 0))
    except (OSError, SyntaxError, ValueError) as exc:
        return SampleCheck(key, key, f"truncated or corrupt image ({exc})", (0, 0))
    if min(size) < min_size:
        return SampleCheck(key, key, f"too small ({size[0]}x{size[1]} < data.min_image_size={min_size})", size)
    return SampleCheck(key, key, None, size)


def check_samples(samples: Samples, cfg: Config) -> list[SampleCheck]:
    if cfg.task == "text_classification":
        return [check_text(x, y) for x, y in zip(samples.inputs, samples.labels)]
    # Pillow releases the GIL while decoding, so threads scale on image checks.
    with ThreadPoolExecutor(max_workers=min(32, 2 * (os.cpu_count() or 1))) as pool:
        return list(pool.map(lambda xy: check_image(xy[0], xy[1], cfg.data.min_image_size),
                             zip(samples.inputs, samples.labels)))


# -------------------------------------------------------------------------------- findings
def find_duplicates(keys: Sequence[str], origins: Sequence[str]) -> dict[str, Any]:
    """Extra copies within one split (the first occurrence is not counted)."""
    first: dict[str, int] = {}
    examples, count = [], 0
    for i, k in enumerate(keys):
        if k in first:
            count += 1
            if len(examples) < EXAMPLES:
                examples.append([origins[first[k]], origins[i]])
        else:
            first[k] = i
    return {"count": count, "examples": examples}


def find_leakage(train_keys: dict[str, str], keys: Sequence[str], origins: Sequence[str]) -> tuple[list[int], dict]:
    """Indices of samples that also occur in training (by content), plus a report entry."""
    leaked = [i for i, k in enumerate(keys) if k in train_keys]
    examples = [{"sample": origins[i], "train": train_keys[keys[i]]} for i in leaked[:EXAMPLES]]
    return leaked, {"count": len(leaked), "examples": examples}


def find_label_conflicts(groups: Sequence[tuple[Sequence[str], Sequence[str], Sequence[str], Sequence[str]]]) -> dict:
    """The same content with different labels, across all splits."""
    labels_by_key: dict[str, Counter] = defaultdict(Counter)
    where: dict[str, list[str]] = defaultdict(list)
    shown: dict[str, str] = {}
    for keys, labels, origins, inputs in groups:
        for k, y, o, x in zip(keys, labels, origins, inputs):
            labels_by_key[k][y] += 1
            where[k].append(o)
            shown.setdefault(k, x)
    conflicts = [k for k, c in labels_by_key.items() if len(c) > 1]
    examples = [{"input": shown[k][:200], "labels": dict(labels_by_key[k]), "origins": where[k][:EXAMPLES]}
                for k in conflicts[:EXAMPLES]]
    return {"count": len(conflicts), "examples": examples}


def histogram(values: Sequence[float], bins: int = 30) -> dict[str, Any]:
    arr = np.asarray(values, dtype=np.float64)
    if arr.size == 0:
        return {"min": None, "p50": None, "p95": None, "max": None, "bins": [], "counts": []}
    counts, edges = np.histogram(arr, bins=bins)
    return {"min": float(arr.min()), "p50": float(np.percentile(arr, 50)), "p95": float(np.percentile(arr, 95)),
            "max": float(arr.max()), "bins": edges.round(3).tolist(), "counts": counts.tolist()}


def fingerprint(splits: dict[str, tuple[Sequence[str], Sequence[str]]]) -> str:
    """sha256 over (split, exact content hash, label), sorted: independent of file format and order."""
    lines = sorted(f"{name}\t{k}\t{y}" for name, (keys, labels) in splits.items() for k, y in zip(keys, labels))
    return "sha256:" + hashlib.sha256("\n".join(lines).encode()).hexdigest()


def balance_warnings(name: str, counts: Counter, classes: Sequence[str], cfg: Config) -> list[str]:
    out = [f"{name}: class '{c}' has {counts.get(c, 0)} examples (< data.min_per_class={cfg.data.min_per_class})"
           for c in classes if counts.get(c, 0) < cfg.data.min_per_class]
    present = [counts[c] for c in classes if counts.get(c, 0) > 0]
    if present and max(present) / min(present) > cfg.data.max_imbalance_ratio:
        out.append(f"{name}: class imbalance {max(present)}:{min(present)} exceeds data.max_imbalance_ratio="
                   f"{cfg.data.max_imbalance_ratio:g}; consider class weights or more data")
    return out


def new_report(cfg: Config) -> dict[str, Any]:
    d = cfg.data
    return {
        "format_version": REPORT_FORMAT,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "task": cfg.task,
        "settings": {"max_bad_fraction": d.max_bad_fraction, "min_per_class": d.min_per_class,
                     "max_imbalance_ratio": d.max_imbalance_ratio, "min_image_size": d.min_image_size,
                     "remove_leakage": d.remove_leakage, "label_map": d.label_map},
        "splits": {}, "quarantine": [], "leakage": {}, "warnings": [],
    }


def split_summary(samples: Samples, checks: Sequence[SampleCheck], text: bool) -> dict[str, Any]:
    reasons = Counter(c.reason.split(" (")[0] for c in checks if c.reason)
    good = [c for c in checks if c.reason is None]
    summary: dict[str, Any] = {"sources": samples.source, "read": len(samples), "quarantined": dict(reasons)}
    if text:
        summary["non_utf8"] = sum("\ufffd" in x for x in samples.inputs)  # decoded with replacement
        summary["text_length"] = histogram([c.size[0] for c in good])
        summary["truncated"] = None  # filled in once the tokenizer has seen the texts
    else:
        summary["image_width"] = histogram([c.size[0] for c in good])
        summary["image_height"] = histogram([c.size[1] for c in good])
    return summary
