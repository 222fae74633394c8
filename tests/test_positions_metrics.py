"""Position maps, selectors and replacement sources; metrics against hand computations."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcircuits.interventions import ablation as A
from jaxcircuits.interventions import positions as P
from jaxcircuits.interventions.metrics import (AnswerProb, LogitDiff, answer_log_prob, first_distinguishing, pad_ids)
from jaxcircuits.models.transformer import forward, logits_of, run_with_cache
from tests.conftest import left_padded_mask, random_tokens


def test_position_maps_on_left_padded_rows():
    tgt = left_padded_mask(2, 5, [0, 2])          # row 0: 5 real tokens, row 1: 3
    src = left_padded_mask(2, 4, [1, 0])          # row 0: 3 real tokens, row 1: 4
    np.testing.assert_array_equal(P.right_aligned(tgt, src), [[-1, -1, 1, 2, 3], [-1, -1, 1, 2, 3]])
    np.testing.assert_array_equal(P.left_aligned(tgt, src), [[1, 2, 3, -1, -1], [-1, -1, 0, 1, 2]])
    t_tok = np.array([[7, 8, 9, 5, 6], [0, 0, 4, 5, 6]])
    s_tok = np.array([[0, 8, 9, 6], [3, 4, 5, 6]])
    np.testing.assert_array_equal(P.token_matched(t_tok, tgt, s_tok, src), [[-1, 1, 2, -1, 3], [-1, -1, 1, 2, 3]])


def test_selectors_and_weights():
    attn_mask = left_padded_mask(2, 4, [0, 1])
    np.testing.assert_array_equal(P.select("all", attn_mask), attn_mask)
    np.testing.assert_array_equal(P.select("last", attn_mask), [[0, 0, 0, 1], [0, 0, 0, 1]])
    np.testing.assert_array_equal(P.select("last:2", attn_mask), [[0, 0, 1, 1], [0, 0, 1, 1]])
    np.testing.assert_array_equal(P.select([0, -1], attn_mask), [[1, 0, 0, 1], [0, 1, 0, 1]])
    pos_map = np.array([[-1, 0, 1, 2], [-1, -1, 0, 1]])
    np.testing.assert_array_equal(P.weights("all", pos_map), [[0, 1, 1, 1], [0, 0, 1, 1]])
    with pytest.raises(ValueError, match="out of range"):
        P.select([4], attn_mask)
    with pytest.raises(ValueError, match="position selector"):
        P.select("first", attn_mask)


def test_align_gathers_mapped_slots_and_zeros_the_rest():
    a = jnp.arange(2 * 1 * 3 * 2, dtype=jnp.float32).reshape(2, 1, 3, 2)          # [L, B, S, D]
    pat = jnp.arange(1 * 1 * 1 * 3 * 3, dtype=jnp.float32).reshape(1, 1, 1, 3, 3)  # [L, B, H, S, S]
    out = P.align({"resid_pre": a, "pattern": pat}, np.array([[2, -1, 0, 1]]))
    np.testing.assert_array_equal(out["resid_pre"][:, 0], np.stack([a[:, 0, 2], 0 * a[:, 0, 0], a[:, 0, 0], a[:, 0, 1]], 1))
    want = np.zeros((4, 4))
    idx = [2, -1, 0, 1]
    for i, si in enumerate(idx):
        for j, sj in enumerate(idx):
            if si >= 0 and sj >= 0:
                want[i, j] = pat[0, 0, 0, si, sj]
    np.testing.assert_array_equal(out["pattern"][0, 0, 0], want)


def test_zero_and_mean_sources():
    a = jnp.asarray(np.random.RandomState(0).randn(2, 3, 4, 5), jnp.float32)     # [L, B, T, D]
    np.testing.assert_array_equal(A.zeros_like_source({"mlp_out": a})["mlp_out"], np.zeros(a.shape))
    attn_mask = left_padded_mask(3, 4, [0, 1, 2])
    got = A.mean_source({"mlp_out": a}, attn_mask)["mlp_out"]
    want = np.asarray(a)[:, attn_mask.astype(bool)].mean(1)                              # mean over real tokens
    np.testing.assert_allclose(got[:, 1, 2], want, rtol=1e-6)
    assert got.shape == a.shape
    with pytest.raises(ValueError, match="mean ablation of 'pattern'"):
        A.mean_source({"pattern": a})


def test_metrics_against_full_logits(tiny):
    _, cfg, params = tiny("llama_mha")
    toks = random_tokens(0, 2, 7)
    logits, cache = run_with_cache(params, cfg, toks, sites=("final_norm",))
    logits, h = np.asarray(logits, np.float64), cache["final_norm"]
    last = logits[:, -1]
    good, bad = pad_ids([[5, 9], [6]]), pad_ids([[7], [8, 10]])
    lse = lambda row, ids: np.log(np.exp(row[[i for i in ids if i >= 0]]).sum())
    want = [lse(last[b], good[b]) - lse(last[b], bad[b]) for b in range(2)]
    np.testing.assert_allclose(LogitDiff(jnp.asarray(good), jnp.asarray(bad))(params, h[:, -1:]), want, rtol=1e-4)
    probs = np.exp(last - last.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    np.testing.assert_allclose(AnswerProb(jnp.asarray(good))(params, h[:, -1:]), [probs[0, [5, 9]].sum(), probs[1, 6]],
                               rtol=1e-4)
    # Teacher forcing: the last tokens of each row are the answer (row 1's answer is shorter).
    answers = [toks[0, -3:].tolist(), toks[1, -2:].tolist()]
    metric = answer_log_prob(answers)
    assert metric.n_positions == 4
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    T = toks.shape[1]                                   # answer token at p is predicted at p - 1
    want = [sum(logp[0, T - 3 + i - 1, answers[0][i]] for i in range(3)),
            sum(logp[1, T - 2 + i - 1, answers[1][i]] for i in range(2))]
    np.testing.assert_allclose(metric(params, h[:, -4:]), want, rtol=1e-4)


def test_logit_diff_with_tied_embeddings_gathers_rows_not_the_transpose(tiny):
    """GPT-2 ties its embeddings: the metric's two columns are rows of the input embedding [V, D],
    gathered there; its compiled code holds no [D, V] array (gathering from the transpose makes XLA
    transpose and copy the whole embedding on every call, every chunk of a sweep)."""
    _, cfg, params = tiny("gpt2")
    assert "unembed" not in params
    h = jnp.asarray(np.random.RandomState(0).randn(2, 1, cfg.d_model), jnp.float32)
    m = LogitDiff(good=jnp.array([[1], [2]]), bad=jnp.array([[3], [4]]))
    full = np.asarray(logits_of(params, h[:, -1]))
    np.testing.assert_allclose(m(params, h), full[[0, 1], [1, 2]] - full[[0, 1], [3, 4]], rtol=1e-5)
    hlo = jax.jit(lambda p, x: m(p, x)).lower(params, h).compile().as_text()
    assert f"[{cfg.d_model},{cfg.vocab_size}]" not in hlo


def test_first_distinguishing_token():
    assert first_distinguishing([216, 41, 30, 40], [216, 41, 30, 33, 33]) == ([216, 41, 30], 40, 33)
    with pytest.raises(ValueError, match="do not differ"):
        first_distinguishing([1, 2], [1, 2, 3])
    with pytest.raises(ValueError, match="empty token set"):
        pad_ids([[1], []])


def test_metric_under_jit_and_vmap_of_params_is_pure(tiny):
    _, cfg, params = tiny("gpt2")
    toks = jnp.asarray(random_tokens(1, 2, 5))
    h = forward(params, cfg, toks, collect=("final_norm",), return_logits=False)[1]["final_norm"]
    m = LogitDiff(good=jnp.array([[1], [2]]), bad=jnp.array([[3], [4]]))
    np.testing.assert_allclose(jax.jit(lambda p, x: m(p, x))(params, h[:, -1:]), m(params, h[:, -1:]), rtol=1e-6)
