"""Attribution patching and integrated gradients at any site, against finite differences and exact patching."""

import jax.numpy as jnp
import numpy as np
import pytest

import jaxcircuits as jc
from jaxcircuits.interventions import positions as P
from jaxcircuits.interventions import sites
from jaxcircuits.methods.attribution import attribution_patching, integrated_gradients
from jaxcircuits.interventions.metrics import LogitDiff
from jaxcircuits.interventions.problem import PatchingProblem, target_run
from jaxcircuits.engine.patching import run_masks
from tests.conftest import random_tokens


def _problem(tiny, name, site):
    _, cfg, params = tiny(name)
    tgt, src = random_tokens(21, 2, 8), random_tokens(22, 2, 8)
    _, cache = jc.run_with_cache(params, cfg, src, sites=(sites.get(site).cache,))
    metric = LogitDiff(good=jnp.array([[5], [6]]), bad=jnp.array([[7], [9]]))
    return params, cfg, PatchingProblem.make(target_run(params, cfg, tgt), cache, P.select("all", np.ones(tgt.shape)),
                                             metric)


def _mean_metric(params, cfg, problem, site, masks):
    return run_masks(params, cfg, problem, jc.Mask(**{site: jnp.asarray(masks, jnp.float32)}), shard=False).mean(-1)


@pytest.mark.parametrize("name,site", [("gpt2", "head_v"), ("llama_gqa", "head_k"), ("llama_gqa", "mlp_neuron"),
                                       ("gpt2", "head_out")])
def test_attribution_patching_matches_finite_differences(tiny, name, site):
    params, cfg, problem = _problem(tiny, name, site)
    grad = attribution_patching(params, cfg, problem, site)
    shape = sites.get(site).shape(cfg)
    assert grad.shape == shape and np.abs(grad).max() > 1e-4
    eps = 1e-2
    units = [np.unravel_index(i, shape) for i in np.argsort(-np.abs(grad), axis=None)[:3]]
    masks = np.zeros((1 + 2 * len(units), *shape), np.float32)
    for i, u in enumerate(units):
        masks[(1 + 2 * i, *u)], masks[(2 + 2 * i, *u)] = eps, 2 * eps
    f = _mean_metric(params, cfg, problem, site, masks)
    for i, u in enumerate(units):
        fd = (4 * (f[1 + 2 * i] - f[0]) - (f[2 + 2 * i] - f[0])) / (2 * eps)     # second-order one-sided
        np.testing.assert_allclose(grad[u], fd, rtol=3e-2, atol=2e-4)


def test_integrated_gradients_are_complete(tiny):
    """sum_u IG_u = f(every unit patched) - f(none) up to the quadrature error; the steps matter."""
    params, cfg, problem = _problem(tiny, "llama_gqa", "head_out")
    ig = integrated_gradients(params, cfg, problem, "head_out", steps=32)
    ends = _mean_metric(params, cfg, problem, "head_out", np.stack([np.zeros((cfg.n_layers, cfg.n_heads)),
                                                                     np.ones((cfg.n_layers, cfg.n_heads))]))
    np.testing.assert_allclose(ig.sum(), ends[1] - ends[0], rtol=1e-2, atol=1e-3)
    one = integrated_gradients(params, cfg, problem, "head_out", steps=1)
    assert np.abs(one - ig).max() > 1e-5                  # the path is not linear: steps matter
    with pytest.raises(ValueError, match="steps=0"):
        integrated_gradients(params, cfg, problem, "head_out", steps=0)
