"""Training sparse dictionaries: planted features recovered, losses and straight-through gradients
by hand, the activation stream equal to the model's sites, kill -9 / resume bit-identical, data
parallel equal to one device, evaluation metrics by hand, the corpus."""

import os
import re
import signal
import subprocess
import sys
import time

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcircuits import storage
from jaxcircuits.dictionaries import core, corpus, evaluate, stream, train
from jaxcircuits.interventions import sites
from jaxcircuits.models import transformer
from jaxcircuits.models.params import param_shapes
from jaxcircuits.reports import viz
from tests import dictionary_train_worker as worker
from tests import sweep_worker
from tests.conftest import ROOT, SMOLLM2_GGUF

CFG = sweep_worker.CFG


def _cosines(true_w, learned_w):
    """For each true feature, the best cosine with a learned decoder row."""
    learned_w = learned_w / np.linalg.norm(learned_w, axis=1, keepdims=True)
    return (true_w @ learned_w.T).max(axis=1)


@pytest.mark.parametrize("kind,extra", [("topk", dict(k=4)), ("relu", dict(sparsity=1.0))])
def test_planted_features_are_recovered(kind, extra):
    """32 unit features in 16 dims, each active with probability 0.04 at magnitudes in [0.5, 1.5):
    every one is matched by a learned decoder row with cosine > 0.9."""
    true_w, acts = worker.planted(n=20000)
    o = train.Options(kind=kind, width=64, lr=3e-3, steps=1000, batch=256, buffer=4096, checkpoint_every=500,
                      dead_tokens=20000, devices=1, **extra)
    out = train.train(stream.ArraySource(acts, 16), o)
    cos = _cosines(true_w, out.params["w_dec"])
    assert cos.min() > 0.9, np.sort(cos)[:5]
    assert out.done and out.history["loss"].shape == (1000,)
    assert out.history["mse"][-50:].mean() < 0.5 * out.history["mse"][:50].mean()
    m = evaluate.metrics(out.config, out.params, acts[:4000])
    assert m.explained_variance > 0.6 and 1 <= m.l0 <= 8


def test_losses_and_straight_through_gradients_by_hand():
    dc = core.DictConfig("jumprelu", 2, 3)
    p = {"w_enc": jnp.eye(2, 3), "b_enc": jnp.zeros(3), "w_dec": jnp.eye(3, 2) * 2, "b_dec": jnp.zeros(2),
         "threshold": jnp.array([0.5, 0.5, 0.1])}
    x = jnp.array([[0.52, 0.2], [0.9, 0.41]])                   # pre: [[.52, .2, 0], [.9, .41, 0]]
    o = train.Options(kind="jumprelu", width=3, sparsity=0.1, bandwidth=0.1, batch=1, buffer=2)
    loss, (f, (mse, l0)) = train.LOSSES["jumprelu"].fn(dc, o, p, x, x, jnp.zeros(3, bool))
    np.testing.assert_allclose(f, [[0.52, 0, 0], [0.9, 0, 0]])
    np.testing.assert_allclose(mse, ((0.52 ** 2 + 0.2 ** 2) + (0.9 ** 2 + 0.41 ** 2)) / 2, rtol=1e-6)
    np.testing.assert_allclose(l0, 1.0)
    np.testing.assert_allclose(loss, mse + 0.1 * l0, rtol=1e-6)
    # STE: pre - theta inside (-bw/2, bw/2) at (0, 0) (.02) and (1, 1) (-.09 is outside; .41 - .5 = -.09)
    g = jax.grad(lambda th: train.jumprelu(x @ p["w_enc"], th, 0.1).sum())(p["threshold"])
    np.testing.assert_allclose(g, [-(0.5 / 0.1) * 1, 0, 0], rtol=1e-6)
    g = jax.grad(lambda th: train.heaviside(x @ p["w_enc"], th, 0.1).sum())(p["threshold"])
    np.testing.assert_allclose(g, [-1 / 0.1, 0, 0], rtol=1e-6)
    g = jax.grad(lambda pre: train.jumprelu(pre, p["threshold"], 0.1).sum())(x @ p["w_enc"])
    np.testing.assert_allclose(g, [[1, 0, 0], [1, 0, 0]])
    # relu: L1 weighted by decoder row norms (2 each)
    dcr = core.DictConfig("relu", 2, 3)
    pr = {k: v for k, v in p.items() if k != "threshold"}
    o = train.Options(kind="relu", width=3, sparsity=0.5, batch=1, buffer=2)
    loss, (f, (mse, l1)) = train.LOSSES["relu"].fn(dcr, o, pr, x, x, jnp.zeros(3, bool))
    np.testing.assert_allclose(l1, 2 * ((0.52 + 0.2) + (0.9 + 0.41)) / 2, rtol=1e-6)
    np.testing.assert_allclose(mse, ((0.52 ** 2 + 0.2 ** 2) + (0.9 ** 2 + 0.41 ** 2)) / 2, rtol=1e-6)
    # topk's AuxK: k=1 keeps feature 0; feature 1 dead; e = y - y_hat, e_hat = pre_1 * w_dec[1]
    dck = core.DictConfig("topk", 2, 3, k=1)
    o = train.Options(kind="topk", width=3, k=1, k_aux=1, aux_coef=0.25, batch=1, buffer=2)
    loss, (f, (mse, aux)) = train.LOSSES["topk"].fn(dck, o, pr, x, x, jnp.array([False, True, False]))
    y_hat = np.asarray(f) @ np.asarray(pr["w_dec"])
    e_hat = np.array([[0, 0.4], [0, 0.82]])
    np.testing.assert_allclose(aux, (((np.asarray(x) - y_hat - e_hat) ** 2).sum(1)).mean(), rtol=1e-6)
    np.testing.assert_allclose(loss, mse + 0.25 * aux, rtol=1e-6)
    _, (_, (_, no_aux)) = train.LOSSES["topk"].fn(dck, o, pr, x, x, jnp.zeros(3, bool))
    assert no_aux == 0


def test_gated_and_jumprelu_train_and_keep_their_constraints():
    _, acts = worker.planted(n=4000)
    for kind, extra in [("gated", dict(sparsity=1.0)), ("jumprelu", dict(sparsity=0.2, bandwidth=0.1))]:
        o = train.Options(kind=kind, width=32, lr=3e-3, steps=300, batch=128, buffer=1024, checkpoint_every=300,
                          devices=1, **extra)
        out = train.train(stream.ArraySource(acts, 16), o)
        assert out.history["mse"][-30:].mean() < 0.5 * out.history["mse"][:30].mean(), kind
        np.testing.assert_allclose(np.linalg.norm(out.params["w_dec"], axis=1), 1, rtol=1e-5)
    assert (out.params["threshold"] >= 0).all() and np.ptp(out.params["threshold"]) > 0


def test_killed_run_resumes_bit_identical(tmp_path):
    """SIGKILL after a checkpoint, then the same call resumes: state, buffer and history equal an
    uninterrupted run's bit for bit."""
    ckpt = str(tmp_path / "ckpt")
    env = dict(os.environ, PYTHONPATH=ROOT, JAXCIRCUITS_PROGRESS="0")
    proc = subprocess.Popen([sys.executable, "-m", "tests.dictionary_train_worker", ckpt], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and not any(os.path.exists(os.path.join(ckpt, f"step_{s}{storage.SIDECAR}"))
                                             for s in storage.checkpoint_steps(ckpt)):
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert 10 <= storage.checkpoint_steps(ckpt)[0] < 40, storage.checkpoint_steps(ckpt)
    source, o = worker.kill_source(), worker.KILL_OPTIONS
    resumed = train.train(source, o, ckpt)
    straight = train.train(source, o)
    assert resumed.step == straight.step == 40
    chex.assert_trees_all_equal(resumed.state, straight.state)
    chex.assert_trees_all_equal(resumed.buffer, straight.buffer)
    chex.assert_trees_all_equal(resumed.history, straight.history)
    with pytest.raises(ValueError, match="options"):
        train.train(source, train.Options(**{**vars(o), "lr": 1e-3}), ckpt)


def test_data_parallel_equals_one_device():
    """The batch split over 2 devices (params replicated) trains as on one, within float rounding."""
    assert jax.device_count() >= 2
    source = stream.ArraySource(worker.planted(n=1024)[1], 16, rows=64)
    runs = [train.train(source, train.Options(kind="topk", width=24, k=3, lr=1e-3, steps=12, batch=64, buffer=256,
                                              checkpoint_every=12, devices=n)) for n in (1, 2)]
    chex.assert_trees_all_close(runs[1].params, runs[0].params, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(runs[1].history["loss"], runs[0].history["loss"], rtol=1e-4)
    with pytest.raises(ValueError, match="batch=62 must be a multiple of the 4 devices"):
        train.train(source, train.Options(kind="topk", width=8, k=2, batch=62, buffer=256))


@pytest.fixture(scope="module")
def model():
    """The sweep worker's tiny Llama with numpy-drawn weights (norm scales near 1), and token rows
    with separators (1) and padding."""
    rng = np.random.default_rng(0)
    params = jax.tree_util.tree_map_with_path(
        lambda path, shape: jnp.asarray(1 + 0.1 * rng.normal(size=shape) if path[-1].key == "scale"
                                        else 0.3 * rng.normal(size=shape), jnp.float32),
        param_shapes(CFG), is_leaf=lambda x: isinstance(x, tuple))
    tokens = np.random.RandomState(0).randint(2, 50, (6, 10)).astype(np.int32)
    tokens[:, 0] = 1
    tokens[2, 5] = 1                                              # a document boundary mid-row
    mask = np.ones_like(tokens)
    mask[3, :3] = 0                                               # left padding
    return params, tokens, mask


def test_streamed_activations_are_the_sites_values(model):
    params, tokens, mask = model
    src = stream.ModelActivations(params, CFG, tokens, "head_out", 1, separator=1, rows_per_chunk=4,
                                  attn_mask=mask)
    assert (src.d_in, src.d_out) == (CFG.n_heads * CFG.d_head, 0)
    _, cache = transformer.forward(params, CFG, tokens, mask, collect=("head_out",))
    z = np.asarray(cache["head_out"][1]).reshape(6, 10, -1)
    keep = (mask > 0) & (tokens != 1)
    got = np.concatenate([src.chunk(0), src.chunk(1), src.chunk(2)])   # 12 rows: two epochs of 6
    assert len(got) == 2 * keep.sum()
    want = np.sort(z[keep], axis=0)
    np.testing.assert_allclose(np.sort(got[:len(got) // 2], axis=0), want, rtol=1e-4, atol=2e-5)
    np.testing.assert_allclose(np.sort(got[len(got) // 2:], axis=0), want, rtol=1e-4, atol=2e-5)
    # the buffer serves shuffled rows of the source, refilling its served half
    buf = stream.Buffer(src, size=40, batch=10, seed=3)
    state = buf.init()
    served = []
    for _ in range(5):
        batch, state = buf.next(state)
        served.append(batch)
    assert state.counters.tolist() == [10, int(state.counters[1]), 3]
    rows = {r.tobytes() for i in range(int(state.counters[1])) for r in src.chunk(i)}
    assert all(r.tobytes() in rows for r in np.concatenate(served))
    with pytest.raises(ValueError, match="two batches"):
        stream.Buffer(src, size=15, batch=10)
    with pytest.raises(ValueError, match="unknown dictionary host 'resid'"):
        stream.ModelActivations(params, CFG, tokens, "resid", 1, separator=1)


@pytest.mark.skipif("mlp_in" not in sites.CACHE_SITES, reason="'mlp_in' is not a cache entry yet (the splice adds it)")
def test_streamed_transcoder_pairs(model):
    params, tokens, mask = model
    src = stream.ModelActivations(params, CFG, tokens, "transcoder", 0, separator=1, rows_per_chunk=6, attn_mask=mask)
    _, cache = transformer.forward(params, CFG, tokens, mask, collect=("mlp_in", "mlp_out"))
    keep = (mask > 0) & (tokens != 1)
    want = np.concatenate([np.asarray(cache[s][0])[keep] for s in ("mlp_in", "mlp_out")], axis=-1)
    np.testing.assert_allclose(np.sort(src.chunk(0), axis=0), np.sort(want, axis=0), rtol=1e-4, atol=2e-5)


def test_transcoder_learns_a_sparse_map():
    """Pairs (x, y = relu(x A) B): a transcoder reads x and writes y."""
    rng = np.random.default_rng(1)
    x = worker.planted(n=8000)[1]
    y = np.maximum(x @ rng.normal(size=(16, 24)), 0) @ rng.normal(size=(24, 8)) / 8
    o = train.Options(kind="topk", width=48, k=8, lr=3e-3, steps=600, batch=256, buffer=4096, checkpoint_every=600,
                      devices=1)
    out = train.train(stream.ArraySource(np.concatenate([x, y], 1), 16), o)
    assert (out.config.d_in, out.config.out_dim) == (16, 8)
    assert evaluate.metrics(out.config, out.params, np.concatenate([x, y], 1)[:2000]).explained_variance > 0.8


def test_metrics_by_hand():
    dc = core.DictConfig("relu", 2, 2)
    p = {"w_enc": jnp.eye(2), "b_enc": jnp.array([0.0, -1.0]), "w_dec": jnp.eye(2), "b_dec": jnp.zeros(2)}
    acts = np.array([[1.0, 0.5], [3.0, 2.0]], np.float32)      # f = [[1, 0], [3, 1]]; y_hat = [[1, 0], [3, 1]]
    m = evaluate.metrics(dc, p, acts)
    assert m.l0 == 1.5 and m.dead_fraction == 0.0
    np.testing.assert_allclose(m.mse, (0.25 + 1) / 2)
    np.testing.assert_allclose(m.explained_variance, 1 - 1.25 / (1 + 1 + 0.5625 + 0.5625), rtol=1e-6)
    assert evaluate.metrics(dc, p, acts[:1]).dead_fraction == 0.5
    with pytest.raises(ValueError, match=r"acts must be \[N, 2\]"):
        evaluate.metrics(dc, p, acts[:, :1])
    assert evaluate.ce_loss_recovered(2.0, 2.5, 4.0) == 0.75
    with pytest.raises(ValueError, match="ablated == clean"):
        evaluate.ce_loss_recovered(2.0, 2.5, 2.0)
    with pytest.raises(ValueError, match="spliced"):
        evaluate.ce_loss_recovered(2.0, float("nan"), 3.0)


def test_ce_losses_against_a_zeroed_mlp(model):
    """Zero-ablating mlp_out of layer 1 equals the model with that layer's down projection zeroed;
    the clean loss is the hand-computed next-token cross-entropy."""
    params, tokens, mask = model
    d = core.Dictionary(core.DictConfig("relu", CFG.d_model, 8), core.init(core.DictConfig("relu", CFG.d_model, 8),
                                                                          jax.random.PRNGKey(0)), "mlp_out", 1)
    seen = []
    out = evaluate.ce_losses(params, CFG, d, tokens, lambda t, m: seen.append(t.shape) or 3.5, mask, separator=1)
    logits = np.asarray(transformer.forward(params, CFG, tokens, mask)[0], np.float64)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    nll = [-logp[b, t, tokens[b, t + 1]] for b in range(6) for t in range(9)
           if mask[b, t] and mask[b, t + 1] and tokens[b, t + 1] != 1]
    np.testing.assert_allclose(out.clean, np.mean(nll), rtol=1e-5)
    zeroed = jax.tree.map(lambda a: a, params)
    zeroed["layers"]["down"]["w"] = params["layers"]["down"]["w"].at[1].set(0)
    want = evaluate.next_token_loss(transformer.forward(zeroed, CFG, tokens, mask)[0], tokens, mask, 1)
    np.testing.assert_allclose(out.ablated, want, rtol=1e-5)
    assert seen == [(6, 10)] and out.spliced == 3.5
    np.testing.assert_allclose(out.recovered, (out.ablated - 3.5) / (out.ablated - out.clean))
    assert evaluate.ce_losses(params, CFG, d, tokens, out.clean, mask, separator=1).recovered == 1.0
    # Spliced by default (without its error): a dictionary writing 0 is the ablation; one reconstructing
    # x exactly (relu(x) - relu(-x) through features [I, -I]) is the clean run.
    D = CFG.d_model
    dc = core.DictConfig("relu", D, 2 * D)
    zero = core.Dictionary(dc, jax.tree.map(jnp.zeros_like, core.init(dc, jax.random.PRNGKey(0))), "mlp_out", 1)
    np.testing.assert_allclose(evaluate.ce_losses(params, CFG, zero, tokens, attn_mask=mask, separator=1).spliced,
                               out.ablated, rtol=1e-6)
    eye = jnp.concatenate([jnp.eye(D), -jnp.eye(D)], 1)
    exact = core.Dictionary(dc, {"w_enc": eye, "b_enc": jnp.zeros(2 * D), "w_dec": eye.T, "b_dec": jnp.zeros(D)},
                            "mlp_out", 1)
    np.testing.assert_allclose(evaluate.ce_losses(params, CFG, exact, tokens, attn_mask=mask, separator=1).spliced,
                               out.clean, rtol=1e-5)


def test_top_contexts_and_their_page(model, tmp_path):
    params, tokens, mask = model
    src = stream.ModelActivations(params, CFG, tokens, "resid_pre", 1, separator=1, rows_per_chunk=4, attn_mask=mask)
    dc = core.DictConfig("relu", CFG.d_model, 6)
    d = core.Dictionary(dc, core.init(dc, jax.random.PRNGKey(1)), "resid_pre", 1)
    tops = evaluate.top_contexts(src, d, [0, 3], k=3, before=2, after=1)
    acts, keep = src.run(np.arange(6))
    f = np.where(keep[..., None], np.asarray(core.encode(dc, d.params, acts)), 0)
    for feat, ctxs in tops.items():
        want = np.sort(f[..., feat].ravel())[::-1][:3]
        np.testing.assert_allclose([c.value for c in ctxs], want[want > 0], rtol=1e-5)
        for c in ctxs:
            assert keep[c.row, c.pos] and c.acts[c.focus] == pytest.approx(c.value)
            np.testing.assert_array_equal(c.tokens, tokens[c.row, max(0, c.pos - 2):c.pos + 2])
    page = viz.feature_contexts_html(tops, lambda i: f"<t{i}>", str(tmp_path / "f.html"))
    assert page.count("class='ctx'") == sum(map(len, tops.values()))
    assert "&lt;t" in page and not re.search(r"<t\d", page)
    assert (tmp_path / "f.html").read_text() == page
    with pytest.raises(ValueError, match="does not read the source"):
        evaluate.top_contexts(src, core.Dictionary(dc, d.params, "resid_pre", 0), [0])


@pytest.mark.parametrize("kw,match", [
    (dict(kind="bad", width=4), "kind='bad'"),
    (dict(kind="relu", width=4, k=2), "k .active features. is set for kind 'topk' only"),
    (dict(kind="topk", width=4), "k .active features. is set for kind 'topk' only"),
    (dict(kind="topk", width=4, k=5), "k=5 active features exceed width=4"),
    (dict(kind="relu", width=4, lr=0), "lr=0: expected a number > 0"),
    (dict(kind="relu", width=4, batch=64, buffer=100), "buffer=100 must hold at least two batches"),
    (dict(kind="relu", width=0), "width"),
    (dict(kind="relu", width=4, sparsity=-1), "sparsity"),
    (dict(kind="relu", width=4, steps=10, warmup=9, decay=0.2), "overlap"),
])
def test_bad_options_are_clear_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        train.Options(**kw)


def test_bad_sources_are_clear_errors():
    o = train.Options(kind="relu", width=4, batch=2, buffer=4)
    with pytest.raises(ValueError, match="source must be a `stream` source"):
        train.train(np.zeros((4, 2)), o)
    with pytest.raises(ValueError, match="data must be a finite float array"):
        stream.ArraySource(np.full((4, 2), np.nan), 2)
    with pytest.raises(ValueError, match="devices=64: only"):
        train.train(stream.ArraySource(np.ones((4, 2)), 2), train.Options(kind="relu", width=4, batch=64, buffer=128,
                                                                         devices=64))


@pytest.fixture(scope="module")
def corpus_texts():
    try:
        return corpus.texts()
    except RuntimeError as e:
        pytest.skip(str(e))


def test_corpus_is_english_prose_in_token_rows(corpus_texts):
    from jaxcircuits.weights.tokenize import load_tokenizer
    assert len(corpus_texts) == 10033
    assert sum(map(len, corpus_texts)) > 4_500_000
    assert "Eiffel Tower" in " ".join(corpus_texts[:2000] + corpus_texts[2000:])
    tok = load_tokenizer(SMOLLM2_GGUF)
    docs = corpus_texts[:20]
    rows = corpus.token_rows(tok, docs, 64)
    ids = [i for d in docs for i in [tok.bos_token_id, *tok.encode(d, add_special_tokens=False)]]
    assert rows.shape == (len(ids) // 63, 64) and rows.dtype == np.int32
    assert (rows[:, 0] == tok.bos_token_id).all()
    np.testing.assert_array_equal(rows[:, 1:].ravel(), ids[:rows.shape[0] * 63])
    with pytest.raises(ValueError, match="fill no row"):
        corpus.token_rows(tok, ["Hi."], 64)
