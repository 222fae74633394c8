"""Circuit evaluation: faithfulness of a set of kept units, curves over circuit size, and the
exhaustive ground truth of a small pool.

A circuit C is a set of units kept from the target run (the behaviour under study, e.g. clean IOI
prompts); every unit outside C is patched from the source run (e.g. corrupted prompts). Its
faithfulness is

    F(C) = (m(C) - m(none)) / (m(full) - m(none))

with m the mean metric over prompts, m(full) the unpatched target run (every unit kept) and
m(none) the run with every unit patched: 1 = the circuit alone carries the model's behaviour,
0 = no better than nothing kept. This is `criteria.recovery` with source = m(full) and
target = m(none), so the criterion 'recovery>=0.8' with those baselines reads F >= 0.8.

Levels (`interventions.sites.LEVELS`): 'head' (units: the `head_out` of every head, flat l * H + h;
outside the circuit a head's output is patched) and 'edge' (units: the valid edges of
`edges.EdgeGraph`, in its flat order; outside the circuit an edge carries the source's value of
its sender).
A ground-truth pool (`ground_truth`) is a `subsets.Pool` of heads: there the circuit is a subset
of the pool and heads outside the pool are never patched.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence, Tuple

import numpy as np

from jaxcircuits.engine.patching import run_masks
from jaxcircuits.stats.criteria import Criterion, recovery
from jaxcircuits.stats.sets import minimal_sufficient
from jaxcircuits.stats.tables import DENSE_MAX_UNITS
from jaxcircuits.engine.subsets import Pool, from_bitmask
from jaxcircuits.interventions import sites
from jaxcircuits.interventions.problem import PatchingProblem
from jaxcircuits.interventions.sites import Mask
from jaxcircuits.models.config import ModelConfig

DEFAULT_CRITERION = "recovery>=0.8"        # F >= 0.8 (see the module doc)


def faithfulness(metric, full, none) -> np.ndarray:
    """F = (mean metric - mean none) / (mean full - mean none): metric [..., B], full and none [B]
    (the metric with every unit kept / patched) -> [...]; NaN where full and none agree within
    float noise (`criteria.indistinguishable`)."""
    return recovery(metric, full, none)


def top_k(scores, sizes: Sequence[int]) -> np.ndarray:
    """bool [N, U]: row i keeps the sizes[i] units of highest score [U] (ties: lower index first)."""
    scores = np.asarray(scores, np.float64)
    sizes = np.asarray(sizes, int)
    if scores.ndim != 1 or not np.isfinite(scores).all():
        raise ValueError(f"scores must be a finite vector [U], got shape {scores.shape}")
    if sizes.size and not (0 <= sizes.min() and sizes.max() <= len(scores)):
        raise ValueError(f"sizes must lie in [0, {len(scores)}], got {sizes.min()}..{sizes.max()}")
    rank = np.empty(len(scores), int)
    rank[np.argsort(-scores, kind="stable")] = np.arange(len(scores))
    return rank[None, :] < sizes[:, None]


def curve_sizes(n_units: int, max_size: int, n_points: int) -> np.ndarray:
    """Circuit sizes 1..K (K = max_size, or n_units when 0): every size when K <= n_points, else
    n_points sizes spaced geometrically from 1 to K (ends included)."""
    k = min(max_size or n_units, n_units)
    if k < 1 or n_points < 2:
        raise ValueError(f"need a largest size >= 1 and >= 2 points, got {k} and {n_points}")
    if k <= n_points:
        return np.arange(1, k + 1)
    return np.unique(np.round(np.geomspace(1, k, n_points)).astype(int))


@dataclasses.dataclass(frozen=True)
class Curves:
    """Faithfulness vs circuit size, per method: sizes int [N_m], faith [N_m] and metric [N_m, B] of
    its circuits; full, none [B]: the metric with every unit kept / patched."""

    sizes: Mapping[str, np.ndarray]
    faith: Mapping[str, np.ndarray]
    metric: Mapping[str, np.ndarray]
    full: np.ndarray
    none: np.ndarray


def evaluate(params, cfg: ModelConfig, problem: PatchingProblem, level: str, kept,
             chunk_size: int = 64) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(metric [N, B] of each circuit kept bool [N, U], full [B], none [B]), all in one batched call
    (the two baselines are its first rows)."""
    lv, kept = sites.level(level), np.asarray(kept, bool)
    n_units = len(lv.labels(cfg))
    if kept.ndim != 2 or kept.shape[1] != n_units:
        raise ValueError(f"kept must be bool [N, {n_units}] ({level} units), got shape {kept.shape}")
    rows = np.concatenate([np.ones((1, n_units), bool), np.zeros((1, n_units), bool), kept])
    m = run_masks(params, cfg, problem, lv.mask(cfg, (~rows).astype(np.float32)), chunk_size=chunk_size)
    return m[2:], m[0], m[1]


def curves(params, cfg: ModelConfig, problem: PatchingProblem, level: str, circuits: Mapping[str, np.ndarray],
           chunk_size: int = 64) -> Curves:
    """Faithfulness of every circuit of every method (circuits {method: kept bool [N_m, U]}, e.g.
    `top_k` of its scores), all in one batched call (`evaluate`)."""
    circuits = {k: np.asarray(v, bool) for k, v in circuits.items()}
    metric, full, none = evaluate(params, cfg, problem, level, np.concatenate(list(circuits.values())), chunk_size)
    parts = dict(zip(circuits, np.split(metric, np.cumsum([len(v) for v in circuits.values()])[:-1])))
    return Curves({k: v.sum(1) for k, v in circuits.items()},
                  {k: faithfulness(v, full, none) for k, v in parts.items()}, parts, full, none)


# ---- ground truth over a small pool ------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class GroundTruth:
    """Every subset of a pool of n units as a circuit: row r of subsets bool [2^n, n] is bitmask r;
    metric [2^n, B]; faith [2^n]; success bool [2^n] (the criterion, recovery relative to full =
    row 2^n - 1 and none = row 0); minimal bool [M, n]: the minimal successful subsets
    (`sets.minimal_sufficient`)."""

    subsets: np.ndarray
    metric: np.ndarray
    faith: np.ndarray
    success: np.ndarray
    minimal: np.ndarray
    criterion: Criterion

    @classmethod
    def of(cls, metric, criterion: Criterion) -> "GroundTruth":
        """From the metric [2^n, B] of every subset kept (row r: bitmask r)."""
        metric = np.asarray(metric)
        n = int(metric.shape[0]).bit_length() - 1
        if metric.ndim != 2 or metric.shape[0] != 1 << n:
            raise ValueError(f"metric must be [2^n, B] (every subset, in bitmask order), got shape {metric.shape}")
        subsets = from_bitmask(np.arange(1 << n), n)
        full, none = metric[-1], metric[0]
        success = criterion.success(metric, full, none)
        return cls(subsets, metric, faithfulness(metric, full, none), success,
                   minimal_sufficient(subsets, success), criterion)

    @property
    def n(self) -> int:
        return self.subsets.shape[1]

    def frontier(self) -> np.ndarray:
        """float [n + 1]: the best faithfulness of any subset of each size 0..n."""
        size = self.subsets.sum(1)
        return np.array([np.nanmax(self.faith[size == k], initial=-np.inf) for k in range(self.n + 1)])


def ground_truth(params, cfg: ModelConfig, problem: PatchingProblem, pool: Pool,
                 criterion: Criterion, chunk_size: int = 64) -> GroundTruth:
    """Every subset of `pool` (heads at `head_out`; n <= DENSE_MAX_UNITS) kept, the rest of
    the pool patched, units outside the pool never patched: one `run_masks` call."""
    if pool.site != "head_out" or pool.n > DENSE_MAX_UNITS:
        raise ValueError(f"a ground-truth pool holds at most {DENSE_MAX_UNITS} head_out units, "
                         f"got {pool.n} at {pool.site!r}")
    kept = from_bitmask(np.arange(1 << pool.n), pool.n)
    masks = Mask(head_out=np.asarray(pool.scatter(~kept, pool.site_shape(cfg))))
    return GroundTruth.of(run_masks(params, cfg, problem, masks, chunk_size=chunk_size), criterion)


def nearest(sets, minimal) -> Tuple[np.ndarray, np.ndarray]:
    """(Hamming [K], Jaccard distance [K]) from each set bool [K, n] to its nearest set of `minimal`
    bool [M, n], each minimised separately; Jaccard distance = 1 - |A & B| / |A | B| (0 for two empty
    sets). With no minimal set: -1 and NaN."""
    a, b = np.asarray(sets, bool)[:, None], np.asarray(minimal, bool)[None]
    if b.shape[1] == 0:
        return np.full(a.shape[0], -1), np.full(a.shape[0], np.nan)
    union = (a | b).sum(-1)
    jac = 1 - np.divide((a & b).sum(-1), union, out=np.ones(union.shape), where=union > 0)
    return (a != b).sum(-1).min(1), jac.min(1)


def compare(gt: GroundTruth, sets) -> dict:
    """A method's subsets bool [K, n] of the pool against the ground truth, per set: size,
    faithfulness, sufficient (meets the criterion), minimal (one of the minimal sufficient sets),
    hamming / jaccard (to the nearest minimal sufficient set, `nearest`) and frontier (the best
    faithfulness of any subset of that size)."""
    sets = np.asarray(sets, bool)
    if sets.ndim != 2 or sets.shape[1] != gt.n:
        raise ValueError(f"sets must be bool [K, {gt.n}] (the pool's units), got shape {sets.shape}")
    row = sets @ (1 << np.arange(gt.n))
    minimal = set((gt.minimal @ (1 << np.arange(gt.n))).tolist())
    hamming, jaccard = nearest(sets, gt.minimal)
    size = sets.sum(1)
    return {"size": size, "faithfulness": gt.faith[row], "sufficient": gt.success[row],
            "minimal": np.array([r in minimal for r in row.tolist()]), "hamming": hamming, "jaccard": jaccard,
            "frontier": gt.frontier()[size]}
