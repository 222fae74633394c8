"""Success rate by subset size, with Wilson intervals over the sampled subsets, and where a rising
rate curve switches on (k*, interpolated k50/k10/k90, the transition width).

A size layer present in full (all C(n, k) subsets) gives an exact rate; otherwise rates carry
Wilson 95% intervals. Inputs as in `tables`: subsets bool [N, n] or bitmasks [N], success bool [N].
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from jaxcircuits.stats.tables import bitmasks, per_subset, size_index, sweep_rows

Z95 = 1.959963984540054


def wilson_interval(successes, count, z: float = Z95):
    """Wilson score interval (lo, hi) for successes/count (arrays broadcast); count 0 -> (0, 1)."""
    s = np.asarray(successes, dtype=np.float64)
    c = np.asarray(count, dtype=np.float64)
    safe = np.maximum(c, 1.0)
    p = s / safe
    centre = (p + z * z / (2 * safe)) / (1 + z * z / safe)
    half = z * np.sqrt(p * (1 - p) / safe + z * z / (4 * safe * safe)) / (1 + z * z / safe)
    lo = np.where(c > 0, np.clip(centre - half, 0.0, 1.0), 0.0)
    hi = np.where(c > 0, np.clip(centre + half, 0.0, 1.0), 1.0)
    return lo, hi


def rate_by_size(subsets, success) -> dict:
    """Success rate per subset size k (only sizes present).

    Returns arrays [K]: k, count, successes, rate, lo, hi (Wilson 95%), exhaustive (all C(n, k)
    distinct k-subsets present: the rate is exact and lo = hi = rate).
    """
    bits, success, _ = sweep_rows(subsets, success)
    ks, idx = size_index(bits)
    count = np.bincount(idx, minlength=len(ks))
    hits = np.bincount(idx, weights=success.astype(np.float64), minlength=len(ks)).astype(np.int64)
    distinct = np.bincount(idx[np.unique(bitmasks(bits), return_index=True)[1]], minlength=len(ks))
    full = distinct == np.array([math.comb(bits.shape[1], int(k)) for k in ks])
    rate = hits / count
    lo, hi = wilson_interval(hits, count)
    return {"k": ks, "count": count, "successes": hits, "rate": rate,
            "lo": np.where(full, rate, lo), "hi": np.where(full, rate, hi), "exhaustive": full}


THRESHOLD_STATS = ("k_star", "k50", "k10", "k90", "sharpness")


def _crossing(k: np.ndarray, rate: np.ndarray, level: float) -> np.ndarray:
    """First k where each column of the piecewise-linear rate curves [K, R] reaches `level`: [R]
    (inf where a curve never does)."""
    above = rate >= level
    j = above.argmax(0)
    prev, cols = np.maximum(j - 1, 0), np.arange(rate.shape[1])
    r0, r1 = rate[prev, cols], rate[j, cols]
    with np.errstate(divide="ignore", invalid="ignore"):
        x = np.where(j > 0, k[prev] + (level - r0) / (r1 - r0) * (k[j] - k[prev]), k[j])
    return np.where(above.any(0), x, np.inf)


def threshold_stats(k, rate, low: float = 0.1, high: float = 0.9) -> np.ndarray:
    """`THRESHOLD_STATS` [5, R] of rising rate curves: k [K] sizes, rate [K, R]; inf = not reached.

    k_star: smallest k with rate >= 0.5; k50/k10/k90: first interpolated k where the curve
    reaches 0.5/`low`/`high`; sharpness = k90 - k10, the width of the transition in units of k.
    """
    k = np.asarray(k, dtype=np.float64)
    rate = np.asarray(rate, dtype=np.float64)
    above = rate >= 0.5
    k10, k90 = _crossing(k, rate, low), _crossing(k, rate, high)
    return np.stack([np.where(above.any(0), k[above.argmax(0)], np.inf), _crossing(k, rate, 0.5), k10, k90,
                     np.where(np.isinf(k90), np.inf, k90 - k10)])


def threshold(rates: dict, low: float = 0.1, high: float = 0.9) -> dict:
    """Where a rising rate curve (from `rate_by_size`) switches on: `threshold_stats` as a dict,
    None where not reached (k_star an int). For a falling curve pass 1 - rate.
    """
    stats = threshold_stats(rates["k"], np.asarray(rates["rate"], dtype=np.float64)[:, None], low, high)[:, 0]
    out = {name: None if np.isinf(v) else float(v) for name, v in zip(THRESHOLD_STATS, stats)}
    out["k_star"] = None if out["k_star"] is None else int(out["k_star"])
    return out


def metric_by_size(subsets, metric, q: Sequence[float] = (0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0)) -> dict:
    """Distribution of the per-subset metric (mean over prompts) per size.

    Returns k, count, mean, std [K]; q [Q] (levels); quantiles [K, Q].
    """
    bits, _, metric = sweep_rows(subsets, metric=metric)
    m = per_subset(metric)
    ks, idx = size_index(bits)
    groups = [m[idx == j] for j in range(len(ks))]
    return {"k": ks, "count": np.array([len(g) for g in groups]),
            "mean": np.array([g.mean() for g in groups]), "std": np.array([g.std() for g in groups]),
            "q": np.asarray(q, dtype=np.float64), "quantiles": np.array([np.quantile(g, q) for g in groups])}
