"""Read labeled samples from folders, tables and Hugging Face datasets into one modality-neutral shape.

A `Samples` holds inputs (texts, or image file paths), their label strings and where each came
from; everything after this point (validation, label maps, splits, datasets) works on it for image
and text alike. Reading never judges the data: empty texts, missing labels and missing files pass
through as empty strings and are quarantined, counted and reported by `deepship.data.validate`.
"""

from __future__ import annotations

import json
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence
from unittest import mock
from urllib.parse import urlparse

from deepship.config import DEMO_PREFIX, HF_PREFIX, DataConfig, SourceConfig, Task
from deepship.errors import DataError
from deepship.runtime.inputs import TABLE_FORMATS, import_parquet, row_location, table_rows
from deepship.runtime.preprocess import IMAGE_EXTENSIONS


@dataclass(frozen=True)
class Samples:
    inputs: list[str]  # texts, or absolute image paths ("" when missing)
    labels: list[str]  # "" when missing
    origins: list[str]  # "file.csv row 7" or the image path: how a person finds the sample
    source: str  # the split's sources, for messages

    def __len__(self) -> int:
        return len(self.inputs)

    def subset(self, indices: Sequence[int]) -> "Samples":
        pick = lambda xs: [xs[i] for i in indices]  # noqa: E731
        return Samples(pick(self.inputs), pick(self.labels), pick(self.origins), self.source)

    @staticmethod
    def concat(parts: Sequence["Samples"]) -> "Samples":
        return Samples([x for p in parts for x in p.inputs], [y for p in parts for y in p.labels],
                       [o for p in parts for o in p.origins], " + ".join(p.source for p in parts))


def resolve_source(source: str) -> Path:
    """Map `demo:NAME/REST` to a generated dataset on disk; other sources are plain paths."""
    if source.startswith(DEMO_PREFIX):
        from deepship.data.demo import materialize_demo

        name, _, rest = source[len(DEMO_PREFIX) :].partition("/")
        return materialize_demo(name) / rest
    return Path(source)


def read_split(sources: Sequence[SourceConfig], task: Task, cfg: DataConfig) -> Samples:
    """Read and concatenate a split's sources, then apply `data.label_map`."""
    samples = Samples.concat([read_source(s, task, cfg) for s in sources])
    if cfg.label_map:
        samples = Samples(samples.inputs, [cfg.label_map.get(y, y) for y in samples.labels], samples.origins,
                          samples.source)
    return samples


def read_source(spec: SourceConfig, task: Task, cfg: DataConfig) -> Samples:
    label_column = spec.label_column or cfg.label_column
    if spec.path.startswith(HF_PREFIX):
        if task == "image_classification":
            raise DataError(f"{spec.path}: hf: sources are supported for text; save images to a folder or table")
        return _samples_from_hf(_read_hf(spec), f"{spec.path}[{spec.split}]", spec.text_column or cfg.text_column,
                                label_column)
    path = resolve_source(spec.path)
    if not path.exists():
        raise DataError(f"{spec.path}: not found; give an existing folder or file")
    if task == "image_classification":
        if path.is_dir():
            return read_image_folder(path)
        samples = read_table(path, spec.path_column or cfg.path_column, label_column)
        return _resolve_image_paths(samples, path)
    if path.is_dir():
        raise DataError(f"{path}: is a folder; text data must be a CSV, JSONL or Parquet file")
    return read_table(path, spec.text_column or cfg.text_column, label_column)


def read_image_folder(root: Path) -> Samples:
    """Class-per-folder layout: root/<label>/**/<image>."""
    inputs, labels = [], []
    for class_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        files = sorted(p for p in class_dir.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
        inputs += [str(p.resolve()) for p in files]
        labels += [class_dir.name] * len(files)
    if not inputs:
        raise DataError(
            f"{root}: no images found; expected one sub-folder per class holding "
            f"{'/'.join(sorted(IMAGE_EXTENSIONS))} files"
        )
    return Samples(inputs, labels, list(inputs), str(root))


def _resolve_image_paths(samples: Samples, table: Path) -> Samples:
    """Paths in a table are relative to the table's folder; missing files stay for validation."""
    base = table.resolve().parent
    resolved = [str((base / p).resolve()) if p else "" for p in samples.inputs]
    return Samples(resolved, samples.labels, samples.origins, samples.source)


def read_table(path: Path, input_column: str, label_column: str) -> Samples:
    """A local CSV/TSV/JSONL/JSON/Parquet table through the runtime's reader, the one predict, monitor
    and evaluate use (bytes that are not UTF-8 become U+FFFD, counted later by validation)."""
    class_names = _parquet_class_names(path, label_column)
    inputs, labels, origins = [], [], []
    for index, row in enumerate(table_rows(path, [input_column, label_column])):
        if index == 0:
            _check_columns(str(path), list(row), input_column, label_column)
        x, y = row.get(input_column), row.get(label_column)
        inputs.append("" if x is None else str(x))
        labels.append(_label_name(y, class_names))
        origins.append(f"{path} {row_location(path, index)}")
    return Samples(inputs, labels, origins, str(path))


def _parquet_class_names(path: Path, column: str) -> list[str] | None:
    """The class names of a label column that a Hugging Face dataset saved to Parquet as ClassLabel ints."""
    if TABLE_FORMATS.get(path.suffix.lower()) != "parquet":
        return None
    try:
        metadata = import_parquet(path).read_schema(path).metadata or {}
    except Exception:  # noqa: BLE001 - an unreadable file is reported by the reader, with its name
        return None
    features = json.loads(metadata.get(b"huggingface", b"{}")).get("info", {}).get("features", {})
    feature = features.get(column) or {}
    return feature.get("names") if feature.get("_type") == "ClassLabel" else None


def _label_name(value: Any, class_names: Sequence[str] | None) -> str:
    if value is None:
        return ""
    if class_names is not None and isinstance(value, int):
        return class_names[value] if 0 <= value < len(class_names) else ""
    return str(value).strip()


def hub_reachable(timeout: float = 3.0) -> bool:
    """One TCP connect to the hub: offline, datasets would otherwise retry with backoff for ~25 s."""
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _read_hf(spec: SourceConfig) -> Any:
    """`hf:NAME[:CONFIG]` through datasets; offline it uses the local cache or fails at once, clearly."""
    import datasets
    import datasets.config
    import huggingface_hub.constants

    name, _, config = spec.path[len(HF_PREFIX) :].partition(":")
    offline = datasets.config.HF_HUB_OFFLINE or not hub_reachable()
    try:
        with mock.patch.object(huggingface_hub.constants, "HF_HUB_OFFLINE", offline), \
                mock.patch.object(datasets.config, "HF_HUB_OFFLINE", offline):
            return datasets.load_dataset(name, config or None, split=spec.split)
    except Exception as exc:
        raise DataError(
            f"{spec.path} (split {spec.split}): cannot load from the Hugging Face hub ({type(exc).__name__}); "
            "offline? load it once on a connected machine (it is then cached) or save it as CSV/Parquet"
        ) from None


def _check_columns(name: str, columns: Sequence[str], input_column: str, label_column: str) -> None:
    for option, column in (("data.text_column / data.path_column", input_column), ("data.label_column", label_column)):
        if column not in columns:
            raise DataError(f"{name}: no column '{column}'; columns are {list(columns)}; set {option}")


def _samples_from_hf(table: Any, name: str, input_column: str, label_column: str) -> Samples:
    """A Hugging Face dataset split; ClassLabel columns hold ints: report and train on their names."""
    _check_columns(name, table.column_names, input_column, label_column)
    feature = table.features.get(label_column)
    names = feature.names if hasattr(feature, "int2str") else None
    inputs = ["" if x is None else str(x) for x in table[input_column]]
    labels = [_label_name(y, names) for y in table[label_column]]
    return Samples(inputs, labels, [f"{name} #{i}" for i in range(len(inputs))], name)
