"""Reading inputs from files: the one table reader behind training, predict, monitor and evaluate. Torch-free.

Every table format training accepts is read here, row by row, so a million-row file never sits in
memory whole: CSV/TSV through the csv module, JSONL line by line, Parquet in record batches (pyarrow,
imported only for Parquet: a serving host without it still reads the other formats). Bytes that are
not UTF-8 are replaced by U+FFFD; a leading byte-order mark (spreadsheet exports) is dropped.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any, Iterator, Sequence

from deepship.errors import DataError
from deepship.runtime.preprocess import IMAGE_EXTENSIONS

# suffix -> format; ".json" is JSON Lines, or one JSON array of records
TABLE_FORMATS = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json",
                 ".parquet": "parquet", ".pq": "parquet"}
PARQUET_BATCH_ROWS = 4096


def accepted(suffixes: Sequence[str]) -> str:
    return "one of " + ", ".join(suffixes)


def table_format(path: Path) -> str:
    kind = TABLE_FORMATS.get(path.suffix.lower())
    if kind is None:
        raise DataError(f"{path}: unsupported file type '{path.suffix}'; use {accepted(list(TABLE_FORMATS))}")
    return kind


def row_location(path: Path, index: int) -> str:
    """How a person finds the 0-based `index`-th row: a CSV's header is row 1 (as a spreadsheet shows it),
    JSONL counts lines from 1 (blank lines are skipped, so this is exact only without them)."""
    kind = table_format(path)
    return f"row {index + 2}" if kind in ("csv", "tsv") else f"line {index + 1}" if kind == "jsonl" else f"row {index + 1}"


def table_rows(path: Path, required: Sequence[str] = (), optional: Sequence[str] = ()) -> Iterator[dict[str, Any]]:
    """The rows of a CSV, TSV, JSONL, JSON or Parquet table as dicts, streamed. A Parquet file decodes only
    the `required` and `optional` columns when it has every required one (else all: the caller's
    missing-column message then lists what is there); other formats return whole rows."""
    kind = table_format(path)
    if kind in ("csv", "tsv"):
        return csv_rows(path, "\t" if kind == "tsv" else ",")
    if kind == "parquet":
        return parquet_rows(path, required, optional)
    return json_rows(path)


def csv_rows(path: Path, delimiter: str) -> Iterator[dict[str, Any]]:
    with open(path, newline="", encoding="utf-8-sig", errors="replace") as f:
        reader = csv.DictReader(f, delimiter=delimiter)
        try:
            yield from reader
        except csv.Error as exc:
            raise DataError(f"{path} row {reader.line_num}: not valid CSV ({exc}); fix the quoting of that row") from None


def json_rows(path: Path) -> Iterator[dict[str, Any]]:
    with open(path, encoding="utf-8-sig", errors="replace") as f:
        head = f.read(4096).lstrip()
        f.seek(0)
        if head.startswith("["):  # one JSON array of records: no way to stream it with the standard library
            try:
                rows = json.load(f)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
            yield from (check_record(path, "record", i + 1, row) for i, row in enumerate(rows))
            return
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path} line {number}: not valid JSON ({exc.msg}); one object per line") from None
            yield check_record(path, "line", number, row)


def check_record(path: Path, word: str, number: int, row: Any) -> dict[str, Any]:
    if not isinstance(row, dict):
        raise DataError(f"{path} {word} {number}: expected a JSON object with named fields, got {type(row).__name__}")
    return row


def import_parquet(path: Path) -> Any:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: reading Parquet needs pyarrow, which is not installed here; "
                        "pip install pyarrow, or give a CSV/JSONL file") from None
    return pq


def parquet_rows(path: Path, required: Sequence[str] = (), optional: Sequence[str] = ()) -> Iterator[dict[str, Any]]:
    pq = import_parquet(path)
    try:
        table = pq.ParquetFile(path)
    except Exception as exc:  # noqa: BLE001 - pyarrow raises ArrowInvalid, OSError, ... for broken files
        raise DataError(f"{path}: cannot read as Parquet ({type(exc).__name__}: {str(exc)[:200]})") from None
    names = table.schema_arrow.names
    wanted = None
    if required and all(c in names for c in required):
        wanted = list(dict.fromkeys([*required, *(c for c in optional if c in names)]))
    for batch in table.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=wanted):
        yield from batch.to_pylist()


def row_id(row: dict[str, Any], index: int, fallback: str | None = None) -> str:
    """The row's own `id` when it has one (0 included), else the given fallback or its 0-based index."""
    value = row.get("id")
    if value is None or value == "":
        return fallback if fallback is not None else str(index)
    return str(value)


def table_inputs(path: Path, column: str, id_is_input: bool = False) -> Iterator[tuple[str, Any]]:
    """(id, value of `column`) per row; the id is the row's `id`, else its 0-based index (or, with
    `id_is_input`, the value itself: an image's path names it better than a number)."""
    for index, row in enumerate(table_rows(path, [column], ["id"])):
        if column not in row:
            where = f" {row_location(path, index)}" if index else ""
            raise DataError(f"{path}{where}: no column '{column}'; columns are {sorted(map(str, row))}; pass --column")
        value = row[column]
        yield row_id(row, index, str(value) if id_is_input else None), value


def text_lines(path: Path) -> Iterator[tuple[str, str]]:
    """(line number, line) of a plain text file, one input per line; blank lines carry nothing to predict."""
    with open(path, encoding="utf-8-sig", errors="replace") as f:
        for number, line in enumerate(f, start=1):
            line = line.rstrip("\r\n")
            if line.strip():
                yield str(number), line


def image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())


def labeled_rows(path: Path, label_column: str = "label", key_column: str = "id") -> Iterator[tuple[str, str, str]]:
    """(row location, key, label) of a labels table (monitor --labels), any table format."""
    for index, row in enumerate(table_rows(path, [key_column, label_column])):
        if key_column not in row or label_column not in row:
            raise DataError(f"{path}: needs columns {key_column} and {label_column} (has {sorted(map(str, row))})")
        yield row_location(path, index), str(row[key_column]), str(row[label_column])
