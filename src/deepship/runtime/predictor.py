"""Load a model package and predict with onnxruntime; torch-free (numpy, onnxruntime, tokenizers, Pillow).

`Predictor.load(dir)` verifies the package (deepship.runtime.package) before building the session, so a
host never serves a model other than the one the manifest (and its parity gate) describes. What differs
between image and text lives in `Predictor.modality` (deepship.runtime.modality).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np

from deepship.runtime.modality import Modality, modality_for
from deepship.runtime.package import EMBEDDINGS_OUTPUT, MODEL_FILE, build_session, read_manifest, verify_files


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


def batched(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    """Consecutive lists of `size` items (the last shorter) from any iterable, read lazily."""
    iterator = iter(items)
    while batch := list(islice(iterator, size)):
        yield batch


def progress(total: int | None, enabled: bool) -> Callable[[int], Any]:
    """tqdm's `update` when tqdm is installed and a bar is worth showing; the runtime does not depend on it."""
    if not enabled:
        return lambda n: None
    try:
        from tqdm import tqdm
    except ImportError:
        return lambda n: None
    return tqdm(total=total, unit="input", file=sys.stderr, leave=False).update


class Predictor:
    """A verified package: raw inputs (texts, or image paths/bytes) -> logits, probabilities, labels."""

    def __init__(self, package_dir: Path, manifest: dict[str, Any], spinning: bool = True) -> None:
        self.package_dir, self.manifest = package_dir, manifest
        self.labels: list[str] = list(manifest["labels"])
        self.model_version: str = manifest["model_version"]
        self.temperature: float = (manifest.get("calibration") or {}).get("temperature") or 1.0
        self.thresholds: dict[str, Any] | None = manifest.get("thresholds")
        self.modality: Modality = modality_for(manifest["preprocessing"], package_dir)
        self.spec = self.modality.spec
        self.session = build_session(package_dir / MODEL_FILE, spinning)
        self.input_names = [i.name for i in self.session.get_inputs()]
        # Packages from export carry the head's input as a second output, for embedding drift.
        self.has_embeddings = EMBEDDINGS_OUTPUT in [o.name for o in self.session.get_outputs()]

    @classmethod
    def load(cls, package_dir: str | Path, spinning: bool = True) -> "Predictor":
        """Verify and load; `spinning=False` for servers (see deepship.runtime.package.build_session)."""
        package_dir = Path(package_dir)
        manifest = read_manifest(package_dir)
        verify_files(package_dir, manifest)
        return cls(package_dir, manifest, spinning)

    def preprocess(self, inputs: Sequence[Any]) -> dict[str, np.ndarray]:
        """Texts -> token arrays; image paths or bytes -> pixel_values; named as the model's inputs."""
        return self.modality.preprocess(inputs)

    def run(self, arrays: dict[str, np.ndarray]) -> np.ndarray:
        """Named model inputs -> logits (N, C) float32."""
        return self.session.run(["logits"], {name: arrays[name] for name in self.input_names})[0]

    def outputs(self, arrays: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray | None]:
        """Named model inputs -> logits (N, C) and the embeddings (N, D) when the model exports them."""
        names = ["logits", EMBEDDINGS_OUTPUT] if self.has_embeddings else ["logits"]
        out = self.session.run(names, {name: arrays[name] for name in self.input_names})
        return out[0], out[1] if self.has_embeddings else None

    def predict_logits(self, inputs: Sequence[Any]) -> np.ndarray:
        return self.run(self.preprocess(inputs))

    def prepare(self, inputs: Sequence[Any]) -> tuple[dict[str, np.ndarray], list[dict[str, Any]]]:
        """Model arrays and input statistics from ONE tokenization or decode per input: predict and
        monitor need both, and images are the expensive part of a batch."""
        return self.modality.prepare(inputs)

    def input_stats(self, inputs: Sequence[Any]) -> list[dict[str, Any]]:
        """deepship.runtime.stats of raw inputs (texts, or image paths/bytes), without running the model."""
        return self.modality.input_stats(inputs)

    def outputs_and_stats(self, inputs: Sequence[Any], batch_size: int = 32, show_progress: bool = False
                          ) -> tuple[np.ndarray, np.ndarray | None, list[dict[str, Any]]]:
        """Logits (N, C), penultimate embeddings (N, D) when the model exports them (else None), and
        the input statistics, batch by batch from one decode per input (export's reference, monitor)."""
        update = progress(len(inputs), enabled=show_progress and len(inputs) > 4 * batch_size)
        logits, embeddings, stats = [], [], []
        for batch in batched(inputs, batch_size):
            arrays, batch_stats = self.prepare(batch)
            batch_logits, batch_embeddings = self.outputs(arrays)
            logits.append(batch_logits)
            embeddings.append(batch_embeddings)
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

    def predict(self, inputs: Sequence[Any]) -> list[Prediction]:
        return self.decisions(self.predict_logits(inputs))

    def predict_batch(self, items: Sequence[Any]) -> list[tuple[Prediction, dict[str, Any] | None]]:
        """A serving batch in the form `modality.collate` takes (raw texts, or images already through
        `preprocess_image`: request threads preprocess each upload and only the model call is batched)
        -> predictions with the input statistics the batch computed (None where the request did)."""
        arrays, stats = self.modality.collate(items)
        return list(zip(self.decisions(self.run(arrays)), stats))

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
