"""A bad-input catalogue: each case raises a ValueError naming the argument before any work
starts, or gives a documented correct result; never a silent wrong number."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxcircuits as jc
from jaxcircuits.interventions import positions as P
from jaxcircuits.interventions.metrics import LogitDiff
from jaxcircuits.interventions.problem import PatchingProblem, target_run
from jaxcircuits.engine.patching import patched_metric, run_masks
from jaxcircuits.interventions.sites import Intervention, Mask
from tests import hf_reference as ref
from tests.conftest import left_padded_mask, random_tokens

B, T = 2, 8
METRIC = LogitDiff(good=jnp.array([[5], [6]]), bad=jnp.array([[7], [9]]))


@pytest.fixture(scope="module")
def gqa(tiny):
    """llama_gqa (8 heads, 2 KV heads): cfg, params, target tokens and a source cache of head_out."""
    _, cfg, params = tiny("llama_gqa")
    _, cache = jc.run_with_cache(params, cfg, random_tokens(100, B, T), sites=("head_out", "mlp_out"))
    return cfg, params, random_tokens(0, B, T), cache


def _head_mask(cfg, layer=1, heads=(0, 2)):
    return Mask(head_out=jnp.zeros((cfg.n_layers, cfg.n_heads)).at[layer, list(heads)].set(1.0))


def _iv(mask, source, pos_w=None):
    return Intervention(mask, source, jnp.asarray(P.select("last", np.ones((B, T))) if pos_w is None else pos_w))


def _logits(gqa, iv):
    cfg, params, tgt, _ = gqa
    return np.asarray(jc.forward(params, cfg, tgt, intervention=iv)[0])


# ---- tokens, padding, positions ---------------------------------------------------------------

RUNS = {
    "forward": lambda p, c, t, m=None: jc.forward(p, c, t, m),
    "run_with_cache": lambda p, c, t, m=None: jc.run_with_cache(p, c, t, m),
    "target_run": lambda p, c, t, m=None: target_run(p, c, t, m),
    "generate": lambda p, c, t, m=None: jc.generate(p, c, t, m, max_new_tokens=2),
}


@pytest.mark.parametrize("run", RUNS)
@pytest.mark.parametrize("bad_id", ["vocab", -1])
def test_token_ids_outside_the_vocabulary(gqa, run, bad_id):
    cfg, params, tgt, _ = gqa
    tokens = tgt.copy()
    tokens[1, 3] = cfg.vocab_size if bad_id == "vocab" else -1
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 101\); tokens \(shape \(2, 8\)\)"):
        RUNS[run](params, cfg, tokens)


@pytest.mark.parametrize("run", RUNS)
def test_all_padding_row(gqa, run):
    cfg, params, tgt, _ = gqa
    with pytest.raises(ValueError, match=r"attn_mask \(shape \(2, 8\)\) row 1 is all padding"):
        RUNS[run](params, cfg, tgt, left_padded_mask(B, T, [2, 8]))


@pytest.mark.parametrize("run", RUNS)
def test_right_padding(gqa, run):
    cfg, params, tgt, _ = gqa
    mask = np.ones((B, T), np.int32)
    mask[0, -2:] = 0
    with pytest.raises(ValueError, match=r"attn_mask \(shape \(2, 8\)\) row 0 has a 0 after a 1: .*left-padded"):
        RUNS[run](params, cfg, tgt, mask)


def test_malformed_tokens_mask_and_positions(gqa):
    cfg, params, tgt, _ = gqa
    with pytest.raises(ValueError, match=r"tokens has shape \(2, 0\), expected \[batch, seq\]"):
        jc.generate(params, cfg, np.zeros((2, 0), np.int32))          # an empty prompt
    with pytest.raises(ValueError, match=r"tokens \(shape \(2, 8\)\) has dtype float32, expected integer"):
        jc.forward(params, cfg, tgt.astype(np.float32))
    with pytest.raises(ValueError, match=r"attn_mask has shape \(1, 8\), expected the tokens' \(2, 8\)"):
        jc.forward(params, cfg, tgt, np.ones((1, T), np.int32))
    with pytest.raises(ValueError, match=r"attn_mask \(shape \(2, 8\)\) must hold 0 .* and 1"):
        jc.forward(params, cfg, tgt, np.full((B, T), 2))
    with pytest.raises(ValueError, match=r"pos_ids has shape \(8,\), expected the tokens' \(2, 8\)"):
        jc.forward(params, cfg, tgt, None, np.arange(T))
    with pytest.raises(ValueError, match="max_new_tokens=0, expected >= 1"):
        jc.generate(params, cfg, tgt, max_new_tokens=0)


def test_learned_positions_beyond_the_context_are_refused_as_hf_does(tiny):
    """GPT-2 (n_positions=64): HF raises past position 63, and so do we; the rule is positions, not
    slots (left padding), and counts the positions generation embeds."""
    model, cfg, params = tiny("gpt2")
    assert cfg.max_positions == 64
    fits, long = random_tokens(1, 1, 64), random_tokens(1, 1, 65)
    np.testing.assert_allclose(np.asarray(jc.forward(params, cfg, fits)[0]), ref.run(model, fits).logits.numpy(),
                               atol=1e-4)
    with pytest.raises(IndexError):
        ref.run(model, long)
    for run in RUNS:
        with pytest.raises(ValueError, match=r"positions span \[0, 6[45]\] .*max_positions=64\) \(HF raises too\)"):
            RUNS[run](params, cfg, long)
    padded = left_padded_mask(1, 70, [10])                            # 60 real tokens in 70 slots
    toks = random_tokens(2, 1, 70)
    want = ref.run(model, toks, padded).logits.numpy()[0, 10:]
    np.testing.assert_allclose(np.asarray(jc.forward(params, cfg, toks, padded)[0])[0, 10:], want, atol=1e-4)
    with pytest.raises(ValueError, match=r"positions span \[0, 64\] \(with 5 generated after the prompt\)"):
        jc.generate(params, cfg, toks, padded, max_new_tokens=6)
    assert jc.generate(params, cfg, toks, padded, max_new_tokens=5).shape == (1, 5)


def test_rotary_positions_beyond_max_position_embeddings_run_as_in_hf(tiny):
    """HF Llama computes RoPE for any position (no error past max_position_embeddings=128); so do we."""
    model, cfg, params = tiny("llama_mha")
    toks = random_tokens(3, 1, 130)
    got = np.asarray(jc.forward(params, cfg, toks)[0])
    np.testing.assert_allclose(got, ref.run(model, toks).logits.numpy(), atol=1e-4)


def test_public_forward_inside_jit_checks_shapes_only(gqa):
    cfg, params, tgt, _ = gqa
    got = jax.jit(lambda t: jc.forward(params, cfg, t)[0])(jnp.asarray(tgt))
    np.testing.assert_allclose(np.asarray(got), np.asarray(jc.forward(params, cfg, tgt)[0]), atol=1e-5)
    with pytest.raises(ValueError, match=r"attn_mask has shape \(2, 7\)"):
        jax.jit(lambda t: jc.forward(params, cfg, t, jnp.ones((B, T - 1)))[0])(jnp.asarray(tgt))


# ---- masks, sources, position weights, metrics --------------------------------------------------

def test_head_out_mask_of_shape_L_by_1_does_not_broadcast(gqa):
    cfg, _, _, cache = gqa
    with pytest.raises(ValueError, match=r"intervention: mask site 'head_out' has shape \(3, 1\), expected \(3, 8\)"):
        _logits(gqa, _iv(Mask(head_out=jnp.ones((cfg.n_layers, 1))), cache))


@pytest.mark.parametrize("value", [2.0, -1.0, np.nan])
def test_mask_values_outside_0_1_in_forward(gqa, value):
    cfg, _, _, cache = gqa
    m = jnp.zeros((cfg.n_layers, cfg.n_heads)).at[1, 2].set(value)
    with pytest.raises(ValueError, match=r"intervention: mask site 'head_out' has values outside \[0, 1\] or NaN"):
        _logits(gqa, _iv(Mask(head_out=m), cache))


def test_wrong_rank_masks_and_sources_in_forward(gqa):
    cfg, _, _, cache = gqa
    L, H = cfg.n_layers, cfg.n_heads
    with pytest.raises(ValueError, match=r"mask site 'head_out' has shape \(3,\), expected \(3, 8\)"):
        _logits(gqa, _iv(Mask(head_out=jnp.ones(L)), cache))
    with pytest.raises(ValueError, match=r"mask site 'head_out' has shape \(3, 8, 1\), expected \(3, 8\)"):
        _logits(gqa, _iv(Mask(head_out=jnp.ones((L, H, 1))), cache))
    flat = {"head_out": cache["head_out"].reshape(L, B, T, -1)}
    with pytest.raises(ValueError, match=r"intervention: source 'head_out' has shape \(3, 2, 8, 64\), "
                                         r"expected \(3, 2, 8, 8, 8\) = \[L, B, T, n_heads, d_head\]"):
        _logits(gqa, _iv(_head_mask(cfg), flat))
    with pytest.raises(ValueError, match=r"source 'head_out' has shape \(3, 2, 8, 8, 4\), expected \(3, 2, 8, 8, 8\)"):
        _logits(gqa, _iv(_head_mask(cfg), {"head_out": cache["head_out"][..., :4]}))
    with pytest.raises(ValueError, match=r"intervention: source lacks \['mlp_out'\] needed by mask sites \('mlp_out',\)"):
        _logits(gqa, _iv(Mask(mlp_out=jnp.ones(L)), {"head_out": cache["head_out"]}))


def test_batch_1_source_and_pos_w_against_batch_2_target_in_forward(gqa):
    cfg, _, _, cache = gqa
    one = {"head_out": cache["head_out"][:, :1]}
    with pytest.raises(ValueError, match=r"source 'head_out' has shape \(3, 1, 8, 8, 8\), expected \(3, 2, 8, 8, 8\)"):
        _logits(gqa, _iv(_head_mask(cfg), one))
    with pytest.raises(ValueError, match=r"intervention: pos_w has shape \(1, 8\), expected .* \(2, 8\)"):
        _logits(gqa, _iv(_head_mask(cfg), cache, np.ones((1, T))))
    with pytest.raises(ValueError, match=r"pos_w \(shape \(2, 8\)\) contains NaN or inf"):
        _logits(gqa, _iv(_head_mask(cfg), cache, np.full((B, T), np.nan)))


def test_batch_1_source_pos_w_and_metric_against_batch_2_target_in_run_masks(gqa):
    cfg, params, tgt, cache = gqa
    target, pos_w = target_run(params, cfg, tgt), P.select("last", np.ones((B, T)))
    with pytest.raises(ValueError, match=r"source 'head_out' has shape \(3, 1, 8, 8, 8\), expected \(3, 2, 8, n_heads"):
        PatchingProblem.make(target, {"head_out": cache["head_out"][:, :1]}, pos_w, METRIC)
    with pytest.raises(ValueError, match=r"pos_w has shape \(1, 8\), expected the target's \(batch, seq\) \(2, 8\)"):
        PatchingProblem.make(target, cache, pos_w[:1], METRIC)
    one = LogitDiff(good=jnp.array([[5]]), bad=jnp.array([[7]]))
    with pytest.raises(ValueError, match=r"metric LogitDiff has batch 1 \(a field of shape \(1, 1\)\), expected .* 2"):
        PatchingProblem.make(target, cache, pos_w, one)
    with pytest.raises(ValueError, match=r"source 'head_out' has shape \(3, 2, 8, 64\), expected \(3, 2, 8, n_heads, d_head\)"):
        PatchingProblem.make(target, {"head_out": cache["head_out"].reshape(3, B, T, -1)}, pos_w, METRIC)


def test_generate_checks_its_interventions(gqa):
    cfg, params, tgt, cache = gqa
    with pytest.raises(ValueError, match=r"prefill: mask site 'head_out' has shape \(3, 1\)"):
        jc.generate(params, cfg, tgt, max_new_tokens=2, prefill=_iv(Mask(head_out=jnp.ones((3, 1))), cache))
    decode = jc.decode_intervention(_head_mask(cfg), jc.source_at_position(cache, 0))
    with pytest.raises(ValueError, match=r"decode: pos_w has shape \(2, 8\), expected .* \(2, 1\)"):
        jc.generate(params, cfg, tgt, max_new_tokens=2, decode=decode.replace(pos_w=jnp.ones((B, T))))
    with pytest.raises(ValueError, match=r"decode: source 'head_out' has shape \(3, 2, 8, 8, 8\), expected \(3, 2, 1,"):
        jc.generate(params, cfg, tgt, max_new_tokens=2, decode=decode.replace(source=cache))


# ---- NaN in a source: harmless where nothing patches it, an error where something does ------------

UNUSED = {"another head": (1, 0, 7, 3, 0), "another position": (1, 1, 2, 0, 5), "another layer": (2, 0, 7, 0, 0)}
USED = (1, 1, 7, 2, 4)                   # layer 1, row 1, the last position, head 2: patched


@pytest.mark.parametrize("where", UNUSED)
def test_nan_outside_the_footprint_is_harmless(gqa, where):
    cfg, params, tgt, cache = gqa
    dirty = {"head_out": cache["head_out"].at[UNUSED[where]].set(jnp.nan), "mlp_out": cache["mlp_out"] * jnp.nan}
    mask = _head_mask(cfg)
    clean = _logits(gqa, _iv(mask, cache))
    assert np.isfinite(clean).all()
    np.testing.assert_array_equal(_logits(gqa, _iv(mask, dirty)), clean)
    pos_w = P.select("last", np.ones((B, T)))
    masks = jax.tree.map(lambda a: jnp.stack([a, 0.5 * a]), mask)
    run = lambda src: run_masks(params, cfg, PatchingProblem.make(target_run(params, cfg, tgt), src, pos_w, METRIC),
                                masks, shard=False)
    np.testing.assert_array_equal(run(dirty), run(cache))


def test_nan_source_with_an_all_zero_mask_leaves_the_run_unchanged(gqa):
    """The promise "an all-zero mask is bit-identical" holds for any source (0 * NaN is never formed)."""
    cfg, params, tgt, cache = gqa
    nan = {"head_out": cache["head_out"] * jnp.nan}
    got = _logits(gqa, _iv(Mask(head_out=jnp.zeros((cfg.n_layers, cfg.n_heads))), nan, np.ones((B, T))))
    np.testing.assert_array_equal(got, np.asarray(jc.forward(params, cfg, tgt)[0]))


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nan_inside_the_footprint_names_the_entry(gqa, bad):
    cfg, params, tgt, cache = gqa
    dirty = {"head_out": cache["head_out"].at[USED].set(bad)}
    msg = rf"source 'head_out' \(shape \(3, 2, 8, 8, 8\)\) holds {bad} at \(1, 1, 7, 2, 4\) = \[L, B, T, n_heads, d_head\]"
    with pytest.raises(ValueError, match="intervention: " + msg):
        _logits(gqa, _iv(_head_mask(cfg), dirty))
    problem = PatchingProblem.make(target_run(params, cfg, tgt), dirty, P.select("last", np.ones((B, T))), METRIC)
    masks = jax.tree.map(lambda a: jnp.stack([jnp.zeros_like(a), a]), _head_mask(cfg))
    with pytest.raises(ValueError, match=msg):
        run_masks(params, cfg, problem, masks, shard=False)
    with pytest.raises(ValueError, match=msg):       # a traced mask may patch every head at the last position
        jax.grad(lambda m: patched_metric(params, cfg, problem, Mask(head_out=m)).mean())(
            jnp.zeros((cfg.n_layers, cfg.n_heads)))


def test_attribution_gradient_at_mask_0_is_finite_differences_with_nan_elsewhere(gqa):
    """Selecting the source leaves d metric / d mask at mask 0 intact (attribution patching); NaN at
    positions pos_w does not select changes nothing."""
    cfg, params, tgt, cache = gqa
    pos_w = P.select("last:3", np.ones((B, T)))
    dirty = {"head_out": cache["head_out"].at[:, :, :5].set(jnp.nan)}
    m0 = jnp.zeros((cfg.n_layers, cfg.n_heads))
    grads = []
    for src in (cache, dirty):
        problem = PatchingProblem.make(target_run(params, cfg, tgt), src, pos_w, METRIC)
        f = jax.jit(lambda m, problem=problem: patched_metric(params, cfg, problem, Mask(head_out=m)).mean())
        grads.append(np.asarray(jax.grad(f)(m0)))
    np.testing.assert_array_equal(grads[1], grads[0])
    assert np.abs(grads[0]).max() > 1e-3
    eps = 1e-2
    for l, h in [(0, 1), (1, 5), (2, 7)]:
        e = m0.at[l, h].set(eps)
        np.testing.assert_allclose(grads[1][l, h], (f(e) - f(-e)) / (2 * eps), rtol=2e-2, atol=2e-4)
