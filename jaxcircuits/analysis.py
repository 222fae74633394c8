"""Analysis of a subset sweep: which subsets of units carry a behaviour, and how sharply.

Inputs, throughout:
  subsets  bool [N, n], one row per evaluated subset of the n units (one row per subset), or
           integer bitmasks [N] (unit i = bit i; n is then the highest set bit + 1, so pass bool
           rows when the last unit may be absent).
  metric   float [N] or [N, P] (P prompts; per-subset quantities average over prompts).
  success  bool [N], usually from `success_from`.
  values   the value function v(S) of a subset for unit importance: success (0/1) or a metric.

Exact vs estimated: a size layer present in full (all C(n, k) subsets) gives an exact rate;
otherwise rates carry Wilson 95% intervals. Exact Shapley/Banzhaf values and interactions need
all 2^n subsets (n <= 24); `shapley_sampled`/`banzhaf_sampled` estimate them, with standard
errors, from a callable value function (or `table_fn` over an incomplete table).
All results are numpy arrays/Python scalars; `summarize` makes a JSON-serialisable dict.
"""

from __future__ import annotations

import functools
import itertools
import math
from typing import Callable, Optional, Sequence

import numpy as np

from jaxcircuits.subsets import from_bitmask, to_bitmask

DENSE_MAX_UNITS = 24          # tables indexed by bitmask (2^n entries) up to this n
Z95 = 1.959963984540054


# ----------------------------------------------------------------------------- inputs

def as_bool(subsets) -> np.ndarray:
    """bool [N, n] rows, or integer bitmasks [N] -> bool [N, n]."""
    a = np.asarray(subsets)
    if a.dtype == bool:
        if a.ndim != 2:
            raise ValueError(f"bool subsets must be [N, n], got shape {a.shape}")
        return a
    if a.ndim != 1 or not np.issubdtype(a.dtype, np.integer):
        raise ValueError(f"subsets must be bool [N, n] or integer bitmasks [N], got {a.dtype} {a.shape}")
    n = max(1, int(a.max(initial=0)).bit_length())
    return from_bitmask(a, n)


def _per_subset(x) -> np.ndarray:
    """float [N] or [N, P] -> [N] (mean over prompts)."""
    x = np.asarray(x, dtype=np.float64)
    return x.mean(-1) if x.ndim == 2 else x


def _criterion(metric: np.ndarray, kind: str, threshold: float) -> np.ndarray:
    if kind == "positive":
        return metric > threshold
    if kind == "above":
        return metric >= threshold
    if kind == "below":
        return metric <= threshold
    raise ValueError(f"kind must be 'positive', 'above' or 'below', got {kind!r}")


def success_fraction(metric, kind: str = "positive", threshold: float = 0.0) -> np.ndarray:
    """Fraction of prompts on which each subset succeeds: metric [N, P] (or [N]) -> float [N].

    Per prompt: 'positive' is metric > threshold (strict; e.g. a logit difference's sign with
    threshold 0), 'above' is metric >= threshold, 'below' is metric <= threshold.
    """
    hit = _criterion(np.asarray(metric, dtype=np.float64), kind, threshold)
    return hit.mean(-1) if hit.ndim == 2 else hit.astype(np.float64)


def success_from(metric, kind: str = "positive", threshold: float = 0.0, aggregate: str = "mean",
                 level: float = 0.5) -> np.ndarray:
    """Per-subset success, bool [N], from metric [N] or [N, P].

    aggregate 'mean': the criterion (see `success_fraction`) applied to the mean over prompts;
    'fraction': at least `level` of the prompts meet the criterion. Same thing for [N] metrics.
    """
    if aggregate == "mean":
        return _criterion(_per_subset(metric), kind, threshold)
    if aggregate == "fraction":
        return success_fraction(metric, kind, threshold) >= level
    raise ValueError(f"aggregate must be 'mean' or 'fraction', got {aggregate!r}")


def _masks(bits: np.ndarray) -> np.ndarray:
    """bool [N, n] -> uint64 bitmasks [N] (n <= 64)."""
    return to_bitmask(bits, np.uint64)


def _dense(bits: np.ndarray, values, fill) -> np.ndarray:
    """A table [2^n] indexed by bitmask: values at the given subsets, `fill` elsewhere."""
    n = bits.shape[1]
    if n > DENSE_MAX_UNITS:
        raise ValueError(f"{n} units: bitmask-indexed tables need n <= {DENSE_MAX_UNITS}")
    values = np.asarray(values)
    table = np.full(1 << n, fill, dtype=np.result_type(values.dtype, np.asarray(fill).dtype))
    table[_masks(bits)] = values
    return table


def _sizes(bits: np.ndarray):
    """Sizes present (ascending) and each row's index into them."""
    return np.unique(bits.sum(1), return_inverse=True)


def _sorted_rows(bits: np.ndarray) -> np.ndarray:
    """Rows ordered by (size, bitmask)."""
    return bits[np.lexsort((_masks(bits), bits.sum(1)))] if len(bits) else bits


def is_exhaustive(subsets) -> bool:
    """Whether all 2^n subsets are present."""
    bits = as_bool(subsets)
    n = bits.shape[1]
    return n <= DENSE_MAX_UNITS and bool(np.bincount(_masks(bits).astype(np.int64), minlength=1 << n).all())


# ----------------------------------------------------------------------------- rates by size

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
    bits = as_bool(subsets)
    success = np.asarray(success, dtype=bool)
    ks, idx = _sizes(bits)
    count = np.bincount(idx, minlength=len(ks))
    hits = np.bincount(idx, weights=success.astype(np.float64), minlength=len(ks)).astype(np.int64)
    distinct = np.bincount(idx[np.unique(_masks(bits), return_index=True)[1]], minlength=len(ks))
    full = distinct == np.array([math.comb(bits.shape[1], int(k)) for k in ks])
    rate = hits / count
    lo, hi = wilson_interval(hits, count)
    return {"k": ks, "count": count, "successes": hits, "rate": rate,
            "lo": np.where(full, rate, lo), "hi": np.where(full, rate, hi), "exhaustive": full}


def _crossing(k: np.ndarray, rate: np.ndarray, level: float) -> Optional[float]:
    """First k where the piecewise-linear rate curve reaches `level` (None if it never does)."""
    above = np.flatnonzero(rate >= level)
    if not len(above):
        return None
    j = int(above[0])
    if j == 0:
        return float(k[0])
    t = (level - rate[j - 1]) / (rate[j] - rate[j - 1])
    return float(k[j - 1] + t * (k[j] - k[j - 1]))


def threshold(rates: dict, low: float = 0.1, high: float = 0.9) -> dict:
    """Where a rising rate curve (from `rate_by_size`) switches on.

    k_star: smallest k with rate >= 0.5 (None if none); k50/k10/k90: first interpolated k where
    the curve reaches 0.5/`low`/`high`; sharpness = k90 - k10, the width of the transition in
    units of k (None if the curve never reaches `high`). For a falling curve pass 1 - rate.
    """
    k = np.asarray(rates["k"], dtype=np.float64)
    rate = np.asarray(rates["rate"], dtype=np.float64)
    above = np.flatnonzero(rate >= 0.5)
    k10, k90 = _crossing(k, rate, low), _crossing(k, rate, high)
    return {"k_star": int(k[above[0]]) if len(above) else None, "k50": _crossing(k, rate, 0.5),
            "k10": k10, "k90": k90, "sharpness": None if k10 is None or k90 is None else k90 - k10}


def metric_by_size(subsets, metric, q: Sequence[float] = (0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0)) -> dict:
    """Distribution of the per-subset metric (mean over prompts) per size.

    Returns k, count, mean, std [K]; q [Q] (levels); quantiles [K, Q].
    """
    bits = as_bool(subsets)
    m = _per_subset(metric)
    ks, idx = _sizes(bits)
    groups = [m[idx == j] for j in range(len(ks))]
    return {"k": ks, "count": np.array([len(g) for g in groups]),
            "mean": np.array([g.mean() for g in groups]), "std": np.array([g.std() for g in groups]),
            "q": np.asarray(q, dtype=np.float64), "quantiles": np.array([np.quantile(g, q) for g in groups])}


# ----------------------------------------------------------------------------- structure

def is_symmetric(subsets, success) -> bool:
    """Whether success depends only on |S| (constant within each size present)."""
    bits = as_bool(subsets)
    success = np.asarray(success, dtype=bool)
    _, idx = _sizes(bits)
    hits = np.bincount(idx, weights=success.astype(np.float64))
    return bool(np.all((hits == 0) | (hits == np.bincount(idx))))


def monotonicity(subsets, success, max_examples: int = 10) -> dict:
    """Violations of monotonicity over the one-unit steps S -> S + {i} present in the table.

    A violation: S succeeds and S + {i} fails. Exhaustive over 2^n, no violations <=> monotone.
    Returns n_pairs (steps with both ends present), n_violations, monotone (bool),
    violations_by_unit [n] (by the added unit), examples: up to `max_examples`
    {'subset': S's units, 'added': i}, smallest S first.
    """
    bits = as_bool(subsets)
    success = np.asarray(success, dtype=bool)
    masks = _masks(bits)
    order = np.argsort(masks)
    sorted_masks, sorted_success = masks[order], success[order]
    n_pairs, by_unit, found = 0, [], []
    for i in range(bits.shape[1]):
        step = masks | (1 << i)
        j = np.minimum(np.searchsorted(sorted_masks, step), len(masks) - 1)
        pair = ~bits[:, i] & (sorted_masks[j] == step)
        bad = pair & success & ~sorted_success[j]
        n_pairs += int(pair.sum())
        by_unit.append(int(bad.sum()))
        found += [(int(m), i) for m in masks[bad]]
    found.sort(key=lambda e: (bin(e[0]).count("1"), e))
    n = bits.shape[1]
    examples = [{"subset": np.flatnonzero(from_bitmask(m, n)).tolist(), "added": i}
                for m, i in found[:max_examples]]
    return {"n_pairs": n_pairs, "n_violations": len(found), "monotone": not found,
            "violations_by_unit": np.array(by_unit), "examples": examples}


def _below(table: np.ndarray, n: int) -> np.ndarray:
    """For a bool table [2^n]: whether each set has a proper subset marked True."""
    up = table.copy()                              # up[S] = any marked subset of S (S included)
    for i in range(n):
        v = up.reshape(-1, 2, 1 << i)
        v[:, 1] |= v[:, 0]
    strict = np.zeros_like(table)                  # OR over i in S of up[S - {i}]
    for i in range(n):
        strict.reshape(-1, 2, 1 << i)[:, 1] |= up.reshape(-1, 2, 1 << i)[:, 0]
    return strict


def minimal_sufficient(subsets, success) -> np.ndarray:
    """The minimal successful sets: bool [M, n], ordered by (size, bitmask).

    S is returned iff it succeeds and no proper subset of S in the table succeeds (O(n 2^n) by a
    subset-sum transform; n <= 24). For a monotone function on an exhaustive table this is the
    antichain whose up-closure is the success family. For a non-monotone one it is still the
    set of minimal elements of the success family, but success is then not closed upwards
    (see `monotonicity`); rows absent from the table count as failures.
    """
    bits = as_bool(subsets)
    n = bits.shape[1]
    table = _dense(bits, np.asarray(success, dtype=bool), False)
    return _sorted_rows(from_bitmask(np.flatnonzero(table & ~_below(table, n)), n).reshape(-1, n))


def maximal_insufficient(subsets, success) -> np.ndarray:
    """The maximal failing sets: bool [M, n] (no proper superset in the table fails).

    The dual of `minimal_sufficient` (complement every set and negate success).
    """
    bits = as_bool(subsets)
    return _sorted_rows(~minimal_sufficient(~bits, ~np.asarray(success, dtype=bool)))


def inclusion_frequency(sets) -> np.ndarray:
    """Fraction of the given sets (bool [M, n]) that contain each unit: float [n] (0 if M = 0)."""
    sets = np.asarray(sets, dtype=bool)
    return sets.mean(0) if len(sets) else np.zeros(sets.shape[1])


def linear_threshold_fit(subsets, success, l2: float = 1e-2, iters: int = 50) -> dict:
    """Best linear threshold rule success ~ [w . x >= b] (x = the subset's bool row).

    w: L2-regularised logistic regression (Newton steps until converged; penalty l2 * N * |w|^2 / 2); b: the
    cut on the scores w . x that classifies the most subsets right (midway between scores).
    Returns weights [n] and bias scaled so max |w| = 1, and accuracy (fraction right; 1.0 means
    success is exactly a weighted threshold function of the units, up to this fit).
    """
    bits = as_bool(subsets)
    y = np.asarray(success, dtype=bool)
    big_n, n = bits.shape
    x = np.concatenate([bits, np.ones((big_n, 1), bool)], axis=1).astype(np.float64)
    reg = np.full(n + 1, l2 * big_n)
    reg[-1] = 1e-6 * big_n                            # (almost) free intercept
    beta = np.zeros(n + 1)
    for _ in range(iters):
        p = 1.0 / (1.0 + np.exp(-(x @ beta)))
        grad = x.T @ (p - y) + reg * beta
        hess = (x * (p * (1 - p))[:, None]).T @ x + np.diag(reg)
        step = np.linalg.solve(hess, grad)
        beta -= step
        if np.abs(step).max() < 1e-6:
            break
    w = beta[:n]
    scores = bits @ w
    order = np.argsort(scores, kind="stable")
    s, ys = scores[order], y[order]
    # Cutting before sorted position j predicts success for positions >= j.
    correct = np.concatenate([[0], np.cumsum(~ys)]) + (ys.sum() - np.concatenate([[0], np.cumsum(ys)]))
    valid = np.ones(big_n + 1, bool)
    valid[1:-1] = s[1:] > s[:-1]
    j = int(np.argmax(np.where(valid, correct, -1)))
    b = s[0] - 1.0 if j == 0 else s[-1] + 1.0 if j == big_n else (s[j - 1] + s[j]) / 2
    scale = np.abs(w).max() if np.abs(w).max() > 0 else 1.0
    w, b = w / scale, b / scale
    return {"weights": w, "bias": float(b), "accuracy": float(np.mean((bits @ w >= b) == y))}


# ----------------------------------------------------------------------------- unit importance

def value_table(subsets, values) -> np.ndarray:
    """v(S) for all 2^n subsets, float [2^n] indexed by bitmask; values [N] or [N, P] (mean)."""
    bits = as_bool(subsets)
    table = _dense(bits, _per_subset(values), np.nan)
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
    masks = _masks(bits)
    order = np.argsort(masks)
    sorted_masks, sorted_values = masks[order], _per_subset(values)[order]

    def value(query):
        q = _masks(np.asarray(query, dtype=bool).reshape(-1, bits.shape[1]))
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


# ----------------------------------------------------------------------------- summary

def jsonable(x):
    """numpy -> JSON-serialisable Python (lists, ints, floats; NaN -> None)."""
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple, np.ndarray)):
        return [jsonable(v) for v in (x.tolist() if isinstance(x, np.ndarray) else x)]
    if isinstance(x, (bool, np.bool_)):
        return bool(x)
    if isinstance(x, (int, np.integer)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        return None if math.isnan(x) else float(x)
    return x


def _sets(sets: np.ndarray, max_sets: int) -> dict:
    return {"count": len(sets), "sets": [np.flatnonzero(r).tolist() for r in sets[:max_sets]],
            "inclusion": inclusion_frequency(sets)}


def summarize(subsets, success, metric=None, importance_of: str = "success",
              unit_names: Optional[Sequence[str]] = None, top: int = 5, max_sets: int = 50) -> dict:
    """Everything above in one JSON-serialisable dict (plain lists/floats/ints/bools/None).

    importance_of: the importance value function, 'success' (0/1) or 'metric' (mean over prompts).
    Keys: n_units, n_subsets, exhaustive (all 2^n present), unit_names, rate_by_size,
    threshold, metric_by_size (if metric), symmetric, monotonicity, linear_fit,
    minimal_sufficient / maximal_insufficient ({count, sets (first max_sets), inclusion};
    if n <= 24), importance ({value, shapley, banzhaf}) and interactions ({index, units,
    matrix}) when exhaustive, else None.
    """
    if importance_of not in ("success", "metric") or (importance_of == "metric" and metric is None):
        raise ValueError("importance_of must be 'success', or 'metric' with a metric given")
    bits = as_bool(subsets)
    success = np.asarray(success, dtype=bool)
    n = bits.shape[1]
    full = is_exhaustive(bits)
    rates = rate_by_size(bits, success)
    out = {
        "n_units": n, "n_subsets": len(bits), "exhaustive": full,
        "unit_names": list(unit_names) if unit_names is not None else [str(i) for i in range(n)],
        "rate_by_size": rates, "threshold": threshold(rates),
        "metric_by_size": None if metric is None else metric_by_size(bits, metric),
        "symmetric": is_symmetric(bits, success), "monotonicity": monotonicity(bits, success),
        "linear_fit": linear_threshold_fit(bits, success),
        "minimal_sufficient": None, "maximal_insufficient": None, "importance": None, "interactions": None,
    }
    if n <= DENSE_MAX_UNITS:
        out["minimal_sufficient"] = _sets(minimal_sufficient(bits, success), max_sets)
        out["maximal_insufficient"] = _sets(maximal_insufficient(bits, success), max_sets)
    if full:
        v = success.astype(np.float64) if importance_of == "success" else metric
        out["importance"] = {"value": importance_of, "shapley": shapley(bits, v), "banzhaf": banzhaf(bits, v)}
        out["interactions"] = {"index": "shapley", **interactions(bits, v, top=top)}
    return jsonable(out)


def _fmt(x, digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def report_markdown(summary: dict) -> str:
    """A Markdown report of a `summarize` dict."""
    names = summary["unit_names"]
    rates, th, mono, fit = (summary[k] for k in ("rate_by_size", "threshold", "monotonicity", "linear_fit"))
    lines = [
        "# Subset sweep", "",
        f"{summary['n_subsets']} subsets of {summary['n_units']} units"
        f" ({'exhaustive' if summary['exhaustive'] else 'not exhaustive'}).", "",
        "## Success rate by size", "",
        "| k | count | successes | rate | 95% interval |", "|---|---|---|---|---|",
        *(f"| {k} | {c} | {s} | {_fmt(r)} | {'exact' if e else f'[{_fmt(lo)}, {_fmt(hi)}]'} |"
          for k, c, s, r, lo, hi, e in zip(*(rates[f] for f in
                                              ("k", "count", "successes", "rate", "lo", "hi", "exhaustive")))),
        "", f"Threshold k* = {_fmt(th['k_star'])} (interpolated k50 = {_fmt(th['k50'], 2)}); "
        f"10%->90% transition from k = {_fmt(th['k10'], 2)} to {_fmt(th['k90'], 2)} "
        f"(sharpness {_fmt(th['sharpness'], 2)}).", "",
        "## Structure", "",
        f"- symmetric (success depends only on |S|): {summary['symmetric']}",
        f"- monotone: {mono['monotone']} ({mono['n_violations']} violations in {mono['n_pairs']} one-unit steps)",
        *(f"  - {{{', '.join(names[u] for u in e['subset'])}}} succeeds, + {names[e['added']]} fails"
          for e in mono["examples"]),
        f"- linear threshold fit: accuracy {_fmt(fit['accuracy'])}, weights "
        f"{', '.join(f'{names[i]}={w:.2f}' for i, w in enumerate(fit['weights']))}, bias {fit['bias']:.2f}",
    ]
    for key, title in (("minimal_sufficient", "Minimal sufficient sets"), ("maximal_insufficient",
                                                                          "Maximal insufficient sets")):
        sets = summary[key]
        if sets is not None:
            lines += ["", f"## {title} ({sets['count']})", "",
                      *(f"- {{{', '.join(names[u] for u in s)}}}" for s in sets["sets"]),
                      *(["- ..."] if sets["count"] > len(sets["sets"]) else [])]
    imp = summary["importance"]
    if imp is not None:
        order = sorted(range(len(names)), key=lambda i: -abs(imp["shapley"][i]))
        lines += ["", f"## Unit importance (v = {imp['value']})", "",
                  "| unit | Shapley | Banzhaf |", "|---|---|---|",
                  *(f"| {names[i]} | {imp['shapley'][i]:.4f} | {imp['banzhaf'][i]:.4f} |" for i in order)]
        inter = summary["interactions"]
        pairs = sorted(((inter["matrix"][a][b], inter["units"][a], inter["units"][b])
                        for a, b in itertools.combinations(range(len(inter["units"])), 2)),
                       key=lambda p: -abs(p[0]))
        lines += ["", f"## Pairwise interactions ({inter['index']}; > 0 synergy, < 0 redundancy)", "",
                  *(f"- {names[i]} x {names[j]}: {x:+.4f}" for x, i, j in pairs)]
    return "\n".join(lines) + "\n"
