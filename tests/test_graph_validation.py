"""Checking attribution graphs by intervention (`methods.graph_validation`) and their HTML view.

References: the local replacement model itself (direct predictions), looped single forwards with an
`Intervention` (the batched node edits), `run_masks` of the same masks (the region's sweep).
"""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcircuits.dictionaries import splice
from jaxcircuits.dictionaries.core import Dictionary
from jaxcircuits.engine.patching import run_masks
from jaxcircuits.interventions.problem import PatchingProblem
from jaxcircuits.interventions.sites import Intervention, Mask
from jaxcircuits.methods import graph_validation as V
from jaxcircuits.methods import graphs
from jaxcircuits.models.transformer import forward
from jaxcircuits.reports import viz
from tests.conftest import random_tokens
from tests.test_dictionary_splice import _dictionaries

EDITS = (V.Edit("zero"), V.Edit("scale", 2.0), V.Edit("set", 1.0))


def _without_skip(d: Dictionary) -> Dictionary:
    dc = dataclasses.replace(d.config, skip=False)
    return Dictionary(dc, {k: v for k, v in d.params.items() if k != "w_skip"}, d.host, d.layer)


@pytest.fixture(scope="module", params=["skip", "no_skip"])
def setup(tiny, request):
    """A tiny Llama with random relu transcoders on layers 0 and 2 (layer 1: its MLP an error node whole),
    with and without skip; its graph of one prompt of 6 tokens."""
    _, cfg, params = tiny("llama_mha")
    dicts = _dictionaries(cfg, "transcoder", "relu", (0, 2))
    if request.param == "no_skip":
        dicts = [_without_skip(d) for d in dicts]
    p2, c2 = splice.attach(params, cfg, dicts)
    tokens = random_tokens(0, 1, 6)[0]
    with jax.default_matmul_precision("highest"):
        graph = graphs.attribute(p2, c2, tokens, max_n_logits=3, desired_logit_prob=0.99)
    return p2, c2, tokens, graph


def test_direct_predictions_are_the_replacement_models_own_response(setup):
    """Without the features responding, the graph's prediction of an edit is exactly the change of the logit
    nodes in the local replacement model with that node's activation edited (every other node held)."""
    p2, c2, tokens, graph = setup
    rep = graphs.local_replacement(p2, c2, tokens)
    vecs = graphs.logit_vectors(rep.params, graph.logit_ids)
    base = np.asarray(graphs.replacement_targets(rep, rep.acts, rep.errors, rep.embeds, vecs)[1])
    nodes = V.top_nodes(graph, 6)
    assert len(nodes) == 6
    for edit in EDITS:
        want = []
        for i in nodes:
            l, p, f = graph.features[i]
            acts = rep.acts.at[l, p, f].set(edit.new(rep.acts[l, p, f]))
            want.append(np.asarray(graphs.replacement_targets(rep, acts, rep.errors, rep.embeds, vecs)[1]) - base)
        got = graphs.predicted_effects(graph, V.node_deltas(graph, edit, nodes), through_features=False)
        np.testing.assert_allclose(got, np.stack(want), atol=1e-4 * max(1, np.abs(base).max()))
        assert np.abs(got).max() > 1e-3


def _looped(p2, c2, graph, edit, nodes, run):
    """The top logit node's change with each node edited by a single forward of the spliced model."""
    out = []
    T = graph.n_pos
    for i in nodes:
        l, p, f = graph.features[i]
        pos_w = jnp.zeros((1, T)).at[0, p].set(1.0)
        iv = Intervention(splice.feature_mask(c2, [(l, f)]), splice.set_source(c2, 1, T, edit.new(run.features)), pos_w)
        _, c = forward(p2, c2, graph.tokens[None], intervention=iv, collect=("final_norm",), return_logits=False)
        out.append(float(run.metric(p2, c["final_norm"][:, -1:])[0]) - run.value)
    return np.asarray(out)


def test_node_effects_batched_by_position_equal_looped_forwards(setup):
    p2, c2, _, graph = setup
    run = V.real_run(p2, c2, graph)
    np.testing.assert_allclose(run.value, graphs.predicted_effects(graph, np.zeros((1, len(graph.features))))[0, 0]
                               + run.value)                       # no edit, no change
    nodes = np.concatenate([V.top_nodes(graph, 2, position=p) for p in range(1, graph.n_pos)])
    assert len(set(graph.features[nodes, 1].tolist())) > 2          # several positions, one call each
    for edit in EDITS:
        got = V.node_effects(p2, c2, graph, edit, nodes, run)
        np.testing.assert_allclose(got, _looped(p2, c2, graph, edit, nodes, run), atol=2e-5)
        assert np.abs(got).max() > 1e-3
    zero = V.node_effects(p2, c2, graph, V.Edit("zero"), nodes, run)
    pred = graphs.predicted_effects(graph, V.node_deltas(graph, V.Edit("zero"), nodes))[:, 0]
    stats = V.agreement(zero, pred, run.value)
    assert stats["n"] == len(nodes) and -1 <= stats["pearson"] <= 1 and stats["median_rel_error"] >= 0


def test_region_sweep_equals_run_masks_of_its_subsets(setup, tmp_path):
    p2, c2, _, graph = setup
    run = V.real_run(p2, c2, graph)
    nodes = V.region(graph, 3)
    assert (graph.features[nodes, 1] == graph.n_pos - 1).all()
    subsets, measured = V.region_sweep(p2, c2, graph, nodes, str(tmp_path / "region"), run)
    assert subsets.shape == (8, 3) and abs(measured[0]) < 1e-5
    masks = np.zeros((8, c2.n_layers, c2.dict_width), np.float32)
    for k, s in enumerate(subsets):
        for i in np.flatnonzero(s):
            l, _, f = graph.features[nodes[i]]
            masks[k, l, f] = 1
    zero = splice.set_source(c2, 1, graph.n_pos, 0.0)
    pos_w = np.zeros((1, graph.n_pos), np.float32)
    pos_w[0, -1] = 1
    problem = PatchingProblem.make(run.target, zero, pos_w, run.metric)
    want = run_masks(p2, c2, problem, Mask(features=masks))[:, 0] - run.value
    np.testing.assert_allclose(measured, want, atol=2e-5)
    singles = V.node_effects(p2, c2, graph, V.Edit("zero"), nodes, run)
    np.testing.assert_allclose(measured[[1, 2, 4]], singles, atol=2e-5)
    again = V.region_sweep(p2, c2, graph, nodes, str(tmp_path / "region"), run)[1]      # resumed from disk
    np.testing.assert_array_equal(again, measured)


def test_region_summary_of_the_graphs_own_predictions(setup):
    """Fed the graph's own predictions as measurements: a perfect fit, and the carrying subsets found by
    measurement and by prediction coincide, ranked first."""
    _, _, _, graph = setup
    nodes = V.region(graph, 3)
    subsets = np.asarray([[(r >> i) & 1 for i in range(3)] for r in range(8)], bool)
    pred = graphs.predicted_effects(graph, V.subset_deltas(graph, nodes, subsets))[:, 0]
    strongest = int(np.argmax(np.abs(pred)))
    value = float(-pred[strongest] * 1.25)                 # the strongest subset removes 80% of it
    s = V.region_summary(graph, nodes, subsets, pred, value)
    assert s["fit"]["r2"] == pytest.approx(1) and s["removed"] == pytest.approx(0.8)
    row = s["carrying"]["0.8"]
    assert row["measured"] == row["predicted"] and row["rank_by_prediction"] == 0
    best = subsets[strongest]
    assert row["measured"] == [i for i in range(3) if best[i]]
    assert row["top_k_by_influence"] == (best[:best.sum()].all())
    additive = subsets @ pred[[1, 2, 4]]
    assert V.region_summary(graph, nodes, subsets, additive, value)["additivity"] == pytest.approx(1)
    assert V.region_summary(graph, nodes, subsets, pred, 10 * value)["carrying"]["0.5"]["measured"] is None


def test_graph_html_shows_the_kept_nodes_and_edges(setup, tmp_path):
    _, _, _, graph = setup
    pruned = graphs.prune(graph, 0.9, 0.95)
    shown = graphs.shown_nodes(graph, pruned)
    text = viz.graph_html(graph, pruned, lambda t: f"<t{t}>", str(tmp_path / "g.html"))
    assert (tmp_path / "g.html").read_text() == text and text.startswith("<!DOCTYPE html>")
    assert len(re.findall(r"class='n'", text)) == len(shown)
    dst, src = np.nonzero(pruned.edge_mask)
    assert len(re.findall(r"<line ", text)) == len(dst) > 0
    assert "&lt;t" in text and "<t" + str(graph.tokens[0]) + ">" not in text          # token text escaped
    assert text.count("<circle") == int(np.isin(shown, np.arange(len(graph.features))).sum())


@pytest.mark.parametrize("call,message", [
    (lambda g: V.region(g, 10 ** 3), "at most 2"),
    (lambda g: V.region(g, 0), "region size"),
    (lambda g: V.region(g, int((g.features[:, 1] == g.n_pos - 1).sum()) + 1), "exceeds the"),
    (lambda g: V.Edit.parse("scale"), "zero, scale:C or set:V"),
    (lambda g: V.Edit.parse("zero:1"), "zero, scale:C or set:V"),
    (lambda g: V.Edit.parse("set:x"), "numbers"),
    (lambda g: V.Edit("double"), "unknown edit"),
])
def test_bad_regions_and_edits_are_refused(setup, call, message):
    with pytest.raises(ValueError, match=message):
        call(setup[3])


def test_edits_parse_and_print():
    assert [str(V.Edit.parse(s)) for s in ("zero", "scale:2", "set:-0.5")] == ["zero", "scale:2", "set:-0.5"]
    np.testing.assert_array_equal(V.Edit("scale", 2).new(np.asarray([1.0, -3.0])), [2.0, -6.0])


def test_node_gradients_are_the_linear_limit_of_the_measured_effects(setup):
    """For a small edit (scale by 1 + eps) the measured effects are eps times the gradient estimate of scale 2."""
    p2, c2, _, graph = setup
    run = V.real_run(p2, c2, graph)
    nodes = np.concatenate([V.top_nodes(graph, 2, position=p) for p in range(1, graph.n_pos)])
    grad = V.node_gradients(p2, c2, graph, V.Edit("scale", 2.0), nodes, run)
    eps = 1e-2
    with jax.default_matmul_precision("highest"):
        small = V.node_effects(p2, c2, graph, V.Edit("scale", 1 + eps), nodes, run)
    np.testing.assert_allclose(small / eps, grad, rtol=5e-2, atol=2e-3 * np.abs(grad).max())
    assert np.abs(grad).max() > 1e-3


def test_a_graph_over_fitted_transcoders_predicts_the_real_models_edits():
    """On transcoders that fit their MLPs (the circuit-tracer fixture's GPT-2: least-squares decoders,
    relative error ~1e-4) the graph's predictions of single-node edits track the real model's measured
    effects (Pearson > 0.8 over the 64 most influential nodes, zero and scale by 2), and the real model's
    own gradient tracks them closer still (> 0.98): what the graph freezes costs little there."""
    from tests.test_graph_circuit_tracer import BOS, PROMPT, _model
    from jaxcircuits.methods import graph_validation as V
    params, cfg = _model("gpt2_skip_relu")
    graph = graphs.attribute(params, cfg, np.asarray([BOS] + PROMPT))
    nodes = V.top_nodes(graph, 64)
    for edit in (V.Edit("zero"), V.Edit("scale", 2.0)):
        measured = V.node_effects(params, cfg, graph, edit, nodes)
        predicted = graphs.predicted_effects(graph, V.node_deltas(graph, edit, nodes))[:, 0]
        assert V.correlations(measured, predicted)["pearson"] > 0.8
        assert V.correlations(measured, V.node_gradients(params, cfg, graph, edit, nodes))["pearson"] > 0.98
