"""The data side of `deepship retrain`: labeled production inputs -> a training file and a decision set.

The prediction log is read and joined with the delayed labels exactly as `monitor --labels` does it
(deepship.monitoring.monitor). The most recent labeled inputs (by the log's `ts`) become the decision
set, which the registry's promotion gate scores both models on and which is never trained on; the rest
becomes a training file added to the champion's training sources.
"""

from __future__ import annotations

import base64
import csv
import io
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from deepship.config import Config, SourceConfig
from deepship.data.sources import Samples, read_split
from deepship.data.validate import check_samples, find_leakage
from deepship.errors import DataError
from deepship.files import atomic_write_text
from deepship.monitoring.monitor import is_prediction_log, join_labels, read_log
from deepship.runtime.batch import read_inputs
from deepship.runtime.modality import Modality

PNG_MAGIC = b"\x89PNG"
NO_RAW_INPUTS = ("holds no raw inputs (`predict --output` never writes them, `serve` only with --log-inputs); "
                 "pass --inputs FILE, the file the predictions were made on, or serve with --log-inputs")


@dataclass(frozen=True)
class LabeledBatch:
    """Logged inputs that got a label, in log order."""

    ids: list[str]
    inputs: list[str]  # text, image path, or (serve --log-inputs, images) base64 bytes
    labels: list[str]
    ts: np.ndarray | None  # seconds since the epoch; None when the log has no usable timestamps
    encoded: bool = False  # inputs are base64 images (a serve --log-inputs log of an image model)

    def __len__(self) -> int:
        return len(self.ids)

    def take(self, index: Sequence[int]) -> "LabeledBatch":
        return LabeledBatch([self.ids[i] for i in index], [self.inputs[i] for i in index],
                            [self.labels[i] for i in index], None if self.ts is None else self.ts[list(index)],
                            self.encoded)


def read_labeled_log(log: Path, labels_file: Path, classes: Sequence[str], modality: Modality,
                     inputs_file: Path | None = None) -> LabeledBatch:
    """The log's predictions that the labels file labels, with their raw inputs (the log's own `input`
    field, else the inputs file's rows by id, as `predict` numbered them)."""
    if not log.is_file():
        raise DataError(f"--log {log}: not found; give the prediction log (serve --log or predict --output)")
    if not is_prediction_log(log):
        raise DataError(f"--log {log}: not a prediction log (JSONL records with label, confidence and probs)")
    current = join_labels(read_log(log, classes, ()), labels_file, classes)
    known = np.flatnonzero(current.targets >= 0)
    raw = current.inputs if current.inputs is not None else inputs_by_id(inputs_file, modality, log, current.ids, known)
    ts = current.ts
    if ts is not None and np.isnan(ts).any():
        ts = None  # some records lack a time: the log's own order is the only order there is
    return LabeledBatch([current.ids[i] for i in known], [str(raw[i]) for i in known],
                        [classes[current.targets[i]] for i in known], None if ts is None else ts[known],
                        encoded=current.inputs is not None and modality.name == "image")


def inputs_by_id(inputs_file: Path | None, modality: Modality, log: Path, ids: list[str],
                 wanted: np.ndarray) -> list[str]:
    if inputs_file is None:
        raise DataError(f"--log {log}: {NO_RAW_INPUTS}")
    table = dict(read_inputs(inputs_file, modality))
    missing = [ids[i] for i in wanted if ids[i] not in table]
    if missing:
        raise DataError(f"--inputs {inputs_file}: no input with id {missing[0]!r} ({len(missing)} labeled ids missing); "
                        "give the file the logged predictions were made on")
    return [table.get(i, "") for i in ids]


def recent_holdout(ts: np.ndarray | None, n: int, share: float) -> tuple[np.ndarray, np.ndarray]:
    """(train, decision) row indices: the round(share * n) most recent rows by ts (log order breaks ties,
    and is the order when there are no timestamps) are the decision set."""
    order = np.arange(n) if ts is None else np.argsort(ts, kind="stable")
    held = int(round(share * n))
    return np.sort(order[: n - held]), np.sort(order[n - held:])


def check_decision_classes(batch: LabeledBatch, decision: LabeledBatch, share: float) -> None:
    if not len(decision):
        raise DataError(f"--holdout {share:g} of {len(batch)} labeled inputs leaves an empty decision set; "
                        "raise --holdout or wait for more labels")
    missing = sorted(set(batch.labels) - set(decision.labels))
    if missing:
        raise DataError(f"the decision set (the {len(decision)} most recent labeled inputs) has no example of "
                        f"class {missing[0]!r}, so the gate could not judge it; raise --holdout or wait for more labels")


def sample_keys(samples: Samples, cfg: Config) -> list[str]:
    """The duplicate keys validation uses (normalized text, or the image's bytes)."""
    return [c.key for c in check_samples(samples, cfg)]


def remove_leakage(decision: LabeledBatch, training: Samples, cfg: Config) -> tuple[LabeledBatch, dict[str, Any]]:
    """Drop decision inputs that also occur in the training data: they would flatter whichever model saw them."""
    train_keys: dict[str, str] = {}
    for key, origin in zip(sample_keys(training, cfg), training.origins):
        train_keys.setdefault(key, origin)
    as_samples = Samples(decision.inputs, decision.labels, [f"log id {i}" for i in decision.ids], "decision set")
    leaked, entry = find_leakage(train_keys, sample_keys(as_samples, cfg), as_samples.origins)
    drop = set(leaked)
    return decision.take([i for i in range(len(decision)) if i not in drop]), entry


def training_samples(cfg: Config, sources: Sequence[SourceConfig], new: LabeledBatch) -> Samples:
    """Everything the challenger trains on: the configured sources plus the new labeled inputs."""
    logged = Samples(new.inputs, new.labels, [f"log id {i}" for i in new.ids], "new labeled inputs")
    return Samples.concat([read_split(sources, cfg.task, cfg.data), logged])


def materialize_images(batch: LabeledBatch, folder: Path) -> LabeledBatch:
    """Base64 images from a `serve --log-inputs` log -> files, so the batch is a table of paths."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, data in enumerate(batch.inputs):
        raw = base64.b64decode(data)
        suffix = ".png" if raw.startswith(PNG_MAGIC) else ".jpg"  # the reader goes by content; the name helps people
        path = folder / f"{index:07d}{suffix}"
        path.write_bytes(raw)
        paths.append(str(path.resolve()))
    return LabeledBatch(batch.ids, paths, batch.labels, batch.ts)  # encoded no more


def write_table(path: Path, batch: LabeledBatch, input_column: str, label_column: str) -> Path:
    """id, input, label as CSV (the config's column names), written atomically."""
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["id", input_column, label_column])
    writer.writerows(zip(batch.ids, batch.inputs, batch.labels))
    atomic_write_text(path, buf.getvalue())
    return path


def per_class(labels: Sequence[str], classes: Sequence[str]) -> dict[str, int]:
    counts = Counter(labels)
    return {c: counts.get(c, 0) for c in classes}


def time_range(batch: LabeledBatch) -> list[float] | None:
    return None if batch.ts is None or not len(batch) else [float(batch.ts.min()), float(batch.ts.max())]
