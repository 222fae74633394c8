"""Weight folding and centring (jaxcircuits.methods.folding) keep the logits and do what they say."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcircuits.methods import folding
from jaxcircuits.models.params import check_params
from jaxcircuits.models.transformer import forward, unembed_matrix
from tests.conftest import VARIANTS, random_tokens

TOKENS = random_tokens(0, 2, 8)


def logits(params, cfg):
    check_params(params, cfg)
    return np.asarray(forward(params, cfg, TOKENS)[0])


@pytest.mark.parametrize("name", VARIANTS)
def test_fold_norms_keeps_logits_and_folds_every_norm(tiny, name):
    _, cfg, params = tiny(name)
    folded, cfg2 = jax.jit(lambda p: folding.fold_norms(p, cfg)[0])(params), folding.fold_norms(params, cfg)[1]
    np.testing.assert_allclose(logits(folded, cfg2), logits(params, cfg), atol=1e-4, rtol=0)
    layers, old = folded["layers"], params["layers"]
    norms = [layers["norm1"], layers["norm2"]]
    if cfg.norm == "layernorm":   # the final LayerNorm is left in place (no logit bias to take b W_U)
        assert cfg2 == cfg
        for k in ("scale", "bias"):
            np.testing.assert_array_equal(folded["final_norm"][k], params["final_norm"][k])
    else:                         # the final RMSNorm's scale is in the unembedding (untied if it was tied)
        norms.append(folded["final_norm"])
        assert cfg2 == dataclasses.replace(cfg, tied_embeddings=False)
        assert not np.allclose(unembed_matrix(folded), unembed_matrix(params))
        np.testing.assert_array_equal(folded["embed"]["tokens"], params["embed"]["tokens"])
    for n in norms:
        assert np.all(np.asarray(n["scale"]) == 1) and np.all(np.asarray(n.get("bias", 0.0)) == 0)
    for r in ("q", "k", "v", "up", "gate")[:5 if cfg.gated_mlp else 4]:
        assert not np.allclose(layers[r]["w"], old[r]["w"], atol=1e-3), r
        if "b" in old[r] and cfg.norm == "layernorm":
            assert not np.allclose(layers[r]["b"], old[r]["b"], atol=1e-3), r


def test_fold_norms_centres_layernorm_reading_weights(tiny):
    _, cfg, params = tiny("gpt2")
    layers = folding.fold_norms(params, cfg)[0]["layers"]
    for r in ("q", "k", "v", "up"):
        np.testing.assert_allclose(layers[r]["w"].mean(axis=1), 0, atol=1e-6)
    plain = folding.fold_norms(params, cfg, center_reading=False)[0]
    assert not np.allclose(plain["layers"]["q"]["w"].mean(axis=1), 0, atol=1e-3)
    np.testing.assert_allclose(logits(plain, cfg), logits(params, cfg), atol=1e-4, rtol=0)


def test_fold_norms_refuses_a_layernorm_bias_with_nowhere_to_go(tiny):
    _, cfg, params = tiny("gpt2")
    with pytest.raises(ValueError, match="attn_bias=False"):
        folding.fold_norms(params, dataclasses.replace(cfg, attn_bias=False))


@pytest.mark.parametrize("fold_first", [True, False])
def test_center_writing_weights_gpt2(tiny, fold_first):
    _, cfg, params = tiny("gpt2")
    centred, cfg2 = folding.center_writing_weights(*(folding.fold_norms(params, cfg) if fold_first else (params, cfg)))
    assert cfg.tied_embeddings and cfg2 == dataclasses.replace(cfg, tied_embeddings=False)
    np.testing.assert_allclose(logits(centred, cfg2), logits(params, cfg), atol=1e-4, rtol=0)
    layers = centred["layers"]
    for w in (centred["embed"]["tokens"], centred["embed"]["positions"], layers["o"]["w"], layers["o"]["b"],
              layers["down"]["w"], layers["down"]["b"]):
        np.testing.assert_allclose(np.asarray(w).mean(-1), 0, atol=1e-6)
    assert not np.allclose(params["layers"]["o"]["w"].mean(-1), 0, atol=1e-3)   # not vacuous


@pytest.mark.parametrize("name", ["llama_mha", "llama_gqa"])
def test_center_writing_weights_refuses_rmsnorm(tiny, name):
    _, cfg, params = tiny(name)
    with pytest.raises(ValueError, match="rmsnorm"):
        folding.center_writing_weights(params, cfg)


@pytest.mark.parametrize("name", ["gpt2", "llama_gqa"])   # both tied: untied, the embedding kept
def test_center_unembed_keeps_log_probs_and_logit_differences(tiny, name):
    _, cfg, params = tiny(name)
    centred, cfg2 = folding.center_unembed(params, cfg)
    np.testing.assert_allclose(unembed_matrix(centred).mean(-1), 0, atol=1e-6)
    np.testing.assert_array_equal(centred["embed"]["tokens"], params["embed"]["tokens"])
    new, ref = logits(centred, cfg2), logits(params, cfg)
    assert not np.allclose(new, ref, atol=1e-2)
    np.testing.assert_allclose(jax.nn.log_softmax(new), jax.nn.log_softmax(ref), atol=1e-4, rtol=0)
    np.testing.assert_allclose(new - new[..., :1], ref - ref[..., :1], atol=1e-4, rtol=0)


def test_untie_embeddings(tiny):
    _, cfg, params = tiny("llama_mha")
    assert folding.untie_embeddings(params, cfg) == (params, cfg)      # untied already: unchanged
    _, cfg, params = tiny("llama_gqa")
    untied, cfg2 = folding.untie_embeddings(params, cfg)
    np.testing.assert_array_equal(untied["unembed"]["w"], jnp.asarray(params["embed"]["tokens"]).T)
    np.testing.assert_allclose(logits(untied, cfg2), logits(params, cfg), atol=1e-5, rtol=0)
