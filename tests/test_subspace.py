"""Subspace (low-rank) and additive (steering) interventions: 'subspace:<site>' / 'steer:<site>'
source entries, against the plain patch, the plain run and a NumPy reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcircuits.interventions import sites
from jaxcircuits.methods import weight_space as ws
from jaxcircuits.interventions.metrics import LogitDiff
from jaxcircuits.models import transformer
from jaxcircuits.interventions.problem import PatchingProblem, target_run
from jaxcircuits.engine.patching import patched_metric
from jaxcircuits.interventions.sites import Intervention, Mask
from tests.conftest import random_tokens

B, T, LAYER = 2, 6, 1


def _setup(tiny):
    _, cfg, params = tiny("llama_gqa")
    tgt, src = random_tokens(0, B, T), random_tokens(1, B, T)
    _, cache = transformer.run_with_cache(params, cfg, src, sites=("head_out", "resid_pre"))
    _, plain = transformer.run_with_cache(params, cfg, tgt, sites=("head_out", "resid_pre"))
    pos_w = np.zeros((B, T), np.float32)
    pos_w[:, 3:] = 1.0
    return cfg, params, tgt, cache, plain, pos_w


def _mask(cfg, site, m):
    a = np.zeros(sites.get(site).shape(cfg), np.float32)
    a[LAYER] = m
    return Mask(**{site: jnp.asarray(a)})


def _basis(rng, cfg, units, k, d):
    """Orthonormal rows [L, *units, k, d] (zero outside LAYER)."""
    q = np.linalg.qr(rng.randn(*units, d, k))[0]                      # [*units, d, k]
    out = np.zeros((cfg.n_layers, *units, k, d), np.float32)
    out[LAYER] = np.swapaxes(q, -1, -2)
    return out


@pytest.mark.parametrize("site", ["head_out", "resid_pre"])
def test_subspace_patch_matches_numpy_and_limits(tiny, site):
    cfg, params, tgt, cache, plain, pos_w = _setup(tiny)
    rng = np.random.RandomState(0)
    units, d = ((cfg.n_heads,), cfg.d_head) if site == "head_out" else ((), cfg.d_model)
    m = rng.uniform(0.3, 1.0, units).astype(np.float32)
    mask = _mask(cfg, site, m)
    key = sites.transform_key("subspace", site)

    def run(basis):
        src = {site: cache[site]} if basis is None else {site: cache[site], key: jnp.asarray(basis)}
        _, c = transformer.forward(params, cfg, tgt, intervention=Intervention(mask, src, pos_w), collect=(site,))
        return np.asarray(c[site][LAYER])

    basis = _basis(rng, cfg, units, 3, d)
    got = run(basis)
    x, s = np.asarray(plain[site][LAYER], np.float64), np.asarray(cache[site][LAYER], np.float64)
    proj = np.einsum("...kd,...ke->...de", basis[LAYER], basis[LAYER])
    w = pos_w.reshape(B, T, *[1] * len(units)) * m
    want = x + w[..., None] * np.einsum("...d,...de->...e", s - x, proj)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    full = _basis(rng, cfg, units, d, d)                                 # rank = d: the plain patch
    np.testing.assert_allclose(run(full), run(None), rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(run(np.zeros_like(basis)), np.asarray(plain[site][LAYER]))   # rank 0: no patch


def test_subspace_through_patching_vmapped_over_ranks(tiny):
    cfg, params, tgt, cache, plain, pos_w = _setup(tiny)
    metric = LogitDiff(good=jnp.array([[5], [6]]), bad=jnp.array([[7], [8]]))
    problem = PatchingProblem.make(target_run(params, cfg, tgt), {"head_out": cache["head_out"]}, pos_w, metric)
    mask = _mask(cfg, "head_out", np.ones(cfg.n_heads, np.float32))
    rng = np.random.RandomState(1)
    dirs = _basis(rng, cfg, (cfg.n_heads,), cfg.d_head, cfg.d_head)          # full orthonormal sets
    bases = jax.vmap(lambda k: jnp.where(jnp.arange(cfg.d_head)[:, None] < k, dirs, 0.0))(jnp.array([0, 2, cfg.d_head]))
    got = np.asarray(ws.transform_metric(params, cfg, problem, mask, "subspace:head_out", bases))
    unpatched = float(patched_metric(params, cfg, problem.replace(source={"head_out": plain["head_out"]}), mask).mean())
    np.testing.assert_allclose(got[0], unpatched, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got[2], float(patched_metric(params, cfg, problem, mask).mean()), rtol=1e-4, atol=1e-5)
    assert not np.isclose(got[1], got[0]) and not np.isclose(got[1], got[2])
    np.testing.assert_allclose(ws.rank_bases(jnp.eye(3), jnp.array([0, 2]))[1], np.diag([1.0, 1.0, 0.0]))


def test_steering_is_additive_and_vmaps_over_alpha(tiny):
    cfg, params, tgt, cache, plain, pos_w = _setup(tiny)
    v = np.zeros((cfg.n_layers, cfg.d_model), np.float32)
    v[LAYER] = np.random.RandomState(2).randn(cfg.d_model)

    def resid(alpha):
        mask = Mask(resid_pre=jnp.zeros((cfg.n_layers,)).at[LAYER].set(alpha))
        iv = Intervention(mask, {"steer:resid_pre": jnp.asarray(v)}, jnp.asarray(pos_w))
        _, c = transformer.forward_fn(params, cfg, jnp.asarray(tgt), intervention=iv, collect=("resid_pre",),
                                      return_logits=False)
        return c["resid_pre"][LAYER]
    alphas = jnp.array([0.0, 0.5, 1.0])
    out = np.asarray(jax.jit(jax.vmap(resid))(alphas))
    x = np.asarray(plain["resid_pre"][LAYER])
    for a, got in zip([0.0, 0.5, 1.0], out):
        np.testing.assert_allclose(got, x + a * pos_w[..., None] * v[LAYER], rtol=1e-5, atol=1e-5)
    # the checked entry point accepts a steer-only source (no replacement activations)
    iv = Intervention(Mask(resid_pre=jnp.zeros((cfg.n_layers,)).at[LAYER].set(1.0)), {"steer:resid_pre": v}, pos_w)
    _, c = transformer.forward(params, cfg, tgt, intervention=iv, collect=("resid_pre",))
    np.testing.assert_allclose(c["resid_pre"][LAYER], out[2], rtol=1e-5, atol=1e-5)


def test_bad_transforms_are_refused(tiny):
    cfg, params, tgt, cache, plain, pos_w = _setup(tiny)
    mask = _mask(cfg, "head_out", np.ones(cfg.n_heads, np.float32))
    bad = {"head_out": cache["head_out"], "subspace:head_out": jnp.zeros((cfg.n_layers, cfg.n_heads, 2, 5))}
    with pytest.raises(ValueError, match="subspace:head_out.*expected"):
        transformer.forward(params, cfg, tgt, intervention=Intervention(mask, bad, pos_w))
    nan = np.full((cfg.n_layers, cfg.n_heads, 2, cfg.d_head), np.nan, np.float32)
    with pytest.raises(ValueError, match="NaN"):
        transformer.forward(params, cfg, tgt, intervention=Intervention(mask, {**bad, "subspace:head_out": nan}, pos_w))
    with pytest.raises(ValueError, match="no per-unit vector axis"):
        sites.check_source({"subspace:mlp_neuron": np.zeros((3, 1, 1))}, cfg.n_layers, B, T, cfg)
    with pytest.raises(ValueError, match="unknown transform"):
        sites.transform_key("rotate", "head_out")
