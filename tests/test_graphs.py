"""Attribution graphs (`methods.graphs`) on tiny models with random transcoders.

References: the real model (the replacement reproduces its logits), the replacement model itself with
one node zeroed (edges are its exact differences: it is affine in the nodes), the sum over all nodes
(completeness), causality (no edge from a later layer or position), the uncapped graph (a capped
graph's rows are its rows), hand computations (logit targets, influence as a matrix inverse, pruning,
the demeaned logit), and circuit-tracer's field names for the graph files.
"""

import json

import jax.numpy as jnp
import numpy as np
import pytest

from jaxcircuits.dictionaries import splice
from jaxcircuits.interventions.metrics import DemeanedLogit
from jaxcircuits.methods import graphs as G
from jaxcircuits.models.transformer import forward, logits_of
from tests.conftest import random_tokens
from tests.test_dictionary_splice import _dictionaries

T = 7


def _model(tiny, name, layers=(0, 1), kind="relu", skip=True):
    _, cfg, params = tiny(name)
    dicts = _dictionaries(cfg, "transcoder", kind, layers)
    if not skip:
        import dataclasses
        dc = dataclasses.replace(dicts[0].config, skip=False)
        dicts = [dataclasses.replace(d, config=dc, params={k: v for k, v in d.params.items() if k != "w_skip"})
                 for d in dicts]
    return params, cfg, splice.attach(params, cfg, dicts)


@pytest.fixture(scope="module")
def built(tiny):
    """{name: (plain params, plain cfg, (spliced params, cfg), tokens, graph, replacement)}."""
    out = {}
    for name, layers, kind, skip in (("gpt2", (0, 1), "relu", True), ("llama_gqa", (0, 2), "jumprelu", False)):
        params, cfg, (p2, c2) = _model(tiny, name, layers, kind, skip)
        tokens = random_tokens(1, 1, T)[0]
        out[name] = (params, cfg, (p2, c2), tokens, G.attribute(p2, c2, tokens, batch_size=16),
                     G.local_replacement(p2, c2, tokens))
    return out


NAMES = ("gpt2", "llama_gqa")


@pytest.mark.parametrize("name", NAMES)
def test_replacement_reproduces_the_models_logits(built, name):
    params, cfg, _, tokens, _, rep = built[name]
    real = np.asarray(forward(params, cfg, tokens[None])[0])[0, -1]
    _, h = G.replacement_outputs(rep, rep.acts, rep.errors, rep.embeds)
    np.testing.assert_allclose(np.asarray(logits_of(rep.params, h)), real, atol=1e-4)
    assert np.asarray(rep.acts).any() and np.abs(np.asarray(rep.errors)).max() > 1e-3


def _targets(rep, graph, acts, errors, embeds):
    """The graph's target values [S + n] of the replacement with the given nodes."""
    pre, lg = G.replacement_targets(rep, jnp.asarray(acts), jnp.asarray(errors), jnp.asarray(embeds),
                                    G.logit_vectors(rep.params, graph.logit_ids))
    l, p, f = graph.features.T
    return np.concatenate([np.asarray(pre)[l, p, f], np.asarray(lg)])


def _rows(graph):
    o = graph.offsets()
    return np.concatenate([graph.adjacency[o["features"]], graph.adjacency[o["logits"]]])


@pytest.mark.parametrize("name", NAMES)
def test_edges_are_the_replacements_exact_differences(built, name):
    """Zeroing one source node in the replacement (affine in its nodes) moves every target by exactly
    that source's column: a feature, an error node, a token."""
    *_, graph, rep = built[name]
    acts, errors, embeds = (np.array(a) for a in (rep.acts, rep.errors, rep.embeds))
    base, rows, o = _targets(rep, graph, acts, errors, embeds), _rows(graph), graph.offsets()
    L = graph.n_layers
    for s in (0, len(graph.features) // 2, len(graph.features) - 1):
        a = acts.copy()
        a[tuple(graph.features[s])] = 0
        np.testing.assert_allclose(base - _targets(rep, graph, a, errors, embeds), rows[:, s], atol=1e-4)
    for l, p in ((0, 3), (L - 2, T - 1)):
        e = errors.copy()
        e[l, p] = 0
        np.testing.assert_allclose(base - _targets(rep, graph, acts, e, embeds), rows[:, o["errors"].start + l * T + p],
                                   atol=1e-4)
    x = embeds.copy()
    x[2] = 0
    np.testing.assert_allclose(base - _targets(rep, graph, acts, errors, x), rows[:, o["tokens"].start + 2], atol=1e-4)


@pytest.mark.parametrize("name", NAMES)
def test_edges_into_a_target_sum_to_its_value_less_the_nodeless_replacement(built, name):
    """Completeness: every node zeroed (position 0 keeps its activations and error: no nodes there)."""
    *_, graph, rep = built[name]
    acts, errors = np.array(rep.acts), np.array(rep.errors)
    base = _targets(rep, graph, acts, errors, rep.embeds)
    acts[:, G.ZERO_POSITIONS:] = 0
    errors[:, G.ZERO_POSITIONS:] = 0
    none = _targets(rep, graph, acts, errors, np.zeros_like(rep.embeds))
    assert graph.n_active == len(graph.features) > 10
    np.testing.assert_allclose(_rows(graph).sum(1), base - none, atol=2e-4)


@pytest.mark.parametrize("name", NAMES)
def test_edges_respect_layers_and_positions(built, name):
    """No edge from a feature or error node at a layer >= the target feature's, or at a later position;
    no edge out of a position-0 error node; logit nodes read the last position."""
    *_, graph, _ = built[name]
    o, A, T_ = graph.offsets(), graph.adjacency, graph.n_pos
    S, L = len(graph.features), graph.n_layers
    err = np.array([(l, p) for l in range(L) for p in range(T_)])
    src = np.concatenate([graph.features[:, :2], err, np.stack([np.full(T_, -1), np.arange(T_)], 1)])
    lt, pt = graph.features[:, 0][:, None], graph.features[:, 1][:, None]
    allowed = (src[None, :, 0] < lt) & (src[None, :, 1] <= pt)
    assert not A[:S, :len(src)][~allowed].any() and A[:S, :len(src)][allowed].any()
    assert not A[:, o["errors"]][:, err[:, 1] == 0].any()
    assert not A[o["errors"].start:o["logits"].start].any() and not A[:, o["logits"]].any()


def test_a_capped_graph_holds_the_uncapped_graphs_rows(built):
    """max_feature_nodes: the chosen features' rows and the logit rows equal the full graph's on the
    kept columns; the chosen ones are influential by the full graph's own influence."""
    _, _, (p2, c2), tokens, full, _ = built["gpt2"]
    k = 8
    capped = G.attribute(p2, c2, tokens, max_feature_nodes=k, batch_size=4, update_interval=1)
    assert len(capped.features) == k and capped.n_active == full.n_active
    idx = [int(np.flatnonzero((full.features == f).all(1))[0]) for f in capped.features]
    fo, co = full.offsets(), capped.offsets()
    cols = np.concatenate([idx, np.arange(fo["errors"].start, len(full.adjacency))])
    rows = np.concatenate([idx, np.arange(fo["logits"].start, len(full.adjacency))])
    keep = np.concatenate([np.arange(k), np.arange(co["logits"].start, len(capped.adjacency))])
    np.testing.assert_allclose(capped.adjacency[keep], full.adjacency[np.ix_(rows, cols)], atol=1e-5)
    infl = G.influence(full)[fo["features"]]
    assert np.median(infl[idx]) > np.median(infl)


def test_logit_targets_take_the_fewest_tokens_reaching_the_probability():
    logits = np.log(np.array([0.05, 0.5, 0.3, 0.15]))
    ids, probs = G.logit_targets(logits, max_n_logits=10, desired_logit_prob=0.8)
    assert ids.tolist() == [1, 2] and np.allclose(probs, [0.5, 0.3])
    assert G.logit_targets(logits, max_n_logits=3, desired_logit_prob=0.99)[0].tolist() == [1, 2, 3]
    assert G.logit_targets(logits, max_n_logits=1, desired_logit_prob=0.99)[0].tolist() == [1]
    with pytest.raises(ValueError, match="desired_logit_prob"):
        G.logit_targets(logits, desired_logit_prob=0)


def test_influence_is_the_normalised_matrix_series():
    """w N (I - N)^-1 - w... : the series w (N + N^2 + ...) on a random DAG, by a matrix inverse."""
    rng = np.random.RandomState(0)
    n = 9
    A = np.tril(rng.randn(n, n), -1) * (rng.rand(n, n) < 0.6)
    N = G.normalized(A)
    w = np.zeros(n)
    w[-2:] = [0.7, 0.2]
    want = w @ N @ np.linalg.inv(np.eye(n) - N)
    np.testing.assert_allclose(G.partial_influence(A, np.arange(n), w[np.arange(n)]), want, atol=1e-12)
    np.testing.assert_allclose(N.sum(1)[np.abs(A).sum(1) > 0], 1)


def _toy_graph():
    """features f0 (layer 0), f1 (layer 1); 1 layer x 2 positions of error nodes; 2 tokens; 1 logit.
    Node order: f0 f1 e00 e01 t0 t1 logit."""
    A = np.zeros((7, 7), np.float32)
    A[1, 0] = 2.0                          # f0 -> f1
    A[1, 4] = 0.01                         # t0 -> f1, tiny
    A[0, 5] = 1.0                          # t1 -> f0
    A[6, 1] = 3.0                          # f1 -> logit
    A[6, 3] = 0.02                         # e01 -> logit, tiny
    A[6, 5] = 1.0                          # t1 -> logit
    return G.Graph(np.array([5, 6]), np.array([[0, 1, 3], [0, 1, 4]]), np.array([1.0, 2.0], np.float32),
                   np.array([9]), np.array([0.9], np.float32), A, 1, 2)


def test_prune_keeps_the_influential_paths_by_hand():
    """Influence on the logit (weight 0.9): f1 0.9*3/4.02, e01 0.9*0.02/4.02, t1 direct 0.9/4.02 plus via
    f1 and f0; f0 via f1. At node threshold 0.8 the error node (tiny) goes, f0 and f1 stay; the tiny
    token edge goes at edge threshold 0.98; tokens and logits always stay."""
    g = _toy_graph()
    infl = G.influence(g)
    n1 = 0.9 * 3 / 4.02
    np.testing.assert_allclose(infl[[1, 3]], [n1, 0.9 * 0.02 / 4.02], rtol=1e-6)
    np.testing.assert_allclose(infl[0], n1 * 2 / 2.01, rtol=1e-6)
    pr = G.prune(g, 0.8, 0.98)
    assert pr.node_mask.tolist() == [True, True, False, False, True, True, True]
    assert not pr.edge_mask[1, 4] and pr.edge_mask[1, 0] and pr.edge_mask[6, 1] and not pr.edge_mask[6, 3]
    assert pr.cumulative.max() == pytest.approx(1.0) and pr.cumulative[1] < pr.cumulative[3]
    with pytest.raises(ValueError, match="node_threshold"):
        G.prune(g, 1.5)


def test_graph_files_have_circuit_tracers_fields(built, tmp_path):
    *_, graph, _ = built["gpt2"]
    pr = G.prune(graph, 1.0, 1.0)                 # random transcoders: keep everything with influence
    path = G.write_graph_files(graph, pr, lambda t: f"<{t}>", str(tmp_path), "tiny-gpt2", "tiny", 0.8)
    G.write_graph_files(graph, pr, lambda t: f"<{t}>", str(tmp_path), "tiny-gpt2", "tiny", 0.8)
    data = json.loads(open(path).read())
    assert set(data) == {"metadata", "qParams", "nodes", "links"}
    fields = {"node_id", "feature", "layer", "ctx_idx", "feature_type", "token_prob", "is_target_logit", "run_idx",
              "reverse_ctx_idx", "jsNodeId", "clerp", "influence", "activation"}
    assert all(set(n) == fields for n in data["nodes"])
    ids = {n["node_id"] for n in data["nodes"]}
    assert data["links"] and all(l["source"] in ids and l["target"] in ids for l in data["links"])
    kinds = [n["feature_type"] for n in data["nodes"]]
    assert kinds.count("embedding") == T and kinds.count("logit") == len(graph.logit_ids)
    logit = [n for n in data["nodes"] if n["feature_type"] == "logit"]
    assert logit[0]["is_target_logit"] and not any(n["is_target_logit"] for n in logit[1:])
    assert logit[0]["node_id"] == f"{graph.n_layers + 1}_{graph.logit_ids[0]}_{T - 1}"
    feat = next(n for n in data["nodes"] if n["feature_type"] == "cross layer transcoder")
    l, f, p = map(int, feat["node_id"].split("_"))
    assert feat["feature"] == (l + f) * (l + f + 1) // 2 + f and feat["ctx_idx"] == p
    assert data["metadata"]["prompt_tokens"] == [f"<{t}>" for t in graph.tokens.tolist()]
    index = json.loads(open(tmp_path / "graph-metadata.json").read())
    assert [g["slug"] for g in index["graphs"]] == ["tiny-gpt2"]


@pytest.mark.parametrize("name", NAMES)
def test_direct_predictions_are_the_replacements_response(built, name):
    """predicted_effects without feature responses: zeroing a set of features moves each logit node by
    the replacement's own difference; with responses it differs only through feature -> feature edges."""
    *_, graph, rep = built[name]
    acts = np.array(rep.acts)
    chosen = np.arange(0, len(graph.features), 3)
    acts[tuple(graph.features[chosen].T)] = 0
    n = len(graph.logit_ids)
    want = (_targets(rep, graph, rep.acts, rep.errors, rep.embeds) - _targets(rep, graph, acts, rep.errors, rep.embeds))[-n:]
    deltas = np.zeros(len(graph.features))
    deltas[chosen] = -graph.activations[chosen]
    np.testing.assert_allclose(G.predicted_effects(graph, deltas, through_features=False)[0], -want, atol=1e-4)
    assert not np.allclose(G.predicted_effects(graph, deltas)[0], -want, atol=1e-4)


def test_demeaned_logit_by_hand(built):
    params, cfg, _, tokens, graph, _ = built["gpt2"]
    logits = np.asarray(forward(params, cfg, tokens[None])[0])[0, -1]
    h = forward(params, cfg, tokens[None], return_logits=False, collect=("final_norm",))[1]["final_norm"]
    v = int(graph.logit_ids[0])
    got = DemeanedLogit(jnp.asarray([[v]], jnp.int32))(params, h)
    np.testing.assert_allclose(np.asarray(got), [logits[v] - logits.mean()], atol=1e-4)


def test_bad_inputs_are_refused(tiny):
    params, cfg, (p2, c2) = _model(tiny, "gpt2")
    with pytest.raises(ValueError, match="transcoders spliced"):
        G.attribute(params, cfg, random_tokens(0, 1, T)[0])
    sp, sc = splice.attach(params, cfg, _dictionaries(cfg, "mlp_out", "relu", (0,)))
    with pytest.raises(ValueError, match="'mlp_out' dictionaries"):
        G.local_replacement(sp, sc, random_tokens(0, 1, T)[0])
    with pytest.raises(ValueError, match="one prompt"):
        G.attribute(p2, c2, random_tokens(0, 2, T))
    with pytest.raises(ValueError, match="position"):
        G.attribute(p2, c2, random_tokens(0, 1, 1)[0])
    with pytest.raises(ValueError, match="max_feature_nodes"):
        G.attribute(p2, c2, random_tokens(0, 1, T)[0], max_feature_nodes=-1)


def test_node_order_matches_nodes_by_key():
    g = _toy_graph()
    keys = g.node_keys()
    assert keys[:2] == [("feature", 0, 1, 3), ("feature", 0, 1, 4)] and keys[2:4] == [("error", 0, 0), ("error", 0, 1)]
    assert keys[4:] == [("token", 0), ("token", 1), ("logit", 9)]
    perm = np.array([6, 0, 3, 1, 5, 2, 4])
    np.testing.assert_array_equal(G.node_order(g, [keys[i] for i in perm]), perm)
    with pytest.raises(ValueError, match="1 not in this graph"):
        G.node_order(g, keys[:-1] + [("logit", 8)])


def test_rows_over_position_prefixes_are_exact(tiny):
    """A longer prompt (19 positions): batches of targets at early positions run backwards over a
    prefix of a multiple of 3 positions (3, 12, ...); their rows still sum to the replacement's own difference."""
    _, _, (p2, c2) = _model(tiny, "gpt2")
    tokens = random_tokens(2, 1, 19)[0]
    graph, rep = G.attribute(p2, c2, tokens, batch_size=8), G.local_replacement(p2, c2, tokens)
    assert G._prefix_len(int(graph.features[0, 1]), 19) == 3 and G._prefix_len(9, 19) == 12
    acts, errors = np.array(rep.acts), np.array(rep.errors)
    base = _targets(rep, graph, acts, errors, rep.embeds)
    acts[:, G.ZERO_POSITIONS:] = 0
    errors[:, G.ZERO_POSITIONS:] = 0
    none = _targets(rep, graph, acts, errors, np.zeros_like(rep.embeds))
    np.testing.assert_allclose(_rows(graph).sum(1), base - none, atol=2e-4)
