"""`deepship evaluate` and the report a training run writes: data -> logits -> report.json + report.html.

A package is evaluated through its own torch-free runtime (preprocessing, onnxruntime, temperature,
thresholds), so the report describes what a serving host will do; a run is evaluated from the
PyTorch logits of best.ckpt on its validation set.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import torch

from deepship.config import Config, ObjectiveConfig, SourceConfig, validate_section
from deepship.errors import ConfigError, DataError, DeepshipError, first_line
from deepship.evaluation.baseline import BASELINES, Baseline, compare_with_model, get_baseline
from deepship.evaluation.html import render_html
from deepship.evaluation.latency import measure_latency
from deepship.evaluation.linear_probe import LinearProbe, fit_linear_probe, probe_applies, probe_skip_reason
from deepship.evaluation.report import Decisions, build_report, comparison_section, fit_decision_rule
from deepship.evaluation.schema import Report
from deepship.files import atomic_write_text, finite
from deepship.runtime.modality import Modality
from deepship.runtime.predictor import Predictor

if TYPE_CHECKING:
    from deepship.data.split import Splits

JSON_NAME, HTML_NAME = "report.json", "report.html"


@dataclass(frozen=True)
class EvaluateOptions:
    compare: str | None = None  # a challenger package evaluated on the same data
    baseline: str | None = None  # "tfidf" (text only)
    baseline_train: str | None = None  # training data for the baseline; default: the package's own
    overrides: Sequence[str] = ()  # --set objective.KEY=VALUE
    batch_size: int = 32
    latency_runs: int = 100  # batch-1 timed calls; 0 skips latency (and its gate)
    n_resamples: int = 1000  # bootstrap resamples for intervals and the paired test


# ------------------------------------------------------------------------------------- inputs
def package_config(predictor: Predictor) -> Config:
    return Config.model_validate(predictor.manifest["config"], context={"skip_path_checks": True})


def resolve_objective(objective: ObjectiveConfig, overrides: Sequence[str]) -> ObjectiveConfig:
    """The config's objective with `--set objective.KEY=VALUE` applied, validated like a config."""
    return validate_section(ObjectiveConfig, "objective", objective.model_dump(mode="json"), overrides, "evaluate",
                            "min=0.9")


def read_labeled(path: str, cfg: Config, labels: Sequence[str], modality: Modality) -> tuple[list[str], np.ndarray]:
    """Inputs and label indices from a folder or table read as the training data was read (same
    columns, same label_map); a row the package cannot score is an error naming the row."""
    from deepship.data.sources import read_split

    source = SourceConfig.model_validate({"path": path}, context={"skip_path_checks": True})
    samples = read_split([source], cfg.task, cfg.data)
    if not len(samples):
        raise DataError(f"--data {path}: holds no labeled samples")
    index = {label: i for i, label in enumerate(labels)}
    for x, y, origin in zip(samples.inputs, samples.labels, samples.origins):
        if not modality.usable(x):
            raise DataError(f"{origin}: empty or missing input; fix or drop it before evaluating")
        if y not in index:
            raise DataError(f"{origin}: label '{y}' is not one the model knows ({sorted(index)}); fix the label, "
                            "map it with data.label_map, or drop the row")
    return samples.inputs, np.array([index[y] for y in samples.labels])


def read_history(run_dir: Path | None) -> list[dict[str, Any]] | None:
    path = run_dir / "history.csv" if run_dir else None
    if path is None or not path.is_file():
        return None
    with open(path, newline="") as f:
        return [{k: (float(v) if v not in ("", None) else None) for k, v in row.items()} for row in csv.DictReader(f)]


# ----------------------------------------------------------------------------------- sections
def baseline_section(cfg: Config, options: EvaluateOptions, inputs: Sequence[str], targets: np.ndarray,
                     labels: Sequence[str], baseline: Baseline, model_preds: torch.Tensor) -> dict[str, Any]:
    """The baseline trained on the package's own training split (or --baseline-train), scored on `inputs`
    and compared, input by input, with the package's predictions `model_preds` (label indices)."""
    from deepship.data.split import load_splits

    if options.baseline_train:
        cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={
            "train": [SourceConfig.model_validate({"path": options.baseline_train}, context={"skip_path_checks": True})],
            "val": None, "test": None})})
    try:
        train = load_splits(cfg).train
    except DataError as exc:
        raise DataError(f"--baseline {options.baseline}: cannot read the training data ({exc}); "
                        "pass --baseline-train FILE") from None
    fit = baseline.predict(cfg, train.inputs, train.labels, inputs)
    return {"name": baseline.name, "train_samples": len(train),
            **baseline_scores(fit.predictions, targets, labels, model_preds, options.n_resamples), **fit.details}


def baseline_scores(predictions: Sequence[str], targets: np.ndarray, labels: Sequence[str], model_preds: torch.Tensor,
                    n_resamples: int = 1000) -> dict[str, Any]:
    """Accuracy and macro-F1 of a baseline's label strings against `targets` (label indices), and `vs_model`:
    the paired comparison with the model's predictions on the same inputs."""
    from deepship.evaluation.metrics import score

    index = {label: i for i, label in enumerate(labels)}
    preds = torch.tensor([index.get(y, -1) for y in predictions])
    t = torch.from_numpy(targets)
    one_hot = torch.nn.functional.one_hot(preds.clamp(min=0), len(labels)).double()
    return {"accuracy": score("accuracy", one_hot, preds, t), "macro_f1": score("macro_f1", one_hot, preds, t),
            "vs_model": compare_with_model(model_preds.cpu(), preds, t, n_resamples)}


def fit_run_probe(cfg: Config, splits: Splits, for_head: bool = False) -> tuple[LinearProbe | None, str | None]:
    """A training run's linear probe, fitted once on its training split before training: the report compares
    the model with it, and with `for_head` (finetune.head_init probe) the model's head starts from it. Returns it,
    or None and why not (text runs, no pretrained weights, finetune.linear_probe false, or it failed: a probe
    only for the report must not cost the run; one the head needs must work)."""
    if for_head:
        if not probe_applies(cfg) or cfg.model.pretrained is False:
            raise ConfigError("finetune.head_init: probe needs a pretrained image backbone (model.pretrained); "
                              "use head_init random or auto")
        return fit_linear_probe(cfg, splits.train.inputs, splits.train.labels), None
    reason = probe_skip_reason(cfg)
    if reason is not None:
        return None, reason
    try:
        return fit_linear_probe(cfg, splits.train.inputs, splits.train.labels), None
    except DeepshipError as exc:
        return None, f"the linear probe failed: {first_line(exc, 300)}"


def run_probe_section(cfg: Config, splits: Splits, probe: LinearProbe, model_preds: dict[str, torch.Tensor]
                      ) -> tuple[dict[str, Any] | None, str | None]:
    """The fitted probe scored on the run's validation split (and under "test" on its test split when
    `model_preds` has one), each against the model's predictions there (label indices, in split order);
    or None and why not (finetune.linear_probe false, or predicting failed)."""
    reason = probe_skip_reason(cfg)
    if reason is not None:
        return None, reason
    scored = {name: s for name, s in (("val", splits.val), ("test", splits.test)) if s is not None and name in model_preds}
    try:
        predictions = probe.predict([x for s in scored.values() for x in s.inputs])
    except DeepshipError as exc:
        return None, f"the linear probe failed: {first_line(exc, 300)}"
    parts, start = {}, 0
    for name, samples in scored.items():
        targets = np.array([splits.classes.index(y) for y in samples.labels])
        parts[name] = baseline_scores(predictions[start:start + len(samples)], targets, splits.classes,
                                      model_preds[name])
        start += len(samples)
    section = {"name": BASELINES["linear-probe"].name, "train_samples": len(splits.train), **parts.pop("val"),
               "C": probe.C}
    return section | parts, None  # the test split's scores, if any, under "test"


def challenger_section(predictor: Predictor, logits: torch.Tensor, targets: torch.Tensor, inputs: Sequence[str],
                       metric: str, options: EvaluateOptions) -> dict[str, Any]:
    challenger = Predictor.load(options.compare)
    if challenger.labels != predictor.labels:
        raise ConfigError(f"--compare {options.compare}: its labels {challenger.labels[:10]} differ from "
                          f"{predictor.labels[:10]}; compare packages trained for the same classes")
    other = torch.from_numpy(challenger.batched_logits(inputs, options.batch_size, show_progress=True))
    champion = Decisions(logits, predictor.temperature, predictor.thresholds, predictor.labels)
    rival = Decisions(other, challenger.temperature, challenger.thresholds, challenger.labels)
    info = {"package": str(options.compare), "model_version": challenger.model_version}
    return comparison_section(champion, rival, targets, metric, info, options.n_resamples)


# ------------------------------------------------------------------------------------ commands
def evaluate_package(package: str | Path, data: str, out: str | Path, options: EvaluateOptions = EvaluateOptions()
                     ) -> dict[str, Any]:
    """Evaluate a package on labeled data; writes out/report.json and out/report.html, returns the report."""
    predictor = Predictor.load(package)
    cfg = package_config(predictor)
    objective = resolve_objective(cfg.objective, options.overrides)
    baseline = get_baseline(options.baseline, predictor.modality.name, cfg) if options.baseline else None
    inputs, targets_np = read_labeled(data, cfg, predictor.labels, predictor.modality)
    logits = torch.from_numpy(predictor.batched_logits(inputs, options.batch_size, show_progress=True))
    targets = torch.from_numpy(targets_np)
    manifest = predictor.manifest
    notes = []
    calibration = dict(manifest.get("calibration") or {})
    if not calibration.get("temperature"):
        calibration = {"temperature": 1.0, "fitted_on": None}
        notes.append("the package carries no fitted temperature (exported before calibration): T = 1")
    run_dir = Path(manifest.get("run", {}).get("dir", "")) if manifest.get("run", {}).get("dir") else None
    decisions = Decisions(logits, float(calibration["temperature"]), predictor.thresholds, predictor.labels)
    report = build_report(
        logits, targets, predictor.labels, objective, calibration=calibration, thresholds=predictor.thresholds,
        model={"name": manifest.get("run", {}).get("name"), "task": manifest["task"], "labels": predictor.labels,
               "model_version": predictor.model_version, "precision": manifest.get("precision"),
               "package": str(package)},
        data={"source": str(data), "split": "given"},
        latency=measure_latency(predictor, inputs, runs=options.latency_runs) if options.latency_runs else None,
        baseline=baseline_section(cfg, options, inputs, targets_np, predictor.labels, baseline, decisions.preds)
        if baseline else None,
        comparison=challenger_section(predictor, logits, targets, inputs, objective.metric, options)
        if options.compare else None,
        history=read_history(run_dir), notes=notes, n_resamples=options.n_resamples)
    write_report(report, Path(out))
    return report


def write_run_report(cfg: Config, run_dir: Path, logits: torch.Tensor, targets: torch.Tensor, labels: Sequence[str],
                     precision: str, n_resamples: int = 1000, baseline: dict[str, Any] | None = None) -> dict[str, Any]:
    """A training run's report on its validation set, with the temperature and thresholds fitted there
    (export refits them on the exported model's own logits); `baseline`: a section scored on the same set."""
    rule = fit_decision_rule(logits, targets, labels, cfg.objective, fitted_on="val")
    report = build_report(
        logits, targets, labels, cfg.objective, calibration=rule["calibration"], thresholds=rule["thresholds"],
        model={"name": cfg.train.run_name, "task": cfg.task, "labels": list(labels), "model_version": None,
               "precision": precision, "run": str(run_dir)},
        data={"source": "validation split of the run", "split": "val"}, baseline=baseline, history=read_history(run_dir),
        notes=["temperature and thresholds were fitted on this same validation set, so calibration and threshold "
               "numbers here are optimistic; evaluate the exported package on held-out data for honest ones"],
        n_resamples=n_resamples)
    write_report(report, run_dir)
    return report


def write_report(report: dict[str, Any], out: Path) -> None:
    """Check the report against its schema, render, then write both files (atomically each)."""
    text = json.dumps(finite(Report.model_validate(report).model_dump(mode="json")), indent=2, allow_nan=False) + "\n"
    page = render_html(report)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / JSON_NAME, text)
    atomic_write_text(out / HTML_NAME, page)
