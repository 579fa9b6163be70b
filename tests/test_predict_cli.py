"""`deepship predict` / scripts/predict.py: inputs from folders and tables, JSONL out, same answers as PyTorch."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest

from deepship import cli

from conftest import read_json, run_val_samples

ROOT = Path(__file__).resolve().parents[1]
RECORD_KEYS = {"id", "label", "confidence", "probs", "abstained", "model_version", "latency_ms", "ts", "input_stats"}


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def torch_probs(run_dir: Path, raw: list[str], package: Path) -> np.ndarray:
    """PyTorch's probabilities under the package's fitted temperature (the runtime applies it)."""
    from deepship.export.onnx import torch_logits
    from deepship.run import load_run
    from deepship.runtime.predictor import softmax

    temperature = read_json(package / "package.json")["calibration"]["temperature"]
    return softmax(torch_logits(load_run(run_dir), raw), temperature)


def test_script_writes_the_documented_schema_from_a_csv(text_package: Path, tmp_path: Path) -> None:
    source = tmp_path / "in.csv"
    with open(source, "w", newline="") as f:
        csv.writer(f).writerows([["id", "text"], ["a1", "the movie was great"], ["a2", "awful boring plot"]])
    out = tmp_path / "preds.jsonl"
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "predict.py"), "--package", str(text_package),
                             "--input", str(source), "--output", str(out)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "2 predictions written" in result.stderr
    records = read_jsonl(out)
    version = read_json(text_package / "package.json")["model_version"]
    assert [r["id"] for r in records] == ["a1", "a2"]
    for r in records:
        assert set(r) == RECORD_KEYS
        assert set(r["probs"]) == {"neg", "pos"} and sum(r["probs"].values()) == pytest.approx(1.0, abs=1e-6)
        assert r["label"] == max(r["probs"], key=r["probs"].get) and r["confidence"] == max(r["probs"].values())
        assert r["abstained"] is False and r["model_version"] == version and r["latency_ms"] > 0
        assert datetime.fromisoformat(r["ts"]).tzinfo is not None


def test_text_package_matches_pytorch_on_the_same_texts(text_package: Path, tiny_text_run: Path, tmp_path: Path) -> None:
    texts = run_val_samples(tiny_text_run).inputs
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in enumerate(texts)))
    out = tmp_path / "preds.jsonl"
    assert cli.main(["predict", "--package", str(text_package), "--input", str(source), "--output", str(out),
                     "--batch-size", "5"]) == 0
    records = read_jsonl(out)
    assert [r["id"] for r in records] == [str(i) for i in range(len(texts))]  # id 0 kept, not replaced
    expected = torch_probs(tiny_text_run, texts, text_package)
    labels = read_json(text_package / "package.json")["labels"]
    assert [r["label"] for r in records] == [labels[i] for i in expected.argmax(1)]
    got = np.array([[r["probs"][c] for c in labels] for r in records])
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_image_folder_matches_pytorch_on_the_same_files(image_package: Path, tiny_image_run: Path, tmp_path: Path) -> None:
    folder = tmp_path / "images"
    (folder / "sub").mkdir(parents=True)
    files = run_val_samples(tiny_image_run).inputs[:9]
    copies = []
    for i, f in enumerate(files):  # one nested: folders are read recursively
        dst = folder / ("sub" if i == 0 else "") / f"{i:02d}{Path(f).suffix}"
        dst.write_bytes(Path(f).read_bytes())
        copies.append(dst)
    (folder / "notes.txt").write_text("not an image")
    out = tmp_path / "preds.jsonl"
    assert cli.main(["predict", "--package", str(image_package), "--input", str(folder), "--output", str(out)]) == 0
    records = {r["id"]: r for r in read_jsonl(out)}
    assert len(records) == 9 and "sub/00" + Path(files[0]).suffix in records
    expected = torch_probs(tiny_image_run, [str(c) for c in copies], image_package)
    labels = read_json(image_package / "package.json")["labels"]
    for copy, probs in zip(copies, expected):
        record = records[copy.relative_to(folder).as_posix()]
        assert record["label"] == labels[int(probs.argmax())]
        assert record["confidence"] == pytest.approx(float(probs.max()), abs=1e-5)


def test_image_csv_paths_are_relative_to_the_csv(image_package: Path, tiny_image_run: Path, tmp_path: Path) -> None:
    src = Path(run_val_samples(tiny_image_run).inputs[0])
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / src.name).write_bytes(src.read_bytes())
    (tmp_path / "list.csv").write_text(f"path\nimgs/{src.name}\nimgs/{src.name}\n")
    out = tmp_path / "preds.jsonl"
    assert cli.main(["predict", "--package", str(image_package), "--input", str(tmp_path / "list.csv"),
                     "--output", str(out)]) == 0
    records = read_jsonl(out)
    assert [r["id"] for r in records] == [f"imgs/{src.name}"] * 2
    assert records[0]["probs"] == records[1]["probs"]


def test_plain_text_file_one_input_per_line(text_package: Path, tmp_path: Path, capsys) -> None:
    source = tmp_path / "in.txt"
    source.write_bytes("great wonderful film\n\nterrible caf\xe9 scene\n".encode("latin-1"))  # not UTF-8
    assert cli.main(["predict", "--package", str(text_package), "--input", str(source)]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["id"] for r in records] == ["1", "3"]  # line numbers; the blank line is skipped


@pytest.mark.parametrize("content, args, message", [
    ("words,label\nhello,pos\n", [], "no column 'text'; columns are ['label', 'words']; pass --column"),
    ('{"text": "fine"}\nnot json\n', [], "line 2: not valid JSON"),
])
def test_bad_text_input_is_exit_2_with_one_clear_line(text_package: Path, tmp_path: Path, capsys,
                                                      content: str, args: list, message: str) -> None:
    source = tmp_path / ("in.csv" if content.startswith("words") else "in.jsonl")
    source.write_text(content)
    code = cli.main(["predict", "--package", str(text_package), "--input", str(source), *args])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith(f"error: {source}") and message in err and len(err.splitlines()) == 1


def test_missing_input_and_tampered_package_are_exit_2(text_package: Path, tmp_path: Path, capsys) -> None:
    assert cli.main(["predict", "--package", str(text_package), "--input", str(tmp_path / "none.csv")]) == 2
    assert "none.csv: not found" in capsys.readouterr().err
    assert cli.main(["predict", "--package", str(tmp_path), "--input", str(tmp_path)]) == 2
    assert "no package.json" in capsys.readouterr().err


def test_undecodable_image_names_the_file(image_package: Path, tmp_path: Path, capsys) -> None:
    (tmp_path / "broken.png").write_bytes(b"not a png")
    assert cli.main(["predict", "--package", str(image_package), "--input", str(tmp_path)]) == 2
    assert "broken.png: cannot decode image" in capsys.readouterr().err
