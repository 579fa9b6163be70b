"""deepship.runtime.predictor: loading (hashes, format version), dynamic shapes, and no torch at run time."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from deepship.errors import PackageError
from deepship.runtime.predictor import Predictor

from conftest import FORBIDDEN_IN_RUNTIME, copy_package, rewrite_manifest, run_val_samples

TEXTS = ["the movie was great", "awful boring plot", "really quite a delightful story " * 3]


def image_files(run_dir: Path, n: int) -> list[str]:
    val = run_val_samples(run_dir).inputs
    return [val[i % len(val)] for i in range(n)]


# -------------------------------------------------------------------------------- dynamic shapes
def test_image_batches_of_1_and_33_match_row_by_row(image_package: Path, tiny_image_run: Path) -> None:
    predictor = Predictor.load(image_package)
    files = image_files(tiny_image_run, 33)
    batch = predictor.predict_logits(files)
    assert batch.shape == (33, 3)
    singles = np.concatenate([predictor.predict_logits([f]) for f in files[:5]])
    np.testing.assert_allclose(batch[:5], singles, atol=1e-5)
    predictions = predictor.predict(files)
    assert len(predictions) == 33 and {p.label for p in predictions} <= {"red", "green", "blue"}


def test_text_sequence_length_is_dynamic_and_padding_does_not_change_logits(text_package: Path) -> None:
    predictor = Predictor.load(text_package)
    short = predictor.preprocess(TEXTS[:2])
    mixed = predictor.preprocess(TEXTS)
    assert short["input_ids"].shape == (2, 16) and mixed["input_ids"].shape == (3, 32)
    # the same two texts padded to 16 and to 32 give the same logits: the mask, not the shape, decides
    np.testing.assert_allclose(predictor.run(short), predictor.run(mixed)[:2], atol=1e-5)
    single = predictor.predict_logits(TEXTS[:1])
    assert single.shape == (1, 2)


def test_inputs_are_fed_by_name_not_position(text_package: Path) -> None:
    predictor = Predictor.load(text_package)
    assert predictor.input_names == ["input_ids", "attention_mask", "token_type_ids"]
    arrays = predictor.preprocess(TEXTS)
    reversed_order = dict(reversed(list(arrays.items())))
    np.testing.assert_array_equal(predictor.run(arrays), predictor.run(reversed_order))
    raw = predictor.session.run(["logits"], reversed_order)[0]  # onnxruntime itself binds by name
    np.testing.assert_array_equal(raw, predictor.run(arrays))


def test_predictions_are_probabilities_and_never_abstain_without_thresholds(text_package: Path) -> None:
    predictor = Predictor.load(text_package)
    for p in predictor.predict(TEXTS):
        assert set(p.probs) == {"neg", "pos"}
        assert sum(p.probs.values()) == pytest.approx(1.0, abs=1e-6)
        assert p.confidence == max(p.probs.values()) and p.label == max(p.probs, key=p.probs.get)
        assert p.abstained is False


def test_calibration_temperature_from_the_manifest_softens_probabilities(text_package: Path, tmp_path: Path) -> None:
    def with_temperature(t: float) -> Path:
        package = copy_package(text_package, tmp_path / f"pkg-{t}")
        manifest = json.loads((package / "package.json").read_text())
        manifest["calibration"]["temperature"] = t
        rewrite_manifest(package, manifest)  # a re-sealed decision rule, as a re-export writes it
        return package

    plain, warm = Predictor.load(with_temperature(1.0)).predict(TEXTS), Predictor.load(with_temperature(4.0)).predict(TEXTS)
    assert [p.label for p in plain] == [p.label for p in warm]
    assert all(w.confidence < p.confidence for p, w in zip(plain, warm) if p.confidence > 0.51)


# --------------------------------------------------------------------------------- refusals
def test_modified_model_is_refused(text_package: Path, tmp_path: Path) -> None:
    package = copy_package(text_package, tmp_path / "pkg")
    with open(package / "model.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(PackageError, match=r"model\.onnx: sha256 does not match package\.json; the file was modified"):
        Predictor.load(package)


def test_modified_tokenizer_is_refused(text_package: Path, tmp_path: Path) -> None:
    package = copy_package(text_package, tmp_path / "pkg")
    (package / "tokenizer" / "tokenizer.json").unlink()
    with pytest.raises(PackageError, match=r"tokenizer\.json: missing from the package"):
        Predictor.load(package)


@pytest.mark.parametrize("version", [2, None, "1"])
def test_unknown_format_version_is_refused(text_package: Path, tmp_path: Path, version) -> None:
    package = copy_package(text_package, tmp_path / "pkg")
    manifest = json.loads((package / "package.json").read_text())
    manifest["format_version"] = version
    rewrite_manifest(package, manifest)
    with pytest.raises(PackageError, match=rf"format_version {version!r} is not supported.*supports \[1\]"):
        Predictor.load(package)


def test_a_folder_without_manifest_is_refused(tmp_path: Path) -> None:
    with pytest.raises(PackageError, match="no package.json"):
        Predictor.load(tmp_path)


# ------------------------------------------------------------------------------- torch-free
TORCH_FREE_CHECK = """
import io, json, sys
from deepship import cli
from deepship.runtime.predictor import Predictor
predictor = Predictor.load(sys.argv[1])
print(predictor.predict(json.loads(sys.argv[2]))[0].label, file=sys.stderr)
code = cli.main(["predict", "--package", sys.argv[1], "--input", sys.argv[3], "--output", sys.argv[4]])
forbidden = json.loads(sys.argv[5])
loaded = sorted(m for m in sys.modules if any(m == f or m.startswith(f + ".") for f in forbidden))
print(json.dumps({"code": code, "loaded": loaded}))
"""


@pytest.mark.parametrize("kind", ["text", "image"])
def test_loading_and_predicting_imports_no_torch(kind: str, text_package: Path, image_package: Path,
                                                 tiny_image_run: Path, tmp_path: Path) -> None:
    if kind == "text":
        package, inputs = text_package, TEXTS
        source = tmp_path / "in.txt"
        source.write_text("\n".join(TEXTS))
    else:
        package, inputs = image_package, image_files(tiny_image_run, 2)
        source = Path(inputs[0])
    result = subprocess.run(
        [sys.executable, "-c", TORCH_FREE_CHECK, str(package), json.dumps(inputs), str(source),
         str(tmp_path / "out.jsonl"), json.dumps(FORBIDDEN_IN_RUNTIME)],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report == {"code": 0, "loaded": []}
    assert len((tmp_path / "out.jsonl").read_text().splitlines()) == (3 if kind == "text" else 1)
