"""deepship.runtime.inputs and the modalities' readers: every table format training accepts, streamed;
unknown formats and a missing pyarrow are one clear line and exit 2."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from deepship import cli
from deepship.errors import DataError
from deepship.runtime.batch import read_inputs
from deepship.runtime.modality import modality_for
from deepship.runtime.preprocess import ImageSpec, TextSpec

TEXT = modality_for(TextSpec().to_dict())  # reading needs no tokenizer
IMAGE = modality_for(ImageSpec.for_size(32).to_dict())

# The rows every text table below holds, and what reading them must give: the `id` column when a row
# has one (0 included), else the row's 0-based position.
ROWS = [{"id": "a1", "text": "great film, really", "label": "pos"},
        {"id": "", "text": 'awful "plot"', "label": "neg"},
        {"id": "0", "text": "café scene", "label": "pos"}]
EXPECTED = [("a1", "great film, really"), ("1", 'awful "plot"'), ("0", "café scene")]


def write_table(path: Path) -> Path:
    """ROWS in the format the suffix names, written by hand (not by the reader under test)."""
    suffix = path.suffix
    if suffix == ".csv":
        path.write_text('id,text,label\na1,"great film, really",pos\n,"awful ""plot""",neg\n0,café scene,pos\n')
    elif suffix == ".tsv":
        path.write_text('id\ttext\tlabel\na1\tgreat film, really\tpos\n\t"awful ""plot"""\tneg\n0\tcafé scene\tpos\n')
    elif suffix in (".jsonl", ".ndjson"):
        path.write_text("\n".join(json.dumps(r) for r in ROWS) + "\n\n")  # a trailing blank line is no row
    elif suffix == ".json":
        path.write_text(json.dumps(ROWS, indent=1))
    else:
        pq.write_table(pa.table({k: [r[k] for r in ROWS] for k in ("id", "text", "label")}), path, row_group_size=2)
    return path


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".jsonl", ".ndjson", ".json", ".parquet", ".pq"])
def test_every_table_format_reads_the_same_rows(tmp_path: Path, suffix: str) -> None:
    path = write_table(tmp_path / f"in{suffix}")
    assert list(read_inputs(path, TEXT)) == EXPECTED


def test_plain_text_is_one_input_per_line_numbered_from_1(tmp_path: Path) -> None:
    path = tmp_path / "in.txt"
    path.write_bytes(b"first line\r\n\n  \nsecond \xff line\n")  # CRLF, blank lines, a byte that is not UTF-8
    assert list(read_inputs(path, TEXT)) == [("1", "first line"), ("4", "second \ufffd line")]


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_a_byte_order_mark_is_not_part_of_the_first_column_name(tmp_path: Path, suffix: str) -> None:
    path = write_table(tmp_path / f"in{suffix}")
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())  # what spreadsheet exports put first
    assert list(read_inputs(path, TEXT)) == EXPECTED


def test_an_image_table_resolves_paths_beside_it_in_any_format(tmp_path: Path) -> None:
    (tmp_path / "imgs").mkdir()
    pq.write_table(pa.table({"path": ["imgs/a.png", "imgs/b.jpg"]}), tmp_path / "list.parquet")
    assert list(read_inputs(tmp_path / "list.parquet", IMAGE)) == [
        ("imgs/a.png", str(tmp_path.resolve() / "imgs" / "a.png")),
        ("imgs/b.jpg", str(tmp_path.resolve() / "imgs" / "b.jpg"))]


def test_an_image_folder_is_read_recursively_and_skips_other_files(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    for name in ("b.png", "sub/a.JPG", "notes.txt"):
        (tmp_path / name).write_bytes(b"x")
    assert list(read_inputs(tmp_path, IMAGE)) == [("b.png", str(tmp_path / "b.png")),
                                                  ("sub/a.JPG", str(tmp_path / "sub" / "a.JPG"))]


def test_reading_is_lazy(tmp_path: Path) -> None:
    """A bad row far down the file is reached only when reading gets there: rows stream, not load."""
    path = tmp_path / "in.jsonl"
    path.write_text('{"text": "fine"}\n' * 1000 + "not json\n")
    rows = read_inputs(path, TEXT)
    assert next(rows) == ("0", "fine")
    with pytest.raises(DataError, match=r"in\.jsonl line 1001: not valid JSON"):
        list(rows)


@pytest.mark.parametrize("name, suffix", [("in.xml", ".xml"), ("noext", "")])
def test_an_unknown_file_type_is_exit_2_naming_the_accepted_formats(text_package: Path, tmp_path: Path, capsys,
                                                                   name: str, suffix: str) -> None:
    message = (f"unsupported file type '{suffix}'; a text model reads one of .csv, .tsv, .jsonl, .ndjson, .json, "
               ".parquet, .pq, .txt")
    (tmp_path / name).write_text("<texts><t>great film</t></texts>\n")
    out = tmp_path / "preds.jsonl"
    code = cli.main(["predict", "--package", str(text_package), "--input", str(tmp_path / name), "--output", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err == f"error: {tmp_path / name}: {message}"
    assert not out.exists()


def test_predict_reads_a_parquet_file_by_its_columns(text_package: Path, tmp_path: Path, capsys) -> None:
    path = write_table(tmp_path / "in.parquet")
    assert cli.main(["predict", "--package", str(text_package), "--input", str(path)]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["id"] for r in records] == ["a1", "1", "0"]
    assert [r["input_stats"]["chars"] for r in records] == [len(t) for _, t in EXPECTED]


def test_parquet_without_pyarrow_is_one_line_saying_what_to_install(text_package: Path, tmp_path: Path, capsys,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_table(tmp_path / "in.parquet")
    for name in ("pyarrow", "pyarrow.parquet"):
        monkeypatch.setitem(sys.modules, name, None)  # what `import pyarrow` meets on a host without it
    with pytest.raises(DataError, match="pip install pyarrow"):
        list(read_inputs(path, TEXT))
    assert cli.main(["predict", "--package", str(text_package), "--input", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {path}: reading Parquet needs pyarrow") and len(err.splitlines()) == 1


@pytest.mark.parametrize("name, content, message", [
    ("in.csv", "words,label\nhello,pos\n", "in.csv: no column 'text'; columns are ['label', 'words']; pass --column"),
    ("in.jsonl", '{"text": "a"}\n{"words": "b"}\n', "in.jsonl line 2: no column 'text'; columns are ['words']"),
    ("in.json", '[{"text": "a"}, 3]', "in.json record 2: expected a JSON object"),
    ("in.csv", "text\n", "in.csv: holds no inputs to predict"),
])
def test_bad_tables_name_the_file_and_row(tmp_path: Path, name: str, content: str, message: str) -> None:
    (tmp_path / name).write_text(content)
    with pytest.raises(DataError, match=message.replace("[", r"\[").replace("]", r"\]")):
        list(read_inputs(tmp_path / name, TEXT))


# ------------------------------------------------------------------ training reads the same tables
@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".jsonl", ".json", ".parquet"])
def test_training_reads_tables_through_the_same_reader(tmp_path: Path, suffix: str) -> None:
    from deepship.data.sources import read_table

    path = write_table(tmp_path / f"train{suffix}")
    samples = read_table(path, "text", "label")
    assert samples.inputs == [text for _, text in EXPECTED] and samples.labels == ["pos", "neg", "pos"]
    first = "row 2" if suffix in (".csv", ".tsv") else "line 1" if suffix == ".jsonl" else "row 1"
    assert samples.origins[0] == f"{path} {first}"


def test_training_names_class_label_ints_of_a_saved_hugging_face_dataset(tmp_path: Path) -> None:
    import datasets

    from deepship.data.sources import read_table

    features = datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(names=["neg", "pos"])})
    datasets.Dataset.from_dict({"text": ["a", "b", "c"], "label": [1, 0, -1]}, features=features).to_parquet(
        tmp_path / "saved.parquet")
    assert read_table(tmp_path / "saved.parquet", "text", "label").labels == ["pos", "neg", ""]
