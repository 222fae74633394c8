"""A bad-input catalogue: each case raises a ValueError naming the argument before any work
starts, or gives a documented correct result; never a silent wrong number."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxcircuits as jc
from jaxcircuits.interventions import positions as P
from jaxcircuits.interventions import edges
from jaxcircuits.interventions.edges import EdgeGraph
from jaxcircuits.interventions.metrics import LogitDiff
from jaxcircuits.engine.subsets import of_size, sampled_per_size, strided
from jaxcircuits.methods import attribution, dla, learned, weight_space
from jaxcircuits.stats.summary import SummaryOptions
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
    with pytest.raises(ValueError, match="max_new_tokens=0: expected an integer >= 1"):
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
    with pytest.raises(ValueError, match=r"pos_w \(shape \(2, 8\)\) has 16 value\(s\) that are NaN or inf"):
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


# ---- #25: numbers that mean nothing, counts, weights, legitimate empty input -------------------

def _problem(gqa, metric=METRIC, pos_w=None):
    cfg, params, tgt, cache = gqa
    pos_w = P.select("last", np.ones((B, T))) if pos_w is None else pos_w
    return PatchingProblem.make(target_run(params, cfg, tgt), cache, pos_w, metric)


def _plain_metric(gqa, metric=METRIC):
    cfg, params, tgt, _ = gqa
    _, c = jc.forward(params, cfg, tgt, collect=("final_norm",), return_logits=False)
    return np.asarray(metric(params, c["final_norm"][:, -metric.n_positions:]))


@pytest.mark.parametrize("case", ["equal sets", "equal as sets", "padding-only good row"])
def test_logit_difference_that_is_identically_zero_is_refused(gqa, case):
    cfg, params, _, _ = gqa
    good, bad = {"equal sets": ([[5], [6]], [[7], [6]]), "equal as sets": ([[5, 7], [6, -1]], [[7, 5], [9, -1]]),
                 "padding-only good row": ([[5], [-1]], [[7], [9]])}[case]
    metric = LogitDiff(good=jnp.array(good), bad=jnp.array(bad))
    match = "hold only padding" if "padding" in case else r"good and bad token sets are equal on row\(s\) \[\d\]"
    with pytest.raises(ValueError, match=match):
        patched_metric(params, cfg, _problem(gqa, metric), _head_mask(cfg))
    with pytest.raises(ValueError, match=match):
        dla.answer_direction(params, metric.good, metric.bad)


@pytest.mark.parametrize("mask", ["all zero", "zero weights on the chosen positions"])
def test_a_mask_that_patches_nothing_is_the_unpatched_run_bit_for_bit(gqa, mask):
    """Legitimate input: a zero mask, or a mask whose positions pos_w selects none, is a no-op."""
    cfg, params, _, _ = gqa
    pos_w = np.zeros((B, T)) if mask != "all zero" else None
    problem, want = _problem(gqa, pos_w=pos_w), _plain_metric(gqa)
    m = Mask(head_out=jnp.zeros((cfg.n_layers, cfg.n_heads))) if mask == "all zero" else _head_mask(cfg)
    np.testing.assert_array_equal(np.asarray(patched_metric(params, cfg, problem, m)), want)
    batch = jax.tree.map(lambda a: jnp.stack([a] * 3), m)
    np.testing.assert_array_equal(run_masks(params, cfg, problem, batch), np.stack([want] * 3))


def test_an_empty_batch_of_masks_gives_an_empty_result(gqa):
    cfg, params, _, _ = gqa
    got = run_masks(params, cfg, _problem(gqa), Mask(head_out=jnp.zeros((0, cfg.n_layers, cfg.n_heads))))
    assert got.shape == (0, B) and got.dtype == np.float32


@pytest.mark.parametrize("value", [1.5, -0.5, np.nan])
def test_position_weights_outside_0_1_are_refused(gqa, value):
    pos_w = np.asarray(P.select("last", np.ones((B, T))), np.float32)
    pos_w[1, 2] = value
    with pytest.raises(ValueError, match=r"pos_w \(shape \(2, 8\)\) has 1 value\(s\) that are NaN or inf, or outside "
                                         r"\[0, 1\]: first .* at \(1, 2\)"):
        _problem(gqa, pos_w=pos_w)


def test_subspace_bases_must_be_orthonormal(gqa):
    cfg, params, tgt, cache = gqa
    basis = np.zeros((cfg.n_layers, cfg.n_heads, 2, cfg.d_head), np.float32)
    basis[..., 0, 0] = 1.0                                          # orthonormal with a zero row: accepted
    iv = lambda b: _iv(_head_mask(cfg), {"head_out": cache["head_out"], "subspace:head_out": b})
    _logits(gqa, iv(basis))
    skew = basis.copy()
    skew[1, 2, 1, :2] = [0.6, 0.9]                                  # not unit length, not orthogonal to row 0
    with pytest.raises(ValueError, match=r"'subspace:head_out' rows must be orthonormal .* at \(1, 2\)"):
        _logits(gqa, iv(skew))


@pytest.mark.parametrize("position", [8, -1, 2.5, [0, 9]])
def test_source_at_position_out_of_range_is_refused_not_clamped(gqa, position):
    _, _, _, cache = gqa
    with pytest.raises(ValueError, match=r"position=.*: expected integer slot\(s\) in \[0, 8\)"):
        P.source_at_position(cache, position)


@pytest.mark.parametrize("direction", [None, "short", "batch 3", "nan"])
def test_dla_direction_is_checked(gqa, direction):
    cfg, params, tgt, _ = gqa
    d = {None: None, "short": np.ones(cfg.d_model - 1), "batch 3": np.ones((3, cfg.d_model)),
         "nan": np.full(cfg.d_model, np.nan)}[direction]
    match = {None: "direction is required", "short": r"direction has shape \(63,\)",
             "batch 3": r"direction has shape \(3, 64\), expected \[D\] \(64,\) or \[B, D\] \(2, 64\)",
             "nan": "direction .* NaN or inf"}[direction]
    with pytest.raises(ValueError, match=match):
        dla.direct_logit_attribution(params, cfg, tgt, direction=d)


@pytest.mark.parametrize("value", [0, 2.5, True, "3", np.nan])
def test_counts_are_integers_at_or_above_their_minimum(gqa, value):
    cfg, params, tgt, _ = gqa
    calls = {
        "max_new_tokens": lambda: jc.generate(params, cfg, tgt, max_new_tokens=value),
        "steps": lambda: learned.Spec(steps=value),
        "checkpoint_every": lambda: learned.Spec(checkpoint_every=value),
        "k": lambda: attribution.top_edges(cfg, np.zeros(EdgeGraph.of(cfg).n_edges), k=value),
    }
    if value != 0:
        calls["steps "] = lambda: attribution.integrated_gradients(params, cfg, _problem(gqa), "head_out", steps=value)
    calls["k "] = lambda: weight_space.top_pairs(jnp.ones((2, 2)), jnp.zeros((2, 2)), k=value)
    calls["samples_per_size"] = lambda: sampled_per_size(8, [2], value, seed=0)
    calls["stride"] = lambda: strided(8, value)
    for name in ("top", "max_sets", "n_resamples"):
        calls[name] = lambda name=name: SummaryOptions(**{name: value})
    if value != 0:                                                  # sizes start at 0
        calls["k  "] = lambda: of_size(8, value)
    for name, call in calls.items():
        with pytest.raises(ValueError, match=rf"{name.strip()}=.*: expected an integer >= [01]"):
            call()


def test_a_path_from_a_sender_to_an_earlier_receiver_is_refused(gqa):
    cfg = gqa[0]
    graph = EdgeGraph.of(cfg)
    graph.path_mask(["L0H1"], ["L1H0"])                             # forward: fine
    with pytest.raises(ValueError, match=r"sender\(s\) \['L1H1'\] have no edge into the receivers \['L0H0'\]"):
        graph.path_mask(["L1H1"], ["L0H0"])
    with pytest.raises(ValueError, match=r"\['L1H1', 'L1MLP'\] have no edge"):
        edges.path_masks(graph, ["L1H1", "L1MLP"], ["L1H0"], np.eye(2))
    # a sender subset sweep may hold senders without a path: their rows patch nothing
    both = edges.path_masks(graph, ["L0H1", "L1MLP"], ["L1H0"], np.eye(2))
    chex.assert_trees_all_equal(jax.tree.map(lambda a: a[0], both), graph.path_mask(["L0H1"], ["L1H0"]))
    assert not np.asarray(both.layers[1]).any() and not np.asarray(both.final[1]).any()


@pytest.mark.parametrize("case", ["no subsets", "success too short", "metric rows", "metric nan"])
def test_summaries_of_empty_or_misaligned_sweeps_name_the_argument(case):
    from jaxcircuits.stats.rates import rate_by_size
    from jaxcircuits.stats.summary import summarize
    bits = np.eye(4, dtype=bool)
    subsets, success, metric = {"no subsets": (np.zeros((0, 4), bool), np.zeros(0, bool), None),
                                "success too short": (bits, np.ones(3, bool), None),
                                "metric rows": (bits, np.ones(4, bool), np.zeros((3, 2))),
                                "metric nan": (bits, np.ones(4, bool), np.full(4, np.nan))}[case]
    match = {"no subsets": "the sweep has no subsets", "success too short": r"success has shape \(3,\), expected \(4,\)",
             "metric rows": r"metric has shape \(3, 2\), expected \(4,\) or \(4, P\)",
             "metric nan": "metric .* NaN or inf"}[case]
    with pytest.raises(ValueError, match=match):
        summarize(subsets, success, metric)
    if metric is None:
        with pytest.raises(ValueError, match=match):
            rate_by_size(subsets, success)


def test_an_output_path_that_is_a_file_is_named(gqa, tmp_path):
    from jaxcircuits.engine.subsets import Pool, of_size
    cfg, params, _, _ = gqa
    path = tmp_path / "taken"
    path.write_text("not a directory")
    for out in (path, path / "sub"):
        with pytest.raises(NotADirectoryError, match=f"{out} cannot be a directory: {path} is a file$"):
            jc.run_sweep(params, cfg, _problem(gqa), Pool.heads(1, cfg.n_heads), of_size(cfg.n_heads, 1), str(out))
    with pytest.raises(NotADirectoryError, match=f"{path} is a file"):
        learned.fit(learned.head_objective(params, cfg, _problem(gqa)), [0.1], spec=learned.Spec(steps=2, checkpoint_every=1),
                    checkpoint_dir=str(path))


def test_a_learned_mask_with_baselines_equal_within_float_noise_has_nothing_to_learn():
    planted = lambda w, data: 5.0 + data @ (1.0 - w)          # a metric of 5 that patching moves by 3e-8
    obj = learned.Objective(planted, jnp.full((2, 3), 1e-8), ("a", "b", "c"))
    with pytest.raises(ValueError, match="same within float noise .*: nothing to learn"):
        learned.fit(obj, [0.1])
    small = learned.Objective(lambda w, data: data @ (1.0 - w), jnp.full((2, 3), 1e-8), ("a", "b", "c"))
    learned.baselines(small)                                   # a metric of 3e-8 that patching moves to 0: real


def test_a_checkpoint_of_other_prompts_is_not_resumed(gqa, tmp_path):
    cfg, params, tgt, cache = gqa
    spec = learned.Spec(steps=4, checkpoint_every=2)
    learned.fit(learned.head_objective(params, cfg, _problem(gqa)), [0.1], spec=spec, checkpoint_dir=str(tmp_path),
                stop_at=2)
    other = PatchingProblem.make(target_run(params, cfg, random_tokens(7, B, T)), cache,
                                 P.select("last", np.ones((B, T))), METRIC)
    with pytest.raises(ValueError, match=r"step_2 was written for objective=\w+, this run has objective=\w+"):
        learned.fit(learned.head_objective(params, cfg, other), [0.1], spec=spec, checkpoint_dir=str(tmp_path))
    done = learned.fit(learned.head_objective(params, cfg, _problem(gqa)), [0.1], spec=spec, checkpoint_dir=str(tmp_path))
    assert done.done


def test_a_chunk_predicted_not_to_fit_is_refused_before_it_runs(gqa, monkeypatch):
    from jaxcircuits.engine import memory
    mem = memory.ChunkMemory(per_item=3e9, fixed=1e9, runtime=1.0)
    assert mem.chunk_size(free=20e9) == 2                            # (0.5 x 20 - 1) / 3 -> 3 -> a power of two
    assert mem.chunk_size(free=3.5e9) == 1                           # fits all the free memory: a warning
    with pytest.raises(MemoryError, match=r"one item per device is predicted to need 3 GB \(\+ 1 GB fixed\) of 2.5 GB free"):
        mem.chunk_size(free=2.5e9)
    cfg, params, _, _ = gqa                                          # through run_masks: refused, nothing runs
    monkeypatch.setattr(memory, "free_bytes", lambda n_devices=1: 1000)
    with pytest.raises(MemoryError, match="predicted to need"):
        run_masks(params, cfg, _problem(gqa), jax.tree.map(lambda a: a[None], _head_mask(cfg)))
