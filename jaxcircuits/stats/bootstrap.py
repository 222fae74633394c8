"""Uncertainty over prompts: the P prompts are a sample, so rates, k* and the transition width of a
sweep, and the means of rows measured on the same prompts, are re-evaluated on prompts resampled
with replacement (seeded percentile intervals)."""

from __future__ import annotations

import warnings
from typing import Callable, Optional, Sequence

import numpy as np
import scipy.stats

from jaxcircuits.stats.criteria import Criterion, recovery
from jaxcircuits.stats.rates import THRESHOLD_STATS, threshold_stats
from jaxcircuits.stats.tables import as_bool, jsonable, size_index

RESAMPLES = 1000              # bootstrap resamples of the prompts


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
    ks, idx = size_index(bits)
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
