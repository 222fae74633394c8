"""Unit importance as a cooperative game on a sweep: exact Shapley and Banzhaf values and pairwise
interaction indices from all 2^n subsets (n <= `tables.DENSE_MAX_UNITS`), and sampled estimates
with standard errors from a value function (`table_fn` over an incomplete table).

values: the value function v(S) of a subset, float [N] or [N, P] (mean over prompts): success
(0/1) or a metric.
"""

from __future__ import annotations

import functools
import itertools
import math
from typing import Callable, Optional, Sequence

import numpy as np

from jaxcircuits.stats.tables import as_bool, bitmasks, dense_table, per_subset


def value_table(subsets, values) -> np.ndarray:
    """v(S) for all 2^n subsets, float [2^n] indexed by bitmask; values [N] or [N, P] (mean)."""
    bits = as_bool(subsets)
    table = dense_table(bits, per_subset(values), np.nan)
    if np.isnan(table).any():
        raise ValueError(f"exact importance needs all 2^{bits.shape[1]} subsets; "
                         f"{int(np.isnan(table).sum())} missing (use shapley_sampled/banzhaf_sampled)")
    return table


@functools.lru_cache(maxsize=4)
def _popcount(n: int) -> np.ndarray:
    """|S| for every bitmask S < 2^n (read-only, cached)."""
    out = np.bitwise_count(np.arange(1 << n))
    out.flags.writeable = False
    return out


def _index(table: np.ndarray, n: int, coalition: Sequence[int], kind: str) -> float:
    """Shapley/Banzhaf (interaction) index of a coalition U of units from a full table [2^n].

    sum over S in N minus U of weight(|S|) * (discrete derivative of v at S along U); weights
    |S|! (n-|S|-|U|)! / (n-|U|+1)! (Shapley) or 2^-(n-|U|) (Banzhaf).
    """
    u = len(coalition)
    axes = [n - 1 - i for i in coalition]          # unit i is bit i: axis n-1-i of the cube
    cube = np.moveaxis(table.reshape((2,) * n), axes, range(u))
    delta = sum((-1) ** (u - sum(t)) * cube[t] for t in itertools.product((0, 1), repeat=u))
    if kind == "banzhaf":
        return float(delta.mean())
    if kind != "shapley":
        raise ValueError(f"index must be 'shapley' or 'banzhaf', got {kind!r}")
    size = np.moveaxis(_popcount(n).reshape((2,) * n), axes, range(u))[(0,) * u]
    weight = 1.0 / np.array([(n - u + 1) * math.comb(n - u, s) for s in range(n - u + 1)])
    return float((weight[size] * delta).sum())


def shapley(subsets, values) -> np.ndarray:
    """Exact Shapley values [n] of the units for v = values (needs all 2^n subsets)."""
    return _unit_indices(subsets, values, "shapley")


def banzhaf(subsets, values) -> np.ndarray:
    """Exact Banzhaf values [n]: mean over S not holding i of v(S + i) - v(S)."""
    return _unit_indices(subsets, values, "banzhaf")


def _unit_indices(subsets, values, kind: str) -> np.ndarray:
    table = value_table(subsets, values)
    n = as_bool(subsets).shape[1]
    return np.array([_index(table, n, (i,), kind) for i in range(n)])


def interactions(subsets, values, units: Optional[Sequence[int]] = None, top: int = 5,
                 index: str = "shapley") -> dict:
    """Pairwise interaction index among `units` (default: the `top` units by |Shapley value|).

    index 'shapley' (Shapley interaction index) or 'banzhaf': weighted mean over S of
    v(S+i+j) - v(S+i) - v(S+j) + v(S); > 0 synergy, < 0 redundancy (e.g. two units each
    sufficient alone). Returns units [m] and matrix [m, m] (symmetric, zero diagonal).
    """
    table = value_table(subsets, values)
    n = as_bool(subsets).shape[1]
    if units is None:
        phi = np.array([_index(table, n, (i,), "shapley") for i in range(n)])
        units = np.sort(np.argsort(-np.abs(phi), kind="stable")[:top])
    units = [int(i) for i in units]
    matrix = np.zeros((len(units), len(units)))
    for a, b in itertools.combinations(range(len(units)), 2):
        matrix[a, b] = matrix[b, a] = _index(table, n, (units[a], units[b]), index)
    return {"units": np.array(units), "matrix": matrix}


def table_fn(subsets, values) -> Callable[[np.ndarray], np.ndarray]:
    """A value function over a (possibly incomplete) table: bool [B, n] -> float [B], NaN if absent."""
    bits = as_bool(subsets)
    masks = bitmasks(bits)
    order = np.argsort(masks)
    sorted_masks, sorted_values = masks[order], per_subset(values)[order]

    def value(query):
        q = bitmasks(np.asarray(query, dtype=bool).reshape(-1, bits.shape[1]))
        j = np.minimum(np.searchsorted(sorted_masks, q), len(sorted_masks) - 1)
        return np.where(sorted_masks[j] == q, sorted_values[j], np.nan)

    return value


def _estimate(marginals: np.ndarray) -> dict:
    """Per-unit mean of marginal samples [M, n] ignoring NaN, its standard error and sample count."""
    count = (~np.isnan(marginals)).sum(0)
    mean = np.nansum(marginals, 0) / np.maximum(count, 1)
    var = np.nansum((marginals - mean) ** 2, 0) / np.maximum(count - 1, 1)
    return {"value": np.where(count > 0, mean, np.nan), "stderr": np.sqrt(var / np.maximum(count, 1)),
            "samples": count}


def shapley_sampled(value_fn: Callable[[np.ndarray], np.ndarray], n: int, n_permutations: int,
                    seed: int = 0) -> dict:
    """Shapley values by permutation sampling: value [n], stderr [n], samples [n].

    Each random order of the units gives every unit's marginal contribution to the units before
    it; value_fn (bool [B, n] -> float [B]) is called once on all n_permutations * (n + 1)
    prefixes. NaN values (e.g. `table_fn` misses) drop the affected marginals.
    """
    rng = np.random.default_rng(seed)
    position = np.argsort(rng.random((n_permutations, n)), axis=1)     # position of each unit
    prefixes = position[:, None, :] < np.arange(n + 1)[None, :, None]  # [P, n + 1, n]
    v = np.asarray(value_fn(prefixes.reshape(-1, n)), dtype=np.float64).reshape(n_permutations, n + 1)
    gain = np.diff(v, axis=1)                                          # gain of the t-th unit added
    return _estimate(np.take_along_axis(gain, position, axis=1))


def banzhaf_sampled(value_fn: Callable[[np.ndarray], np.ndarray], n: int, n_samples: int,
                    seed: int = 0) -> dict:
    """Banzhaf values from uniformly random subsets S: value [n], stderr [n], samples [n].

    Unit i's sample is v(S + i) - v(S - i); value_fn is called once on the n_samples * (n + 1)
    sets S and S xor {i}. NaN values drop the affected marginals.
    """
    rng = np.random.default_rng(seed)
    s = rng.random((n_samples, n)) < 0.5
    flipped = s[:, None, :] ^ np.eye(n, dtype=bool)[None]              # [M, n, n]
    v = np.asarray(value_fn(np.concatenate([s[:, None], flipped], 1).reshape(-1, n)),
                   dtype=np.float64).reshape(n_samples, n + 1)
    sign = np.where(s, 1.0, -1.0)
    return _estimate(sign * (v[:, :1] - v[:, 1:]))
