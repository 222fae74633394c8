"""Gradient estimates of patching effects, for every unit of a site (or every edge) at once.

For a `PatchingProblem` with mean metric f(m) under mask m (a leaf [L, *units] of one site, or the
edges of `interventions.edges.EdgeGraph`, site 'edges'):

  attribution patching   g = df/dm at m = 0: the first-order estimate f(e_u) - f(0) ~ g_u of
                         patching each unit u alone, from one backward pass (Nanda; Syed et al.;
                         at edges, EAP).
  integrated gradients   IG_u = integral_0^1 df/dm_u (a * 1) da, the path from nothing patched to
                         every unit patched, by the midpoint rule over `steps` points (vmapped);
                         the IG of all units sums to f(1) - f(0) as steps grow (at edges, EAP-IG).

Both differentiate `engine.patching.patched_metric`, the same path sweeps run (edges: through its
buffer-free custom VJP), in one routine, `_grads`.
"""

from __future__ import annotations

import functools
from typing import List, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxcircuits import checks
from jaxcircuits.engine.patching import patched_metric
from jaxcircuits.interventions import sites
from jaxcircuits.interventions.edges import EdgeGraph
from jaxcircuits.interventions.problem import PatchingProblem
from jaxcircuits.interventions.sites import Mask
from jaxcircuits.models.config import ModelConfig


@functools.partial(jax.jit, static_argnames=("cfg",))
def _grads(params, cfg: ModelConfig, problem: PatchingProblem, full: Mask, alphas) -> Mask:
    """d(mean metric(m))/dm at m = a * full for each a of alphas [K]: `full`'s pytree (the mask with
    every unit patched) with a leading [K] axis on its leaves."""
    f = lambda m: patched_metric(params, cfg, problem, m).mean()
    return jax.vmap(lambda a: jax.grad(f)(jax.tree.map(lambda x: a * x, full)))(alphas)


def _midpoints(steps: int):
    """The midpoint rule's [steps] points on (0, 1)."""
    steps = checks.count("steps", steps)
    return (jnp.arange(steps, dtype=jnp.float32) + 0.5) / steps


def _unit_grads(params, cfg: ModelConfig, problem: PatchingProblem, site: str, n_blocks, alphas) -> np.ndarray:
    """[K, *units] (site 'edges': [K, E]): `_grads` of every unit of `site` (`sites.every_unit`),
    the problem checked and cut to what they read once."""
    full = sites.every_unit(cfg, site, n_blocks)
    problem = problem.for_footprint(cfg, sites.footprint(full))
    return np.asarray(sites.unit_values(cfg, _grads(params, cfg, problem, full, alphas), site))


def attribution_patching(params, cfg: ModelConfig, problem: PatchingProblem, site: str = "head_out",
                         n_blocks=None) -> np.ndarray:
    """float32 [L, *units] (site 'edges': [E], in `EdgeGraph.of(cfg).edges` order): d(mean metric over
    prompts)/d(mask of `site`) at 0, the linear estimate of each unit's patching effect (patched -
    unpatched mean metric; an edge with mask 1 carries the source's value of its sender, so the
    problem's source holds `sites.EDGE_SOURCE`)."""
    return _unit_grads(params, cfg, problem, site, n_blocks, jnp.zeros(1))[0]


def integrated_gradients(params, cfg: ModelConfig, problem: PatchingProblem, site: str = "head_out",
                         steps: int = 8, n_blocks=None) -> np.ndarray:
    """float32 [L, *units] (site 'edges': [E]): integrated gradients of the mean metric along the blend
    of every unit of `site` from 0 to 1, midpoint rule with `steps` points, all in one vmapped call;
    they sum to f(every unit patched) - f(none) as steps grow."""
    return _unit_grads(params, cfg, problem, site, n_blocks, _midpoints(steps)).mean(0)


def top_edges(cfg: ModelConfig, scores, k: int = 10) -> List[Tuple[str, str, float]]:
    """The k edges of largest |score| (scores [E] in `EdgeGraph.edges` order; ties: earlier first) as
    (sender, receiver, score), largest first."""
    graph = EdgeGraph.of(cfg)
    scores = np.asarray(scores, np.float64)
    if scores.shape != (graph.n_edges,):
        raise ValueError(f"edge scores have shape {scores.shape}, expected ({graph.n_edges},)")
    order = np.argsort(-np.abs(scores), kind="stable")[:checks.count("k", k)]
    return [(*graph.edges[i], float(scores[i])) for i in order]
