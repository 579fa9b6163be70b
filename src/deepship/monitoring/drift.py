"""Two-sample drift statistics, each with an effect size and a p-value.

An alert needs both (deepship.monitoring.monitor): the p-value guards small windows (where noise
looks like drift) and the effect size guards large ones (where any difference is "significant").
PSI uses bins fixed from the reference and additive smoothing, so it is never infinite.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from scipy import stats

N_BINS = 10
SMOOTHING = 0.5  # pseudo-count per bin: an empty bin on either side costs a bounded amount


def quantile_edges(reference: np.ndarray, n_bins: int = N_BINS) -> list[float]:
    """Inner bin edges at reference quantiles (ties merged): each bin holds about 1/n_bins of it."""
    qs = np.quantile(reference, np.linspace(0, 1, n_bins + 1)[1:-1])
    return sorted(set(float(q) for q in qs))


def binned(values: np.ndarray, edges: Sequence[float]) -> np.ndarray:
    return np.bincount(np.searchsorted(edges, values, side="right"), minlength=len(edges) + 1)


def psi(reference_counts: np.ndarray, current_counts: np.ndarray) -> float:
    """Population stability index, sum (c - r) ln(c / r) over smoothed bin shares."""
    r = (reference_counts + SMOOTHING) / (reference_counts.sum() + SMOOTHING * len(reference_counts))
    c = (current_counts + SMOOTHING) / (current_counts.sum() + SMOOTHING * len(current_counts))
    return float(np.sum((c - r) * np.log(c / r)))


def ks_test(reference: np.ndarray, current: np.ndarray) -> tuple[float, float]:
    """Two-sample Kolmogorov-Smirnov: (D, p-value); exact for small samples, asymptotic otherwise."""
    result = stats.ks_2samp(reference, current, method="auto")
    return float(result.statistic), float(result.pvalue)


def chi_square_test(reference_counts: np.ndarray, current_counts: np.ndarray) -> tuple[float, float]:
    """Homogeneity of two count vectors over the same categories; categories empty in both drop out."""
    table = np.vstack([reference_counts, current_counts]).astype(float)
    table = table[:, table.sum(0) > 0]
    if table.shape[1] < 2:
        return 0.0, 1.0
    statistic, p_value, _, _ = stats.chi2_contingency(table, correction=False)
    return float(statistic), float(p_value)


def holm(p_values: dict[str, float]) -> dict[str, float]:
    """Holm-adjusted p-values (family-wise error across the signals of one window)."""
    order = sorted(p_values, key=p_values.get)
    adjusted, running = {}, 0.0
    for rank, name in enumerate(order):
        running = max(running, min(1.0, (len(order) - rank) * p_values[name]))
        adjusted[name] = running
    return adjusted


def mmd_test(reference: torch.Tensor, current: torch.Tensor, permutations: int = 1000, seed: int = 0
             ) -> tuple[float, float]:
    """RBF-kernel MMD^2 (biased; bandwidth: median pairwise squared distance) with a permutation p-value.

    MMD^2 = s^T K s with s = +1/n on reference rows and -1/m on current rows, so all permutations are
    one matrix product K @ S. 1,000 permutations: the smallest p-value (1/1001) survives Holm's
    correction over a window's handful of signals at alpha 0.01. Embeddings are L2-normalized
    first: a change of direction, not of scale, is what the head sees."""
    x = torch.nn.functional.normalize(reference.double(), dim=1)
    y = torch.nn.functional.normalize(current.double().to(x.device), dim=1)
    joint = torch.cat([x, y])  # (n+m, D)
    distances = torch.cdist(joint, joint).pow(2)
    bandwidth = distances[distances > 0].median().clamp_min(1e-12)
    kernel = torch.exp(-distances / bandwidth)  # (n+m, n+m)
    n, m = len(x), len(y)
    signs = torch.cat([torch.full((n,), 1.0 / n), torch.full((m,), -1.0 / m)]).double().to(kernel.device)
    generator = torch.Generator().manual_seed(seed)
    order = torch.stack([torch.randperm(n + m, generator=generator) for _ in range(permutations)], 1)
    shuffled = torch.cat([signs[:, None], signs[order.to(kernel.device)]], 1)  # column 0: the observed split
    values = ((kernel @ shuffled) * shuffled).sum(0)  # (1 + permutations,) MMD^2 per split
    observed = values[0]
    return float(observed), float(((values[1:] >= observed).sum() + 1) / (permutations + 1))


def sample_rows(values: np.ndarray, limit: int, seed: int = 0) -> np.ndarray:
    """At most `limit` rows, drawn without replacement (seeded) when there are more."""
    if len(values) <= limit:
        return values
    return values[np.random.default_rng(seed).choice(len(values), limit, replace=False)]
