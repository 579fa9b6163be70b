"""Load a model package and predict with onnxruntime; torch-free (numpy, onnxruntime, tokenizers, Pillow).

`Predictor.load(dir)` checks the manifest's format version and every file's sha256 before building
the session, so a host never serves a model other than the one the manifest (and its parity gate)
describes. `predict_file` is the batch path behind `deepship predict`: files in, JSONL out.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence, TextIO

import numpy as np

from deepship.errors import DataError, PackageError
from deepship.runtime.preprocess import (
    IMAGE_EXTENSIONS,
    IMAGE_INPUT,
    ImageSpec,
    TextPreprocessor,
    TextSpec,
    load_image,
    preprocess_image,
    preprocess_images,
)

FORMAT_VERSION = 1
SUPPORTED_FORMAT_VERSIONS = (1,)
MANIFEST = "package.json"
MODEL_FILE = "model.onnx"
EMBEDDINGS_OUTPUT = "embeddings"


# ------------------------------------------------------------------------------------- package
def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_manifest(package_dir: Path) -> dict[str, Any]:
    path = package_dir / MANIFEST
    if not path.is_file():
        raise PackageError(f"{package_dir}: no {MANIFEST}; is this a deepship model package (deepship export)?")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise PackageError(f"{path}: not valid JSON ({exc}); re-export the package") from None
    version = manifest.get("format_version")
    if version not in SUPPORTED_FORMAT_VERSIONS:
        raise PackageError(f"{path}: format_version {version!r} is not supported by this deepship "
                           f"(supports {list(SUPPORTED_FORMAT_VERSIONS)}); upgrade deepship or re-export the package")
    return manifest


def verify_files(package_dir: Path, manifest: dict[str, Any]) -> None:
    """Every file the manifest lists must exist with the recorded sha256; the model must be listed."""
    files: dict[str, str] = manifest.get("files") or {}
    if MODEL_FILE not in files:
        raise PackageError(f"{package_dir / MANIFEST}: lists no sha256 for {MODEL_FILE}; re-export the package")
    for name, expected in sorted(files.items()):
        path = package_dir / name
        if not path.is_file():
            raise PackageError(f"{path}: missing from the package; re-export or copy the whole package folder")
        if sha256_file(path) != expected:
            raise PackageError(f"{path}: sha256 does not match {MANIFEST}; the file was modified or corrupted, "
                               "re-export or re-copy the package")


def build_session(model_path: Path, spinning: bool = True) -> "onnxruntime.InferenceSession":  # noqa: F821
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = os.cpu_count() or 1
    options.log_severity_level = 3  # quantized models warn about every folded node otherwise
    if not spinning:
        # Idle intra-op threads spin-wait for the next call by default: lowest latency for back-to-back
        # calls, but a server's event loop then competes with them for the cores between calls.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        return ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types for bad models
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise PackageError(f"{model_path}: onnxruntime cannot load it ({message[:300]}); re-export the package") from None


# ----------------------------------------------------------------------------------- predictor
@dataclass(frozen=True)
class Prediction:
    label: str
    confidence: float
    probs: dict[str, float]
    abstained: bool


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = logits.astype(np.float64) / temperature
    z -= z.max(axis=1, keepdims=True)  # (N, C); shift for exp overflow
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


class Predictor:
    """A verified package: raw inputs (texts, or image paths/bytes) -> logits, probabilities, labels."""

    def __init__(self, package_dir: Path, manifest: dict[str, Any], spinning: bool = True) -> None:
        self.package_dir, self.manifest = package_dir, manifest
        self.labels: list[str] = list(manifest["labels"])
        self.model_version: str = manifest["model_version"]
        self.temperature: float = (manifest.get("calibration") or {}).get("temperature") or 1.0
        self.thresholds: dict[str, Any] | None = manifest.get("thresholds")
        spec = manifest["preprocessing"]
        self.modality: str = spec["kind"]
        self.spec: ImageSpec | TextSpec = ImageSpec.from_dict(spec) if self.modality == "image" else TextSpec.from_dict(spec)
        self.text: TextPreprocessor | None = None
        if isinstance(self.spec, TextSpec):
            self.text = TextPreprocessor.from_file(package_dir / self.spec.tokenizer_file, self.spec)
        self.session = build_session(package_dir / MODEL_FILE, spinning)
        self.input_names = [i.name for i in self.session.get_inputs()]
        # Packages from export carry the head's input as a second output, for embedding drift.
        self.has_embeddings = EMBEDDINGS_OUTPUT in [o.name for o in self.session.get_outputs()]

    @classmethod
    def load(cls, package_dir: str | Path, spinning: bool = True) -> "Predictor":
        """Verify and load; `spinning=False` for servers (see build_session)."""
        package_dir = Path(package_dir)
        manifest = read_manifest(package_dir)
        verify_files(package_dir, manifest)
        return cls(package_dir, manifest, spinning)

    def preprocess(self, inputs: Sequence[Any]) -> dict[str, np.ndarray]:
        """Texts -> token arrays; image paths or bytes -> pixel_values; named as the model's inputs."""
        if self.text is not None:
            return self.text([str(t) for t in inputs])
        return preprocess_images(inputs, self.spec)

    def run(self, arrays: dict[str, np.ndarray]) -> np.ndarray:
        """Named model inputs -> logits (N, C) float32."""
        return self.session.run(["logits"], {name: arrays[name] for name in self.input_names})[0]

    def predict_logits(self, inputs: Sequence[Any]) -> np.ndarray:
        return self.run(self.preprocess(inputs))

    def prepare(self, inputs: Sequence[Any]) -> tuple[dict[str, np.ndarray], list[dict[str, Any]]]:
        """Model arrays and deepship.runtime.stats input statistics from ONE tokenization or decode
        per input: predict and monitor need both, and images are the expensive part of a batch."""
        from deepship.runtime.stats import image_stats, text_stats

        if self.text is not None:
            texts = [str(t) for t in inputs]
            encodings = self.text.tokenize(texts)
            return self.text.pad(encodings), text_stats(self.text, texts, encodings)
        images = [load_image(x) for x in inputs]
        arrays = {IMAGE_INPUT: np.stack([preprocess_image(img, self.spec) for img in images])}
        return arrays, [image_stats(img) for img in images]

    def input_stats(self, inputs: Sequence[Any]) -> list[dict[str, Any]]:
        """deepship.runtime.stats of raw inputs (texts, or image paths/bytes), without running the model."""
        from deepship.runtime.stats import image_stats, text_stats

        if self.text is not None:
            return text_stats(self.text, [str(t) for t in inputs])
        return [image_stats(load_image(x)) for x in inputs]

    def outputs_and_stats(self, inputs: Sequence[Any], batch_size: int = 32, show_progress: bool = False
                          ) -> tuple[np.ndarray, np.ndarray | None, list[dict[str, Any]]]:
        """Logits (N, C), penultimate embeddings (N, D) when the model exports them (else None), and
        the input statistics, batch by batch from one decode per input (export's reference, monitor)."""
        names = ["logits", EMBEDDINGS_OUTPUT] if self.has_embeddings else ["logits"]
        update = progress(len(inputs), enabled=show_progress and len(inputs) > 4 * batch_size)
        logits, embeddings, stats = [], [], []
        for batch in batched(inputs, batch_size):
            arrays, batch_stats = self.prepare(batch)
            out = self.session.run(names, {name: arrays[name] for name in self.input_names})
            logits.append(out[0])
            embeddings.append(out[-1])
            stats += batch_stats
            update(len(batch))
        return np.concatenate(logits), np.concatenate(embeddings) if self.has_embeddings else None, stats

    def batched_logits(self, inputs: Sequence[Any], batch_size: int = 32, show_progress: bool = False) -> np.ndarray:
        """Logits (N, C) for any number of inputs, `batch_size` at a time (memory stays bounded)."""
        update = progress(len(inputs), enabled=show_progress and len(inputs) > 4 * batch_size)
        chunks = []
        for batch in batched(inputs, batch_size):
            chunks.append(self.predict_logits(batch))
            update(len(batch))
        return np.concatenate(chunks)

    def predict_proba(self, inputs: Sequence[Any]) -> np.ndarray:
        return softmax(self.predict_logits(inputs), self.temperature)  # (N, C)

    def predict(self, inputs: Sequence[Any]) -> list[Prediction]:
        return self.decisions(self.predict_logits(inputs))

    def predict_with_stats(self, inputs: Sequence[Any]) -> list[tuple[Prediction, dict[str, Any]]]:
        """Predictions and deepship.runtime.stats input statistics from one tokenization (or decode) per input:
        the server logs the token signals without tokenizing its texts a second time."""
        arrays, stats = self.prepare(inputs)
        return list(zip(self.decisions(self.run(arrays)), stats))

    def predict_arrays(self, images: Sequence[np.ndarray]) -> list[Prediction]:
        """Images already through `preprocess_image` ((3, S, S) float32 each): the server preprocesses each
        upload in its request thread and batches only the model call."""
        return self.decisions(self.run({IMAGE_INPUT: np.stack(images)}))

    def decisions(self, logits: np.ndarray) -> list[Prediction]:
        """Logits (N, C) -> calibrated probabilities and the package's decision rule, one Prediction each."""
        probs = softmax(logits, self.temperature)  # (N, C)
        preds, confidence, abstained = decide(probs, self.labels, self.thresholds)
        return [Prediction(self.labels[p], float(c), dict(zip(self.labels, map(float, row))), bool(a))
                for p, c, a, row in zip(preds, confidence, abstained, probs)]


def decide(probs: np.ndarray, labels: Sequence[str], thresholds: dict[str, Any] | None
           ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The package's decision rule on calibrated probs (N, C): predicted index, its confidence and
    whether to abstain, each (N,). evaluate scores exactly this rule, so it lives once, here.

    - binary cost threshold: predict the positive class (index 1) iff P(positive) >= threshold;
    - per-class thresholds: abstain when the predicted class's confidence is below its threshold
      (a class with none, because no confidence reached the target on validation, always abstains);
    - otherwise a global `min_confidence`; a target that was infeasible on validation abstains on all.
    """
    preds = probs.argmax(1)
    rule = thresholds or {}
    cost = rule.get("cost")
    if cost and probs.shape[1] == 2:
        preds = (probs[:, 1] >= float(cost["threshold"])).astype(np.int64)
    confidence = probs[np.arange(len(preds)), preds]
    per_class = rule.get("per_class")
    if per_class:
        limits = np.array([np.inf if per_class.get(label) is None else float(per_class[label]) for label in labels])
        abstained = confidence < limits[preds]
    elif rule.get("min_confidence") is not None:
        abstained = confidence < float(rule["min_confidence"])
    else:
        abstained = np.full(len(preds), rule.get("basis") in ("target_precision", "target_coverage")
                            and not rule.get("feasible", True))
    return preds, confidence, abstained


# ------------------------------------------------------------------------- reading raw inputs
def read_text_inputs(path: Path, text_column: str = "text") -> list[tuple[str, str]]:
    """(id, text) pairs from CSV/TSV (column `text_column`), JSONL (key `text_column`) or plain text lines."""
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv"):
        with open(path, newline="", encoding="utf-8", errors="replace") as f:
            rows = list(csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ","))
    elif suffix in (".jsonl", ".ndjson"):
        rows = read_jsonl(path)
    else:  # one text per line; blank lines carry nothing to predict
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
        return [(str(i + 1), line) for i, line in enumerate(lines) if line.strip()]
    if rows and text_column not in rows[0]:
        raise DataError(f"{path}: no column '{text_column}'; columns are {sorted(rows[0])}; pass --column")
    return [(row_id(r, i), str(r[text_column])) for i, r in enumerate(rows)]


def row_id(row: dict[str, Any], index: int, fallback: str | None = None) -> str:
    """The row's own `id` when it has one (0 included), else the given fallback or its 0-based index."""
    value = row.get("id")
    if value is None or value == "":
        return fallback if fallback is not None else str(index)
    return str(value)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path} line {number}: not valid JSON ({exc.msg}); fix or drop the line") from None
            if not isinstance(row, dict):
                raise DataError(f"{path} line {number}: expected a JSON object with a text field")
            rows.append(row)
    return rows


def read_image_inputs(path: Path, path_column: str = "path") -> list[tuple[str, str]]:
    """(id, file) pairs from one image, a folder (recursive) or a CSV whose paths are relative to it."""
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
        return [(str(p.relative_to(path)), str(p)) for p in files]
    if path.suffix.lower() in IMAGE_EXTENSIONS:
        return [(path.name, str(path))]
    if path.suffix.lower() != ".csv":
        raise DataError(f"{path}: not an image, a folder or a CSV; give one of those for an image model")
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    if rows and path_column not in rows[0]:
        raise DataError(f"{path}: no column '{path_column}'; columns are {sorted(rows[0])}; pass --column")
    base = path.resolve().parent
    return [(row_id(r, i, r[path_column]), str(base / r[path_column])) for i, r in enumerate(rows)]


def read_inputs(path: Path, modality: str, column: str | None = None) -> list[tuple[str, str]]:
    if not path.exists():
        raise DataError(f"{path}: not found; give an existing file or folder as --input")
    if modality == "image":
        items = read_image_inputs(path, column or "path")
    elif path.is_dir():
        raise DataError(f"{path}: is a folder; a text model reads a CSV, JSONL or plain text file")
    else:
        items = read_text_inputs(path, column or "text")
    if not items:
        raise DataError(f"{path}: holds no inputs to predict")
    return items


# ------------------------------------------------------------------------------ batch predict
def batched(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def progress(total: int, enabled: bool) -> Callable[[int], None]:
    """tqdm when it is installed and worth showing; the runtime does not depend on it."""
    if not enabled:
        return lambda n: None
    try:
        from tqdm import tqdm
    except ImportError:
        return lambda n: None
    bar = tqdm(total=total, unit="input", file=sys.stderr, leave=False)
    return bar.update


def prediction_records(predictor: Predictor, items: Sequence[tuple[str, str]], batch_size: int) -> Iterable[dict[str, Any]]:
    """One DESIGN.md prediction record per input; latency_ms is the batch's wall time per input."""
    update = progress(len(items), enabled=len(items) > 4 * batch_size)
    for batch in batched(items, batch_size):
        start = time.perf_counter()
        arrays, stats = predictor.prepare([x for _, x in batch])  # stats: what `monitor` compares with the reference
        predictions = predictor.decisions(predictor.run(arrays))
        latency_ms = (time.perf_counter() - start) * 1000 / len(batch)
        ts = datetime.now(timezone.utc).isoformat()
        for (item_id, _), p, s in zip(batch, predictions, stats):
            yield {"id": item_id, "label": p.label, "confidence": p.confidence, "probs": p.probs,
                   "abstained": p.abstained, "model_version": predictor.model_version,
                   "latency_ms": round(latency_ms, 3), "ts": ts, "input_stats": s}
        update(len(batch))


def predict_file(package_dir: str | Path, input_path: str | Path, out: TextIO, batch_size: int = 32,
                 column: str | None = None) -> int:
    """Predict every input under `input_path`, write JSONL to `out`; returns the number written."""
    predictor = Predictor.load(package_dir)
    items = read_inputs(Path(input_path), predictor.modality, column)
    count = 0
    for record in prediction_records(predictor, items, batch_size):
        out.write(json.dumps(record) + "\n")
        count += 1
    return count
