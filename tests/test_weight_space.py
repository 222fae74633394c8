"""Weight space: factored head matrices vs dense, composition scores, edits, Q/K profiles."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcircuits.methods import weight_space as ws
from jaxcircuits.models import transformer
from tests.conftest import random_tokens


def _dense_heads(params, cfg, kind):
    """OV / QK per head [L, H, D, D] straight from the weights (NumPy, float64)."""
    lay = jax.tree.map(lambda a: np.asarray(a, np.float64), params["layers"])
    g = cfg.n_heads // cfg.n_kv_heads
    out = np.zeros((cfg.n_layers, cfg.n_heads, cfg.d_model, cfg.d_model))
    for l in range(cfg.n_layers):
        for h in range(cfg.n_heads):
            if kind == "ov":
                out[l, h] = lay["v"]["w"][l, :, h // g] @ lay["o"]["w"][l, h]
            else:
                out[l, h] = lay["q"]["w"][l, :, h] @ lay["k"]["w"][l, :, h // g].T
    return out


@pytest.mark.parametrize("name", ["gpt2", "llama_gqa"])
@pytest.mark.parametrize("kind", ws.HEAD_MATRICES)
def test_factors_norms_svd_match_dense(tiny, name, kind):
    _, cfg, params = tiny(name)
    f = ws.head_factors(params, cfg, kind)
    dense = _dense_heads(params, cfg, kind)
    np.testing.assert_allclose(f.dense(), dense, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(ws.frobenius(f), np.linalg.norm(dense, axis=(-1, -2)), rtol=1e-4)
    u, s, vh = ws.svd(f)
    s_ref = np.linalg.svd(dense, compute_uv=False)[..., :cfg.d_head]
    np.testing.assert_allclose(s, s_ref, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose((u * s[..., None, :]) @ vh, dense, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(ws.product(f, f).dense(), dense @ dense, rtol=1e-3, atol=1e-4)


def test_composition_scores_match_dense(tiny):
    _, cfg, params = tiny("llama_gqa")
    scores = np.asarray(jax.jit(ws.composition_scores, static_argnums=(1, 2))(params, cfg, 4))
    ov, qk = _dense_heads(params, cfg, "ov"), _dense_heads(params, cfg, "qk")
    fro = lambda m: np.linalg.norm(m)
    assert scores.shape == (3, cfg.n_layers, cfg.n_heads, cfg.n_layers, cfg.n_heads)
    for la, ha, lb, hb in [(0, 1, 1, 5), (0, 7, 2, 0), (1, 3, 2, 3)]:
        a = ov[la, ha]
        want = [fro(a @ qk[lb, hb]) / (fro(a) * fro(qk[lb, hb])),
                fro(a @ qk[lb, hb].T) / (fro(a) * fro(qk[lb, hb])),
                fro(a @ ov[lb, hb]) / (fro(a) * fro(ov[lb, hb]))]
        np.testing.assert_allclose(scores[:, la, ha, lb, hb], want, rtol=1e-4)
    assert np.isnan(scores[:, 1, 0, 1, 0]).all() and np.isnan(scores[:, 2, 0, 0, 0]).all()
    base = ws.random_baseline(jax.random.PRNGKey(0), cfg, 64)
    assert base.shape == (3, 64) and np.all((0 < base) & (base < 1))
    rows = ws.top_pairs(scores, base, 3)
    assert len(rows) == 9 and rows[0]["writer"][0] < rows[0]["reader"][0]


def test_scale_directions_edits_only_that_head_and_vmaps(tiny):
    _, cfg, params = tiny("llama_gqa")
    for kind in ws.HEAD_MATRICES:
        scales = jnp.ones(cfg.d_head).at[0].set(0.0).at[1].set(2.0)
        new = ws.scale_directions(params, cfg, kind, 1, 3, scales)
        before, after = ws.head_factors(params, cfg, kind), ws.head_factors(new, cfg, kind)
        u, s, vh = np.linalg.svd(np.asarray(before.dense()[1, 3], np.float64))
        s2 = s.copy(); s2[0] = 0; s2[1] *= 2
        np.testing.assert_allclose(after.dense()[1, 3], (u * s2) @ vh, atol=1e-4)
        other = np.ones((cfg.n_layers, cfg.n_heads), bool); other[1, 3] = False
        np.testing.assert_allclose(after.dense()[other], before.dense()[other], atol=1e-6)
    # vmapped over strengths: top-n removed for n = 0..3
    f = jax.jit(jax.vmap(lambda n: ws.frobenius(ws.head_factors(
        ws.remove_directions(params, cfg, "ov", 0, 2, n), cfg, "ov"))[0, 2]))
    norms = np.asarray(f(jnp.arange(4)))
    s = np.linalg.svd(np.asarray(ws.head_factors(params, cfg, "ov").dense()[0, 2]), compute_uv=False)
    np.testing.assert_allclose(norms, [np.sqrt((s[n:] ** 2).sum()) for n in range(4)], rtol=1e-4)


def test_project_out():
    rng = np.random.RandomState(0)
    w = rng.randn(3, 5, 8).astype(np.float32)
    basis = np.linalg.qr(rng.randn(8, 2))[0].T.astype(np.float32)           # [2, 8]
    out = np.asarray(ws.project_out(jnp.asarray(w), jnp.asarray(basis), -1))
    np.testing.assert_allclose(out @ basis.T, 0, atol=1e-5)
    np.testing.assert_allclose(out, w - (w @ basis.T) @ basis, atol=1e-5)
    half = jax.vmap(lambda a: ws.project_out(jnp.asarray(w), jnp.asarray(basis), -1, a))(jnp.array([0.0, 1.0]))
    np.testing.assert_allclose(half[0], w, atol=1e-6)
    np.testing.assert_allclose(half[1], out, atol=1e-5)
    out1 = np.asarray(ws.project_out(jnp.asarray(w.transpose(0, 2, 1)), jnp.asarray(basis), 1))
    np.testing.assert_allclose(out1, out.transpose(0, 2, 1), atol=1e-5)


def test_qk_profile_and_zeroing_top_dims(tiny):
    _, cfg, params = tiny("llama_gqa")
    tokens = random_tokens(0, 2, 6)
    prof = ws.qk_profile(params, cfg, tokens)
    _, cache = transformer.run_with_cache(params, cfg, tokens, sites=("head_q", "head_k"))
    np.testing.assert_allclose(prof["q_rope"], np.abs(np.asarray(cache["head_q"])).mean((1, 2)), rtol=1e-5)
    assert prof["q"].shape == (cfg.n_layers, cfg.n_heads, cfg.d_head)
    assert prof["k"].shape == (cfg.n_layers, cfg.n_kv_heads, cfg.d_head)
    # position 0 has no rotation: profiles with and without RoPE agree there
    p0 = ws.qk_profile(params, cfg, tokens[:, :1])
    np.testing.assert_allclose(p0["q"], p0["q_rope"], rtol=1e-5, atol=1e-6)
    ranks = {"q": ws.top_dims(prof["q"]), "k": ws.top_dims(prof["k"])}
    assert np.all(np.sort(np.asarray(ranks["q"]), -1) == np.arange(cfg.d_head))
    zeroed = ws.zero_top_dims(params, ranks, 3)
    p2 = ws.qk_profile(zeroed, cfg, tokens)
    np.testing.assert_allclose(np.where(np.asarray(ranks["q"]) < 3, p2["q"], 0), 0, atol=1e-6)
    kept = np.asarray(ranks["q"])[0] >= 3                   # layer 0 reads the unchanged embeddings
    np.testing.assert_allclose(np.where(kept, p2["q"][0] - prof["q"][0], 0), 0, atol=1e-5)

    def metric(p):
        logits, _ = transformer.forward_fn(p, cfg, jnp.asarray(tokens))
        return logits[:, -1, 5].mean()
    curve = np.asarray(jax.jit(lambda ns: ws.zeroed_metric(params, ranks, ns, metric))(jnp.array([0, 3])))
    np.testing.assert_allclose(curve[0], metric(params), rtol=1e-5)
    np.testing.assert_allclose(curve[1], metric(zeroed), rtol=1e-4)
