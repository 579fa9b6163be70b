"""`deepship bench train|runtime` in tiny CPU mode: the harness measures what it says (no timing assertions)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from deepship import cli


def bench_lines(capsys: pytest.CaptureFixture) -> list[dict]:
    return [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]


def test_bench_train_compares_the_toolkit_step_with_a_plain_loop(capsys: pytest.CaptureFixture) -> None:
    assert cli.main(["bench", "train", "--modality", "image", "--steps", "3", "--batch-size", "4",
                     "--image-size", "32", "--device", "cpu"]) == 0
    (row,) = bench_lines(capsys)
    assert row["kind"] == "train_step" and row["device"] == "cpu" and row["precision"] == "32-true"
    assert row["plain_samples_per_s"] > 0 and row["toolkit_samples_per_s"] > 0
    # the ratio is the two throughputs of the same run, not a stored figure
    assert row["toolkit_over_plain"] == pytest.approx(row["toolkit_samples_per_s"] / row["plain_samples_per_s"], abs=2e-3)
    assert row["peak_gpu_memory_mib"] is None  # reported on CUDA only


def test_bench_runtime_times_both_runtimes_on_the_same_input(tiny_text_run: Path, text_package: Path,
                                                               capsys: pytest.CaptureFixture) -> None:
    assert cli.main(["bench", "runtime", "--run", str(tiny_text_run), "--package", str(text_package),
                     "--runs", "8"]) == 0
    (row,) = bench_lines(capsys)
    assert row["torch_eager_p50_ms"] > 0 and row["onnxruntime_p50_ms"] > 0
    assert row["onnxruntime_over_torch"] == pytest.approx(row["onnxruntime_p50_ms"] / row["torch_eager_p50_ms"],
                                                          abs=2e-3)


def test_bench_runtime_needs_a_run_and_a_package(capsys: pytest.CaptureFixture) -> None:
    assert cli.main(["bench", "runtime"]) == 2
    assert "needs --run RUN_DIR and --package" in capsys.readouterr().err
