"""Residual decomposition, DLA in its three final-norm modes, frozen-LN and LN-free models, logit lens."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import jaxcircuits as jc
from jaxcircuits.methods import dla
from jaxcircuits.interventions import positions as P
from jaxcircuits.interventions.metrics import LogitDiff
from jaxcircuits.models import transformer as M
from jaxcircuits.interventions.problem import PatchingProblem, target_run
from jaxcircuits.engine.patching import run_masks
from jaxcircuits.weights.hf import load_hf_dir
from tests import hf_reference as ref
from tests.conftest import VARIANTS, make_hf_model, random_tokens

GOOD, BAD = np.array([[5], [6]]), np.array([[7], [9]])


def _logit_diff(params, cfg, toks, pos=-1):
    logits = np.asarray(jc.forward(params, cfg, toks)[0])[:, pos]
    return logits[[0, 1], GOOD[:, 0]] - logits[[0, 1], BAD[:, 0]]


@pytest.mark.parametrize("name", VARIANTS)
def test_components_sum_to_the_final_residual(tiny, name):
    _, cfg, params = tiny(name)
    toks = random_tokens(3, 2, 9)
    comps = dla.decompose(params, cfg, toks, positions=(-1, 2))
    _, cache = jc.run_with_cache(params, cfg, toks, sites=("resid_final",))
    np.testing.assert_allclose(comps.final, np.asarray(cache["resid_final"])[:, [-1, 2]], atol=1e-6)
    np.testing.assert_allclose(comps.total(), comps.final, atol=1e-4)
    assert comps.heads.shape == (cfg.n_layers, cfg.n_heads, 2, 2, cfg.d_model)


def test_components_sum_on_smollm2():
    model = jc.load()
    ids, attn_mask = model.tokenizer.batch(["The capital of France is", "Q: Which is bigger: 9.8 or 9.11?\nA:"])
    comps = dla.decompose(model.params, model.cfg, ids, attn_mask, positions=(-1, -2))
    np.testing.assert_allclose(comps.total(), comps.final, atol=1e-4)
    direction = dla.answer_direction(model.params, jnp.array([[28], [32]]), jnp.array([[30], [33]]))
    out = dla.attribute(model.params, model.cfg, comps, direction)
    logits = np.asarray(jc.forward(model.params, model.cfg, ids, attn_mask)[0])[:, -1]
    np.testing.assert_allclose(out["total"][:, 0], logits[[0, 1], [28, 32]] - logits[[0, 1], [30, 33]], atol=2e-4)


@pytest.mark.parametrize("name", ["gpt2", "llama_gqa"])
def test_dla_run_mode_is_exact_and_matches_a_hand_computation(tiny, name):
    _, cfg, params = tiny(name)
    toks = random_tokens(4, 2, 8)
    direction = dla.answer_direction(params, GOOD, BAD)
    out = dla.direct_logit_attribution(params, cfg, toks, direction=direction)
    np.testing.assert_allclose(out["total"][:, 0], _logit_diff(params, cfg, toks), atol=1e-4)
    # One head by hand: its output z_h @ W_O[h] through the final norm's linear part along d.
    _, c = jc.run_with_cache(params, cfg, toks, sites=("head_out", "resid_final"))
    l, h = cfg.n_layers - 1, 1
    comp = np.asarray(c["head_out"])[l, :, -1, h] @ np.asarray(params["layers"]["o"]["w"])[l, h]     # [B, D]
    final = np.asarray(c["resid_final"])[:, -1].astype(np.float64)
    if cfg.norm == "layernorm":
        comp, final = comp - comp.mean(-1, keepdims=True), final - final.mean(-1, keepdims=True)
    inv = 1 / np.sqrt((final ** 2).mean(-1, keepdims=True) + cfg.norm_eps)
    want = ((comp * inv * np.asarray(params["final_norm"]["scale"])) * np.asarray(direction)).sum(-1)
    np.testing.assert_allclose(out["heads"][l, h, :, 0], want, atol=1e-5)
    assert np.abs(out["heads"]).max() > 1e-2


@pytest.mark.parametrize("name", VARIANTS)
def test_frozen_ln_model_equals_the_plain_one_on_its_reference_run_and_is_linear(tiny, name):
    _, cfg, params = tiny(name)
    toks = random_tokens(5, 2, 8)
    frozen = dla.freeze_norms(params, cfg, toks)
    np.testing.assert_allclose(np.asarray(jc.forward(frozen, cfg, toks)[0]),
                               np.asarray(jc.forward(params, cfg, toks)[0]), atol=1e-4)
    # Linearity identity: every frozen norm is affine in its input, n(x + y) + n(0) = n(x) + n(y).
    rng = np.random.RandomState(0)
    x, y = (jnp.asarray(rng.randn(2, 8, cfg.d_model), jnp.float32) for _ in range(2))
    for p in (jax.tree.map(lambda a: a[1], frozen["layers"])["norm2"], frozen["final_norm"]):
        n = lambda v: np.asarray(M.norm(cfg, p, v), np.float64)
        np.testing.assert_allclose(n(x + y) + n(0 * x), n(x) + n(y), atol=1e-5)
        plain = {k: v for k, v in p.items() if k != "inv_scale"}
        assert np.abs(np.asarray(M.norm(cfg, plain, x + y)) + np.asarray(M.norm(cfg, plain, 0 * x))
                      - np.asarray(M.norm(cfg, plain, x)) - np.asarray(M.norm(cfg, plain, y))).max() > 1e-2
    # On its reference run the frozen DLA is the run's; on another run it is not.
    direction = dla.answer_direction(params, GOOD, BAD)
    run = dla.direct_logit_attribution(params, cfg, toks, direction=direction)
    fro = dla.direct_logit_attribution(frozen, cfg, toks, direction=direction)
    np.testing.assert_allclose(fro["heads"], run["heads"], atol=1e-5)
    other = random_tokens(6, 2, 8)
    assert np.abs(dla.direct_logit_attribution(frozen, cfg, other, direction=direction)["heads"]
                  - dla.direct_logit_attribution(params, cfg, other, direction=direction)["heads"]).max() > 1e-4


def test_a_frozen_layernorm_after_the_heads_splits_their_write_by_hand(tiny):
    """GPT-2 with a LayerNorm after each sublayer too (post_norms) and its o_proj bias, frozen: head h's
    share is scale * centre(z_h W_O[h]) / s, the part no head owns that of b_O plus the norm's bias; the
    components sum to the final residual at any positions. Unfrozen, the write has no per-head share."""
    _, cfg, params = tiny("gpt2")
    cfg = dataclasses.replace(cfg, post_norms=True)
    rng = np.random.RandomState(0)
    norm = lambda: {k: jnp.asarray(rng.normal(v, 0.1, (cfg.n_layers, cfg.d_model)), jnp.float32)
                    for k, v in (("scale", 1.0), ("bias", 0.0))}
    params = {**params, "layers": {**params["layers"], "post_norm1": norm(), "post_norm2": norm()}}
    toks = random_tokens(9, 2, 8)
    with pytest.raises(ValueError, match="post_norms.*freeze_norms"):
        dla.decompose(params, cfg, toks)
    frozen = dla.freeze_norms(params, cfg, toks)
    comps = dla.decompose(frozen, cfg, toks, positions=(-1, 2))
    np.testing.assert_allclose(comps.total(), comps.final, atol=1e-4)
    _, c = jc.run_with_cache(frozen, cfg, toks, sites=("head_out",))
    l, h, p = 1, 2, frozen["layers"]
    pos = np.array([7, 2])
    centred = lambda a: a - a.mean(-1, keepdims=True)
    inv, scale = np.asarray(p["post_norm1"]["inv_scale"])[l][:, pos], np.asarray(p["post_norm1"]["scale"])[l]
    head = np.asarray(c["head_out"])[l][:, pos, h] @ np.asarray(p["o"]["w"])[l, h]
    np.testing.assert_allclose(comps.heads[l, h], centred(head) * inv * scale, atol=1e-5)
    const = centred(np.asarray(p["o"]["b"])[l]) * inv * scale + np.asarray(p["post_norm1"]["bias"])[l]
    np.testing.assert_allclose(comps.attn_bias[l], const, atol=1e-5)


def test_frozen_ln_model_runs_in_sweeps(tiny):
    """Patched fast paths (suffix positions, vmapped masks) read the frozen scales of their positions."""
    _, cfg, params = tiny("llama_gqa")
    tgt, src = random_tokens(7, 2, 8), random_tokens(8, 2, 8)
    frozen = dla.freeze_norms(params, cfg, tgt)
    _, cache = jc.run_with_cache(params, cfg, src, sites=("head_out",))
    metric = LogitDiff(good=jnp.asarray(GOOD), bad=jnp.asarray(BAD))
    pos_w = P.select("last:3", np.ones(tgt.shape))
    masks = jc.Mask(head_out=jnp.asarray(np.random.RandomState(0).rand(5, cfg.n_layers, cfg.n_heads) < 0.5,
                                         jnp.float32))
    got = run_masks(frozen, cfg, PatchingProblem.make(target_run(frozen, cfg, tgt), cache, pos_w, metric), masks,
                    shard=False)
    for i in range(5):
        iv = jc.Intervention(jax.tree.map(lambda a: a[i], masks), cache, jnp.asarray(pos_w))
        _, c = jc.forward(frozen, cfg, tgt, intervention=iv, collect=("final_norm",), return_logits=False)
        np.testing.assert_allclose(got[i], metric(frozen, c["final_norm"][:, -1:]), atol=2e-5)
    with pytest.raises(ValueError, match="frozen norm scales"):
        jc.forward(frozen, cfg, random_tokens(1, 1, 8))
    with pytest.raises(ValueError, match="frozen norm scales"):
        jc.generate(frozen, cfg, tgt, max_new_tokens=2)


def test_ln_free_checkpoint_is_linear_and_its_dla_exact(tmp_path):
    """The published LN-free GPT-2 convention (eps 1e12, norm scales 1e6) loads as norm='ln_free':
    logits match HF, and DLA is exact on any run without freezing."""
    model = make_hf_model("gpt2")
    model.config.layer_norm_epsilon = 1e12
    with torch.no_grad():
        for layer in model.transformer.h:
            for ln in (layer.ln_1, layer.ln_2):
                ln.weight.mul_(1e6)
        model.transformer.ln_f.weight.mul_(1e6)
    model.save_pretrained(tmp_path)
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()  # eps 1e12 in its norms
    cfg, params = load_hf_dir(str(tmp_path))
    params = jax.tree.map(jnp.asarray, params)
    assert cfg.norm == "ln_free"
    toks = random_tokens(9, 2, 8)
    np.testing.assert_allclose(np.asarray(jc.forward(params, cfg, toks)[0]), ref.run(model, toks).logits.numpy(),
                               atol=1e-4)
    direction = dla.answer_direction(params, GOOD, BAD)
    for t in (toks, random_tokens(10, 2, 8)):
        out = dla.direct_logit_attribution(params, cfg, t, direction=direction)
        np.testing.assert_allclose(out["total"][:, 0], _logit_diff(params, cfg, t), atol=1e-4)
    x, y = (jnp.asarray(np.random.RandomState(s).randn(2, 8, cfg.d_model), jnp.float32) for s in (1, 2))
    n = lambda v: np.asarray(M.norm(cfg, params["final_norm"], v), np.float64)
    np.testing.assert_allclose(n(x + y) + n(0 * x), n(x) + n(y), atol=1e-4)


@pytest.mark.parametrize("name", ["gpt2", "llama_mqa"])
def test_logit_lens_ends_at_the_logits(tiny, name):
    _, cfg, params = tiny(name)
    toks = random_tokens(11, 2, 6)
    lens = dla.logit_lens(params, cfg, dla.decompose(params, cfg, toks, positions=(-1,)))
    assert lens.shape == (cfg.n_layers + 1, 2, 1, cfg.vocab_size)
    np.testing.assert_allclose(lens[-1, :, 0], np.asarray(jc.forward(params, cfg, toks)[0])[:, -1], atol=1e-4)
    _, c = jc.run_with_cache(params, cfg, toks, sites=("resid_pre",))
    after0 = M.logits_of(params, M.final_norm(params, cfg, c["resid_pre"][1][:, -1]))
    np.testing.assert_allclose(lens[1, :, 0], after0, atol=1e-4)
