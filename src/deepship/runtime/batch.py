"""`deepship predict`: a package and a file or folder of inputs -> one JSONL prediction record per input.

Inputs are read and predicted batch by batch (deepship.runtime.inputs streams every table format), so
peak memory does not grow with the number of inputs. Torch-free.
"""

from __future__ import annotations

import json
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Iterator, TextIO

from deepship.errors import DataError
from deepship.runtime.modality import Modality
from deepship.runtime.predictor import Predictor, batched, progress


def read_inputs(path: Path, modality: Modality, column: str | None = None) -> Iterator[tuple[str, str]]:
    """(id, input) pairs of a file or folder as `modality` reads it, streamed; none at all is a DataError."""
    if not path.exists():
        raise DataError(f"{path}: not found; give an existing file or folder as --input")
    items = modality.read_inputs(path, column)  # raises now for an unsupported file type

    def checked() -> Iterator[tuple[str, str]]:
        count = 0
        for item in items:
            count += 1
            yield item
        if not count:
            raise DataError(f"{path}: holds no inputs to predict")

    return checked()


def prediction_records(predictor: Predictor, items: Iterable[tuple[str, str]], batch_size: int,
                       show_progress: bool = False) -> Iterator[dict[str, Any]]:
    """One prediction record per input; latency_ms is the batch's wall time per input."""
    update = progress(None, enabled=show_progress)
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
    for record in prediction_records(predictor, items, batch_size, show_progress=sys.stderr.isatty()):
        out.write(json.dumps(record) + "\n")
        count += 1
    return count
