"""Gradient estimates of patching effects at any registered site, for every unit at once.

For a `PatchingProblem` with mean metric f(m) under mask m (leaves [L, *units] of one site):

  attribution patching   g = df/dm at m = 0: the first-order estimate f(e_u) - f(0) ~ g_u of
                         patching each unit u alone, from one backward pass (Nanda; Syed et al.).
  integrated gradients   IG_u = integral_0^1 df/dm_u (a * 1) da, the path from nothing patched to
                         every unit of the site patched, by the midpoint rule over `steps` points
                         (vmapped); the IG of all units sums to f(1) - f(0) as steps grow.

Both differentiate `patching.patched_metric`, the same compiled path sweeps run.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxcircuits import sites
from jaxcircuits.models.config import ModelConfig
from jaxcircuits.patching import PatchingProblem, patched_metric
from jaxcircuits.sites import Mask


@functools.partial(jax.jit, static_argnames=("cfg", "site", "shape"))
def _mean_metric_grads(params, cfg: ModelConfig, problem: PatchingProblem, site: str, shape: tuple, alphas):
    """d(mean metric)/d(mask of `site`) at the masks alpha * ones(shape), for each alpha [K]: [K, *shape]."""
    f = lambda m: patched_metric(params, cfg, problem, Mask(**{site: m})).mean()
    return jax.vmap(lambda a: jax.grad(f)(jnp.full(shape, a, jnp.float32)))(alphas)


def _prepared(cfg: ModelConfig, problem: PatchingProblem, site: str, n_blocks):
    """(problem checked and cut to what every unit of `site` reads, the site's mask shape)."""
    shape = sites.get(site).shape(cfg, n_blocks)
    return problem.for_footprint(cfg, Mask(**{site: np.ones(shape, bool)})), shape


def attribution_patching(params, cfg: ModelConfig, problem: PatchingProblem, site: str = "head_out",
                         n_blocks=None) -> np.ndarray:
    """float32 [L, *units]: d(mean metric over prompts)/d(mask of `site`) at 0, the linear estimate
    of each unit's patching effect (patched - unpatched mean metric)."""
    problem, shape = _prepared(cfg, problem, site, n_blocks)
    return np.asarray(_mean_metric_grads(params, cfg, problem, site, shape, jnp.zeros(1))[0])


def integrated_gradients(params, cfg: ModelConfig, problem: PatchingProblem, site: str = "head_out",
                         steps: int = 8, n_blocks=None) -> np.ndarray:
    """float32 [L, *units]: integrated gradients of the mean metric along the blend of every unit
    of `site` from 0 to 1, midpoint rule with `steps` points, all in one vmapped call."""
    if steps < 1:
        raise ValueError(f"steps={steps}, expected >= 1")
    problem, shape = _prepared(cfg, problem, site, n_blocks)
    alphas = (jnp.arange(steps, dtype=jnp.float32) + 0.5) / steps
    return np.asarray(_mean_metric_grads(params, cfg, problem, site, shape, alphas).mean(0))
