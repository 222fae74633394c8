"""The JAX ports against HF transformers: logits, cached sites, generation, bad input."""

import dataclasses

import chex
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from absl.testing import parameterized

from jaxcircuits.models.generate import generate
from jaxcircuits.models.config import ModelConfig, RopeConfig, UnsupportedConfigError
from jaxcircuits.models.params import cast_params
from jaxcircuits.models.transformer import forward, forward_fn, run_with_cache
from tests import hf_reference as ref
from tests.conftest import VARIANTS, left_padded_mask, random_tokens

ATOL = 1e-4  # fp32, highest matmul precision; worst seen in these tests is ~3e-7


@pytest.mark.parametrize("name", VARIANTS)
def test_logits_match_hf_with_left_padding(tiny, name):
    model, cfg, params = tiny(name)
    toks = random_tokens(1, 3, 11)
    attn_mask = left_padded_mask(3, 11, [0, 4, 1])
    want = ref.run(model, toks, attn_mask).logits.numpy()
    got = np.asarray(forward(params, cfg, jnp.asarray(toks), jnp.asarray(attn_mask))[0])
    chex.assert_shape(got, (3, 11, cfg.vocab_size))
    real = attn_mask.astype(bool)
    np.testing.assert_allclose(got[real], want[real], atol=ATOL, rtol=0)


class JitVariantsTest(parameterized.TestCase):
    """The jitted and un-jitted forward agree with HF (chex.variants)."""

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters("gpt2", "llama_gqa")
    def test_variants(self, name):
        from tests.conftest import make_hf_model
        import tempfile
        from jaxcircuits.weights.hf import load_hf_dir
        model = make_hf_model(name)
        with tempfile.TemporaryDirectory() as d:
            model.save_pretrained(d)
            cfg, params = load_hf_dir(d)
        toks = random_tokens(2, 2, 7)
        fn = self.variant(forward_fn, static_argnames=("cfg", "collect", "return_logits"))
        got = np.asarray(fn(params, cfg, jnp.asarray(toks))[0])
        np.testing.assert_allclose(got, ref.run(model, toks).logits.numpy(), atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", ["gpt2", "llama_gqa"])
def test_cached_sites_match_hf_hooks(tiny, name):
    model, cfg, params = tiny(name)
    toks = random_tokens(3, 2, 9)
    attn_mask = left_padded_mask(2, 9, [0, 2])
    want = ref.sites(model, toks, attn_mask)
    _, cache = run_with_cache(params, cfg, toks, jnp.asarray(attn_mask))
    real = attn_mask.astype(bool)
    for site in ("resid_pre", "head_out", "attn_out", "mlp_out"):
        chex.assert_shape(cache[site], want[site].shape)
        np.testing.assert_allclose(np.asarray(cache[site])[:, real], want[site][:, real], atol=ATOL,
                                   err_msg=site)
    np.testing.assert_allclose(np.asarray(cache["final_norm"])[real], want["final_norm"][real], atol=ATOL)
    # Attention rows of real queries (HF's padded rows differ by masking convention).
    pat, wp = np.asarray(cache["pattern"]), want["pattern"]
    for b in range(2):
        q = np.flatnonzero(real[b])
        np.testing.assert_allclose(pat[:, b][:, :, q], wp[:, b][:, :, q], atol=ATOL)
    k, v = cache["kv"]
    chex.assert_shape(k, (cfg.n_layers, 2, 9, cfg.n_kv_heads, cfg.d_head))


@pytest.mark.parametrize("name", ["gpt2", "llama_gqa", "llama_mqa"])
def test_greedy_generation_matches_hf(tiny, name):
    model, cfg, params = tiny(name)
    toks = random_tokens(4, 2, 6)
    attn_mask = left_padded_mask(2, 6, [0, 2])
    with torch.no_grad():
        want = model.generate(torch.tensor(toks), attention_mask=torch.tensor(attn_mask), max_new_tokens=8,
                              do_sample=False, eos_token_id=None, pad_token_id=0).numpy()[:, 6:]
    got = np.asarray(generate(params, cfg, toks, attn_mask, max_new_tokens=8, eos_id=-1))
    np.testing.assert_array_equal(got, want)


def test_generation_stops_at_eos(tiny):
    model, cfg, params = tiny("llama_mha")
    toks = random_tokens(5, 1, 5)
    free = np.asarray(generate(params, cfg, toks, max_new_tokens=6, eos_id=-1))[0]
    eos = int(free[2])
    got = np.asarray(generate(params, cfg, toks, max_new_tokens=6, eos_id=eos))[0]
    first = int(np.flatnonzero(free == eos)[0])
    np.testing.assert_array_equal(got[:first + 1], free[:first + 1])
    assert (got[first:] == eos).all()


def test_bf16_runs_close_to_fp32(tiny):
    _, cfg, params = tiny("llama_gqa")
    toks = jnp.asarray(random_tokens(6, 2, 8))
    full = np.asarray(forward(params, cfg, toks)[0])
    half = forward(cast_params(params, jnp.bfloat16), cfg, toks)[0]
    assert half.dtype == jnp.float32
    assert np.abs(np.asarray(half) - full).max() < 0.1 * np.abs(full).max()


def test_token_ids_out_of_range(tiny):
    _, cfg, params = tiny("gpt2")
    with pytest.raises(ValueError, match="token ids must lie in"):
        run_with_cache(params, cfg, np.array([[1, cfg.vocab_size]]))
    with pytest.raises(ValueError, match="token ids must lie in"):
        generate(params, cfg, np.array([[-1, 2]]))
    with pytest.raises(ValueError, match=r"\[batch, seq\]"):
        run_with_cache(params, cfg, np.array([1, 2]))


def test_unknown_cache_site(tiny):
    _, cfg, params = tiny("gpt2")
    with pytest.raises(ValueError, match="unknown cache site"):
        run_with_cache(params, cfg, np.array([[1, 2]]), sites=("nope",))


@pytest.mark.parametrize("hf,match", [
    ({"model_type": "bert"}, "model_type 'bert'"),
    ({"model_type": "llama", "hidden_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2,
      "intermediate_size": 8, "vocab_size": 10, "rope_scaling": {"rope_type": "yarn", "factor": 2.0}}, "yarn"),
    ({"model_type": "llama", "hidden_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2,
      "intermediate_size": 8, "vocab_size": 10, "sliding_window": 4}, "sliding_window"),
    ({"model_type": "gpt2", "scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx"),
    ({"model_type": "llama", "hidden_size": 8, "num_hidden_layers": 1, "num_attention_heads": 3,
      "num_key_value_heads": 2, "intermediate_size": 8, "vocab_size": 10}, "not a multiple"),
])
def test_unsupported_configs_name_the_field(hf, match):
    with pytest.raises(UnsupportedConfigError, match=match):
        ModelConfig.from_hf(hf)


def test_rope_inv_freq_matches_hf():
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    hf = LlamaConfig(hidden_size=256, num_attention_heads=2, rope_theta=500000.0,
                     rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
    want, _ = ROPE_INIT_FUNCTIONS["llama3"](hf, "cpu")
    cfg = ModelConfig.from_hf(hf.to_dict())
    np.testing.assert_allclose(cfg.rope.inv_freq(cfg.d_head), want.numpy(), rtol=1e-6)
    plain = ModelConfig.from_hf({**hf.to_dict(), "rope_scaling": None, "rope_parameters": {"rope_theta": 500000.0}})
    assert not np.allclose(plain.rope.inv_freq(cfg.d_head), want.numpy())  # the scaling matters


def test_quantized_hf_config_is_refused():
    hf = {"model_type": "llama", "hidden_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2,
          "intermediate_size": 8, "vocab_size": 10, "quantization_config": {"quant_method": "gptq"}}
    with pytest.raises(UnsupportedConfigError, match="quantization_config"):
        ModelConfig.from_hf(hf)


@pytest.mark.parametrize("field,value", [("norm", "batchnorm"), ("activation", "swish"),
                                         ("position_embedding", "alibi"), ("checkpoint", "bert")])
def test_unknown_model_feature_names_the_field(tiny, field, value):
    """Features are rows of tables (`models.layers`); an unknown one is refused, naming the field."""
    _, cfg, _ = tiny("gpt2")
    with pytest.raises(UnsupportedConfigError, match=f"{field}='{value}' is not supported"):
        dataclasses.replace(cfg, **{field: value})


def test_features_not_family_choose_the_forward(tiny):
    """A GPT-2 config switched to rotary positions: RoPE follows the feature, not a family name
    (learned position embeddings are then absent from the params layout)."""
    _, cfg, params = tiny("gpt2")
    assert (cfg.norm, cfg.activation, cfg.gated_mlp, cfg.position_embedding) == ("layernorm", "gelu_new", False, "learned")
    rotary = dataclasses.replace(cfg, position_embedding="rotary", rope=RopeConfig())
    no_positions = {**params, "embed": {"tokens": params["embed"]["tokens"],
                                        "positions": jnp.zeros_like(params["embed"]["positions"])}}
    rope_params = {**params, "embed": {"tokens": params["embed"]["tokens"]}}
    toks = np.array([[5, 6, 7, 8]])
    plain = np.asarray(forward(no_positions, cfg, toks)[0])
    rope = np.asarray(forward(rope_params, rotary, toks)[0])
    np.testing.assert_allclose(rope[0, 0], plain[0, 0], atol=1e-5)     # position 0: no rotation
    assert np.abs(rope[0, -1] - plain[0, -1]).max() > 1e-3
    with pytest.raises(UnsupportedConfigError, match="rope parameters are required"):
        dataclasses.replace(cfg, position_embedding="rotary")
