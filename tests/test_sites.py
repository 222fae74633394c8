"""The site registry's four newest sites against HF forward hooks, on a random GPT-2 and on SmolLM2."""

import dataclasses

import chex
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import jaxcircuits as jc
from jaxcircuits.interventions import positions as P
from jaxcircuits.dictionaries.core import DictConfig
from jaxcircuits.interventions import sites
from jaxcircuits.models.config import SpliceConfig
from tests import hf_reference as ref
from tests.conftest import random_tokens

NEW_SITES = ("head_q", "head_k", "head_v", "mlp_neuron")


def _hf_capture(model, site, tokens):
    """HF's activations of `site`, stacked [L, B, T, ...] in jaxcircuits' layout."""
    got = {}

    def keep(l, x):
        got[l] = x.detach().numpy().copy()
        return x
    with ref.qkv_neuron_hooks(model, site, keep):
        ref.run(model, tokens)
    return np.stack([got[l] for l in sorted(got)])


def _hf_patched(model, site, layer, weights, source, positions, tokens):
    """HF logits with x <- x + w_u * (s - x) for units u at `positions` of `layer`."""
    def blend(l, x):
        if l != layer:
            return x
        s = torch.tensor(source[l])
        for t in positions:
            for u, w in weights.items():
                x[:, t, u] = x[:, t, u] + w * (s[:, t, u] - x[:, t, u])
        return x
    with ref.qkv_neuron_hooks(model, site, blend):
        return ref.run(model, tokens).logits.numpy()


def _check_site(hf, cfg, params, site, tgt, src, layer, units, atol):
    _, cache = jc.run_with_cache(params, cfg, src, sites=(site,))
    hf_src = _hf_capture(hf, site, src)
    chex.assert_shape(cache[site], hf_src.shape)
    # rtol for the massive activations of late layers (SmolLM2's layer-29 neurons reach ~341).
    np.testing.assert_allclose(np.asarray(cache[site]), hf_src, atol=atol, rtol=1e-5)
    rng = np.random.RandomState(layer)
    weights = {u: float(w) for u, w in zip(units, rng.uniform(0.3, 1.0, len(units)))}
    m = np.zeros(sites.get(site).shape(cfg), np.float32)
    m[layer, units] = list(weights.values())
    T = tgt.shape[1]
    positions = [T - 3, T - 2, T - 1]
    pos_w = np.zeros(tgt.shape, np.float32)
    pos_w[:, positions] = 1.0
    iv = jc.Intervention(jc.Mask(**{site: jnp.asarray(m)}), cache, jnp.asarray(pos_w))
    got = np.asarray(jc.forward(params, cfg, jnp.asarray(tgt), intervention=iv)[0])
    want = _hf_patched(hf, site, layer, weights, hf_src, positions, tgt)
    np.testing.assert_allclose(got, want, atol=atol)
    plain = np.asarray(jc.forward(params, cfg, jnp.asarray(tgt))[0])
    assert np.abs(got - plain).max() > 10 * atol           # the patch changes the logits
    return cache


@pytest.mark.parametrize("site", NEW_SITES)
def test_new_site_matches_hf_hooks_on_random_gpt2(tiny, site):
    hf, cfg, params = tiny("gpt2")
    units = [0, 2] if site != "mlp_neuron" else [1, 7, 100, 150]
    _check_site(hf, cfg, params, site, random_tokens(5, 2, 9), random_tokens(6, 2, 9), 1, units, 1e-4)


@pytest.mark.parametrize("site", ["head_k", "head_v"])
def test_gqa_kv_sites_match_hf_hooks(tiny, site):
    """K/V masks address KV heads: [L, n_kv_heads] on an 8-query / 2-KV-head model."""
    hf, cfg, params = tiny("llama_gqa")
    assert sites.get(site).shape(cfg) == (cfg.n_layers, 2)
    _check_site(hf, cfg, params, site, random_tokens(5, 2, 9), random_tokens(6, 2, 9), 2, [1], 1e-4)


@pytest.fixture(scope="module")
def smollm2():
    return jc.load()


@pytest.mark.parametrize("site", NEW_SITES)
def test_new_site_matches_hf_hooks_on_smollm2(smollm2, hf_smollm2, site):
    cfg = smollm2.cfg
    units = {"head_q": [0, 4, 8], "head_k": [1], "head_v": [0, 2], "mlp_neuron": [3, 77, 500, 1535]}[site]
    tgt = random_tokens(7, 1, 12, vocab=cfg.vocab_size)
    src = random_tokens(8, 1, 12, vocab=cfg.vocab_size)
    _check_site(hf_smollm2, cfg, smollm2.params, site, tgt, src, 20, units, 2.5e-4)


def test_new_sites_in_position_maps_and_generation(tiny):
    """q/k/v/neuron sources align across prompt lengths and patch generated tokens, like head_out."""
    _, cfg, params = tiny("llama_gqa")
    tgt, src = random_tokens(1, 1, 9), random_tokens(2, 1, 6)
    _, cache = jc.run_with_cache(params, cfg, src, sites=NEW_SITES)
    pos_map = P.right_aligned(np.ones(tgt.shape), np.ones(src.shape))
    aligned = P.align(cache, pos_map)
    for site in NEW_SITES:
        np.testing.assert_array_equal(np.asarray(aligned[site])[:, :, 3:], np.asarray(cache[site]))
        assert not np.asarray(aligned[site])[:, :, :3].any()
    decode = jc.source_at_position(cache, 0)
    mask = jc.Mask(head_v=jnp.ones((cfg.n_layers, cfg.n_kv_heads)), mlp_neuron=jnp.ones((cfg.n_layers, cfg.d_mlp)))
    iv = jc.decode_intervention(mask, decode)
    got = np.asarray(jc.generate(params, cfg, tgt, max_new_tokens=4, decode=iv, eos_id=-1))
    plain = np.asarray(jc.generate(params, cfg, tgt, max_new_tokens=4, eos_id=-1))
    assert got.shape == (1, 4) and not np.array_equal(got[:, 1:], plain[:, 1:])


@pytest.mark.parametrize("site", sites.NAMES)
def test_select_source_keeps_exactly_what_the_blend_reads(tiny, site):
    """`select_source` keeps a source element iff `apply` gives it a nonzero weight (x = 0, s = 1
    makes the blend the weight itself), for random units and positions."""
    _, cfg, _ = tiny("llama_gqa")
    if site == "features":                 # a site of models with a spliced dictionary only
        cfg = dataclasses.replace(cfg, splice=SpliceConfig("resid_pre", DictConfig("relu", cfg.d_model, 6), (1, 2)))
    rng = np.random.RandomState(sites.NAMES.index(site))
    B, T, row = 2, 5, sites.get(site)
    m = (rng.rand(*row.shape(cfg, 4)) < 0.5).astype(np.float32)
    pos_w = (rng.rand(B, T) < 0.5).astype(np.float32)
    m.flat[0], pos_w[0, -1] = 1, 1
    entry = (cfg.n_layers, B, *(T if d in ("T", "S") else getattr(cfg, d) for d in sites.get(row.cache).dims))
    kept = sites.select_source(cfg, {row.cache: np.ones(entry, np.float32)}, jc.Mask(**{site: m}), pos_w)
    weights = [sites.apply(site, jnp.zeros(entry[1:]), jc.Mask(**{site: jnp.asarray(m[l])}),
                           {row.cache: jnp.ones(entry[1:])}, jnp.asarray(pos_w)) for l in range(cfg.n_layers)]
    np.testing.assert_array_equal(np.asarray(kept[row.cache]) != 0, np.stack(weights) != 0)
    assert 0 < (np.stack(weights) != 0).mean() < 1
