"""run directory -> model package: ONNX, tokenizer, parity report and a manifest that hashes them all.

The package is built in a hidden staging folder beside the target and renamed into place only after
the parity gate (and, for int8, the accuracy budget) has passed, so `--out` never holds a half-written
or unverified package.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from deepship.errors import ConfigError, DataError, ExportError
from deepship.export.onnx import (
    Tolerance,
    check_onnx,
    check_parity,
    enforce_fp32_gate,
    export_onnx,
    parity_cases,
    run_modality,
    torch_logits,
)
from deepship.export.quantize import (
    AccuracyBudget,
    QuantizationReport,
    compare_on_val,
    enforce_budget,
    measure_latency_ms,
    quantize_int8,
)
from deepship.files import write_json
from deepship.run import LoadedRun, load_run
from deepship.runtime.package import FORMAT_VERSION, MANIFEST, MODEL_FILE, seal_manifest, sha256_file
from deepship.runtime.predictor import Predictor, decide, softmax

LIBRARIES = ("deepship", "torch", "torchvision", "transformers", "tokenizers", "onnx", "onnxruntime", "numpy", "pillow")


@dataclass(frozen=True)
class ExportOptions:
    quantize: str | None = None  # None or "int8"
    opset: int = 17
    tolerance: float = 1e-4  # fp32 parity atol, logits and embeddings, PyTorch vs onnxruntime
    rtol: float = 1e-4  # fp32 parity rtol: an element passes where |onnx - torch| <= tolerance + rtol * |torch|
    budget: AccuracyBudget = field(default_factory=AccuracyBudget)
    overwrite: bool = False
    max_val_samples: int = 2000  # caps the int8 accuracy comparison on large val sets


# ------------------------------------------------------------------------------------ manifest
def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def base_manifest(run: LoadedRun, num_train: int, precision: str) -> dict[str, Any]:
    """Everything but the file hashes and model_version, which depend on the final files."""
    cfg, spec = run.config, run.backbone.preprocessing
    metrics_path = run.run_dir / "metrics.json"
    metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
    return {
        "format_version": FORMAT_VERSION,
        "task": cfg.task,
        "labels": list(run.classes),
        "precision": precision,
        "preprocessing": spec.to_dict(),
        "calibration": {"temperature": None},
        "thresholds": None,
        # The validated data's fingerprint (deepship.data.validate), as recorded by training.
        "training_data": {"fingerprint": metrics.get("data_fingerprint"), "num_samples": num_train,
                          "source": cfg.model_dump(mode="json")["data"]["train"]},
        "metrics": {k: metrics[k] for k in ("val", "test") if k in metrics},
        "config": cfg.model_dump(mode="json"),
        "run": {"name": cfg.train.run_name, "dir": str(run.run_dir.resolve())},
        "libraries": library_versions(),
        "created_at": datetime.now(timezone.utc).isoformat(),
    }


def hash_files(package_dir: Path) -> dict[str, str]:
    return {p.relative_to(package_dir).as_posix(): sha256_file(p)
            for p in sorted(package_dir.rglob("*")) if p.is_file() and p.name != MANIFEST}


def write_manifest(package_dir: Path, base: dict[str, Any]) -> dict[str, Any]:
    files = hash_files(package_dir)
    manifest = seal_manifest({**base, "model_version": f"{base['run']['name']}-{files[MODEL_FILE][:12]}", "files": files})
    write_json(package_dir / MANIFEST, manifest)
    return manifest


# -------------------------------------------------------------------------------------- export
def export_package(run_dir: str | Path, out: str | Path, options: ExportOptions = ExportOptions()) -> Path:
    """Export, gate and publish a package; raises ExportError (nothing written) when a gate fails."""
    out = Path(out)
    check_target(out, options.overwrite)
    run = load_run(run_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.staging-", dir=out.parent))
    try:
        build_package(run, staging, options)
        publish(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def check_target(out: Path, overwrite: bool) -> None:
    if out.exists() and not (out.is_dir() and (overwrite or not any(out.iterdir()))):
        raise ConfigError(f"--out {out}: already exists; choose a new folder or pass --overwrite to replace it")


def publish(staging: Path, out: Path) -> None:
    """Swap the finished package into place; an old package is replaced only now, after every gate."""
    staging.chmod(0o755)  # mkdtemp makes it owner-only; a package is meant to be read by serving users
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
        os.replace(staging, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, out)


def load_run_data(run: LoadedRun) -> Any:
    from deepship.data.split import load_splits

    try:
        splits = load_splits(run.config)
    except DataError as exc:
        raise DataError(f"{exc} (export reads the run's data for the parity gate and the data fingerprint)") from None
    if splits.classes != run.classes:
        raise ExportError(f"{run.run_dir}: the data's classes {splits.classes[:10]} differ from labels.json "
                          f"{run.classes[:10]}; the data changed since training, export from the original data")
    return splits


def build_package(run: LoadedRun, staging: Path, options: ExportOptions) -> dict[str, Any]:
    """Fill `staging` with a gated package; returns the parity report written to parity.json."""
    splits = load_run_data(run)
    modality, tolerance = run_modality(run), Tolerance(options.tolerance, options.rtol)
    val = splits.val.inputs[: options.max_val_samples]
    export_onnx(run, val[:2], staging / MODEL_FILE, options.opset)
    for asset in modality.assets:  # e.g. the tokenizer: the exact files used in training
        shutil.copytree(run.run_dir / asset, staging / asset)
    base = base_manifest(run, len(splits.train), options.quantize or "fp32")
    write_manifest(staging, base)
    predictor = Predictor.load(staging)  # the gate runs the package's own torch-free preprocessing
    cases = parity_cases(val, modality)
    report = check_parity(run, predictor, cases, tolerance)
    enforce_fp32_gate(report, tolerance)
    parity = {"passed": True, "precision": "fp32", "gate": {"kind": "tolerance", "atol": tolerance.atol,
                                                             "rtol": tolerance.rtol, "outputs": ["logits", "embeddings"],
                                                             "min_top1_agreement": 1.0}, **report.to_dict()}
    targets = np.array([run.classes.index(y) for y in splits.val.labels[: len(val)]])
    if options.quantize == "int8":
        parity = quantize_package(run, staging, predictor, cases, val, targets, parity, options, tolerance)
    parity |= {"onnx_checker": "passed (full_check)", "opset": options.opset, "libraries": base["libraries"]}
    write_json(staging / "parity.json", parity)
    shipped = Predictor.load(staging)
    logits, embeddings, stats = shipped.outputs_and_stats(val)  # the model as it ships (int8 included)
    base |= decision_rule(logits, run, targets)
    base["reference"] = reference_profile(staging, shipped, stats, targets, logits, embeddings, base)
    write_manifest(staging, base)  # final hashes cover parity.json and the reference embeddings too
    Predictor.load(staging)  # what ships must load and verify as written
    return parity


def decision_rule(logits: np.ndarray, run: LoadedRun, targets: np.ndarray) -> dict[str, Any]:
    """Temperature and thresholds fitted on the validation logits of the model as it ships, per the
    run's `objective`; the runtime applies both (deepship.runtime.predictor)."""
    import torch

    from deepship.evaluation.report import fit_decision_rule

    rule = fit_decision_rule(torch.from_numpy(logits), torch.from_numpy(targets), run.classes, run.config.objective,
                             fitted_on=f"val ({len(targets)} samples)")
    thresholds = rule["thresholds"]
    if thresholds and not thresholds["feasible"]:
        print(f"warning: {thresholds['note']} on validation; the package abstains where no threshold meets "
              "the target (lower objective.target_precision or improve the model)", file=sys.stderr)
    return rule


def reference_profile(staging: Path, shipped: Predictor, input_stats: list[dict[str, Any]], targets: np.ndarray,
                      logits: np.ndarray, embeddings: np.ndarray | None, base: dict[str, Any]) -> dict[str, Any]:
    """What `monitor` compares production with: the validation set through the shipped model and its
    decision rule (deepship.monitoring.reference)."""
    from deepship.monitoring.reference import build_profile, stats_columns, write_embeddings

    probs = softmax(logits, base["calibration"]["temperature"])
    preds, confidence, _ = decide(probs, base["labels"], base["thresholds"])
    stats = stats_columns(input_stats, shipped.modality.signals)
    profile = build_profile(base["labels"], preds, confidence, targets, stats, source=f"val ({len(targets)} samples)")
    if embeddings is not None:
        profile["embeddings"] = write_embeddings(staging, embeddings)
    return profile


def quantize_package(run: LoadedRun, staging: Path, fp32: Predictor, cases: Sequence[Any], val: Sequence[str],
                     targets: np.ndarray, fp32_parity: dict[str, Any], options: ExportOptions,
                     tolerance: Tolerance) -> dict[str, Any]:
    """Replace model.onnx by its int8 version, then hold it to the accuracy budget on the val set."""
    fp32_path = staging.parent / f"{staging.name}.fp32.onnx"  # outside staging: not part of the package
    os.replace(staging / MODEL_FILE, fp32_path)
    try:
        method = quantize_int8(fp32_path, staging / MODEL_FILE, fp32, val)
        check_onnx(staging / MODEL_FILE)
        write_manifest(staging, fp32.manifest)  # new hashes and model_version for the int8 model
        int8 = Predictor.load(staging)
        int8_parity = check_parity(run, int8, cases, tolerance)  # recorded; int8 is judged by the budget below
        val_scores = compare_on_val(torch_logits(run, val), fp32.batched_logits(val), int8.batched_logits(val), targets)
        one = fp32.preprocess(val[:1])
        acc = val_scores["val_accuracy"]
        report = QuantizationReport(
            method=method, val_samples=len(val), **val_scores,
            accuracy_drop_points=100 * (acc["torch_fp32"] - acc["onnx_int8"]),
            size_bytes={"fp32": fp32_path.stat().st_size, "int8": (staging / MODEL_FILE).stat().st_size},
            latency_ms_p50_batch1={"fp32": measure_latency_ms(fp32_path, one),
                                   "int8": measure_latency_ms(staging / MODEL_FILE, one)},
            budget={"max_accuracy_drop": options.budget.max_accuracy_drop,
                    "min_top1_agreement": options.budget.min_top1_agreement},
        )
        enforce_budget(report, options.budget)
    finally:
        fp32_path.unlink(missing_ok=True)
    return {"passed": True, "precision": "int8", "gate": {"kind": "accuracy_budget", **report.budget},
            **int8_parity.to_dict(), "quantization": report.to_dict(), "fp32": fp32_parity}
