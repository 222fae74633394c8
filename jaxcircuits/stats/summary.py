"""One sweep's analysis as a JSON-serialisable dict (`summarize`): rates and the threshold with their
intervals over prompts, set structure, unit importance, the subset closest to succeeding, and the
analyses the sweep cannot support, each "not defined" with its reason rather than fitted.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence, Tuple, Union

import numpy as np

from jaxcircuits import checks
from jaxcircuits.stats.bootstrap import RESAMPLES, prompt_intervals
from jaxcircuits.stats.criteria import Criterion
from jaxcircuits.stats.games import banzhaf, interactions, shapley
from jaxcircuits.stats.rates import THRESHOLD_STATS, metric_by_size, rate_by_size, threshold
from jaxcircuits.stats.sets import (inclusion_frequency, is_exhaustive, is_symmetric, linear_threshold_fit,
                                    maximal_insufficient, minimal_sufficient, monotonicity)
from jaxcircuits.stats.tables import DENSE_MAX_UNITS, jsonable, sweep_rows

MIN_UNITS = 3                 # a threshold or a linear fit over fewer units is not defined
IMPORTANCE_OF = ("success", "metric")   # the value function of unit importance: 0/1 success or the metric


@dataclasses.dataclass(frozen=True)
class SummaryOptions:
    """The settings of `summarize` beyond the sweep: importance_of (a value of `IMPORTANCE_OF`;
    'metric' needs the metric), top (units in the interaction matrix), max_sets (minimal /
    maximal sets listed), n_resamples and seed (the bootstrap over prompts)."""

    importance_of: str = "success"
    top: int = 5
    max_sets: int = 50
    n_resamples: int = RESAMPLES
    seed: int = 0

    def __post_init__(self):
        if self.importance_of not in IMPORTANCE_OF:
            raise ValueError(f"importance_of must be one of {IMPORTANCE_OF}, got {self.importance_of!r}")
        for name in ("top", "max_sets", "n_resamples"):
            object.__setattr__(self, name, checks.count(name, getattr(self, name)))


def braces(units, names) -> str:
    """Unit indices as a set of their names: '{L0H1, L0H3}'."""
    return "{" + ", ".join(names[u] for u in units) + "}"


def _sets(sets: np.ndarray, max_sets: int) -> dict:
    return {"count": len(sets), "sets": [np.flatnonzero(r).tolist() for r in sets[:max_sets]],
            "inclusion": inclusion_frequency(sets)}


def _best(bits, values, criterion: Criterion, names) -> Optional[dict]:
    """The subset whose criterion value comes closest to succeeding: {value, subset} (None if no value)."""
    v = np.where(np.isnan(values), -np.inf, values if criterion.op in (">", ">=") else -values)
    if not np.isfinite(v).any():
        return None
    j = int(np.argmax(v))
    return {"value": float(values[j]), "subset": np.flatnonzero(bits[j]).tolist(),
            "text": f"{criterion.quantity} {values[j]:.3f} at best, by {braces(np.flatnonzero(bits[j]), names)}"}


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


def summarize(subsets, success, metric=None, unit_names: Optional[Sequence[str]] = None,
              criterion: Union[str, Criterion, None] = None, baselines: Optional[Tuple] = None,
              options: SummaryOptions = SummaryOptions()) -> dict:
    """Everything about one sweep in one JSON-serialisable dict (plain lists/floats/ints/bools/None).

    subsets bool [N, n] or bitmasks [N]; success bool [N]; metric [N] or [N, P] (optional).
    success should be `criterion.success(metric, *baselines)` when a criterion (a `Criterion` or
    its string) is given; the criterion also gives the prompt intervals (metric [N, P],
    `prompt_intervals`) and the best subset. baselines: (source [P], target [P]), the unpatched
    runs' metric, which a recovery criterion needs. options: `SummaryOptions`.
    Keys: n_units, n_subsets, n_prompts, exhaustive (all 2^n present), unit_names, criterion
    ({spec, description} or None), best ({value, subset, text}: closest to succeeding, or None),
    rate_by_size, threshold (None values: not reached), prompt_intervals (or None),
    metric_by_size (if metric), symmetric, monotonicity, linear_fit, minimal_sufficient /
    maximal_insufficient ({count, sets (first max_sets), inclusion}; if n <= 24), importance
    ({value, shapley, banzhaf}) and interactions ({index, units, matrix}) when exhaustive,
    undefined ({analysis: reason}; such analyses are None, the threshold all None).
    """
    if options.importance_of == "metric" and metric is None:
        raise ValueError("importance_of='metric' needs a metric")
    bits, success, metric = sweep_rows(subsets, success, metric)
    criterion = None if criterion is None else Criterion.of(criterion)
    source, target = baselines or (None, None)
    n = bits.shape[1]
    names = list(unit_names) if unit_names is not None else [str(i) for i in range(n)]
    full = is_exhaustive(bits)
    rates = rate_by_size(bits, success)
    has_prompts = criterion is not None and metric is not None and np.ndim(metric) == 2
    best = None if criterion is None or metric is None else _best(bits, criterion.value(metric, source, target),
                                                                    criterion, names)
    undefined = _undefined(bits, success, best)
    if options.importance_of == "metric":
        undefined = {k: v for k, v in undefined.items() if k not in ("importance", "interactions")}
    run = lambda key, f: None if key in undefined else f()
    out = {
        "n_units": n, "n_subsets": len(bits), "n_prompts": None if metric is None or np.ndim(metric) == 1 else
        np.shape(metric)[1], "exhaustive": full, "unit_names": names,
        "criterion": None if criterion is None else {"spec": str(criterion), "description": criterion.describe()},
        "best": best, "rate_by_size": rates,
        "threshold": run("threshold", lambda: threshold(rates)) or dict.fromkeys(THRESHOLD_STATS),
        "prompt_intervals": prompt_intervals(bits, metric, criterion, source, target, options.n_resamples,
                                             options.seed) if has_prompts else None,
        "metric_by_size": None if metric is None else metric_by_size(bits, metric),
        "symmetric": is_symmetric(bits, success), "monotonicity": monotonicity(bits, success),
        "linear_fit": run("linear_fit", lambda: linear_threshold_fit(bits, success)),
        "minimal_sufficient": None, "maximal_insufficient": None, "importance": None, "interactions": None,
        "undefined": undefined,
    }
    if n <= DENSE_MAX_UNITS:
        out["minimal_sufficient"] = run("minimal_sufficient",
                                        lambda: _sets(minimal_sufficient(bits, success), options.max_sets))
        out["maximal_insufficient"] = run("maximal_insufficient",
                                          lambda: _sets(maximal_insufficient(bits, success), options.max_sets))
    if full:
        v = success.astype(np.float64) if options.importance_of == "success" else metric
        out["importance"] = run("importance", lambda: {"value": options.importance_of, "shapley": shapley(bits, v),
                                                       "banzhaf": banzhaf(bits, v)})
        out["interactions"] = run("interactions", lambda: {"index": "shapley",
                                                           **interactions(bits, v, top=options.top)})
    return jsonable(out)
