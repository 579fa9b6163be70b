"""Two-sample drift statistics, each with an effect size and a p-value.

An alert needs both (deepship.monitoring.monitor): the p-value guards small windows (where noise
looks like drift) and the effect size guards large ones (where any difference is "significant").
PSI uses bins fixed from the reference and additive smoothing, so it is never infinite.
"""

from __future__ import annotations

import math
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


def rbf_kernel(reference: torch.Tensor, current: torch.Tensor) -> torch.Tensor:
    """RBF kernel over the pooled rows (reference first), L2-normalized: a change of direction, not
    of scale, is what the head sees. Bandwidth: the median pairwise squared distance of the pooled
    rows, which does not depend on which rows are the reference, so permutations stay exchangeable.
    float32: the permutation products are the monitor's main cost, and sums are taken in float64."""
    x = torch.nn.functional.normalize(reference.double(), dim=1)
    y = torch.nn.functional.normalize(current.double().to(x.device), dim=1)
    joint = torch.cat([x, y])
    distances = (2 - 2 * joint @ joint.T).clamp_min(0)  # unit rows: |a - b|^2 = 2 - 2 a.b
    distances.fill_diagonal_(0)
    pairs = torch.triu_indices(len(joint), len(joint), offset=1, device=joint.device)
    bandwidth = distances[pairs[0], pairs[1]].median().clamp_min(1e-12)
    return torch.exp(-distances / bandwidth).float()


def unbiased_mmd2(kernel: torch.Tensor, first: torch.Tensor) -> torch.Tensor:
    """Unbiased MMD^2 between the rows in `first` and the others, one value per column of the (N, S)
    boolean matrix `first`: all S splits in one matrix product. Its expectation is 0 when both groups
    come from one distribution, whatever their sizes, so one effect limit serves every window size."""
    a = first.double()
    n = a.sum(0)
    m = kernel.shape[0] - n
    within_a = (a * (kernel @ first.to(kernel.dtype)).double()).sum(0)
    row_sums = kernel.double().sum(1)
    across = a.T @ row_sums - within_a
    within_b = row_sums.sum() - 2 * across - within_a
    diagonal = torch.diagonal(kernel).double()
    trace_a = a.T @ diagonal
    trace_b = diagonal.sum() - trace_a
    return ((within_a - trace_a) / (n * (n - 1)) + (within_b - trace_b) / (m * (m - 1))
            - 2 * across / (n * m))


def random_splits(total: int, size: int, count: int, generator: torch.Generator) -> torch.Tensor:
    """(total, count) boolean: each column marks `size` rows drawn without replacement."""
    picks = torch.rand(count, total, generator=generator).argsort(1)[:, :size]
    return torch.zeros(total, count, dtype=torch.bool).scatter_(0, picks.T, True)


def permutation_p_value(kernel: torch.Tensor, n: int, observed: float, resolution: float, seed: int = 0,
                        stop_after: int = 20, chunk: int = 500) -> float:
    """Sequential permutation p-value of MMD^2 (Besag & Clifford, 1991), the first `n` rows being the
    reference. Permutations are drawn in chunks until `stop_after` reach the observed value (p =
    stop_after / drawn: a window like the reference stops after a few dozen) or until the p-value
    could go as low as `resolution` (ceil(1 / resolution) - 1 permutations, p = (hits + 1) / (drawn + 1)).
    Both are exact under exchangeability."""
    generator = torch.Generator().manual_seed(seed)
    limit, drawn, hits = math.ceil(1 / resolution) - 1, 0, 0
    while drawn < limit:
        count = min(chunk if drawn else 5 * stop_after, limit - drawn)  # most quiet windows stop in the first
        reached = unbiased_mmd2(kernel, random_splits(kernel.shape[0], n, count, generator)) >= observed
        running = hits + reached.cumsum(0)
        if int(running[-1]) >= stop_after:
            return stop_after / (drawn + int(torch.nonzero(running >= stop_after)[0]) + 1)
        hits, drawn = int(running[-1]), drawn + count
    return (hits + 1) / (drawn + 1)


def half_split_limit(kernel: torch.Tensor, quantile: float = 0.99, splits: int = 200, seed: int = 0) -> float:
    """The `quantile` of unbiased MMD^2 between random halves of the rows of a (reference) kernel: how
    much the validation set differs from itself, the least a window must differ to alert."""
    splits_matrix = random_splits(kernel.shape[0], kernel.shape[0] // 2, splits, torch.Generator().manual_seed(seed))
    return float(torch.quantile(unbiased_mmd2(kernel, splits_matrix), quantile))


def mmd_drift(reference: torch.Tensor, current: torch.Tensor, resolution: float = 1e-3, seed: int = 0
              ) -> dict[str, float]:
    """Embedding drift: unbiased MMD^2 (the effect), its permutation p-value, resolved down to
    `resolution` (the caller sets it below the level Holm needs across the window's signals, so a real
    shift can alert at any monitor.alpha), and the effect limit from halves of the reference, all on
    one kernel."""
    kernel = rbf_kernel(reference, current)
    n = len(reference)
    first = torch.zeros(kernel.shape[0], 1, dtype=torch.bool)
    first[:n] = True
    statistic = float(unbiased_mmd2(kernel, first)[0])
    return {"statistic": statistic, "p_value": permutation_p_value(kernel, n, statistic, resolution, seed),
            "limit": half_split_limit(kernel[:n, :n], seed=seed)}


def sample_rows(values: np.ndarray, limit: int, seed: int = 0) -> np.ndarray:
    """At most `limit` rows, drawn without replacement (seeded) when there are more."""
    if len(values) <= limit:
        return values
    return values[np.random.default_rng(seed).choice(len(values), limit, replace=False)]
