"""Read labeled samples from folders and tables into one modality-neutral shape.

A `Samples` holds inputs (texts, or image file paths) and their label strings; everything after
this point (label maps, splits, datasets) works on it for image and text alike.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from deepship.config import DEMO_PREFIX, DataConfig, Task
from deepship.errors import DataError

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
TABLE_READERS = {".csv": "from_csv", ".tsv": "from_csv", ".jsonl": "from_json", ".json": "from_json",
                 ".parquet": "from_parquet", ".pq": "from_parquet"}


@dataclass(frozen=True)
class Samples:
    inputs: list[str]  # texts, or absolute image paths
    labels: list[str]
    source: str  # where they came from, for messages

    def __len__(self) -> int:
        return len(self.inputs)

    def subset(self, indices: Sequence[int]) -> "Samples":
        return Samples([self.inputs[i] for i in indices], [self.labels[i] for i in indices], self.source)


def resolve_source(source: str) -> Path:
    """Map `demo:NAME/REST` to a generated dataset on disk; other sources are plain paths."""
    if source.startswith(DEMO_PREFIX):
        from deepship.data.demo import materialize_demo

        name, _, rest = source[len(DEMO_PREFIX) :].partition("/")
        return materialize_demo(name) / rest
    return Path(source)


def read_samples(source: str, task: Task, cfg: DataConfig) -> Samples:
    path = resolve_source(source)
    if not path.exists():
        raise DataError(f"{source}: not found; give an existing folder or file")
    if task == "image_classification":
        samples = read_image_folder(path) if path.is_dir() else read_image_table(path, cfg)
    else:
        if path.is_dir():
            raise DataError(f"{path}: is a folder; text data must be a CSV, JSONL or Parquet file")
        samples = _samples_from_columns(path, cfg.text_column, cfg.label_column)
    if len(samples) == 0:
        raise DataError(f"{path}: contains no samples; check the file or the column names")
    return samples


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
    return Samples(inputs, labels, str(root))


def read_image_table(path: Path, cfg: DataConfig) -> Samples:
    """CSV/JSONL/Parquet with a path column (relative to the table's folder) and a label column."""
    samples = _samples_from_columns(path, cfg.path_column, cfg.label_column)
    base = path.resolve().parent
    resolved = [str((base / p).resolve()) for p in samples.inputs]
    for row, file in enumerate(resolved):
        if not Path(file).is_file():
            raise DataError(f"{path} row {row + 2}: image '{samples.inputs[row]}' not found "
                            "(paths are relative to the table's folder)")
    return Samples(resolved, samples.labels, str(path))


def _read_table(path: Path) -> "datasets.Dataset":  # noqa: F821
    import datasets  # local: the torch-free runtime must not pull in datasets

    reader = TABLE_READERS.get(path.suffix.lower())
    if reader is None:
        raise DataError(f"{path}: unsupported file type '{path.suffix}'; use one of {sorted(TABLE_READERS)}")
    datasets.disable_progress_bars()
    kwargs = {"delimiter": "\t"} if path.suffix.lower() == ".tsv" else {}
    try:
        return getattr(datasets.Dataset, reader)(str(path), keep_in_memory=True, **kwargs)
    except Exception as exc:  # datasets raises many types for malformed files
        raise DataError(f"{path}: cannot read as a table ({type(exc).__name__}: {exc})") from None


def _samples_from_columns(path: Path, input_column: str, label_column: str) -> Samples:
    table = _read_table(path)
    for key, column in (("input", input_column), ("label_column", label_column)):
        if column not in table.column_names:
            option = "data.label_column" if key == "label_column" else "data.text_column / data.path_column"
            raise DataError(f"{path}: no column '{column}'; columns are {table.column_names}; set {option}")
    inputs, labels = table[input_column], table[label_column]
    for row, (x, y) in enumerate(zip(inputs, labels)):
        if x is None or y is None or str(y).strip() == "":
            what = "input" if x is None else "label"
            # Row numbers count the header line as row 1, as a spreadsheet shows them.
            raise DataError(f"{path} row {row + 2}: missing {what}; fill it in or drop the row")
    return Samples([str(x) for x in inputs], [str(y).strip() for y in labels], str(path))
