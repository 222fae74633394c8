"""Set structure of a sweep's success: symmetry (only |S| matters), monotonicity, the minimal
sufficient and maximal insufficient sets, and the best weighted threshold of the units.

Inputs as in `tables`: subsets bool [N, n] or bitmasks [N], success bool [N] (from a
`criteria.Criterion`). Minimal / maximal sets need n <= `tables.DENSE_MAX_UNITS`.
"""

from __future__ import annotations

import numpy as np

from jaxcircuits.stats.tables import from_bitmask
from jaxcircuits.stats.tables import (DENSE_MAX_UNITS, as_bool, bitmasks, dense_table, size_index, sorted_rows,
                                     sweep_rows)


def is_exhaustive(subsets) -> bool:
    """Whether all 2^n subsets are present."""
    bits = as_bool(subsets)
    n = bits.shape[1]
    return n <= DENSE_MAX_UNITS and bool(np.bincount(bitmasks(bits).astype(np.int64), minlength=1 << n).all())


def is_symmetric(subsets, success) -> bool:
    """Whether success depends only on |S| (constant within each size present)."""
    bits, success, _ = sweep_rows(subsets, success)
    _, idx = size_index(bits)
    hits = np.bincount(idx, weights=success.astype(np.float64))
    return bool(np.all((hits == 0) | (hits == np.bincount(idx))))


def monotonicity(subsets, success, max_examples: int = 10) -> dict:
    """Violations of monotonicity over the one-unit steps S -> S + {i} present in the table.

    A violation: S succeeds and S + {i} fails. Exhaustive over 2^n, no violations <=> monotone.
    Returns n_pairs (steps with both ends present), n_violations, monotone (bool),
    violations_by_unit [n] (by the added unit), examples: up to `max_examples`
    {'subset': S's units, 'added': i}, smallest S first.
    """
    bits, success, _ = sweep_rows(subsets, success)
    masks = bitmasks(bits)
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
    table = dense_table(bits, np.asarray(success, dtype=bool), False)
    return sorted_rows(from_bitmask(np.flatnonzero(table & ~_below(table, n)), n).reshape(-1, n))


def maximal_insufficient(subsets, success) -> np.ndarray:
    """The maximal failing sets: bool [M, n] (no proper superset in the table fails).

    The dual of `minimal_sufficient` (complement every set and negate success).
    """
    bits = as_bool(subsets)
    return sorted_rows(~minimal_sufficient(~bits, ~np.asarray(success, dtype=bool)))


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
