"""Model families as features (`config.LLAMA_FAMILIES`), each against HF transformers on a tiny random
model saved with `save_pretrained` and loaded by `jc.load`: Qwen2 (q/k/v biases, no o_proj bias,
tied embeddings), Mistral (sliding window, shorter than the prompts), Qwen3 (RMSNorm of each head's
queries and keys; the window on its last layer, `window_layers`), OLMo-2 (norms after the sublayers,
q/k norms over the whole projection), GPT-NeoX / Pythia (parallel attention and MLP, RoPE on a
fraction of each head's dims, fused per-head q/k/v), Phi-3 (fused qkv_proj and gate_up_proj; partial
RoPE, Phi-4-mini's field, and Phi-3-mini's sliding window), SmolLM3 (layers without RoPE,
`rope_layers`; the window on them), Gemma-2 (RMSNorm times 1 + w before and after both sublayers,
GeGLU, scaled embeddings, query_pre_attn_scalar, soft-capped attention scores and logits, a sliding
window on every other layer), Gemma-3 (Gemma-2's block with per-head q/k norms and its own RoPE base on
the windowed layers, `local_rope`).

Logits (fp32, left padding), greedy generation through the KV cache, cached sites and head_out
patches (`hf_reference` hooks) match HF; unsupported variants of the families are refused, naming
the field. The features' consistency checks (edges, fast paths, DLA, frozen norms, gradients) are
in `test_block_features.py`.
"""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import jaxcircuits as jc
from jaxcircuits.interventions.sites import Intervention, Mask
from jaxcircuits.methods import dla
from jaxcircuits.methods.folding import fold_norms
from jaxcircuits.models.block import heads_of
from jaxcircuits.models.config import ModelConfig, RopeConfig, UnsupportedConfigError
from jaxcircuits.models.generate import generate
from jaxcircuits.models.params import init_params
from jaxcircuits.models.transformer import forward, run_with_cache
from jaxcircuits.weights.cache import config_from_json, config_to_json
from tests import hf_reference as ref
from tests.conftest import VOCAB, left_padded_mask, random_tokens

ATOL = 1e-4
COMMON = dict(hidden_size=32, num_hidden_layers=2, intermediate_size=48, vocab_size=VOCAB, num_attention_heads=4,
              max_position_embeddings=64, bos_token_id=1, eos_token_id=2)
GQA = dict(num_key_value_heads=2)
# family -> (HF config class name, its arguments, the features `ModelConfig.from_hf` must read)
FAMILIES = {
    "qwen2": ("Qwen2Config", dict(GQA, tie_word_embeddings=True),
              dict(attn_bias=True, o_bias=False, tied_embeddings=True)),
    "mistral": ("MistralConfig", dict(GQA, sliding_window=4, head_dim=8),
                dict(attn_bias=False, tied_embeddings=False, sliding_window=4)),
    "qwen3": ("Qwen3Config", dict(GQA, head_dim=8, use_sliding_window=True, sliding_window=4, max_window_layers=1),
              dict(attn_bias=False, o_bias=False, qk_norm="head", sliding_window=4, window_layers=(False, True))),
    "olmo2": ("Olmo2Config", dict(GQA), dict(attn_bias=False, qk_norm="proj", post_norms=True)),
    "gpt_neox": ("GPTNeoXConfig", dict(rotary_pct=0.5),
                 dict(norm="layernorm", parallel_residual=True, attn_bias=True, mlp_bias=True, tied_embeddings=False,
                      rope=RopeConfig(partial=0.5))),
    "phi3": ("Phi3Config", dict(GQA, partial_rotary_factor=0.5, sliding_window=4, pad_token_id=0),
             dict(checkpoint="phi3", attn_bias=False, sliding_window=4, rope=RopeConfig(partial=0.5))),
    "smollm3": ("SmolLM3Config", dict(GQA, no_rope_layer_interval=2, pad_token_id=0, use_sliding_window=True,
                                      sliding_window=4),                      # the window on the NoPE layer
                dict(rope_layers=(True, False), tied_embeddings=True, attn_bias=False, window_layers=(False, True))),
    # caps small enough to matter at these weights
    "gemma2": ("Gemma2Config", dict(GQA, head_dim=8, sliding_window=4, query_pre_attn_scalar=12,
                                    attn_logit_softcapping=2.0, final_logit_softcapping=3.0, pad_token_id=0),
               dict(norm="rmsnorm_unit_offset", activation="gelu_pytorch_tanh", pre_norms=True, post_norms=True,
                    scaled_embeddings=True, tied_embeddings=True, sliding_window=4, window_layers=(True, False),
                    query_pre_attn_scalar=12.0, attn_logit_softcap=2.0, final_logit_softcap=3.0)),
    # the window (and the local base, 1e4) on layer 0, the global base 1e6 with linear scaling on layer 1
    "gemma3_text": ("Gemma3TextConfig", dict(GQA, head_dim=8, sliding_window=4, sliding_window_pattern=2,
                                             query_pre_attn_scalar=12, final_logit_softcapping=3.0, pad_token_id=0,
                                             rope_scaling=dict(rope_type="linear", factor=8.0)),
                    dict(norm="rmsnorm_unit_offset", qk_norm="head", post_norms=True, scaled_embeddings=True,
                         sliding_window=4, window_layers=(True, False), query_pre_attn_scalar=12.0,
                         attn_logit_softcap=None, final_logit_softcap=3.0,
                         rope=RopeConfig(theta=1e6, kind="linear", factor=8.0), local_rope=RopeConfig(theta=1e4))),
}
B, T = 3, 12                                  # longer than Mistral's window
PADS = [0, 5, 1]


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory):
    """(name, HF model, cfg, params): a tiny random HF model of the family and our load of its checkpoint."""
    name = request.param
    path = tmp_path_factory.mktemp(name)
    model = _hf_model(name, path)
    m = jc.load(str(path), cache=False)
    return name, model, m.cfg, m.params


def _hf_model(name, path, **fields):
    """A tiny random HF model of family `name` (its config with `fields` changed), saved to `path`."""
    import transformers
    cls, kwargs, _ = FAMILIES[name]
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(getattr(transformers, cls)(**COMMON, **{**kwargs, **fields}),
                                                          attn_implementation="eager").eval()
    with torch.no_grad():
        for n, p in model.named_parameters():                  # Gemma-2's norms multiply by 1 + weight
            p.copy_(float(not name.startswith("gemma")) + 0.1 * torch.randn_like(p)) if "norm.weight" in n else p.normal_(0, 0.15)
    model.save_pretrained(path)
    return model


def test_config_reads_the_family_features(family):
    name, _, cfg, params = family
    assert {k: getattr(cfg, k) for k in FAMILIES[name][2]} == FAMILIES[name][2]
    assert ("unembed" in params) == (not cfg.tied_embeddings)


def test_logits_match_hf(family):
    name, model, cfg, params = family
    toks, attn_mask = random_tokens(1, B, T), left_padded_mask(B, T, PADS)
    want = ref.run(model, toks, attn_mask).logits.numpy()
    got = np.asarray(forward(params, cfg, toks, attn_mask)[0])
    real = attn_mask.astype(bool)
    print(f"{name}: max |logit - HF logit| = {np.abs(got[real] - want[real]).max():.1e}")   # README's Models table
    np.testing.assert_allclose(got[real], want[real], atol=ATOL, rtol=0)
    for off, p in _switched_off(cfg, params):     # each feature changes the logits (the window: past it)
        other = np.asarray(forward(p, off, toks, attn_mask)[0])
        assert np.abs(other[real] - want[real]).max() > 1e-2, off


def _switched_off(cfg, params):
    """(cfg, params) without each of their features that keep the layer params' shapes."""
    for cfg in _switched_off_cfg(cfg):
        yield cfg, params
    if "logit_softcap" in params:
        yield cfg, {k: v for k, v in params.items() if k != "logit_softcap"}


def _switched_off_cfg(cfg):
    if cfg.sliding_window:
        yield dataclasses.replace(cfg, sliding_window=T)                 # every key of the prompts
    if cfg.window_layers:
        yield dataclasses.replace(cfg, window_layers=None)
    for field in ("query_pre_attn_scalar", "attn_logit_softcap"):
        if getattr(cfg, field) is not None:
            yield dataclasses.replace(cfg, **{field: None})
    if cfg.scaled_embeddings:
        yield dataclasses.replace(cfg, scaled_embeddings=False)
    if cfg.norm == "rmsnorm_unit_offset":
        yield dataclasses.replace(cfg, norm="rmsnorm")
    if cfg.parallel_residual:
        yield dataclasses.replace(cfg, parallel_residual=False)
    if cfg.rope_layers:
        yield dataclasses.replace(cfg, rope_layers=None)
    if cfg.local_rope:
        yield dataclasses.replace(cfg, local_rope=None)
    if cfg.rope.partial < 1:
        yield dataclasses.replace(cfg, rope=dataclasses.replace(cfg.rope, partial=1.0))


def test_greedy_generation_matches_hf(family):
    _, model, cfg, params = family
    toks, attn_mask = random_tokens(4, 2, 6), left_padded_mask(2, 6, [0, 2])
    with torch.no_grad():
        want = model.generate(torch.tensor(toks), attention_mask=torch.tensor(attn_mask), max_new_tokens=8,
                              do_sample=False, eos_token_id=None, pad_token_id=0).numpy()[:, 6:]
    np.testing.assert_array_equal(np.asarray(generate(params, cfg, toks, attn_mask, max_new_tokens=8, eos_id=-1)),
                                  want)


def test_cached_sites_match_hf_hooks(family):
    """resid_pre, head_out (o_proj's input), the final norm and the pattern of real queries."""
    _, model, cfg, params = family
    toks, attn_mask = random_tokens(3, B, T), left_padded_mask(B, T, PADS)
    want = ref.sites(model, toks, attn_mask)
    _, cache = run_with_cache(params, cfg, toks, attn_mask)
    real = attn_mask.astype(bool)
    for site in ("resid_pre", "head_out"):
        np.testing.assert_allclose(np.asarray(cache[site])[:, real], want[site][:, real], atol=ATOL, err_msg=site)
    np.testing.assert_allclose(np.asarray(cache["final_norm"])[real], want["final_norm"][real], atol=ATOL)
    for b in range(B):
        q = np.flatnonzero(real[b])
        np.testing.assert_allclose(np.asarray(cache["pattern"])[:, b][:, :, q], want["pattern"][:, b][:, :, q], atol=ATOL)


def test_head_out_patch_matches_hf_pre_hook_on_o_proj(family):
    _, model, cfg, params = family
    tgt, src = random_tokens(5, 2, T), random_tokens(6, 2, T)
    _, cache = run_with_cache(params, cfg, src, sites=("head_out",))
    subset = {0: [1, 3], 1: [0]}
    mask = jnp.zeros((cfg.n_layers, cfg.n_heads))
    for l, heads in subset.items():
        mask = mask.at[l, jnp.asarray(heads)].set(1.0)
    iv = Intervention(mask=Mask(head_out=mask), source=cache, pos_w=jnp.ones(tgt.shape, jnp.float32))
    got = np.asarray(forward(params, cfg, tgt, intervention=iv)[0])
    with ref.patch_heads(model, subset, np.asarray(cache["head_out"]), list(range(T))):
        want = ref.run(model, tgt).logits.numpy()
    np.testing.assert_allclose(got, want, atol=ATOL, rtol=0)
    assert np.abs(got - np.asarray(forward(params, cfg, tgt)[0])).max() > 1e-2


def test_per_unit_reads_are_each_units_own_read(family):
    """Edge receivers read one residual per head: head u's query is the plain read of its own input
    (OLMo-2's q/k norm over the whole projection norms every head's value of that input)."""
    name, _, cfg, params = family
    p = jax.tree.map(lambda a: a[0], params["layers"])
    h = jnp.asarray(np.random.RandomState(0).normal(size=(cfg.n_heads, 2, 5, cfg.d_model)), jnp.float32)
    got = heads_of(cfg, p, "q", h)
    for u in range(cfg.n_heads):
        np.testing.assert_allclose(got[:, :, u], heads_of(cfg, p, "q", h[u])[:, :, u], atol=1e-5)


@pytest.mark.parametrize("model_type,field,value,match", [
    ("qwen2", "use_sliding_window", 1, "use_sliding_window"),
    ("qwen3", "layer_types", ["sliding_attention"], "layer_types"),             # fewer kinds than layers
    ("olmo2", "qk_layernorm", True, "qk_layernorm"),        # a field OLMo-2 does not have
    ("mistral", "mlp_bias", True, "mlp_bias"),               # Llama's, not Mistral's
    ("qwen2", "hidden_act", "gelu", "hidden_act"),
    ("qwen2", "rope_parameters", {"rope_type": "default", "partial_rotary_factor": 0.5}, "partial_rotary_factor"),
    ("gpt_neox", "rotary_pct", 0.375, "partial_rotary_factor=0.375 rotates 3 of the 8"),   # an odd count
    ("gpt_neox", "num_key_value_heads", 2, "num_key_value_heads"),                      # GQA is not NeoX's
    ("phi3", "rope_scaling", {"type": "longrope", "short_factor": [1.0] * 4, "long_factor": [2.0] * 4,
                              "factor": 32.0}, "'longrope' is not supported"),             # Phi-3-128k, Phi-3.5
    ("phi3", "attention_bias", True, "attention_bias"),
    ("smollm3", "no_rope_layers", [1], "no_rope_layers"),                      # fewer flags than layers
    ("gemma2", "use_bidirectional_attention", True, "use_bidirectional_attention"),
    ("gemma2", "layer_types", ["chunked_attention", "full_attention"], "layer_types"),
    ("gemma2", "hidden_activation", "swish", "hidden_activation"),
    ("gemma3_text", "attn_logit_softcapping", 50.0, "attn_logit_softcapping"),     # HF's Gemma-3 ignores it
    ("gemma3_text", "sliding_window", None, "sliding_window"),
    ("gemma3_text", "rope_parameters", {"rope_type": "default", "rope_theta": 1.0}, "rope_parameters"),  # not by type
])
def test_unsupported_family_configs_name_the_field(model_type, field, value, match):
    hf = {"model_type": model_type, **COMMON}
    ModelConfig.from_hf(hf)
    with pytest.raises(UnsupportedConfigError, match=match):
        ModelConfig.from_hf({**hf, field: value})


def test_legacy_rope_keys_read_as_hf_reads_them():
    """Pythia's config.json (transformers 4 keys rotary_pct, rotary_emb_base; dropouts) reads as HF reads
    it; so does a top-level partial_rotary_factor (Phi-4-mini)."""
    from transformers import GPTNeoXConfig
    hf = {"model_type": "gpt_neox", **COMMON, "rotary_pct": 0.5, "rotary_emb_base": 500, "use_parallel_residual": False,
          "hidden_dropout": 0.0, "classifier_dropout": 0.1, "hidden_act": "gelu"}
    cfg = ModelConfig.from_hf(hf)
    want = GPTNeoXConfig(**{k: v for k, v in hf.items() if k != "model_type"}).rope_parameters
    assert (cfg.rope.theta, cfg.rope.partial, cfg.parallel_residual) == (want["rope_theta"], want["partial_rotary_factor"], False)
    assert ModelConfig.from_hf({"model_type": "gpt_neox", **COMMON}).rope.partial == 0.25
    assert ModelConfig.from_hf({"model_type": "phi3", **COMMON, "partial_rotary_factor": 0.75}).rope.dims(8) == 6
    from transformers import SmolLM3Config                   # no_rope_layers and rope_theta as HF fills them
    smol = ModelConfig.from_hf({"model_type": "smollm3", **COMMON, "num_hidden_layers": 8})
    want = SmolLM3Config(**{**COMMON, "num_hidden_layers": 8})
    assert smol.rope_layers == tuple(map(bool, want.no_rope_layers)) and smol.rope.theta == want.rope_parameters["rope_theta"]


@pytest.mark.parametrize("model_type", ["olmo2", "gemma2"])
def test_folding_refuses_post_norms(model_type):
    """OLMo-2's and Gemma-2's norms scale the sublayers' outputs: nothing reads them linearly to fold
    into (edges and DLA are exact with the norms frozen: test_block_features, test_frozen_dla_*)."""
    cfg = ModelConfig.from_hf({"model_type": model_type, **COMMON})
    with pytest.raises(ValueError, match="post_norms"):
        fold_norms(init_params(cfg, jax.random.PRNGKey(0)), cfg)


def test_gemma2_defaults_read_as_hf_fills_them():
    """Absent fields read as Gemma2Config fills them (sliding window on the even layers, caps, scalar);
    Google's config.json keys (hidden_act beside hidden_activation, cache_implementation) load; a null
    cap is no cap."""
    from transformers import Gemma2Config
    hf = {**COMMON, "num_hidden_layers": 5}
    want, cfg = Gemma2Config(**hf), ModelConfig.from_hf({"model_type": "gemma2", **hf})
    assert cfg.window_layers == tuple(t == "sliding_attention" for t in want.layer_types)
    assert (cfg.sliding_window, cfg.attn_logit_softcap, cfg.final_logit_softcap, cfg.query_pre_attn_scalar,
            cfg.d_head, cfg.tied_embeddings) == (want.sliding_window, want.attn_logit_softcapping,
                                                 want.final_logit_softcapping, want.query_pre_attn_scalar,
                                                 want.head_dim, want.tie_word_embeddings)
    google = ModelConfig.from_hf({"model_type": "gemma2", **hf, "hidden_act": "gelu_pytorch_tanh",
                                  "cache_implementation": "hybrid", "final_logit_softcapping": None})
    assert google.final_logit_softcap is None and "logit_softcap" not in init_params(google, jax.random.PRNGKey(0))
    assert config_from_json(json.loads(json.dumps(config_to_json(cfg)))) == cfg      # the params cache's round trip


def test_gemma3_config_reads_as_hf_fills_it():
    """Google's config.json (transformers 4 keys: rope_theta with rope_scaling, rope_local_base_freq,
    sliding_window_pattern; no layer_types) reads as Gemma3TextConfig fills it: the window on all but
    every 6th layer, their RoPE frequencies HF's local ones, the others' HF's global ones."""
    from transformers import Gemma3TextConfig
    from transformers.models.gemma3.modeling_gemma3 import Gemma3RotaryEmbedding
    hf = {**COMMON, "num_hidden_layers": 7, "head_dim": 8, "rope_theta": 5e5, "rope_local_base_freq": 100.0,
          "rope_scaling": {"rope_type": "linear", "factor": 4.0}, "cache_implementation": "hybrid",
          "attn_logit_softcapping": None}
    want, cfg = Gemma3TextConfig(**hf), ModelConfig.from_hf({"model_type": "gemma3_text", **hf})
    assert cfg.window_layers == tuple(t == "sliding_attention" for t in want.layer_types) != (True,) * 7
    rotary = Gemma3RotaryEmbedding(want)
    for rope, kind in ((cfg.rope, "full_attention"), (cfg.local_rope, "sliding_attention")):
        np.testing.assert_allclose(rope.inv_freq(8), getattr(rotary, f"{kind}_inv_freq").numpy(), rtol=1e-6)  # pow's ulp
    assert config_from_json(json.loads(json.dumps(config_to_json(cfg)))) == cfg      # the params cache's round trip


@pytest.mark.parametrize("model_type,cls,window", [
    ("qwen2", "Qwen2Config", dict(use_sliding_window=True, max_window_layers=3)),
    ("qwen3", "Qwen3Config", dict(use_sliding_window=True, sliding_window=6, max_window_layers=1)),
    ("qwen3", "Qwen3Config", dict(use_sliding_window=False, max_window_layers=1)),
    ("smollm3", "SmolLM3Config", dict(use_sliding_window=True, sliding_window=6)),
])
def test_per_layer_windows_read_as_hf_fills_them(model_type, cls, window):
    """Qwen2 / Qwen3: the window from layer max_window_layers on; SmolLM3: on its NoPE layers (HF's layer_types)."""
    import transformers
    hf = {**COMMON, "num_hidden_layers": 5, **window}
    want, cfg = getattr(transformers, cls)(**hf), ModelConfig.from_hf({"model_type": model_type, **hf})
    sliding = tuple(t == "sliding_attention" for t in want.layer_types)
    on = want.sliding_window if want.sliding_window and any(sliding) else None
    assert (cfg.sliding_window, cfg.window_layers) == (on, None if on is None or all(sliding) else sliding)

@pytest.mark.parametrize("name, fields", [("olmo2", {}), ("gemma2", {"final_logit_softcapping": None})])
def test_frozen_dla_of_post_norm_families_sums_to_hfs_logit_difference(name, fields, tmp_path):
    """OLMo-2 and Gemma-2 (without its final cap, which DLA refuses): with the norms frozen on the run,
    each head's write through post_norm1 is its own share, and the components sum to HF's logit
    difference; unfrozen, DLA is refused, naming freeze_norms."""
    model = _hf_model(name, tmp_path, **fields)
    m = jc.load(str(tmp_path), cache=False)
    toks, attn_mask = random_tokens(7, B, T), left_padded_mask(B, T, PADS)
    good, bad = np.array([[3], [5], [8]]), np.array([[4], [9], [1]])
    with pytest.raises(ValueError, match="freeze_norms"):
        dla.decompose(m.params, m.cfg, toks, attn_mask)
    frozen = dla.freeze_norms(m.params, m.cfg, toks, attn_mask)
    out = dla.direct_logit_attribution(frozen, m.cfg, toks, attn_mask, dla.answer_direction(frozen, good, bad))
    logits = ref.run(model, toks, attn_mask).logits.numpy()[:, -1]
    want = logits[np.arange(B), good[:, 0]] - logits[np.arange(B), bad[:, 0]]
    print(f"{name}: max |DLA total - HF logit difference| = {np.abs(np.asarray(out['total'][:, 0]) - want).max():.1e}")
    np.testing.assert_allclose(out["total"][:, 0], want, atol=ATOL, rtol=0)
    assert np.abs(np.asarray(out["heads"])).max() > 1e-2


def test_dla_refuses_final_logit_softcapping():
    """Soft-capped logits are not linear in the final residual: DLA names the feature (Gemma-2's heads
    are refused first, for their post-norm, unless the norms are frozen)."""
    cfg = dataclasses.replace(ModelConfig.from_hf({"model_type": "llama", **COMMON}), final_logit_softcap=5.0)
    params = init_params(cfg, jax.random.PRNGKey(0))
    toks = random_tokens(0, 2, 5)
    with pytest.raises(ValueError, match="final-logit soft-capping"):
        dla.direct_logit_attribution(params, cfg, toks, direction=jnp.ones(cfg.d_model))
    gemma = ModelConfig.from_hf({"model_type": "gemma2", **COMMON, **GQA, "head_dim": 8})
    with pytest.raises(ValueError, match="post_norms"):
        dla.direct_logit_attribution(init_params(gemma, jax.random.PRNGKey(0)), gemma, toks, direction=jnp.ones(32))


@pytest.mark.parametrize("family, field, want", [("mistral", {}, 4096), ("mistral", {"sliding_window": None}, None),
                                                 ("phi3", {}, None)])
def test_an_absent_window_takes_hfs_default(family, field, want):
    from transformers import AutoConfig
    hf = {"model_type": family, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
          "intermediate_size": 48, "vocab_size": 50, **field}
    assert ModelConfig.from_hf(hf).sliding_window == want == AutoConfig.for_model(**hf).sliding_window
