"""Gradient estimates of patching effects, for every unit (or edge) at once.

For a `PatchingProblem` with mean metric f(m) under mask m (leaves [L, *units] of one site, or an
`edges.EdgeMask` over the model's edges):

  attribution patching   g = df/dm at m = 0: the first-order estimate f(e_u) - f(0) ~ g_u of
                         patching each unit u alone, from one backward pass (Nanda; Syed et al.;
                         at edges, EAP).
  integrated gradients   IG_u = integral_0^1 df/dm_u (a * 1) da, the path from nothing patched to
                         every unit patched, by the midpoint rule over `steps` points (vmapped);
                         the IG of all units sums to f(1) - f(0) as steps grow (at edges, EAP-IG).

Node sites differentiate `patching.patched_metric`, the same compiled path sweeps run; edges
differentiate `edges.edge_metric`. Both go through one gradient routine, `_mean_metric_grads`.
"""

from __future__ import annotations

import functools
from typing import List, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxcircuits.interventions import edges, sites
from jaxcircuits.models.config import ModelConfig
from jaxcircuits.engine.patching import PatchingProblem, patched_metric
from jaxcircuits.interventions.sites import Mask


def _mean_metric_grads(metric_of, full, alphas):
    """d(mean metric_of(m))/dm at m = a * full for each a of alphas [K]: `full`'s pytree (the mask
    with every unit patched) with a leading [K] axis on its leaves."""
    f = lambda m: metric_of(m).mean()
    return jax.vmap(lambda a: jax.grad(f)(jax.tree.map(lambda x: a * x, full)))(alphas)


def _midpoints(steps: int):
    """The midpoint rule's [steps] points on (0, 1)."""
    if steps < 1:
        raise ValueError(f"steps={steps}, expected >= 1")
    return (jnp.arange(steps, dtype=jnp.float32) + 0.5) / steps


# ---- node sites ----------------------------------------------------------------------------------
@functools.partial(jax.jit, static_argnames=("cfg", "site", "shape"))
def _site_grads(params, cfg: ModelConfig, problem: PatchingProblem, site: str, shape: tuple, alphas):
    """[K, *shape]: `_mean_metric_grads` of the mask of `site` (leaves `shape`)."""
    metric_of = lambda m: patched_metric(params, cfg, problem, Mask(**{site: m}))
    return _mean_metric_grads(metric_of, jnp.ones(shape, jnp.float32), alphas)


def _prepared(cfg: ModelConfig, problem: PatchingProblem, site: str, n_blocks):
    """(problem checked and cut to what every unit of `site` reads, the site's mask shape)."""
    shape = sites.get(site).shape(cfg, n_blocks)
    return problem.for_footprint(cfg, Mask(**{site: np.ones(shape, bool)})), shape


def attribution_patching(params, cfg: ModelConfig, problem: PatchingProblem, site: str = "head_out",
                         n_blocks=None) -> np.ndarray:
    """float32 [L, *units]: d(mean metric over prompts)/d(mask of `site`) at 0, the linear estimate
    of each unit's patching effect (patched - unpatched mean metric)."""
    problem, shape = _prepared(cfg, problem, site, n_blocks)
    return np.asarray(_site_grads(params, cfg, problem, site, shape, jnp.zeros(1))[0])


def integrated_gradients(params, cfg: ModelConfig, problem: PatchingProblem, site: str = "head_out",
                         steps: int = 8, n_blocks=None) -> np.ndarray:
    """float32 [L, *units]: integrated gradients of the mean metric along the blend of every unit
    of `site` from 0 to 1, midpoint rule with `steps` points, all in one vmapped call."""
    alphas = _midpoints(steps)
    problem, shape = _prepared(cfg, problem, site, n_blocks)
    return np.asarray(_site_grads(params, cfg, problem, site, shape, alphas).mean(0))


# ---- edges ---------------------------------------------------------------------------------------
@functools.partial(jax.jit, static_argnames=("cfg",))
def _edge_grads(params, cfg: ModelConfig, problem: PatchingProblem, alphas):
    """[K, E]: `_mean_metric_grads` of the edge mask (every valid edge), flat in `EdgeGraph.edges` order."""
    graph = edges.EdgeGraph.of(cfg)
    full = jax.tree.map(lambda v: jnp.asarray(v, jnp.float32), graph.valid())
    return graph.flat(_mean_metric_grads(lambda m: edges.edge_metric(params, cfg, problem, m), full, alphas))


def edge_attribution_patching(params, cfg: ModelConfig, problem: PatchingProblem) -> np.ndarray:
    """float32 [E] (EAP): d(mean metric over prompts)/d(edge mask) at 0 for every edge, in
    `edges.EdgeGraph.of(cfg).edges` order, from one backward pass; the linear estimate of patching
    each edge alone (an edge with mask 1 carries the source's value of its sender). The problem's
    source holds `sites.EDGE_SOURCE`."""
    problem = edges.prepared(cfg, problem)
    return np.asarray(_edge_grads(params, cfg, problem, jnp.zeros(1))[0])


def edge_integrated_gradients(params, cfg: ModelConfig, problem: PatchingProblem, steps: int = 8) -> np.ndarray:
    """float32 [E] (EAP-IG): integrated gradients of the mean metric along a * (every edge) from a = 0
    to 1, midpoint rule with `steps` points (vmapped), in `EdgeGraph.edges` order; they sum to
    f(every edge patched) - f(none) as steps grow."""
    alphas = _midpoints(steps)
    problem = edges.prepared(cfg, problem)
    return np.asarray(_edge_grads(params, cfg, problem, alphas).mean(0))


def top_edges(cfg: ModelConfig, scores, k: int = 10) -> List[Tuple[str, str, float]]:
    """The k edges of largest |score| (scores [E] in `EdgeGraph.edges` order; ties: earlier first) as
    (sender, receiver, score), largest first."""
    graph = edges.EdgeGraph.of(cfg)
    scores = np.asarray(scores, np.float64)
    if scores.shape != (graph.n_edges,):
        raise ValueError(f"edge scores have shape {scores.shape}, expected ({graph.n_edges},)")
    order = np.argsort(-np.abs(scores), kind="stable")[:k]
    return [(*graph.edges[i], float(scores[i])) for i in order]
