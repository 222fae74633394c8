"""Edge attribution (EAP, EAP-IG) against finite differences, completeness and auto-circuit."""

import importlib.util

import jax.numpy as jnp
import numpy as np
import pytest

from jaxcircuits.engine.patching import run_masks
from jaxcircuits.interventions import edges, sites
from jaxcircuits.interventions.sites import Mask
from jaxcircuits.methods import attribution
from jaxcircuits.interventions.metrics import LogitDiff
from jaxcircuits.models.transformer import run_with_cache
from jaxcircuits.interventions.problem import PatchingProblem, target_run
from tests.conftest import random_tokens

B, T = 3, 6
GOOD, BAD = np.array([5, 6, 7]), np.array([8, 9, 4])


def _problem(tiny, name):
    hf_model, cfg, params = tiny(name)
    tgt, src = random_tokens(31, B, T), random_tokens(32, B, T)
    _, cache = run_with_cache(params, cfg, src, sites=sites.EDGE_SOURCE)
    metric = LogitDiff(good=jnp.asarray(GOOD[:, None]), bad=jnp.asarray(BAD[:, None]))
    problem = PatchingProblem.make(target_run(params, cfg, tgt), cache, np.ones((B, T), np.float32), metric)
    return hf_model, cfg, params, problem, tgt, src


def _mean_metric(params, cfg, problem, flat_masks):
    """Mean metric [N] of edge masks given flat [N, E]."""
    masks = edges.EdgeGraph.of(cfg).unflat(jnp.asarray(flat_masks, jnp.float32))
    return run_masks(params, cfg, problem, Mask(edges=masks), shard=False).mean(-1)


@pytest.mark.parametrize("name", ["gpt2", "llama_gqa"])
def test_eap_matches_finite_differences(tiny, name):
    """The gradient at 0 of the largest-|score| edge into each receiver kind (q, k, v, MLP, logits)
    equals the one-sided finite difference of exact one-edge patching."""
    _, cfg, params, problem, _, _ = _problem(tiny, name)
    graph = edges.EdgeGraph.of(cfg)
    eap = attribution.attribution_patching(params, cfg, problem, "edges")
    assert eap.shape == (graph.n_edges,) and eap.dtype == np.float32
    kinds = np.array([r.split(".")[-1] if "." in r else ("logits" if r == "logits" else "mlp") for _, r in graph.edges])
    assert set(kinds) == {"q", "k", "v", "mlp", "logits"}
    picked = [int(np.flatnonzero(kinds == k)[np.argmax(np.abs(eap[kinds == k]))]) for k in sorted(set(kinds))]
    eps = 1e-2
    masks = np.zeros((1 + 2 * len(picked), graph.n_edges), np.float32)
    for i, e in enumerate(picked):
        masks[1 + 2 * i, e], masks[2 + 2 * i, e] = eps, 2 * eps
    f = _mean_metric(params, cfg, problem, masks)
    for i, e in enumerate(picked):
        fd = (4 * (f[1 + 2 * i] - f[0]) - (f[2 + 2 * i] - f[0])) / (2 * eps)     # second-order one-sided
        assert abs(eap[e]) > 1e-3, graph.edges[e]
        np.testing.assert_allclose(eap[e], fd, rtol=3e-2, atol=2e-4, err_msg=str(graph.edges[e]))


def test_eap_ig_is_complete(tiny):
    """sum_e EAP-IG_e = f(every edge patched) - f(none) up to the quadrature error; steps matter."""
    _, cfg, params, problem, _, _ = _problem(tiny, "llama_gqa")
    graph = edges.EdgeGraph.of(cfg)
    ig = attribution.integrated_gradients(params, cfg, problem, "edges", steps=32)
    ends = _mean_metric(params, cfg, problem, np.stack([np.zeros(graph.n_edges), np.ones(graph.n_edges)]))
    assert abs(ends[1] - ends[0]) > 0.1
    np.testing.assert_allclose(ig.sum(), ends[1] - ends[0], rtol=1e-2, atol=1e-3)
    one = attribution.integrated_gradients(params, cfg, problem, "edges", steps=1)
    assert abs(one.sum() - ig.sum()) > 1e-3                # the path is not linear: steps matter
    with pytest.raises(ValueError, match="steps=0"):
        attribution.integrated_gradients(params, cfg, problem, "edges", steps=0)


def test_top_edges_labels_and_order(tiny):
    _, cfg, _ = tiny("gpt2")
    graph = edges.EdgeGraph.of(cfg)
    scores = np.zeros(graph.n_edges)
    scores[[3, 10, 7]] = [0.5, -2.0, 0.5]
    top = attribution.top_edges(cfg, scores, k=3)
    assert top == [(*graph.edges[10], -2.0), (*graph.edges[3], 0.5), (*graph.edges[7], 0.5)]
    with pytest.raises(ValueError, match=rf"shape \(5,\), expected \({graph.n_edges},\)"):
        attribution.top_edges(cfg, np.zeros(5))


def test_eap_and_edge_masks_agree_with_auto_circuit(tiny):
    """auto-circuit (torch + TransformerLens, same weights) gives our EAP scores and our edge-patched
    metric for random masks: the semantics and the edge maps match."""
    if importlib.util.find_spec("auto_circuit") is None:
        pytest.skip("auto_circuit is not installed (optional: pip install --no-deps auto-circuit==1.0.1 and the "
                    "deps listed in setup.py's bench extra)")
    from benchmarks.edges_vs_autocircuit import AutoCircuit, random_masks

    hf_model, cfg, params, problem, tgt, src = _problem(tiny, "gpt2")
    peer = AutoCircuit(hf_model, tgt, src, GOOD, BAD)
    graph = edges.EdgeGraph.of(cfg)
    assert len(peer.model.edges) == graph.n_edges
    ours = attribution.attribution_patching(params, cfg, problem, "edges")
    theirs = peer.eap()
    assert np.abs(ours).max() > 0.1
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)
    masks = random_masks(graph, 3, 0.5, seed=0)
    mine = run_masks(params, cfg, problem, Mask(edges=masks), shard=False)
    got = peer.run([peer.masks_of(edges.EdgeMask(masks.layers[i], masks.final[i])) for i in range(3)],
                   peer.source_outs())
    assert np.ptp(mine, axis=0).max() > 0.1
    np.testing.assert_allclose(got, mine, atol=1e-4, rtol=0)
