"""The edge site: a receiver-by-receiver reference, node-level equivalence, bit identity, checks."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcircuits.engine.patching import patched_hidden, patched_metric, run_masks
from jaxcircuits.interventions import edges, sites
from jaxcircuits.interventions.metrics import LogitDiff
from jaxcircuits.interventions.problem import PatchingProblem, target_run
from jaxcircuits.interventions.sites import Mask
from jaxcircuits.models import transformer as M
from jaxcircuits.models.block import LayerIO
from tests.conftest import random_tokens

B, T = 2, 7


def _problem(tiny, name, pos_w=None, n_positions=T):
    _, cfg, params = tiny(name)
    return _problem_of(cfg, params, pos_w, n_positions)


def _problem_of(cfg, params, pos_w=None, n_positions=T):
    tgt, src = random_tokens(1, B, T), random_tokens(2, B, T)
    _, cache = M.run_with_cache(params, cfg, src, sites=sites.EDGE_SOURCE)
    metric = LogitDiff(good=jnp.array([[5], [6]]), bad=jnp.array([[7], [8]]), n_positions=n_positions)
    pos_w = np.ones((B, T), np.float32) if pos_w is None else pos_w
    return cfg, params, PatchingProblem.make(target_run(params, cfg, tgt), cache, pos_w, metric)


def _reference(params, cfg, problem, mask):
    """The edge-patched run receiver by receiver: lists of sender outputs of this run and of the source,
    each receiver's input summed from them with its own weights (float32 [B, T, D], final-normed)."""
    tgt, src = problem.target, problem.source
    w = np.asarray(problem.pos_w)[..., None]
    x = M.embed(params, cfg, tgt.tokens, tgt.pos_ids)
    cur, source = [x], [src["resid_pre"][0]]
    H, K, n_g = cfg.n_heads, cfg.n_kv_heads, cfg.n_groups
    allowed = M.attention_mask(tgt.attn_mask, T)
    read = lambda m_r: x + sum(m_r[s] * w * (source[s] - cur[s]) for s in range(len(cur)))
    for l in range(cfg.n_layers):
        p = jax.tree.map(lambda a: a[l], params["layers"])
        m = mask.layers[l]
        proj = lambda name, r, u: M.dense(jax.tree.map(lambda a: a[:, u] if a.ndim == 3 else a[u], p[name]),
                                          M.norm(cfg, p["norm1"], read(m[:, r])), "btd,de->bte")
        q = jnp.stack([proj("q", h, h) for h in range(H)], 2)
        k = jnp.stack([proj("k", H + g, g) for g in range(K)], 2)
        v = jnp.stack([proj("v", H + K + g, g) for g in range(K)], 2)
        rope = M.rope_tables(cfg, tgt.pos_ids, l)
        z = M.attend(cfg, M.rotate(q, rope), M.rotate(k, rope), v, allowed, LayerIO())
        outs = [z[:, :, h] @ p["o"]["w"][h] for h in range(H)]
        x = x + sum(outs) + p["o"].get("b", 0.0)
        cur += outs
        source += [src["head_out"][l][:, :, h] @ p["o"]["w"][h] for h in range(H)]
        out = M.mlp(cfg, p, read(m[:, -1]), LayerIO())
        x = x + out
        cur.append(out)
        source.append(src["mlp_out"][l])
        assert n_g * K == H
    return M.final_norm(params, cfg, read(mask.final))


def _prepared(cfg, problem):
    """The problem cut to what every edge reads (as `patched_metric` does)."""
    return problem.for_footprint(cfg, sites.footprint(sites.every_unit(cfg, "edges")))


def _hidden(params, cfg, problem, mask):
    """Final-normed hidden states of the edge-patched run of `mask` (an `EdgeMask`)."""
    return patched_hidden(params, cfg, problem, Mask(edges=mask))


def _metric(params, cfg, problem, mask):
    """The metric of the edge-patched run of `mask` (an `EdgeMask`)."""
    return patched_metric(params, cfg, problem, Mask(edges=mask))


def test_two_layer_model_matches_the_reference(tiny_dir):
    """The 2-layer GQA Llama of `tiny_dir` (4 heads, 2 KV heads): every edge kind at once, by hand."""
    from jaxcircuits.weights.hf import load_hf_dir
    cfg, params = load_hf_dir(tiny_dir)
    params = jax.tree.map(jnp.asarray, params)
    cfg, params, problem = _problem_of(cfg, params)
    graph = edges.EdgeGraph.of(cfg)
    assert cfg.n_layers == 2 and graph.n_edges == len(graph.edges)
    mask = _random_mask(graph, 7, density=0.6)
    got = _hidden(params, cfg, _prepared(cfg, problem), mask)
    np.testing.assert_allclose(got, _reference(params, cfg, problem, mask), atol=2e-5)
    plain = _hidden(params, cfg, _prepared(cfg, problem), graph.unflat(jnp.zeros(graph.n_edges)))
    assert np.abs(np.asarray(got) - np.asarray(plain)).max() > 1e-2


def _random_mask(graph, seed, density=0.3):
    rng = np.random.RandomState(seed)
    vec = rng.uniform(0, 1, graph.n_edges) * (rng.uniform(0, 1, graph.n_edges) < density)
    return graph.unflat(jnp.asarray(vec, jnp.float32))


@pytest.mark.parametrize("name", ["gpt2", "llama_gqa"])
def test_matches_receiver_by_receiver_reference(tiny, name):
    pos_w = np.random.RandomState(3).uniform(0, 1, (B, T)).astype(np.float32)
    cfg, params, problem = _problem(tiny, name, pos_w)
    graph = edges.EdgeGraph.of(cfg)
    for seed in range(2):
        mask = _random_mask(graph, seed)
        got = _hidden(params, cfg, _prepared(cfg, problem), mask)
        want = _reference(params, cfg, problem, mask)
        np.testing.assert_allclose(got, want, atol=2e-5)
        assert np.abs(np.asarray(want) - np.asarray(_reference(params, cfg, problem, graph.unflat(
            jnp.zeros(graph.n_edges))))).max() > 1e-2


@pytest.mark.parametrize("name", ["gpt2", "llama_gqa"])
def test_zero_mask_is_bitwise_the_plain_run(tiny, name):
    cfg, params, problem = _problem(tiny, name)
    graph = edges.EdgeGraph.of(cfg)
    zero = graph.unflat(jnp.zeros(graph.n_edges))
    got = jax.jit(_hidden, static_argnames="cfg")(params, cfg, _prepared(cfg, problem), zero)
    _, cache = M.forward(params, cfg, problem.target.tokens, collect=("final_norm",), return_logits=False)
    np.testing.assert_array_equal(got, cache["final_norm"])


@pytest.mark.parametrize("name", ["gpt2", "llama_gqa"])
@pytest.mark.parametrize("where", ["all", "last"])
def test_every_edge_out_of_a_node_is_the_node_patch(tiny, name, where):
    pos_w = np.ones((B, T), np.float32) if where == "all" else np.eye(T, dtype=np.float32)[[-1, -1]]
    cfg, params, problem = _problem(tiny, name, pos_w, n_positions=1)
    graph = edges.EdgeGraph.of(cfg)
    L, H = cfg.n_layers, cfg.n_heads
    nodes = {"L0H1": Mask(head_out=jnp.zeros((L, H)).at[0, 1].set(1.0)),
             "L1H2": Mask(head_out=jnp.zeros((L, H)).at[1, 2].set(1.0)),
             "L1MLP": Mask(mlp_out=jnp.zeros(L).at[1].set(1.0)),
             "embed": Mask(resid_pre=jnp.zeros(L).at[0].set(1.0))}
    everything = list(graph.receiver_labels)
    for sender, node in nodes.items():
        got = _metric(params, cfg, problem, graph.path_mask([sender], everything))
        want = patched_metric(params, cfg, problem, node)
        np.testing.assert_allclose(got, want, atol=2e-5, err_msg=sender)
    both = graph.path_mask(["L0H1", "L1H2"], everything)
    want = patched_metric(params, cfg, problem, Mask(head_out=jnp.zeros((L, H)).at[0, 1].set(1.0).at[1, 2].set(1.0)))
    np.testing.assert_allclose(_metric(params, cfg, problem, both), want, atol=2e-5)


def test_batch_equals_loop_and_path_masks(tiny):
    cfg, params, problem = _problem(tiny, "llama_gqa")
    graph = edges.EdgeGraph.of(cfg)
    senders, receivers = ["L0H0", "L0H3", "L0MLP", "L1H5"], ["L2H1", "logits"]
    subsets = np.array([[0, 0, 0, 0], [1, 0, 0, 0], [1, 1, 0, 1], [1, 1, 1, 1], [0, 0, 1, 0]], bool)
    masks = edges.path_masks(graph, senders, receivers, subsets)
    got = run_masks(params, cfg, problem, Mask(edges=masks), chunk_size=2)
    chex.assert_shape(got, (len(subsets), B))
    for i, row in enumerate(subsets):
        one = graph.path_mask([s for s, on in zip(senders, row) if on], receivers)
        np.testing.assert_allclose(got[i], _metric(params, cfg, problem, one), atol=1e-5)
    np.testing.assert_allclose(got[0], got[0] * 0 + np.asarray(_metric(
        params, cfg, problem, graph.unflat(jnp.zeros(graph.n_edges)))), atol=0)


def test_graph_labels_flat_and_valid(tiny):
    _, cfg, _ = tiny("llama_gqa")
    g = edges.EdgeGraph.of(cfg)
    L, H, K = cfg.n_layers, cfg.n_heads, cfg.n_kv_heads
    assert g.n_senders == 1 + L * (H + 1) and g.n_receivers == H + 2 * K + 1
    # Attention receivers of layer l read the L*(H+1) senders before it plus embed; the MLP also its own heads.
    per_layer = [(1 + l * (H + 1)) * (H + 2 * K) + 1 + l * (H + 1) + H for l in range(L)]
    assert g.n_edges == sum(per_layer) + g.n_senders == len(g.edges)
    assert ("L0H3", "L0MLP") in g.edges and ("L0MLP", "L0MLP") not in g.edges and ("L1H0", "L1H0.q") not in g.edges
    vec = jnp.arange(g.n_edges, dtype=jnp.float32)
    chex.assert_trees_all_equal(g.flat(g.unflat(vec)), vec)
    m = g.path_mask(["L0H2"], ["L1H5"])                     # a head as receiver: its q and its KV head's k, v
    picked = {g.edges[i] for i in np.flatnonzero(np.asarray(g.flat(m)))}
    assert picked == {("L0H2", "L1H5.q"), ("L0H2", "L1K1.k"), ("L0H2", "L1K1.v")}


def test_bad_masks_and_sources_are_named(tiny):
    cfg, params, problem = _problem(tiny, "gpt2")
    g = edges.EdgeGraph.of(cfg)
    zero = g.unflat(jnp.zeros(g.n_edges))
    with pytest.raises(ValueError, match="'L1H0' does not precede receiver 'L1H0.q'"):
        _metric(params, cfg, problem, zero.replace(layers=zero.layers.at[1, g.first_sender(1), 0].set(1.0)))
    with pytest.raises(ValueError, match="outside"):
        _metric(params, cfg, problem, zero.replace(final=zero.final.at[0].set(2.0)))
    with pytest.raises(ValueError, match="expected"):
        _metric(params, cfg, problem, zero.replace(final=zero.final[1:]))
    with pytest.raises(ValueError, match="lacks \\['mlp_out'\\]"):
        src = {k: v for k, v in problem.source.items() if k != "mlp_out"}
        _metric(params, cfg, problem.replace(source=src), zero)
    with pytest.raises(ValueError, match="unknown receiver"):
        g.path_mask(["embed"], ["L9H0"])
    with pytest.raises(ValueError, match="unknown sender"):
        g.path_mask(["L0H9"], ["logits"])
    with pytest.raises(ValueError, match="subsets has shape \\(2, 3\\)"):
        edges.path_masks(g, ["embed", "L0H1"], ["logits"], np.ones((2, 3)))
    with pytest.raises(ValueError, match=f"expected {g.n_edges}"):
        g.unflat(jnp.zeros(g.n_edges - 1))
    bad = dict(problem.source, head_out=problem.source["head_out"].at[1, 0, 3, 2, 0].set(jnp.nan))
    with pytest.raises(ValueError, match="head_out"):
        _metric(params, cfg, problem.replace(source=bad), zero)


@pytest.mark.parametrize("name", ["gpt2", "llama_gqa"])
def test_mask_gradient_equals_the_reference_gradient(tiny, name):
    """The edge metric's gradient (custom VJP: receiver-input gradients x sender deltas) against reverse mode
    through the receiver-by-receiver reference, at 0 (EAP) and at a random partial mask."""
    pos_w = np.random.RandomState(4).uniform(0, 1, (B, T)).astype(np.float32)
    cfg, params, problem = _problem(tiny, name, pos_w, n_positions=1)
    graph = edges.EdgeGraph.of(cfg)
    prepared = _prepared(cfg, problem)
    want_of = jax.grad(lambda m: problem.metric(params, _reference(params, cfg, prepared, m)[:, -1:]).mean())
    got_of = jax.grad(lambda m: _metric(params, cfg, problem, m).mean())
    for mask in (graph.unflat(jnp.zeros(graph.n_edges)), _random_mask(graph, 5, density=0.5)):
        want = graph.flat(want_of(mask))
        np.testing.assert_allclose(graph.flat(got_of(mask)), want, atol=1e-5, rtol=1e-4)
        assert np.abs(np.asarray(want)).max() > 1e-2
        np.testing.assert_array_equal(np.asarray(got_of(mask).layers)[~graph.valid().layers], 0.0)
