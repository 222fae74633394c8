"""Checking an attribution graph (`methods.graphs`) by intervention in the real model.

The real model is the one the graph was built from: transcoders spliced with their errors kept
(`dictionaries.splice.attach`), so while nothing is patched it is the plain model, and an edit of a
feature f at position p adds (f' - f) W_dec to its layer's MLP output there while everything else
(the MLPs, attention patterns, norm scales, the other features) responds as the model does. What is
measured is the graph's top logit node, the demeaned logit of its most probable token
(`metrics.DemeanedLogit`), through the site 'features' with position weights one-hot at p:

  single nodes   each feature node edited alone (`EDITS`: zero, scale by c, set to v), one batched
                 `run_masks` call per position, against `graphs.predicted_effects` of the same
                 deltas, with and without the other features responding, and against the real
                 model's own linearisation (`node_gradients`) (`agreement`)
  a region       every subset of the n most influential feature nodes at the last position
                 zero-ablated (`run_sweep` over a `Pool` of their (layer, feature) units, `all_subsets`),
                 against the graph's predictions of all 2^n subsets (`region_summary`: fit, additivity,
                 the smallest subsets carrying a fraction of the logit, measured and predicted)
"""

from __future__ import annotations

import dataclasses
from typing import Dict, Optional, Sequence

import jax.numpy as jnp
import numpy as np

from jaxcircuits import checks
from jaxcircuits.dictionaries import splice
from jaxcircuits.engine.patching import run_masks
from jaxcircuits.engine.subsets import Pool, all_subsets
from jaxcircuits.engine.sweep import run_sweep
from jaxcircuits.interventions.metrics import DemeanedLogit
from jaxcircuits.interventions.problem import PatchingProblem, TargetRun, target_run
from jaxcircuits.interventions.sites import Mask
from jaxcircuits.methods import graphs
from jaxcircuits.methods.attribution import attribution_patching
from jaxcircuits.models.config import ModelConfig
from jaxcircuits.models.transformer import run_with_cache
from jaxcircuits.stats.agreement import correlations, r_squared

MAX_REGION = 20               # 2^20 patched runs: the largest exhaustive region

# edit kind -> (the new activations of activations a under the edit of value v, whether it takes a value)
EDITS: Dict[str, tuple] = {
    "zero": (lambda a, v: np.zeros_like(a), False),
    "scale": (lambda a, v: v * a, True),
    "set": (lambda a, v: np.full_like(a, v), True),
}


@dataclasses.dataclass(frozen=True)
class Edit:
    """An intervention on feature activations: `kind` a key of `EDITS`, `value` its c or v (0 for zero)."""

    kind: str
    value: float = 0.0

    def __post_init__(self):
        if self.kind not in EDITS:
            raise ValueError(f"unknown edit {self.kind!r}; known: {sorted(EDITS)}")

    @classmethod
    def parse(cls, spec: str) -> "Edit":
        """'zero', 'scale:C' or 'set:V'."""
        kind, _, value = spec.partition(":")
        if kind not in EDITS or EDITS[kind][1] != bool(value):
            raise ValueError(f"must be edits zero, scale:C or set:V, got {spec!r}")
        try:
            return cls(kind, float(value) if value else 0.0)
        except ValueError:
            raise ValueError(f"must be edits zero, scale:C or set:V with C, V numbers, got {spec!r}") from None

    def __str__(self) -> str:
        return f"{self.kind}:{self.value:g}" if EDITS[self.kind][1] else self.kind

    def new(self, acts: np.ndarray) -> np.ndarray:
        """The edited activations of activations `acts` (any shape)."""
        return EDITS[self.kind][0](np.asarray(acts, np.float32), np.float32(self.value))


@dataclasses.dataclass(frozen=True)
class RealRun:
    """The graph's prompt in the real model: its target run [1, T], its feature activations [L, 1, T, F]
    (the site 'features'), the top logit node's metric and its unpatched value."""

    target: TargetRun
    features: np.ndarray
    metric: DemeanedLogit
    value: float


def real_run(params, cfg: ModelConfig, graph: graphs.Graph) -> RealRun:
    """The `RealRun` of `graph`'s prompt in the model with transcoders spliced (params, cfg)."""
    graphs.check_transcoders(cfg)
    tokens = graph.tokens[None]
    _, cache = run_with_cache(params, cfg, tokens, sites=("features",))
    target = target_run(params, cfg, tokens)
    metric = DemeanedLogit(jnp.asarray(graph.logit_ids[:1, None], jnp.int32))
    return RealRun(target, np.asarray(cache["features"], np.float32), metric,
                   float(metric(params, target.final[:, -1:])[0]))


def _problem(run: RealRun, cfg: ModelConfig, features: np.ndarray, position: int) -> PatchingProblem:
    """The real run patched from `features` [L, 1, T, F] at `position` only, scored by the top logit node."""
    pos_w = np.zeros(run.target.tokens.shape, np.float32)
    pos_w[0, position] = 1
    T = pos_w.shape[1]
    return PatchingProblem.make(run.target, splice.set_source(cfg, 1, T, features), pos_w, run.metric)


def node_effects(params, cfg: ModelConfig, graph: graphs.Graph, edit: Edit, nodes: Sequence[int],
                 run: Optional[RealRun] = None, chunk_size: Optional[int] = None) -> np.ndarray:
    """[K]: the measured change of the top logit node when each feature node nodes[k] (an index into
    graph.features) alone is edited at its position in the real model (params, cfg: spliced, error
    kept); one batched `run_masks` call per position (chunk_size: its chunks, None: from memory)."""
    run = run or real_run(params, cfg, graph)
    nodes = np.asarray(nodes, np.int64)
    feats = graph.features[nodes]
    source = edit.new(run.features)
    out = np.zeros(len(nodes))
    for p in np.unique(feats[:, 1]):
        sel = np.flatnonzero(feats[:, 1] == p)
        masks = np.zeros((len(sel), cfg.n_layers, cfg.dict_width), np.float32)
        masks[np.arange(len(sel)), feats[sel, 0], feats[sel, 2]] = 1
        got = run_masks(params, cfg, _problem(run, cfg, source, int(p)), Mask(features=masks), chunk_size=chunk_size)
        out[sel] = got[:, 0] - run.value
    return out


def node_gradients(params, cfg: ModelConfig, graph: graphs.Graph, edit: Edit, nodes: Sequence[int],
                   run: Optional[RealRun] = None) -> np.ndarray:
    """[K]: the real model's own linear estimate of `node_effects` (attribution patching: the gradient of
    the top logit node in each feature at its position times the edit's change), one backward pass per
    position. Close to the measured effects where the model is linear in the edits; what separates it
    from the graph's prediction is what the graph freezes (norm scales, attention patterns, error nodes)."""
    run = run or real_run(params, cfg, graph)
    feats = graph.features[np.asarray(nodes, np.int64)]
    source = edit.new(run.features)
    out = np.zeros(len(feats))
    for p in np.unique(feats[:, 1]):
        sel = np.flatnonzero(feats[:, 1] == p)
        est = attribution_patching(params, cfg, _problem(run, cfg, source, int(p)), "features")      # [L, F]
        out[sel] = est[feats[sel, 0], feats[sel, 2]]
    return out


def node_deltas(graph: graphs.Graph, edit: Edit, nodes: Sequence[int]) -> np.ndarray:
    """[K, S]: the change of each feature node's activation when node nodes[k] alone is edited (the
    `graphs.predicted_effects` input)."""
    nodes = np.asarray(nodes, np.int64)
    a = graph.activations[nodes]
    deltas = np.zeros((len(nodes), len(graph.features)))
    deltas[np.arange(len(nodes)), nodes] = edit.new(a) - a
    return deltas


def agreement(measured, predicted, value: float) -> Dict[str, float]:
    """How predicted effects [n] match measured ones [n]: their `correlations`, `r_squared`, the median
    |measured - predicted| and, for scale, the median |measured|, both relative to |value| (the logit
    node's unpatched value)."""
    m = np.asarray(measured, np.float64)
    rel = lambda x: float(np.median(x) / max(abs(value), 1e-30)) if len(x) else float("nan")
    return {**correlations(m, predicted), "r2": r_squared(m, predicted),
            "median_rel_error": rel(np.abs(m - np.asarray(predicted, np.float64))), "median_rel_effect": rel(np.abs(m)),
            "n": int(len(m))}


def top_nodes(graph: graphs.Graph, n: Optional[int] = None, position: Optional[int] = None) -> np.ndarray:
    """Indices of the feature nodes in descending influence on the logits (`graphs.influence`), the first
    n (None: all), of one position only when given."""
    infl = graphs.influence(graph)[graph.offsets()["features"]]
    order = np.argsort(-infl, kind="stable")
    if position is not None:
        order = order[graph.features[order, 1] == position]
    return order[:n]


def region(graph: graphs.Graph, size: int) -> np.ndarray:
    """The `size` most influential feature nodes at the last position (indices into graph.features,
    descending influence; distinct (layer, feature) units); ValueError when it has fewer."""
    checks.count("region size", size)
    if size > MAX_REGION:
        raise ValueError(f"region size {size}: an exhaustive sweep runs 2^size subsets, at most 2^{MAX_REGION}")
    nodes = top_nodes(graph, position=graph.n_pos - 1)
    if len(nodes) < size:
        raise ValueError(f"region size {size} exceeds the {len(nodes)} feature nodes of the graph at the last "
                         "position")
    return nodes[:size]


def region_sweep(params, cfg: ModelConfig, graph: graphs.Graph, nodes: Sequence[int], out_dir: str,
                 run: Optional[RealRun] = None, chunk_size: Optional[int] = None):
    """(subsets bool [2^n, n], measured changes of the top logit node [2^n]): every subset of the feature
    nodes `nodes` (all at the last position) zero-ablated in the real model, by `run_sweep` over
    their (layer, feature) units (streamed to and resumed from out_dir)."""
    run = run or real_run(params, cfg, graph)
    feats = graph.features[np.asarray(nodes, np.int64)]
    if (feats[:, 1] != graph.n_pos - 1).any():
        raise ValueError("a region's nodes lie at the last position (`region`)")
    pool = Pool("features", tuple(map(tuple, feats[:, [0, 2]].tolist())))
    problem = _problem(run, cfg, Edit("zero").new(run.features), graph.n_pos - 1)
    res = run_sweep(params, cfg, problem, pool, all_subsets(pool.n), out_dir, chunk_size=chunk_size)
    return res.subsets(pool.n), res.metric[:, 0].astype(np.float64) - run.value


def subset_deltas(graph: graphs.Graph, nodes: Sequence[int], subsets) -> np.ndarray:
    """[K, S]: the activation changes that zero the nodes of each subset (bool [K, n] over `nodes`)."""
    nodes = np.asarray(nodes, np.int64)
    deltas = np.zeros((len(subsets), len(graph.features)))
    deltas[:, nodes] = -(np.asarray(subsets, bool) * graph.activations[nodes])
    return deltas


def _carrying(subsets: np.ndarray, removed: np.ndarray, fraction: float) -> Optional[np.ndarray]:
    """The smallest subset (bool [n]) whose removal reaches `fraction`, the largest removal among the
    smallest size that reaches it; None when none does."""
    ok = removed >= fraction
    if not ok.any():
        return None
    sizes = subsets.sum(1)
    k = sizes[ok].min()
    at = np.flatnonzero(sizes == k)
    return subsets[at[np.argmax(removed[at])]]


def region_summary(graph: graphs.Graph, nodes: Sequence[int], subsets: np.ndarray, measured: np.ndarray,
                   value: float, fractions: Sequence[float] = (0.5, 0.8)) -> dict:
    """What the region's sweep says of the graph (nodes in descending influence; subsets bool [K, n];
    measured changes [K] of the logit node of unpatched value `value`):

    fit: `agreement` of the graph's predictions (through the other features, and 'direct' only) with
    the measured changes over the subsets; additivity: `r_squared` of the sum of the single nodes'
    measured changes as a prediction of each subset's; removed: the largest measured fraction of the
    value removed (-change / value, over all subsets); per fraction: the smallest subset whose measured
    removal reaches it ('measured', node indices), the smallest by the graph's prediction ('predicted'),
    whether the top-k nodes by influence (k: the measured subset's size) are that subset and the rank of
    the measured subset among the subsets of its size by predicted removal (0: the graph's first)."""
    if value == 0:
        raise ValueError("the logit node's value is 0: no fraction of it is removed")
    subsets = np.asarray(subsets, bool)
    nodes = np.asarray(nodes, np.int64)
    deltas = subset_deltas(graph, nodes, subsets)
    predicted = graphs.predicted_effects(graph, deltas)[:, 0]
    direct = graphs.predicted_effects(graph, deltas, through_features=False)[:, 0]
    sizes = subsets.sum(1)
    singles = {int(np.flatnonzero(s)[0]): m for s, m in zip(subsets, measured) if s.sum() == 1}
    additive = subsets.astype(np.float64) @ np.asarray([singles[i] for i in range(len(nodes))])
    removed, removed_pred = -measured / value, -predicted / value
    out = {"nodes": nodes.tolist(), "units": graph.features[nodes][:, [0, 2]].tolist(),
           "fit": agreement(measured, predicted, value), "fit_direct": agreement(measured, direct, value),
           "additivity": r_squared(measured, additive), "removed": float(removed.max()),
           "removed_all": float(removed[sizes == len(nodes)][0]), "carrying": {}}
    for fraction in fractions:
        want, pred = _carrying(subsets, removed, fraction), _carrying(subsets, removed_pred, fraction)
        row = {"measured": None if want is None else np.flatnonzero(want).tolist(),
               "predicted": None if pred is None else np.flatnonzero(pred).tolist(),
               "top_k_by_influence": None, "rank_by_prediction": None}
        if want is not None:
            k = int(want.sum())
            row["top_k_by_influence"] = bool(want[:k].all())
            same = np.flatnonzero(sizes == k)
            order = same[np.argsort(-removed_pred[same], kind="stable")]
            row["rank_by_prediction"] = int(np.flatnonzero((subsets[order] == want).all(1))[0])
        out["carrying"][f"{fraction:g}"] = row
    return out
