"""Champion vs challenger on the same inputs: is the difference real?

Both tests are paired (each input is scored by both models), which is far more sensitive than
comparing two independent confidence intervals.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch

from deepship.evaluation.metrics import bootstrap_values, percentile_interval

EXACT_MAX = 1000  # discordant pairs; beyond, 2**n overflows float and the normal approximation is exact enough


def mcnemar(correct_a: torch.Tensor, correct_b: torch.Tensor) -> dict[str, Any]:
    """McNemar test: under H0 the discordant pairs split 50/50. Exact two-sided binomial p-value up to
    EXACT_MAX discordant pairs, then the continuity-corrected chi-square (1 dof), which matches it there.

    b: A right and B wrong; c: A wrong and B right."""
    b = int((correct_a & ~correct_b).sum())
    c = int((~correct_a & correct_b).sum())
    n = b + c
    if n == 0:
        return {"b": 0, "c": 0, "p_value": 1.0, "method": "exact"}
    if n <= EXACT_MAX:
        tail = sum(math.comb(n, k) for k in range(min(b, c) + 1)) / 2.0 ** n  # exact ints, then one division
        return {"b": b, "c": c, "p_value": min(1.0, 2.0 * tail), "method": "exact"}
    chi2 = (abs(b - c) - 1) ** 2 / n
    return {"b": b, "c": c, "p_value": math.erfc(math.sqrt(chi2 / 2)), "method": "chi2_corrected"}


def paired_bootstrap(n: int, metric_a: Callable[[torch.Tensor], float | None],
                     metric_b: Callable[[torch.Tensor], float | None], n_resamples: int = 1000, alpha: float = 0.05,
                     seed: int = 0, device: torch.device | str = "cpu") -> dict[str, Any]:
    """Distribution of metric_b - metric_a over the same resampled inputs: its percentile interval and
    a two-sided p-value (twice the share of resamples on the far side of zero). Both are None when
    the metric is undefined on every resample (e.g. ROC-AUC when the data holds one class)."""
    def diff(idx: torch.Tensor) -> float | None:
        a, b = metric_a(idx), metric_b(idx)
        return None if a is None or b is None else b - a

    values = bootstrap_values(n, diff, n_resamples, seed, device)
    if not values.numel():
        return {"ci": None, "p_value": None, "n_resamples": 0}
    lo, hi = percentile_interval(values, alpha)
    below, above = float((values <= 0).double().mean()), float((values >= 0).double().mean())
    return {"ci": [lo, hi], "p_value": min(1.0, 2.0 * min(below, above)), "n_resamples": int(values.numel())}
