"""Analysis of a subset sweep: which subsets of units carry a behaviour, and how sharply.

Inputs, throughout:
  subsets  bool [N, n], one row per evaluated subset of the n units (one row per subset), or
           integer bitmasks [N] (unit i = bit i; n is then the highest set bit + 1, so pass bool
           rows when the last unit may be absent).
  metric   float [N] or [N, P] (P prompts; per-subset quantities average over prompts).
  source, target
           float [P]: the unpatched source and target runs' metric per prompt (the baselines
           of the normalised `recovery`).
  success  bool [N], from a `Criterion` (recovery>=X, metric>X, fraction>=X) or `success_from`.
  values   the value function v(S) of a subset for unit importance: success (0/1) or a metric.

Two axes of uncertainty. The subset axis: a size layer present in full (all C(n, k) subsets)
gives an exact rate; otherwise rates carry Wilson 95% intervals. The prompt axis: the P prompts
are a sample, so rates, k* and the transition width are re-evaluated on prompts resampled with
replacement (`bootstrap`, seeded percentile intervals). Exact Shapley/Banzhaf values and
interactions need all 2^n subsets (n <= 24); `shapley_sampled`/`banzhaf_sampled` estimate them,
with standard errors, from a callable value function (or `table_fn` over an incomplete table).
Analyses that a sweep cannot support (no subset succeeds, every subset does, too few units or
sizes) are "not defined", with the reason, rather than fitted (`summarize`'s 'undefined').
`findings` rules (`FINDING_RULES`) turn the numbers into plain statements.
All results are numpy arrays/Python scalars; `summarize` makes a JSON-serialisable dict.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
import re
import warnings
from typing import Callable, Optional, Sequence

import numpy as np
import scipy.stats

from jaxcircuits.engine.subsets import from_bitmask, to_bitmask

DENSE_MAX_UNITS = 24          # tables indexed by bitmask (2^n entries) up to this n
Z95 = 1.959963984540054
MIN_UNITS = 3                 # a threshold or a linear fit over fewer units is not defined
RESAMPLES = 1000              # bootstrap resamples of the prompts
SHARP_WIDTH = 1.0             # a 10%->90% transition this narrow (one size step) is "sharp"
FIT_ACCURACY = 0.95           # a linear threshold fit this accurate is named among the findings


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


OPS = {">": np.greater, ">=": np.greater_equal, "<": np.less, "<=": np.less_equal}
KINDS = {"positive": ">", "above": ">=", "below": "<="}       # `success_from`'s kinds as OPS


def _criterion(metric: np.ndarray, kind: str, threshold: float) -> np.ndarray:
    if kind not in KINDS:
        raise ValueError(f"kind must be 'positive', 'above' or 'below', got {kind!r}")
    return OPS[KINDS[kind]](metric, threshold)


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


def recovery(metric, source, target) -> np.ndarray:
    """Normalised recovery of the mean over prompts (Wang et al. 2022):
    (mean patched - mean target) / (mean source - mean target).

    metric [..., P] (e.g. [N, P]: N subsets; [N, R, P]: R resamples of the prompts), source and
    target [..., P] broadcasting against it. Returns [...]: 0 = the unpatched target, 1 = the
    source; NaN (not defined) where the two baselines' means are equal.
    """
    t = np.mean(target, -1)
    gap = np.mean(source, -1) - t
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(gap != 0, (np.mean(metric, -1) - t) / gap, np.nan)


# name -> (what the criterion compares, value(criterion, metric [..., P], source, target) -> [...])
QUANTITIES = {
    "recovery": ("normalised recovery (patched - target) / (source - target) of the mean metric over prompts",
                 lambda c, m, s, t: recovery(m, s, t)),
    "metric": ("mean metric over prompts", lambda c, m, s, t: np.mean(m, -1)),
    "fraction": ("fraction of prompts whose metric is {prompt_op} {prompt_threshold:g}",
                 lambda c, m, s, t: OPS[c.prompt_op](m, c.prompt_threshold).mean(-1)),
}
_SPEC = re.compile(r"\s*(\w+)\s*(>=|<=|>|<)\s*(\S+)\s*")


@dataclasses.dataclass(frozen=True)
class Criterion:
    """When a subset succeeds: `quantity` (a `QUANTITIES` key) `op` (an `OPS` key) `threshold`.

    'recovery' needs the source and target baselines; 'fraction' counts the prompts whose metric
    is `prompt_op` `prompt_threshold` (default: > 0, the prompt is answered right).
    Written and parsed as 'recovery>=0.5', 'metric>0', 'fraction>=0.8'.
    """

    quantity: str
    op: str
    threshold: float
    prompt_op: str = ">"
    prompt_threshold: float = 0.0

    def __post_init__(self):
        if self.quantity not in QUANTITIES or self.op not in OPS or self.prompt_op not in OPS:
            raise ValueError(f"a criterion compares one of {sorted(QUANTITIES)} with one of {sorted(OPS)}, "
                             f"got {self.quantity!r} {self.op!r}")

    @classmethod
    def parse(cls, spec: str) -> "Criterion":
        """'recovery>=0.5' -> Criterion('recovery', '>=', 0.5); ValueError naming the forms otherwise."""
        m = _SPEC.fullmatch(spec)
        try:
            return cls(m.group(1), m.group(2), float(m.group(3)))
        except (AttributeError, ValueError):
            raise ValueError(f"a success criterion is recovery>=X, metric>X or fraction>=X "
                             f"(any of {', '.join(OPS)}), got {spec!r}") from None

    @classmethod
    def legacy(cls, kind: str, threshold: float, aggregate: str = "mean", level: float = 0.5) -> "Criterion":
        """The criterion `success_from(metric, kind, threshold, aggregate, level)` applies."""
        if kind not in KINDS or aggregate not in ("mean", "fraction"):
            raise ValueError(f"kind must be one of {sorted(KINDS)} and aggregate 'mean' or 'fraction', "
                             f"got {kind!r}, {aggregate!r}")
        if aggregate == "mean":
            return cls("metric", KINDS[kind], threshold)
        return cls("fraction", ">=", level, KINDS[kind], threshold)

    @property
    def needs_baselines(self) -> bool:
        return self.quantity == "recovery"

    def __str__(self) -> str:
        return f"{self.quantity}{self.op}{self.threshold:g}"

    def describe(self) -> str:
        """'recovery>=0.5: the normalised recovery ... >= 0.5'."""
        what = QUANTITIES[self.quantity][0].format(prompt_op=self.prompt_op, prompt_threshold=self.prompt_threshold)
        return f"{self}: the {what} {self.op} {self.threshold:g}"

    def value(self, metric, source=None, target=None) -> np.ndarray:
        """The compared quantity: metric [..., P] (source, target [..., P]) -> [...]."""
        if self.needs_baselines and (source is None or target is None):
            raise ValueError(f"the criterion {self} needs the source and target baselines")
        m = np.asarray(metric, dtype=np.float64)
        return QUANTITIES[self.quantity][1](self, m[:, None] if m.ndim == 1 else m, source, target)

    def success(self, metric, source=None, target=None) -> np.ndarray:
        """bool [...]: the value meets the criterion (a value that is not defined fails)."""
        return OPS[self.op](self.value(metric, source, target), self.threshold)


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
    bits = as_bool(subsets)
    m = _per_subset(metric)
    ks, idx = _sizes(bits)
    groups = [m[idx == j] for j in range(len(ks))]
    return {"k": ks, "count": np.array([len(g) for g in groups]),
            "mean": np.array([g.mean() for g in groups]), "std": np.array([g.std() for g in groups]),
            "q": np.asarray(q, dtype=np.float64), "quantiles": np.array([np.quantile(g, q) for g in groups])}


# ----------------------------------------------------------------------------- uncertainty over prompts

def bootstrap(statistic: Callable[[np.ndarray], np.ndarray], n_prompts: int, n_resamples: int = RESAMPLES,
              seed: int = 0, level: float = 0.95, batch: Optional[int] = None) -> Optional[dict]:
    """Percentile intervals of statistics over the prompts resampled with replacement.

    statistic: int prompt indices [R, P] (R resamples of the P prompts) -> float [S, R] (S
    statistics; inf allowed, e.g. a threshold not reached). scipy.stats.bootstrap draws the
    resamples from numpy's Generator seeded with `seed` (`batch` resamples per call). Returns
    {'lo', 'hi': [S] (NaN where a statistic is NaN in some resample), 'n_prompts', 'n_resamples',
    'level', 'seed'}; None when n_prompts < 2 (one prompt has no spread to resample).
    """
    if n_prompts < 2:
        return None
    with warnings.catch_warnings(), np.errstate(invalid="ignore", over="ignore"):
        warnings.simplefilter("ignore", scipy.stats.DegenerateDataWarning)
        res = scipy.stats.bootstrap((np.arange(n_prompts),), lambda idx, axis=-1: statistic(idx.reshape(-1, n_prompts)),
                                    vectorized=True, n_resamples=n_resamples, batch=batch, method="percentile",
                                    confidence_level=level, rng=np.random.default_rng(seed))
    return {"lo": np.asarray(res.confidence_interval.low), "hi": np.asarray(res.confidence_interval.high),
            "n_prompts": n_prompts, "n_resamples": n_resamples, "level": level, "seed": seed}


def _take(x, idx):
    """Baselines [P] at resampled prompt indices [R, P] (None stays None)."""
    return None if x is None else np.asarray(x, dtype=np.float64)[idx]


def prompt_intervals(subsets, metric, criterion: Criterion, source=None, target=None,
                     n_resamples: int = RESAMPLES, seed: int = 0) -> Optional[dict]:
    """Success rate by size and `THRESHOLD_STATS` re-evaluated on resampled prompts.

    metric [N, P]; success per resample is `criterion` on the resampled prompts (and baselines
    source, target [P]). Returns {'rate_lo', 'rate_hi': [K] (sizes as in `rate_by_size`),
    'threshold': {stat: [lo, hi]} (inf: not reached in the upper tail), 'n_prompts',
    'n_resamples', 'level', 'seed'}, or None with fewer than 2 prompts.
    """
    bits = as_bool(subsets)
    metric = np.asarray(metric, dtype=np.float64)
    ks, idx = _sizes(bits)
    share = (idx[None] == np.arange(len(ks))[:, None]) / np.bincount(idx)[:, None]     # [K, N]

    def stat(i):
        rate = share @ criterion.success(metric[:, i], _take(source, i), _take(target, i))
        return np.concatenate([rate, threshold_stats(ks, rate)])

    boot = bootstrap(stat, metric.shape[1], n_resamples, seed, batch=max(1, 2 ** 22 // metric.size))
    if boot is None:
        return None
    lo, hi = boot.pop("lo"), boot.pop("hi")
    return {"rate_lo": lo[:len(ks)], "rate_hi": hi[:len(ks)],
            "threshold": {name: [a, b] for name, a, b in zip(THRESHOLD_STATS, lo[len(ks):], hi[len(ks):])}, **boot}


PROMPT_STATS = ("mean", "right", "recovery")


def prompt_table(metric, source=None, target=None, contrasts: Sequence[Sequence[int]] = (),
                 n_resamples: int = RESAMPLES, seed: int = 0) -> dict:
    """Rows measured on the same P prompts (formats, layers, unit families), with bootstrap
    intervals over prompts (one set of resamples for all, so differences are paired).

    metric [F, P]; source, target [P] (the baselines of recovery; without them it is NaN);
    contrasts: row pairs (i, j). Returns per `PROMPT_STATS` name arrays [F] and name_lo/name_hi:
    mean (mean metric), right (fraction of prompts with metric > 0: answered right for a logit
    difference), recovery; 'contrast' [C] (mean of row i - mean of row j) with contrast_lo/hi;
    'contrasts', 'n_prompts'; JSON-ready (`jsonable`: NaN -> None; intervals are None with fewer
    than 2 prompts).
    """
    m = np.asarray(metric, dtype=np.float64)
    rows, n_prompts = m.shape
    pairs = np.asarray(contrasts, dtype=np.int64).reshape(-1, 2)

    def stat(i):
        mm = m[:, i]                                                         # [F, R, P]
        rec = recovery(mm, _take(source, i), _take(target, i)) if source is not None else np.full(mm.shape[:2], np.nan)
        mean = mm.mean(-1)
        return np.concatenate([mean, (mm > 0).mean(-1), rec, mean[pairs[:, 0]] - mean[pairs[:, 1]]])

    point = stat(np.arange(n_prompts)[None])[:, 0]
    boot = bootstrap(stat, n_prompts, n_resamples, seed) or {"lo": np.full_like(point, np.nan),
                                                            "hi": np.full_like(point, np.nan)}
    cuts = rows * np.arange(1, len(PROMPT_STATS) + 1)                       # rows per statistic, then contrasts
    out = {"contrasts": pairs, "n_prompts": n_prompts}
    columns = (np.split(a, cuts) for a in (point, boot["lo"], boot["hi"]))
    for name, *parts in zip(PROMPT_STATS + ("contrast",), *columns):
        out.update(zip((name, f"{name}_lo", f"{name}_hi"), parts))
    return jsonable(out)


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
    """numpy -> JSON-serialisable Python (lists, ints, floats; NaN and inf -> None)."""
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple, np.ndarray)):
        return [jsonable(v) for v in (x.tolist() if isinstance(x, np.ndarray) else x)]
    if isinstance(x, (bool, np.bool_)):
        return bool(x)
    if isinstance(x, (int, np.integer)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        return float(x) if math.isfinite(x) else None
    return x


def _sets(sets: np.ndarray, max_sets: int) -> dict:
    return {"count": len(sets), "sets": [np.flatnonzero(r).tolist() for r in sets[:max_sets]],
            "inclusion": inclusion_frequency(sets)}


def _braces(units, names) -> str:
    return "{" + ", ".join(names[u] for u in units) + "}"


def _best(bits, values, criterion: Criterion, names) -> Optional[dict]:
    """The subset whose criterion value comes closest to succeeding: {value, subset} (None if no value)."""
    v = np.where(np.isnan(values), -np.inf, values if criterion.op in (">", ">=") else -values)
    if not np.isfinite(v).any():
        return None
    j = int(np.argmax(v))
    return {"value": float(values[j]), "subset": np.flatnonzero(bits[j]).tolist(),
            "text": f"{criterion.quantity} {values[j]:.3f} at best, by {_braces(np.flatnonzero(bits[j]), names)}"}


def _undefined(bits, success, best: Optional[dict]) -> dict:
    """{analysis: why it is not defined} for a degenerate sweep (the first reason that applies)."""
    n, n_sizes = bits.shape[1], len(np.unique(bits.sum(1)))
    rows = (
        (not success.any(), "no subset succeeds" + (f" ({best['text']})" if best else ""),
         ("threshold", "linear_fit", "maximal_insufficient", "importance", "interactions")),
        (success.all(), "every subset succeeds", ("threshold", "linear_fit", "minimal_sufficient", "importance",
                                                  "interactions")),
        (n < MIN_UNITS, f"only {n} unit{'s' * (n != 1)} (at least {MIN_UNITS} needed)", ("threshold", "linear_fit")),
        (n_sizes < 2, "only one subset size was swept", ("threshold",)),
    )
    out = {}
    for hit, reason, keys in rows:
        for key in keys if hit else ():
            out.setdefault(key, reason)
    return out


def summarize(subsets, success, metric=None, importance_of: str = "success",
              unit_names: Optional[Sequence[str]] = None, top: int = 5, max_sets: int = 50,
              criterion: Optional[Criterion] = None, source=None, target=None,
              n_resamples: int = RESAMPLES, seed: int = 0) -> dict:
    """Everything above in one JSON-serialisable dict (plain lists/floats/ints/bools/None). It takes
    more than eight parameters: beyond the sweep, optional settings with defaults.

    success [N] should be `criterion.success(metric, source, target)` when a criterion is given;
    the criterion also gives the prompt intervals (metric [N, P], `prompt_intervals`) and the
    best subset. importance_of: the importance value function, 'success' (0/1) or 'metric'.
    Keys: n_units, n_subsets, n_prompts, exhaustive (all 2^n present), unit_names, criterion
    ({spec, description} or None), best ({value, subset, text}: closest to succeeding, or None),
    rate_by_size, threshold (None values: not reached), prompt_intervals (or None),
    metric_by_size (if metric), symmetric, monotonicity, linear_fit, minimal_sufficient /
    maximal_insufficient ({count, sets (first max_sets), inclusion}; if n <= 24), importance
    ({value, shapley, banzhaf}) and interactions ({index, units, matrix}) when exhaustive,
    undefined ({analysis: reason}; such analyses are None, the threshold all None).
    """
    if importance_of not in ("success", "metric") or (importance_of == "metric" and metric is None):
        raise ValueError("importance_of must be 'success', or 'metric' with a metric given")
    bits = as_bool(subsets)
    success = np.asarray(success, dtype=bool)
    n = bits.shape[1]
    names = list(unit_names) if unit_names is not None else [str(i) for i in range(n)]
    full = is_exhaustive(bits)
    rates = rate_by_size(bits, success)
    has_prompts = criterion is not None and metric is not None and np.ndim(metric) == 2
    best = None if criterion is None or metric is None else _best(bits, criterion.value(metric, source, target),
                                                                    criterion, names)
    undefined = _undefined(bits, success, best)
    if importance_of == "metric":
        undefined = {k: v for k, v in undefined.items() if k not in ("importance", "interactions")}
    run = lambda key, f: None if key in undefined else f()
    out = {
        "n_units": n, "n_subsets": len(bits), "n_prompts": None if metric is None or np.ndim(metric) == 1 else
        np.shape(metric)[1], "exhaustive": full, "unit_names": names,
        "criterion": None if criterion is None else {"spec": str(criterion), "description": criterion.describe()},
        "best": best, "rate_by_size": rates,
        "threshold": run("threshold", lambda: threshold(rates)) or dict.fromkeys(THRESHOLD_STATS),
        "prompt_intervals": prompt_intervals(bits, metric, criterion, source, target, n_resamples, seed)
        if has_prompts else None,
        "metric_by_size": None if metric is None else metric_by_size(bits, metric),
        "symmetric": is_symmetric(bits, success), "monotonicity": monotonicity(bits, success),
        "linear_fit": run("linear_fit", lambda: linear_threshold_fit(bits, success)),
        "minimal_sufficient": None, "maximal_insufficient": None, "importance": None, "interactions": None,
        "undefined": undefined,
    }
    if n <= DENSE_MAX_UNITS:
        out["minimal_sufficient"] = run("minimal_sufficient",
                                        lambda: _sets(minimal_sufficient(bits, success), max_sets))
        out["maximal_insufficient"] = run("maximal_insufficient",
                                          lambda: _sets(maximal_insufficient(bits, success), max_sets))
    if full:
        v = success.astype(np.float64) if importance_of == "success" else metric
        out["importance"] = run("importance", lambda: {"value": importance_of, "shapley": shapley(bits, v),
                                                       "banzhaf": banzhaf(bits, v)})
        out["interactions"] = run("interactions", lambda: {"index": "shapley", **interactions(bits, v, top=top)})
    return jsonable(out)


# ----------------------------------------------------------------------------- markdown and findings

def _fmt(x, digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def interval(lo, hi, spec: str = ".2f", missing: str = "not reached") -> str:
    """An interval 'lo..hi' in format `spec`; None ends (JSON for inf, or NaN) read `missing`."""
    end = lambda x: missing if x is None else format(x, spec)
    return f"{end(lo)}..{end(hi)}"


def cell(table: dict, key: str, i: int, spec: str = "+.3f") -> str:
    """Row i of a `prompt_table` statistic with its interval: '+0.044 (-0.118..+0.225)'."""
    value = table[key][i]
    ends = interval(table[key + "_lo"][i], table[key + "_hi"][i], spec, "-")
    return f"{'-' if value is None else format(value, spec)} ({ends})"


def _not_defined(summary: dict, key: str) -> Optional[str]:
    reason = summary.get("undefined", {}).get(key)
    return None if reason is None else f"not defined: {reason}."


def _k(x, digits: int = 2) -> str:
    """A threshold statistic: None (not reached) -> 'not reached'."""
    return "not reached" if x is None else str(x) if isinstance(x, int) else f"{x:.{digits}f}"


def threshold_cell(summary: dict, stat: str) -> str:
    """A `THRESHOLD_STATS` value of a `summarize` dict with its prompt interval: '6 (prompts 95%:
    5.00..not reached)'; 'not defined' when the threshold is not."""
    if "threshold" in summary["undefined"]:
        return "not defined"
    pi = summary["prompt_intervals"]
    return _k(summary["threshold"][stat]) + (f" (prompts 95%: {interval(*pi['threshold'][stat])})" if pi else "")


def _threshold_line(summary: dict) -> str:
    th = summary["threshold"]
    if _not_defined(summary, "threshold"):
        return "Threshold: " + _not_defined(summary, "threshold")
    return (f"Threshold k* = {threshold_cell(summary, 'k_star')}; interpolated k50 = {_k(th['k50'])}; "
            f"10%->90% transition from k = {_k(th['k10'])} to {_k(th['k90'])}, width "
            f"{threshold_cell(summary, 'sharpness')}.")


def report_markdown(summary: dict, level: int = 3) -> str:
    """A Markdown report of a `summarize` dict, its headings at `level` (3: to sit inside a report's
    '##' section; no title of its own)."""
    h = "#" * level + " "
    names = summary["unit_names"]
    rates, mono, fit, pi = (summary[k] for k in ("rate_by_size", "monotonicity", "linear_fit", "prompt_intervals"))
    crit, n_prompts = summary.get("criterion"), summary.get("n_prompts")
    prompt_ci = ([interval(a, b, missing="-") for a, b in zip(pi["rate_lo"], pi["rate_hi"])] if pi else
                 [f"not defined ({n_prompts or 1} prompt)"] * len(rates["k"]))
    lines = [
        f"{summary['n_subsets']} subsets of {summary['n_units']} units"
        f" ({'exhaustive' if summary['exhaustive'] else 'not exhaustive'})"
        + (f", {n_prompts} prompts" if n_prompts else "") + ".",
        *([f"Success: {crit['description']}."] if crit else []),
        *([f"Closest to succeeding: {summary['best']['text']}."] if summary.get("best") else []), "",
        h + "Success rate by size", "",
        "Two axes of uncertainty. Subsets: 'exact' where every subset of a size ran, else a Wilson 95% "
        "interval over the sampled subsets. Prompts: the prompts are a sample, so each rate is recomputed on "
        + (f"the {pi['n_prompts']} prompts resampled with replacement (percentile bootstrap, "
           f"{pi['n_resamples']} resamples, seed {pi['seed']})." if pi else
           "resampled prompts, which needs at least 2 prompts: not defined here."), "",
        "| k | count | successes | rate | subsets 95% | prompts 95% |", "|---|---|---|---|---|---|",
        *(f"| {k} | {c} | {s} | {_fmt(r)} | {'exact' if e else interval(lo, hi)} | {p} |"
          for k, c, s, r, lo, hi, e, p in zip(*(rates[f] for f in ("k", "count", "successes", "rate", "lo", "hi",
                                                                   "exhaustive")), prompt_ci)),
        "", _threshold_line(summary), "",
        h + "Structure", "",
        f"- symmetric (success depends only on |S|): {summary['symmetric']}",
        f"- monotone: {mono['monotone']} ({mono['n_violations']} violations in {mono['n_pairs']} one-unit steps)",
        *(f"  - {_braces(e['subset'], names)} succeeds, + {names[e['added']]} fails" for e in mono["examples"]),
        "- linear threshold fit: " + (_not_defined(summary, "linear_fit") or
                                      f"accuracy {_fmt(fit['accuracy'])}, weights "
                                      f"{', '.join(f'{names[i]}={w:.2f}' for i, w in enumerate(fit['weights']))}, "
                                      f"bias {fit['bias']:.2f}"),
    ]
    for key, title in (("minimal_sufficient", "Minimal sufficient sets"),
                       ("maximal_insufficient", "Maximal insufficient sets")):
        sets, reason = summary[key], _not_defined(summary, key)
        if reason:
            lines += ["", h + title, "", reason[0].upper() + reason[1:]]
        elif sets is not None:
            left = sets["count"] - len(sets["sets"])
            lines += ["", f"{h}{title} ({sets['count']})", "", *(f"- {_braces(s, names)}" for s in sets["sets"]),
                      *([f"- ... and {left} more, not listed"] if left else []),
                      *(["None."] if not sets["count"] else [])]
    imp = summary["importance"]
    if _not_defined(summary, "importance") and summary["exhaustive"]:
        lines += ["", h + "Unit importance", "", "Shapley and Banzhaf values of success: "
                  + _not_defined(summary, "importance")]
    if imp is not None:
        order = sorted(range(len(names)), key=lambda i: -abs(imp["shapley"][i]))
        lines += ["", f"{h}Unit importance (v = {imp['value']})", "",
                  "| unit | Shapley | Banzhaf |", "|---|---|---|",
                  *(f"| {names[i]} | {imp['shapley'][i]:.4f} | {imp['banzhaf'][i]:.4f} |" for i in order)]
        inter = summary["interactions"]
        pairs = sorted(((inter["matrix"][a][b], inter["units"][a], inter["units"][b])
                        for a, b in itertools.combinations(range(len(inter["units"])), 2)),
                       key=lambda p: -abs(p[0]))
        lines += ["", f"{h}Pairwise interactions ({inter['index']}; > 0 synergy, < 0 redundancy)", "",
                  *(f"- {names[i]} x {names[j]}: {x:+.4f}" for x, i, j in pairs)]
    return "\n".join(lines) + "\n"


FINDING_RULES = {
    "premise": "Premise: the source answers right on average (the 95% prompt interval of its mean metric lies "
               "above 0) and beats the target (the interval of the paired difference source - target lies "
               "above 0). When it fails, that is the first finding.",
    "layer": "Best layer: the largest recovery, i.e. movement of the mean metric toward the source, when all "
             "heads of one layer are patched at once.",
    "threshold": f"Threshold: k* is the smallest size whose success rate reaches 0.5. The transition is sharp "
                 f"when the 95% prompt interval of its width k90 - k10 lies at or below {SHARP_WIDTH:g} size "
                 f"step, gradual when it lies above, else not resolved. It is not "
                 f"defined when no subset or every subset succeeds, with fewer than {MIN_UNITS} units, or "
                 "with one size.",
    "size": "Depends only on |S|: at every size the subsets all succeed or all fail. Otherwise, when a "
            "weighted threshold of the units (the linear threshold fit) classifies at least "
            f"{FIT_ACCURACY:.0%} of the subsets, its largest weights are named.",
    "contrast": "Families: one family moves the target more than another when the 95% prompt interval of the "
                "paired difference of their mean metrics excludes 0.",
    "fails": "What fails: the sizes at which no subset succeeds, the full set when it fails, and families that "
             "miss the criterion.",
}


def _spans(ks: Sequence[int]) -> str:
    """[0, 1, 2, 5] -> '0-2, 5'."""
    runs = [list(g) for _, g in itertools.groupby(ks, key=lambda k, c=itertools.count(): k - next(c))]
    return ", ".join(f"{r[0]}-{r[-1]}" if len(r) > 1 else str(r[0]) for r in runs)


def _sharpness(width, interval) -> str:
    """The threshold rule's verdict on a width (None: never reaches 90%) and its prompt interval
    ([lo, hi], None ends: not reached; None: one prompt, the width alone decides)."""
    if width is None:
        return "no complete transition (the rate never reaches 90%)"
    lo, hi = (width, width) if interval is None else (math.inf if x is None else x for x in interval)
    note = " (one prompt: no prompt interval)" if interval is None else ""
    if hi <= SHARP_WIDTH:
        return "sharp" + note
    if lo > SHARP_WIDTH:
        return "gradual" + note
    return "not resolved with these prompts"


def sweep_findings(summary: dict, name: str) -> list:
    """Findings of one sweep by `FINDING_RULES` 'threshold', 'size' and 'fails': [(statement, rule)]."""
    rates, th, pi = summary["rate_by_size"], summary["threshold"], summary["prompt_intervals"]
    about = [summary["criterion"]["spec"]] if summary.get("criterion") else []
    about += [f"{summary['n_prompts']} prompts"] if summary.get("n_prompts") else []
    crit = f" ({', '.join(about)})" if about else ""
    reason = summary["undefined"].get("threshold")
    if reason:
        return [(f"{name}{crit}: no threshold: {reason}.", "threshold")]
    out = [(f"{name}{crit}: threshold k* = {threshold_cell(summary, 'k_star')}; 10%->90% transition width "
            f"{threshold_cell(summary, 'sharpness')}: "
            f"{_sharpness(th['sharpness'], pi['threshold']['sharpness'] if pi else None)}.", "threshold")]
    k, count, hits = (np.asarray(rates[f]) for f in ("k", "count", "successes"))
    mixed = np.flatnonzero((hits > 0) & (hits < count))
    if not len(mixed):
        out.append((f"{name}: success depends only on |S|.", "size"))
    else:
        j = mixed[np.argmin(np.abs(hits[mixed] / count[mixed] - 0.5))]
        fit, names = summary["linear_fit"], summary["unit_names"]
        lead = ""
        if fit and fit["accuracy"] >= FIT_ACCURACY:
            w = np.asarray(fit["weights"])
            lead = (f"; a weighted threshold of the units fits {fit['accuracy']:.1%} of the subsets, largest "
                    "weights " + ", ".join(f"{names[u]} {w[u]:+.2f}" for u in np.argsort(-np.abs(w), kind="stable")[:3]))
        out.append((f"{name}: success does not depend only on |S|: {len(mixed)} of {len(k)} sizes mix successes "
                    f"and failures (k = {k[j]}: {hits[j]} of {count[j]} succeed){lead}.", "size"))
    if (hits == 0).any():
        full = " (the full set of units included)" if k[-1] == summary["n_units"] and hits[-1] == 0 else ""
        out.append((f"{name}: no subset of size {_spans(k[hits == 0].tolist())} succeeds{full}.", "fails"))
    return out


def premise_findings(table: dict, names: Sequence[str], source: int, target: int, contrast: int = 0,
                     kind: str = "rows") -> tuple:
    """`FINDING_RULES['premise']` on a `prompt_table` whose rows are `names` (`kind`, e.g. 'formats'),
    with the source and target rows and the index of the contrast source - target. Returns
    (whether the premise holds, [(statement, rule)])."""
    t, P = table, table["n_prompts"]
    above = lambda key, i: t[f"{key}_lo"][i] is not None and t[f"{key}_lo"][i] > 0
    row = lambda i: (f"`{names[i]}` (mean metric {cell(t, 'mean', i)}; "
                     f"right on {cell(t, 'right', i, '.0%')} of {P} prompts)")
    diff = f"source - target {cell(t, 'contrast', contrast)}"
    right, beats = above("mean", source), above("contrast", contrast)
    if right and beats:
        return True, [(f"Premise holds: the source {row(source)} answers right and beats the target {row(target)}: "
                       f"{diff}.", "premise")]
    reasons = ([] if right else [f"the source {row(source)} does not answer right on average"]) + \
        ([f"it beats the target {row(target)}: {diff}"] if beats else
         [f"it does not beat the target {row(target)}: {diff}"])
    out = [(f"Premise fails: {'; '.join(reasons)}. 'Recovery' below measures movement toward the source, not "
            "the repair of a wrong answer.", "premise")]
    if len(names) > 2 and not any(above("mean", i) for i in range(len(names))):
        out.append((f"None of the {len(names)} {kind} answers right on average: "
                    + ", ".join(f"`{n}` {m:+.3f}" for n, m in zip(names, t["mean"])) + ".", "premise"))
    return False, out


def contrast_findings(table: dict, names: Sequence[str], what: str) -> list:
    """`FINDING_RULES['contrast']` for each contrast of a `prompt_table` with rows `names`: [(statement, rule)]."""
    out = []
    for c, (i, j) in enumerate(table["contrasts"]):
        lo, hi = table["contrast_lo"][c], table["contrast_hi"][c]
        verdict = (f"favours {names[i]}" if lo is not None and lo > 0 else
                   f"favours {names[j]}" if hi is not None and hi < 0 else "no difference resolved")
        out.append((f"{what}: {names[i]} - {names[j]}: mean metric {cell(table, 'contrast', c)}: {verdict}.",
                    "contrast"))
    return out


def subsets_frame(subsets: np.ndarray, metric: np.ndarray, unit_names: Sequence[str], index=None):
    """A pandas DataFrame, one row per subset (bool [N, n]) of a sweep with metric [N, P]: units (the
    member's unit names, space-separated), size, metric_0 .. metric_{P-1} (per prompt) and metric
    (mean over prompts); `index` (e.g. the sweep's ranks) names the rows."""
    import pandas as pd
    names = np.asarray(unit_names)
    subsets, metric = np.asarray(subsets, bool), np.asarray(metric)
    frame = pd.DataFrame({"units": [" ".join(names[row]) for row in subsets], "size": subsets.sum(1)}, index=index)
    for p in range(metric.shape[1]):
        frame[f"metric_{p}"] = metric[:, p]
    frame["metric"] = metric.mean(1)
    return frame

