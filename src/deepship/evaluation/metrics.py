"""Offline classification metrics from predictions (probabilities), not from models.

Inputs are torch tensors on any device: probs (N, C) rows summing to 1, targets (N,) class indices.
torchmetrics does the counting, so CPU and GPU give the same numbers; this module names them and
handles the edge cases a report meets (a class never predicted, a single-class batch).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import torch
import torchmetrics.functional.classification as tmf

EPS = 1e-12  # log loss clips probabilities so that a confident mistake costs a lot, not infinity


def log_loss(probs: torch.Tensor, targets: torch.Tensor) -> float:
    picked = probs[torch.arange(targets.shape[0], device=probs.device), targets]
    return float(-torch.log(picked.clamp(EPS, 1.0)).mean())


def _auc(fn: Callable[..., torch.Tensor], probs: torch.Tensor, targets: torch.Tensor) -> float | None:
    """ROC-AUC / PR-AUC; None when only one class is present (the curve is undefined)."""
    if torch.unique(targets).numel() < 2:
        return None
    num_classes = probs.shape[1]
    if num_classes == 2:
        name = "binary_auroc" if fn is tmf.multiclass_auroc else "binary_average_precision"
        return float(getattr(tmf, name)(probs[:, 1], targets))
    return float(fn(probs, targets, num_classes=num_classes, average="macro"))  # one-vs-rest, macro


def per_class(preds: torch.Tensor, targets: torch.Tensor, labels: Sequence[str]) -> dict[str, dict[str, float]]:
    c = len(labels)
    kwargs = {"num_classes": c, "average": None, "zero_division": 0}
    precision = tmf.multiclass_precision(preds, targets, **kwargs)
    recall = tmf.multiclass_recall(preds, targets, **kwargs)
    f1 = tmf.multiclass_f1_score(preds, targets, **kwargs)
    support = torch.bincount(targets, minlength=c)
    return {label: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
                    "support": int(support[i])} for i, label in enumerate(labels)}


def classification_metrics(probs: torch.Tensor, targets: torch.Tensor, labels: Sequence[str],
                           top_k: Sequence[int] = (2, 5), preds: torch.Tensor | None = None) -> dict[str, Any]:
    """Headline, averaged, per-class and threshold-free metrics plus the confusion matrix.

    `preds` are the decisions to score (default argmax; a package's binary cost threshold moves them);
    top-k, AUCs and log loss score the probabilities themselves."""
    c = len(labels)
    preds = probs.argmax(1) if preds is None else preds
    out: dict[str, Any] = {"n": int(targets.shape[0]),
                           "accuracy": float((preds == targets).double().mean())}
    for k in top_k:
        if k < c:
            out[f"top{k}_accuracy"] = float(tmf.multiclass_accuracy(probs, targets, num_classes=c, top_k=k,
                                                                    average="micro"))
    for average in ("macro", "weighted"):
        kwargs = {"num_classes": c, "average": average, "zero_division": 0}
        out[f"{average}_precision"] = float(tmf.multiclass_precision(preds, targets, **kwargs))
        out[f"{average}_recall"] = float(tmf.multiclass_recall(preds, targets, **kwargs))
        out[f"{average}_f1"] = float(tmf.multiclass_f1_score(preds, targets, **kwargs))
    out["roc_auc"] = _auc(tmf.multiclass_auroc, probs, targets)
    out["pr_auc"] = _auc(tmf.multiclass_average_precision, probs, targets)
    out["log_loss"] = log_loss(probs, targets)
    out["per_class"] = per_class(preds, targets, labels)
    out["confusion_matrix"] = tmf.multiclass_confusion_matrix(preds, targets, num_classes=c).tolist()  # rows: true
    return out


def bootstrap_values(n: int, statistic: Callable[[torch.Tensor], float | None], n_resamples: int = 1000,
                     seed: int = 0, device: torch.device | str = "cpu") -> torch.Tensor:
    """`statistic(idx)` over `n_resamples` index draws with replacement (seeded, same draws on any
    device); undefined values (None/NaN, e.g. AUC of a one-class resample) are dropped. Paired
    comparisons pass a statistic that indexes both models' predictions with the same idx."""
    generator = torch.Generator().manual_seed(seed)
    values = []
    for _ in range(n_resamples):
        value = statistic(torch.randint(0, n, (n,), generator=generator).to(device))
        if value is not None and not math.isnan(value):
            values.append(value)
    return torch.tensor(values, dtype=torch.float64)


def percentile_interval(values: torch.Tensor, alpha: float = 0.05) -> tuple[float, float]:
    return torch.quantile(values, alpha / 2).item(), torch.quantile(values, 1 - alpha / 2).item()


_AVERAGED = {"f1": tmf.multiclass_f1_score, "precision": tmf.multiclass_precision, "recall": tmf.multiclass_recall}


def score(name: str, probs: torch.Tensor, preds: torch.Tensor, targets: torch.Tensor) -> float | None:
    """One named metric (an objective.metric) of decisions `preds` and probabilities; None if undefined."""
    if name == "accuracy":
        return float((preds == targets).double().mean())
    if name == "roc_auc":
        return _auc(tmf.multiclass_auroc, probs, targets)
    if name == "pr_auc":
        return _auc(tmf.multiclass_average_precision, probs, targets)
    average, kind = name.split("_", 1)  # macro_f1 -> ("macro", "f1")
    return float(_AVERAGED[kind](preds, targets, num_classes=probs.shape[1], average=average, zero_division=0))
