"""Calibration: how far confidence is from accuracy (ECE, MCE, reliability bins), and temperature
scaling fitted on validation logits. Torch tensors on any device."""

from __future__ import annotations

from typing import Any

import torch

N_BINS = 15


def reliability_bins(probs: torch.Tensor, targets: torch.Tensor, n_bins: int = N_BINS) -> list[dict[str, Any]]:
    """Equal-width confidence bins over (0, 1]: count, mean confidence and accuracy; empty bins keep
    None for both, so a plot can show them as empty instead of as zero accuracy."""
    confidence, preds = probs.max(1)
    correct = (preds == targets).double()
    edges = torch.linspace(0, 1, n_bins + 1, dtype=torch.float64)
    # bin i holds (edges[i], edges[i+1]]; confidence 0 (impossible for a softmax) joins the first bin
    index = (torch.bucketize(confidence.double().cpu(), edges, right=False) - 1).clamp(0, n_bins - 1)
    bins = []
    for i in range(n_bins):
        mask = index == i
        count = int(mask.sum())
        bins.append({"lo": float(edges[i]), "hi": float(edges[i + 1]), "count": count,
                     "confidence": float(confidence.double().cpu()[mask].mean()) if count else None,
                     "accuracy": float(correct.cpu()[mask].mean()) if count else None})
    return bins


def calibration_errors(probs: torch.Tensor, targets: torch.Tensor, n_bins: int = N_BINS) -> dict[str, Any]:
    """ECE: count-weighted mean |accuracy - confidence| over bins; MCE: the largest gap."""
    bins = reliability_bins(probs, targets, n_bins)
    n = sum(b["count"] for b in bins)
    gaps = [(b["count"], abs(b["accuracy"] - b["confidence"])) for b in bins if b["count"]]
    return {"ece": sum(c * g for c, g in gaps) / max(n, 1), "mce": max((g for _, g in gaps), default=0.0),
            "n_bins": n_bins, "bins": bins}


def nll(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0) -> float:
    return float(torch.nn.functional.cross_entropy(logits.double() / temperature, targets))


def fit_temperature(logits: torch.Tensor, targets: torch.Tensor, max_iter: int = 200) -> float:
    """T > 0 minimizing the NLL of softmax(logits / T); argmax (hence accuracy) is unchanged by any T.

    Optimizes log T so T stays positive; logits are detached, the model is not involved."""
    logits, targets = logits.detach().double(), targets.detach()
    log_t = torch.zeros((), dtype=torch.float64, device=logits.device, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.1, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(logits / log_t.exp(), targets)
        loss.backward()
        return loss

    optimizer.step(closure)
    temperature = float(log_t.detach().exp())
    # Never return a T that is worse than no scaling (a degenerate optimizer run).
    return temperature if nll(logits, targets, temperature) <= nll(logits, targets) else 1.0
