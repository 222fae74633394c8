"""Attribution graphs (`methods.graphs`) agree with circuit-tracer's (0.5.0) on the same model and
transcoders: active and selected features, activations, logit nodes, the adjacency, pruning,
graph scores and the graph file.

Fixtures, tests/data/circuit_tracer/<case>/: a random tiny HF model (model/, with a word-level
tokenizer "<pad> <bos> <eos> t3 ..."), random transcoders in circuit-tracer's format reading
ln2.hook_normalized (transcoders/; ReLU with skip on GPT-2, JumpReLU with skip on Llama with GQA),
fixture.json, circuit-tracer's graph (ct_graph.npz, the fields `ct_reference.TEST_FIELDS`; the GPT-2
case also ct_graph_capped.npz, max_feature_nodes 100 of 319 at batch_size 32) and its graph file
(ct_graph.json, `create_graph_files`). Made in circuit-tracer's venv (benchmarks/ct_reference.py's
docstring says how to make it) from the repository root:

    D=tests/data/circuit_tracer; CT="/tmp/ctvenv/bin/python benchmarks/ct_reference.py"
    $CT fixture $D/gpt2_skip_relu --arch gpt2 --layers 2
    $CT fixture $D/llama_skip_jumprelu --arch llama --layers 3 --act jumprelu
    for n in gpt2_skip_relu llama_skip_jumprelu; do
      $CT graph $D/$n/model $D/$n/transcoders --tokens 5,9,13,17,21,25,29 --out $D/$n/ct_graph.npz \\
        --json-dir /tmp/ct_json_$n --slug ct-$n --reps 0 --trim
      cp /tmp/ct_json_$n/ct-$n.json $D/$n/ct_graph.json
    done
    $CT graph $D/gpt2_skip_relu/model $D/gpt2_skip_relu/transcoders --tokens 5,9,13,17,21,25,29 \\
      --out $D/gpt2_skip_relu/ct_graph_capped.npz --max-feature-nodes 100 --batch-size 32 --reps 0 --trim

circuit-tracer prepends <bos> (id 1) to a prompt not starting with a special token: our run is fed
the tokens it used. The live tests rerun circuit-tracer (subprocess) when JAXCIRCUITS_CIRCUIT_TRACER_PYTHON
names an interpreter that has it. Tolerances: adjacency, link weights: 1e-5 of max |A| (seen: 9e-7);
activations, probabilities, cumulative scores, graph scores: 1e-5 absolute.
"""

import functools
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from jaxcircuits.dictionaries import files, splice
from jaxcircuits.methods import graphs as G
from jaxcircuits.weights.hf import load_hf_dir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, "tests", "data", "circuit_tracer")
CASES = ("gpt2_skip_relu", "llama_skip_jumprelu")
PROMPT, BOS = [5, 9, 13, 17, 21, 25, 29], 1
SCAN = "tiny-test"                                   # ct_reference's scan name
CT_PYTHON = os.environ.get("JAXCIRCUITS_CIRCUIT_TRACER_PYTHON")
TOL = 1e-5


@functools.lru_cache(maxsize=None)
def _model(case):
    """(params, cfg) of the case's HF model with its circuit-tracer transcoders spliced in."""
    cfg, params = load_hf_dir(os.path.join(DATA, case, "model"))
    return splice.attach(params, cfg, files.load(os.path.join(DATA, case, "transcoders"), cfg, params=params))


def _token_str(case):
    with open(os.path.join(DATA, case, "model", "tokenizer.json")) as f:
        words = {i: w for w, i in json.load(f)["model"]["vocab"].items()}
    return words.__getitem__


def _ours(case, ref, **opts):
    """Our graph of the tokens circuit-tracer used, and the order of its nodes in circuit-tracer's."""
    graph = G.attribute(*_model(case), ref["input_tokens"], **opts)
    return graph, G.node_order(graph, G.node_keys(ref["active_features"][ref["selected_features"]], graph.n_layers,
                                                  len(ref["input_tokens"]), ref["logit_tokens"]))


def _check_graph(case, ref, **opts):
    """Our graph of the tokens circuit-tracer used against its graph `ref` (an npz's fields)."""
    graph, perm = _ours(case, ref, **opts)
    assert ref["input_tokens"].tolist() == [BOS] + PROMPT and graph.tokens.tolist() == [BOS] + PROMPT
    assert graph.n_active == len(ref["active_features"])
    ours_active = np.argwhere(np.array(G.local_replacement(*_model(case), graph.tokens).acts)[:, G.ZERO_POSITIONS:]
                              != 0) + [0, G.ZERO_POSITIONS, 0]
    np.testing.assert_array_equal(ours_active, ref["active_features"])
    np.testing.assert_array_equal(graph.features, ref["active_features"][ref["selected_features"]])
    np.testing.assert_allclose(graph.activations, ref["activation_values"][ref["selected_features"]], atol=TOL)
    np.testing.assert_array_equal(graph.logit_ids, ref["logit_tokens"])
    np.testing.assert_allclose(graph.logit_probs, ref["logit_probabilities"], atol=TOL)
    A, R = graph.adjacency[np.ix_(perm, perm)], ref["adjacency"]
    assert np.abs(A - R).max() <= TOL * np.abs(R).max(), np.abs(A - R).max() / np.abs(R).max()
    return graph, perm


@pytest.fixture(scope="module", params=["stored", "live"])
def reference(request, tmp_path_factory):
    """{case: (npz fields, graph-file dict)}: the committed circuit-tracer outputs, or (live) fresh ones."""
    if request.param == "stored":
        return {c: (dict(np.load(os.path.join(DATA, c, "ct_graph.npz"))),
                    json.load(open(os.path.join(DATA, c, "ct_graph.json")))) for c in CASES}
    if not CT_PYTHON:
        pytest.skip("live circuit-tracer run: set JAXCIRCUITS_CIRCUIT_TRACER_PYTHON to an interpreter with "
                    "circuit-tracer 0.5 (benchmarks/ct_reference.py's docstring makes one)")
    out, refs = tmp_path_factory.mktemp("ct"), {}
    for c in CASES:
        d = os.path.join(DATA, c)
        subprocess.run([CT_PYTHON, os.path.join(ROOT, "benchmarks", "ct_reference.py"), "graph",
                        os.path.join(d, "model"), os.path.join(d, "transcoders"), "--tokens",
                        ",".join(map(str, PROMPT)), "--out", str(out / f"{c}.npz"), "--json-dir", str(out),
                        "--slug", f"ct-{c}", "--reps", "0", "--trim"], check=True, cwd=ROOT)
        refs[c] = (dict(np.load(out / f"{c}.npz")), json.load(open(out / f"ct-{c}.json")))
    return refs


@pytest.mark.parametrize("case", CASES)
def test_graph_pruning_and_scores_agree(reference, case):
    ref, _ = reference[case]
    graph, perm = _check_graph(case, ref)
    pr = G.prune(graph, float(ref["node_threshold"]), float(ref["edge_threshold"]))
    assert 0 < pr.node_mask.sum() < len(perm) and 0 < pr.edge_mask.sum()
    np.testing.assert_array_equal(pr.node_mask[perm], ref["node_mask"])
    np.testing.assert_array_equal(pr.edge_mask[np.ix_(perm, perm)], ref["edge_mask"])
    np.testing.assert_allclose(pr.cumulative[perm], ref["cumulative_scores"], atol=TOL)
    s = G.scores(graph)
    np.testing.assert_allclose([s["replacement"], s["completeness"]],
                               [ref["replacement_score"], ref["completeness_score"]], atol=TOL)


def test_capped_graph_selects_the_same_features():
    """max_feature_nodes 100 of 319 active, batch_size 32: the same greedy choice and rows."""
    ref = dict(np.load(os.path.join(DATA, "gpt2_skip_relu", "ct_graph_capped.npz")))
    graph, _ = _check_graph("gpt2_skip_relu", ref, max_feature_nodes=100, batch_size=32)
    assert len(graph.features) == 100 < graph.n_active


def _floats_close(a, b, scale):
    if isinstance(a, float) or isinstance(b, float):
        return a == b or abs(a - b) <= TOL * scale
    return a == b


@pytest.mark.parametrize("case", CASES)
def test_graph_file_agrees(reference, case):
    """Our graph_json = circuit-tracer's graph file: same nodes (every field, floats within TOL) and links
    in the same order, same metadata (but `prompt`, its tokenizer's decode of the whole prompt)."""
    ref, theirs = reference[case]
    graph, _ = _check_graph(case, ref)
    t = float(ref["node_threshold"])
    ours = G.graph_json(graph, G.prune(graph, t, float(ref["edge_threshold"])), _token_str(case),
                        theirs["metadata"]["slug"], SCAN, t)
    assert list(ours) == list(theirs) == ["metadata", "qParams", "nodes", "links"]
    drop = lambda m: {k: v for k, v in m.items() if k != "prompt"}                        # noqa: E731
    assert drop(ours["metadata"]) == drop(theirs["metadata"]) and ours["qParams"] == theirs["qParams"]
    assert [n["node_id"] for n in ours["nodes"]] == [n["node_id"] for n in theirs["nodes"]]
    for a, b in zip(ours["nodes"], theirs["nodes"]):
        assert list(a) == list(b) and all(_floats_close(a[k], b[k], 1.0) for k in a), (a, b)
    assert [(l["source"], l["target"]) for l in ours["links"]] == [(l["source"], l["target"]) for l in theirs["links"]]
    scale = np.abs(graph.adjacency).max()
    np.testing.assert_allclose([l["weight"] for l in ours["links"]], [l["weight"] for l in theirs["links"]],
                               atol=TOL * scale)
    assert len(ours["links"]) > 50 and any(n["feature_type"] == "mlp reconstruction error" for n in ours["nodes"])
