"""Assemble an evaluation report (a plain dict, schema in deepship.evaluation.schema) from logits.

Modality ended at the logits: everything here takes (N, C) logits and (N,) targets, on any device,
from a package (onnxruntime) or a run (PyTorch), and scores the package's own decision rule
(deepship.runtime.predictor.decide) with its calibrated temperature and thresholds.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any, Sequence

import numpy as np
import torch

from deepship.config import ObjectiveConfig
from deepship.evaluation.calibration import calibration_errors, fit_temperature, nll
from deepship.evaluation.metrics import bootstrap_values, classification_metrics, percentile_interval, score
from deepship.evaluation.significance import mcnemar, paired_bootstrap
from deepship.evaluation.thresholds import (
    choose_thresholds,
    cost_threshold,
    expected_cost,
    risk_coverage,
    threshold_for_precision,
)
from deepship.runtime.predictor import decide

SCHEMA_VERSION = 1
CURVE_POINTS = 200  # risk-coverage points kept in the report (the full curve has one per input)
HEADLINE = ("accuracy", "macro_f1")


def fit_decision_rule(logits: torch.Tensor, targets: torch.Tensor, labels: Sequence[str], objective: ObjectiveConfig,
                      fitted_on: str) -> dict[str, Any]:
    """What a package carries: the temperature fitted on these (validation) logits and the thresholds
    chosen on the calibrated probabilities. Returns {"calibration": ..., "thresholds": ...}."""
    temperature = fit_temperature(logits, targets)
    probs = torch.softmax(logits.double() / temperature, dim=1)
    calibration = {"temperature": temperature, "fitted_on": fitted_on, "n": int(targets.shape[0]),
                   "nll_before": nll(logits, targets), "nll_after": nll(logits, targets, temperature)}
    return {"calibration": calibration, "thresholds": choose_thresholds(probs, targets, labels, objective, fitted_on)}


class Decisions:
    """Calibrated probabilities and the package's decisions on them, as tensors on the logits' device."""

    def __init__(self, logits: torch.Tensor, temperature: float, thresholds: dict[str, Any] | None,
                 labels: Sequence[str]) -> None:
        self.probs = torch.softmax(logits.double() / temperature, dim=1)  # (N, C)
        preds, confidence, abstained = decide(self.probs.cpu().numpy(), labels, thresholds)
        device = logits.device
        self.preds = torch.as_tensor(preds, device=device)
        self.confidence = torch.as_tensor(confidence, device=device)
        self.abstained = torch.as_tensor(abstained, device=device)

    def metric(self, name: str, targets: torch.Tensor, idx: torch.Tensor | None = None) -> float | None:
        if idx is None:
            return score(name, self.probs, self.preds, targets)
        return score(name, self.probs[idx], self.preds[idx], targets[idx])


# ------------------------------------------------------------------------------------- sections
def metrics_section(d: Decisions, targets: torch.Tensor, labels: Sequence[str], objective: ObjectiveConfig,
                    n_resamples: int) -> dict[str, Any]:
    out = classification_metrics(d.probs, targets, labels, preds=d.preds)
    out["ci95"] = {}
    for name in dict.fromkeys((*HEADLINE, objective.metric)):  # ordered, no duplicates
        values = bootstrap_values(len(targets), lambda idx: d.metric(name, targets, idx), n_resamples,
                                  device=targets.device)
        out["ci95"][name] = list(percentile_interval(values)) if values.numel() else None
        out.setdefault(name, d.metric(name, targets))
    return out


def calibration_section(logits: torch.Tensor, targets: torch.Tensor, calibration: dict[str, Any]) -> dict[str, Any]:
    temperature = float(calibration.get("temperature") or 1.0)
    before = calibration_errors(torch.softmax(logits.double(), 1), targets)
    after = calibration_errors(torch.softmax(logits.double() / temperature, 1), targets)
    return {"temperature": temperature, "fitted_on": calibration.get("fitted_on"),
            "before": {**before, "nll": nll(logits, targets)},
            "after": {**after, "nll": nll(logits, targets, temperature)}}


def thin_curve(curve: dict[str, list[float]], points: int = CURVE_POINTS) -> dict[str, list[float]]:
    n = len(curve["coverage"])
    keep = sorted(set(np.linspace(0, n - 1, min(n, points)).round().astype(int).tolist()))
    return {k: [v[i] for i in keep] for k, v in curve.items()}


def selective_section(d: Decisions, targets: torch.Tensor, labels: Sequence[str], objective: ObjectiveConfig,
                      thresholds: dict[str, Any] | None) -> dict[str, Any]:
    answered = ~d.abstained
    correct = d.preds == targets
    out: dict[str, Any] = {
        "thresholds": thresholds, "answered": int(answered.sum()), "coverage": float(answered.double().mean()),
        "precision_answered": float(correct[answered].double().mean()) if answered.any() else None,
        "risk_coverage": thin_curve(risk_coverage(d.probs, targets)), "at_target_on_this_data": None, "cost": None,
    }
    if objective.target_precision is not None:
        out["at_target_on_this_data"] = threshold_for_precision(d.probs, targets, objective.target_precision).to_dict()
    if objective.cost_fp is not None and objective.cost_fn is not None and len(labels) == 2:
        at = float(((thresholds or {}).get("cost") or {}).get("threshold", 0.5))
        p1, costs = d.probs[:, 1], (objective.cost_fp, objective.cost_fn)
        out["cost"] = {"threshold": at, "expected_cost": expected_cost(p1, targets, at, *costs),
                       "expected_cost_at_0_5": expected_cost(p1, targets, 0.5, *costs),
                       "best_on_this_data": cost_threshold(p1, targets, *costs)}
    return out


def gates_section(objective: ObjectiveConfig, metrics: dict[str, Any], latency: dict[str, Any] | None) -> dict[str, Any]:
    """Pass/fail per objective gate; `passed` is None when there is no gate (nothing was promised)."""
    gates = []
    if objective.min is not None:
        value = metrics.get(objective.metric)
        gates.append({"name": f"{objective.metric} >= {objective.min:g}", "kind": "metric", "value": value,
                      "limit": objective.min, "passed": value is not None and value >= objective.min})
    if objective.latency_budget_ms is not None:
        value = (latency or {}).get("batch_1", {}).get("p95")
        gates.append({"name": f"batch-1 p95 latency <= {objective.latency_budget_ms:g} ms", "kind": "latency",
                      "value": value, "limit": objective.latency_budget_ms,
                      "passed": None if value is None else value <= objective.latency_budget_ms})
    measured = [g["passed"] for g in gates if g["passed"] is not None]
    passed = None if not measured else all(measured)
    if passed is None:
        summary = "no objective gates set (objective.min, objective.latency_budget_ms)" if not gates else \
            "gates not measured here"
    else:
        failed = [g["name"] for g in gates if g["passed"] is False]
        summary = "PASS: every gate holds" if passed else "FAIL: " + "; ".join(failed)
    unmeasured = [g["name"] for g in gates if g["passed"] is None]
    if unmeasured:
        summary += f" (not measured: {'; '.join(unmeasured)})"
    return {"passed": passed, "summary": summary, "gates": gates}


def comparison_section(champion: Decisions, challenger: Decisions, targets: torch.Tensor, metric: str,
                       challenger_info: dict[str, Any], n_resamples: int) -> dict[str, Any]:
    """Challenger minus champion on the objective metric, with a paired bootstrap and McNemar's test."""
    a, b = champion.metric(metric, targets), challenger.metric(metric, targets)
    boot = paired_bootstrap(len(targets), lambda idx: champion.metric(metric, targets, idx),
                            lambda idx: challenger.metric(metric, targets, idx), n_resamples, device=targets.device)
    test = mcnemar(champion.preds == targets, challenger.preds == targets)
    diff = None if a is None or b is None else b - a
    if diff is None or boot["p_value"] is None:
        conclusion = f"undefined: {metric} cannot be computed on this data or its resamples (e.g. only one " \
                     "class present); compare on a metric defined here, e.g. --set objective.metric=accuracy"
    elif boot["p_value"] >= 0.05:
        conclusion = f"no significant difference in {metric} (paired bootstrap p={boot['p_value']:.3f})"
    else:
        conclusion = f"challenger is {'better' if diff > 0 else 'worse'} on {metric} by {diff:+.4f} " \
                     f"(paired bootstrap p={boot['p_value']:.3f})"
    return {"challenger": challenger_info, "metric": metric, "champion_value": a, "challenger_value": b,
            "difference": diff, "paired_bootstrap": boot, "mcnemar": test,
            "challenger_metrics": {m: challenger.metric(m, targets) for m in HEADLINE}, "conclusion": conclusion}


# --------------------------------------------------------------------------------------- report
def build_report(logits: torch.Tensor, targets: torch.Tensor, labels: Sequence[str], objective: ObjectiveConfig, *,
                 calibration: dict[str, Any], thresholds: dict[str, Any] | None, model: dict[str, Any],
                 data: dict[str, Any], latency: dict[str, Any] | None = None, baseline: dict[str, Any] | None = None,
                 comparison: dict[str, Any] | None = None, history: list[dict[str, Any]] | None = None,
                 notes: Sequence[str] = (), n_resamples: int = 1000) -> dict[str, Any]:
    """The whole report. `calibration`/`thresholds` are the package's (or the run's freshly fitted) rule."""
    decisions = Decisions(logits, float(calibration.get("temperature") or 1.0), thresholds, labels)
    metrics = metrics_section(decisions, targets, labels, objective, n_resamples)
    counts = torch.bincount(targets, minlength=len(labels)).tolist()
    return {
        "schema_version": SCHEMA_VERSION,
        "created_at": datetime.now(timezone.utc).isoformat(),
        "verdict": gates_section(objective, metrics, latency),
        "model": model,
        "data": {**data, "n": int(targets.shape[0]), "class_counts": dict(zip(labels, counts))},
        "objective": objective.model_dump(mode="json"),
        "metrics": metrics,
        "calibration": calibration_section(logits, targets, calibration),
        "selective": selective_section(decisions, targets, labels, objective, thresholds),
        "latency": latency,
        "baseline": baseline,
        "comparison": comparison,
        "history": history,
        "notes": list(notes),
    }
