"""deepship.export: ONNX export, the parity gate, int8 budgets and the manifest."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from deepship import cli

from conftest import SHARED_DATA, copy_package, export, read_json

ROOT = Path(__file__).resolve().parents[1]
RT_POLARITY = SHARED_DATA / "rt-polarity"


# --------------------------------------------------------------------------------- parity.json
def test_text_parity_covers_batches_and_short_and_max_length(text_package: Path) -> None:
    parity = read_json(text_package / "parity.json")
    assert parity["passed"] is True and parity["precision"] == "fp32"
    assert parity["batch_sizes"] == [1, 7, 32]
    assert parity["max_abs_diff"] <= 1e-4 and parity["gate"]["atol"] == 1e-4 and parity["gate"]["rtol"] == 1e-4
    assert 0 <= parity["embeddings_max_abs_diff"] <= 1e-3 and parity["within_tolerance"] is True
    assert parity["top1_agreement"] == 1.0
    cases = {c["name"]: c for c in parity["cases"]}
    assert set(cases) == {"batch_1", "batch_7", "validation", "short_texts", "max_length"}
    # tiny run: max_length 32, padding to multiples of 16 -> the gate saw two sequence lengths
    assert cases["max_length"]["shape"] == [7, 32]
    assert cases["short_texts"]["shape"] == [7, 16]
    assert parity["num_compared"] == 1 + 7 + 32 + 7 + 7
    assert parity["onnx_checker"].startswith("passed")


def test_image_parity_runs_real_images_at_each_batch_size(image_package: Path) -> None:
    parity = read_json(image_package / "parity.json")
    shapes = {c["name"]: c["shape"] for c in parity["cases"]}
    assert shapes == {"batch_1": [1, 3, 32, 32], "batch_7": [7, 3, 32, 32], "validation": [32, 3, 32, 32]}
    assert parity["max_abs_diff"] <= 1e-4 and parity["top1_agreement"] == 1.0


def test_onnx_graph_has_named_inputs_and_dynamic_axes(text_package: Path, image_package: Path) -> None:
    text = onnx.load(str(text_package / "model.onnx"))
    names = [i.name for i in text.graph.input]
    assert names == read_json(text_package / "package.json")["preprocessing"]["input_names"]
    for graph_input in text.graph.input:
        dims = [d.dim_param for d in graph_input.type.tensor_type.shape.dim]
        assert dims == ["batch", "sequence"]
    image = onnx.load(str(image_package / "model.onnx"))
    (pixels,) = image.graph.input
    assert pixels.name == "pixel_values"
    dims = pixels.type.tensor_type.shape.dim
    assert dims[0].dim_param == "batch" and [d.dim_value for d in dims[1:]] == [3, 32, 32]
    assert [o.name for o in image.graph.output] == ["logits", "embeddings"]  # the head's input, for the monitor
    embeddings = [d.dim_value for d in image.graph.output[1].type.tensor_type.shape.dim[1:]]
    assert embeddings == [1280]  # MobileNetV2's pooled features
    onnx.checker.check_model(str(image_package / "model.onnx"), full_check=True)


# ----------------------------------------------------------------------------------- manifest
def test_manifest_describes_the_run(text_package: Path, tiny_text_run: Path) -> None:
    manifest = read_json(text_package / "package.json")
    assert manifest["format_version"] == 1
    assert manifest["task"] == "text_classification"
    assert manifest["labels"] == json.loads((tiny_text_run / "labels.json").read_text())
    assert manifest["preprocessing"]["kind"] == "text" and manifest["preprocessing"]["max_length"] == 32
    assert manifest["calibration"]["temperature"] > 0 and manifest["calibration"]["fitted_on"].startswith("val")
    assert manifest["calibration"]["nll_after"] <= manifest["calibration"]["nll_before"]
    assert manifest["thresholds"] is None  # the tiny config sets no objective target
    run_metrics = json.loads((tiny_text_run / "metrics.json").read_text())
    assert manifest["metrics"]["val"] == run_metrics["val"]
    assert manifest["config"]["train"]["run_name"] == "tiny-text"
    assert {"torch", "onnx", "onnxruntime", "tokenizers", "transformers"} <= set(manifest["libraries"])
    assert manifest["training_data"]["fingerprint"] == run_metrics["data_fingerprint"]  # validation's, not a new one
    # every file but the manifest is hashed, and model_version names the run and the model's hash
    files = sorted(p.relative_to(text_package).as_posix() for p in text_package.rglob("*") if p.is_file())
    assert sorted(manifest["files"]) == [f for f in files if f != "package.json"]
    assert "tokenizer/tokenizer.json" in manifest["files"]
    for name, digest in manifest["files"].items():
        assert hashlib.sha256((text_package / name).read_bytes()).hexdigest() == digest
    assert manifest["model_version"] == f"tiny-text-{manifest['files']['model.onnx'][:12]}"


# ------------------------------------------------------------------------------ gate failures
def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir())


def test_parity_failure_exits_1_and_writes_nothing(tiny_text_run: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    import deepship.export.onnx as onnx_mod

    real = onnx_mod.torch_outputs

    def shifted(run, raw, batch_size=32):
        logits, embeddings = real(run, raw, batch_size)
        return logits + 1e-2, embeddings

    monkeypatch.setattr(onnx_mod, "torch_outputs", shifted)
    out = tmp_path / "pkg"
    code = cli.main(["export", "--run", str(tiny_text_run), "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 1
    assert "parity gate failed: logits max_abs_diff 0.01," in err and "atol 0.0001" in err
    assert leftovers(tmp_path) == []  # no package, no staging folder


def test_embeddings_that_differ_fail_the_gate(tiny_text_run: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    import deepship.export.onnx as onnx_mod

    real = onnx_mod.torch_outputs

    def shifted(run, raw, batch_size=32):  # the logits agree; only the exported embeddings do not
        logits, embeddings = real(run, raw, batch_size)
        return logits, embeddings + 1e-2

    monkeypatch.setattr(onnx_mod, "torch_outputs", shifted)
    code = cli.main(["export", "--run", str(tiny_text_run), "--out", str(tmp_path / "pkg")])
    err = capsys.readouterr().err
    assert code == 1
    assert "parity gate failed" in err and "embeddings max_abs_diff 0.01 " in err
    assert leftovers(tmp_path) == []


def test_a_disagreeing_validation_input_past_the_first_32_fails_the_gate(tiny_text_run: Path, text_package: Path,
                                                                          monkeypatch) -> None:
    import deepship.export.onnx as onnx_mod
    from deepship.errors import ExportError
    from deepship.run import load_run
    from deepship.runtime.predictor import Predictor

    val = [f"the movie number {i} was great" for i in range(300)]
    target = val[200]  # far past the first 32 inputs; inside the 256 the gate compares
    real = onnx_mod.torch_outputs

    def one_input_off(run, raw, batch_size=32):
        logits, embeddings = real(run, raw, batch_size)
        logits[[i for i, text in enumerate(raw) if text == target]] += 1.0
        return logits, embeddings

    monkeypatch.setattr(onnx_mod, "torch_outputs", one_input_off)
    predictor = Predictor.load(text_package)
    cases = onnx_mod.parity_cases(val, predictor.modality)
    report = onnx_mod.check_parity(load_run(tiny_text_run), predictor, cases)
    validation = next(c for c in report.cases if c.name == "validation")
    assert validation.num_inputs == 256 and report.num_compared == 1 + 7 + 256 + 7 + 7
    assert validation.within_tolerance is False and report.max_abs_diff == pytest.approx(1.0, abs=1e-3)
    with pytest.raises(ExportError, match="first failing case 'validation'"):
        onnx_mod.enforce_fp32_gate(report, onnx_mod.Tolerance())


# ---------------------------------------------------------------------------------- manifest
def canonical_sha256(manifest: dict) -> str:
    content = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    return hashlib.sha256(json.dumps(content, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
                          .encode("utf-8")).hexdigest()


def test_manifest_carries_the_sha256_of_its_own_canonical_json(text_package: Path) -> None:
    manifest = read_json(text_package / "package.json")
    assert manifest["manifest_sha256"] == canonical_sha256(manifest)


@pytest.mark.parametrize("key, value", [("labels", ["pos", "neg"]), ("thresholds", {"min_confidence": 0.99}),
                                        ("calibration", {"temperature": 9.0})])
def test_an_edited_manifest_is_refused_with_exit_2(text_package: Path, tmp_path: Path, capsys, key: str, value) -> None:
    from deepship.errors import PackageError
    from deepship.runtime.predictor import Predictor

    package = copy_package(text_package, tmp_path / "pkg")
    manifest = read_json(package / "package.json")
    manifest[key] = value
    (package / "package.json").write_text(json.dumps(manifest, indent=2))
    with pytest.raises(PackageError, match=r"package\.json: content does not match its manifest_sha256"):
        Predictor.load(package)
    (tmp_path / "in.txt").write_text("a fine film\n")
    assert cli.main(["predict", "--package", str(package), "--input", str(tmp_path / "in.txt")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {package / 'package.json'}: content does not match") and len(err.splitlines()) == 1


def test_a_package_without_manifest_hash_loads_with_a_warning(text_package: Path, tmp_path: Path, capsys) -> None:
    from deepship.runtime.predictor import Predictor

    package = copy_package(text_package, tmp_path / "pkg")
    manifest = read_json(package / "package.json")
    del manifest["manifest_sha256"]  # as exported before the manifest hashed itself
    (package / "package.json").write_text(json.dumps(manifest))
    assert Predictor.load(package).labels == ["neg", "pos"]
    assert "has no manifest_sha256" in capsys.readouterr().err


def test_export_refuses_an_existing_package_without_overwrite(text_package: Path, tiny_text_run: Path, capsys) -> None:
    before = (text_package / "package.json").read_bytes()
    code = cli.main(["export", "--run", str(tiny_text_run), "--out", str(text_package)])
    err = capsys.readouterr().err
    assert code == 2
    assert "already exists" in err and "--overwrite" in err
    assert (text_package / "package.json").read_bytes() == before


def test_export_of_a_missing_run_is_a_usage_error(tmp_path: Path, capsys) -> None:
    code = cli.main(["export", "--run", str(tmp_path / "nope"), "--out", str(tmp_path / "pkg")])
    assert code == 2
    assert "no config.yaml" in capsys.readouterr().err


# ------------------------------------------------------------------------------------- int8
def test_int8_text_package_passes_budget_and_records_size_and_latency(tiny_text_run: Path, text_package: Path,
                                                                      tmp_path: Path) -> None:
    from deepship.export import AccuracyBudget
    from deepship.runtime.predictor import Predictor

    # The tiny run has 24 val texts: one flipped prediction is 4.2 points, so its budget is one flip
    # (the default 1 point / 98% is for real val sets; test_int8_budget_miss_fails_with_the_numbers holds the gate).
    out = export(tiny_text_run, tmp_path / "int8", quantize="int8", budget=AccuracyBudget(5.0, 0.95))
    parity = read_json(out / "parity.json")
    q = parity["quantization"]
    assert parity["precision"] == "int8" and parity["gate"]["kind"] == "accuracy_budget"
    assert parity["gate"]["min_top1_agreement"] == 0.95 and parity["gate"]["max_accuracy_drop"] == 5.0
    assert q["method"] == "dynamic"
    assert q["size_bytes"]["int8"] < 0.5 * q["size_bytes"]["fp32"]
    assert q["size_bytes"]["int8"] == (out / "model.onnx").stat().st_size
    assert q["latency_ms_p50_batch1"]["fp32"] > 0 and q["latency_ms_p50_batch1"]["int8"] > 0
    assert q["accuracy_drop_points"] <= 5.0 and q["top1_agreement"] >= 0.95
    assert parity["fp32"]["max_abs_diff"] <= 1e-4  # the fp32 gate ran first
    ops = {n.op_type for n in onnx.load(str(out / "model.onnx")).graph.node}
    assert ops & {"MatMulInteger", "DynamicQuantizeLinear", "DynamicQuantizeMatMul"}
    assert read_json(out / "package.json")["precision"] == "int8"
    texts = ["the movie was great", "awful boring plot", "quite a painful film really"]
    int8_labels = [p.label for p in Predictor.load(out).predict(texts)]
    assert int8_labels == [p.label for p in Predictor.load(text_package).predict(texts)]


def test_int8_budget_miss_fails_with_the_numbers(tiny_text_run: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "pkg"
    code = cli.main(["export", "--run", str(tiny_text_run), "--out", str(out), "--quantize", "int8",
                     "--max-accuracy-drop", "-1"])
    err = capsys.readouterr().err
    assert code == 1
    assert "int8 accuracy budget missed" in err and "> -1" in err and "val accuracy torch fp32" in err
    assert leftovers(tmp_path) == []


def test_int8_image_uses_static_calibration(tiny_image_run: Path, tmp_path: Path) -> None:
    out = export(tiny_image_run, tmp_path / "int8", quantize="int8")
    q = read_json(out / "parity.json")["quantization"]
    assert q["method"] == "static"
    ops = {n.op_type for n in onnx.load(str(out / "model.onnx")).graph.node}
    assert "QuantizeLinear" in ops and "DequantizeLinear" in ops
    assert q["val_accuracy"]["onnx_int8"] >= q["val_accuracy"]["torch_fp32"] - 0.01


# -------------------------------------------------------------------- real MiniLM, rt-polarity
@pytest.mark.slow
def test_minilm_rt_polarity_fp32_and_int8_pass_their_gates(tmp_path: Path) -> None:
    if not RT_POLARITY.is_dir():
        pytest.skip(reason=f"{RT_POLARITY} not found (shared reference data is absent on this machine)")
    from deepship.bench import bench_export

    fp32, int8, _ = bench_export(str(RT_POLARITY), str(tmp_path), train_samples=2000, val_samples=1000,
                                 test_samples=300, epochs=2, runs=100)
    assert fp32["parity_max_abs_diff"] <= 1e-4 and fp32["parity_top1_agreement"] == 1.0
    assert int8["size_bytes"] < 0.4 * fp32["size_bytes"]
    assert fp32["test_accuracy"] > 0.6  # briefly fine-tuned, clearly above chance (0.5)
    assert abs(fp32["test_accuracy"] - int8["test_accuracy"]) <= 0.02
    assert np.isfinite(int8["latency_ms_p50"]) and int8["latency_ms_p50"] > 0
