"""Confidence thresholds for selective prediction: answer when confident, abstain otherwise.

Every chooser returns a `Threshold`; when no threshold meets the target it says so (`feasible`
False, with the best it could do) instead of silently falling back to 0.5.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Sequence

import torch


@dataclass(frozen=True)
class Threshold:
    value: float | None  # answer when confidence >= value; None when infeasible
    feasible: bool
    precision: float | None  # accuracy of the answered predictions on the data it was chosen on
    coverage: float  # share of inputs answered
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def risk_coverage(probs: torch.Tensor, targets: torch.Tensor) -> dict[str, list[float]]:
    """Answer the k most confident inputs, k = 1..N: coverage k/N, risk = error rate among them,
    and the confidence of the k-th (the threshold that answers exactly those)."""
    confidence, preds = probs.max(1)
    order = torch.argsort(confidence, descending=True, stable=True)
    correct = (preds == targets)[order].double()
    k = torch.arange(1, len(order) + 1, dtype=torch.float64, device=correct.device)
    return {"coverage": (k / len(order)).tolist(), "risk": (1 - correct.cumsum(0) / k).tolist(),
            "threshold": confidence[order].double().tolist()}


def _at(confidence: torch.Tensor, correct: torch.Tensor, value: float) -> tuple[float | None, float]:
    answered = confidence >= value
    coverage = float(answered.double().mean())
    precision = float(correct[answered].double().mean()) if answered.any() else None
    return precision, coverage


def threshold_for_precision(probs: torch.Tensor, targets: torch.Tensor, target: float) -> Threshold:
    """The lowest threshold (most coverage) whose answered predictions reach `target` precision.

    Candidates are the observed confidences; a threshold answers every input at or above it (ties
    included), so each distinct confidence is priced at the end of its run in the descending sort:
    one sort and one cumulative sum, O(N log N)."""
    confidence, preds = probs.max(1)
    order = torch.argsort(confidence, descending=True)
    ranked = confidence[order]
    hits = (preds == targets)[order].double().cumsum(0)
    ends = torch.ones_like(ranked, dtype=torch.bool)
    ends[:-1] = ranked[:-1] != ranked[1:]  # last position of each run of equal confidences
    answered = torch.arange(1, len(ranked) + 1, dtype=torch.float64, device=ranked.device)[ends]
    precision = hits[ends] / answered
    reached = torch.nonzero(precision >= target).flatten()
    if reached.numel():
        k = int(reached[-1])  # the lowest confidence that still reaches the target
        return Threshold(float(ranked[ends][k]), True, float(precision[k]), float(answered[k] / len(ranked)))
    top_precision, top_coverage = float(precision[0]), float(answered[0] / len(ranked))
    return Threshold(None, False, top_precision, top_coverage,
                     f"no threshold reaches precision {target:g}; the most confident predictions reach "
                     f"{top_precision:.3f}")


def threshold_for_coverage(probs: torch.Tensor, targets: torch.Tensor, target: float) -> Threshold:
    """The highest threshold that still answers at least `target` of the inputs."""
    confidence, preds = probs.max(1)
    sorted_conf = torch.sort(confidence, descending=True).values
    k = max(1, int(torch.ceil(torch.tensor(target * len(sorted_conf))).item()))
    value = float(sorted_conf[k - 1])
    precision, coverage = _at(confidence, preds == targets, value)
    return Threshold(value, True, precision, coverage)


def per_class_thresholds(probs: torch.Tensor, targets: torch.Tensor, labels: Sequence[str],
                         target: float) -> dict[str, Threshold]:
    """A precision threshold per predicted class: answer class c when its confidence reaches t_c."""
    preds = probs.argmax(1)
    out = {}
    for i, label in enumerate(labels):
        mask = preds == i
        if not mask.any():
            out[label] = Threshold(None, False, None, 0.0, f"class '{label}' is never predicted")
            continue
        out[label] = threshold_for_precision(probs[mask], targets[mask], target)
    return out


def expected_cost(p_positive: torch.Tensor, targets: torch.Tensor, threshold: float, cost_fp: float,
                  cost_fn: float) -> float:
    """Mean cost per input when predicting positive iff p >= threshold."""
    positive = p_positive >= threshold
    fp = (positive & (targets == 0)).sum()
    fn = (~positive & (targets == 1)).sum()
    return float((cost_fp * fp + cost_fn * fn) / targets.shape[0])


def cost_threshold(p_positive: torch.Tensor, targets: torch.Tensor, cost_fp: float,
                   cost_fn: float) -> dict[str, float]:
    """Binary tasks: the threshold on P(positive) minimizing expected cost on this data. The cost only
    changes at observed scores, so every distinct score (and 'never positive') is a candidate;
    cumulative counts over the sorted scores price them all in O(N log N)."""
    order = torch.argsort(p_positive)
    scores, labels = p_positive[order].double(), targets[order]
    zero = torch.zeros(1, dtype=torch.float64, device=scores.device)
    cum_pos = torch.cat([zero, (labels == 1).double().cumsum(0)])
    cum_neg = torch.cat([zero, (labels == 0).double().cumsum(0)])
    candidates = torch.cat([torch.unique(scores), torch.tensor([float("inf")], dtype=torch.float64,
                                                                device=scores.device)])
    below = torch.searchsorted(scores, candidates, right=False)  # scores < t are predicted negative
    fn, fp = cum_pos[below], cum_neg[-1] - cum_neg[below]
    costs = (cost_fp * fp + cost_fn * fn) / targets.shape[0]
    best = int(torch.argmin(costs))  # first minimum: the lowest such threshold
    return {"threshold": float(candidates[best]), "expected_cost": float(costs[best]),
            "cost_fp": cost_fp, "cost_fn": cost_fn}


def choose_thresholds(probs: torch.Tensor, targets: torch.Tensor, labels: Sequence[str],
                      objective: "ObjectiveConfig", fitted_on: str) -> dict[str, Any] | None:  # noqa: F821
    """The package's `thresholds` entry (read by deepship.runtime.predictor.decide) for the objective,
    chosen on calibrated validation probabilities; None when the objective asks for no threshold."""
    rule: dict[str, Any] = {"basis": None, "target": None, "min_confidence": None, "feasible": True,
                            "per_class": None, "cost": None, "note": "", "fitted_on": fitted_on,
                            "n": int(targets.shape[0])}
    if objective.cost_fp is not None and objective.cost_fn is not None and len(labels) == 2:
        cost = cost_threshold(probs[:, 1], targets, objective.cost_fp, objective.cost_fn)
        rule.update(basis="cost", cost={**cost, "positive_label": labels[1]})
    if objective.target_precision is not None:
        rule.update(basis="target_precision", target=objective.target_precision)
        if objective.per_class_thresholds:
            chosen = per_class_thresholds(probs, targets, labels, objective.target_precision)
            rule["per_class"] = {label: t.value for label, t in chosen.items()}
            notes = [t.note for t in chosen.values() if not t.feasible]
            rule.update(feasible=not notes, note="; ".join(notes))
        else:
            chosen_one = threshold_for_precision(probs, targets, objective.target_precision)
            rule.update(min_confidence=chosen_one.value, feasible=chosen_one.feasible, note=chosen_one.note)
    elif objective.target_coverage is not None:
        chosen_one = threshold_for_coverage(probs, targets, objective.target_coverage)
        rule.update(basis="target_coverage", target=objective.target_coverage, min_confidence=chosen_one.value)
    return rule if rule["basis"] is not None else None
