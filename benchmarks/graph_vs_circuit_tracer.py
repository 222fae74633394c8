"""Attribution graphs: jaxcircuits (`methods.graphs.attribute`) against circuit-tracer 0.5.0, in one run.

    python -m benchmarks.graph_vs_circuit_tracer --ct_python=/tmp/ctvenv/bin/python

circuit-tracer cannot share our environment (it pins transformers >=4.56,<=4.57.3; ours has 5.24),
so it lives in its own venv (transformer-lens 3.2.1 there), run by subprocess (--ct_python):

    python3 -m venv /tmp/ctvenv
    /tmp/ctvenv/bin/pip install torch==2.13.0          # the CPU wheel
    /tmp/ctvenv/bin/pip install circuit-tracer==0.5.0

(a) The fixture (made once in --fixture_dir, reused while fixture.json's shape matches; by
    benchmarks/ct_reference.py in that venv): a random-weight HF GPT-2 of --layers x --d_model
    (GPT-2 small's shape by default, vocabulary --vocab) and a random skip ReLU transcoder of --width
    features on every layer in circuit-tracer's format (reading ln2.hook_normalized; encoder bias
    --enc_bias sets how many features fire), the prompt <bos> + --seq_len - 1 seeded random tokens.
(b) circuit-tracer: `attribute(prompt, model, batch_size=--ct_batch_size, max_feature_nodes=...)`
    (its TransformerLens ReplacementModel); its first call apart, then --reps timed calls (wall and
    CPU, torch's threads); model loading outside.
(c) jaxcircuits: `load_hf_dir`, `files.load` (norm weight folded), `splice.attach`, then
    `graphs.attribute(batch_size=--batch_size, max_feature_nodes=...)`: the first call (compile + run,
    after jax.clear_caches) apart, then --reps timed calls. Where the time goes: the local replacement
    (the real run, activations, errors, frozen scales), the rows (backward passes and edges, `_rows`,
    the same batches), the rest (node bookkeeping, assembly).
(d) Agreement: the same active features, logit nodes, and adjacency after matching node orders
    (`graphs.node_order`) within --rel_tol of max |A| (float32 sums in different orders), else the run
    fails after writing its results.

Outputs: a table on stdout, benchmarks/results/graph_vs_circuit_tracer-<date>.json,
benchmarks/RESULTS_graph.md (--results_md='' skips it).
"""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from absl import app, flags

import jax
import numpy as np

from benchmarks import timing
from benchmarks.timing import load_line, machine_load

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("jax", "jaxlib", "numpy", "flax")
SHAPE = ("layers", "d_model", "heads", "vocab", "width", "enc_bias", "seed")

FLAGS = flags.FLAGS
flags.DEFINE_string("ct_python", "/tmp/ctvenv/bin/python", "interpreter with circuit-tracer 0.5.0 (module doc)")
flags.DEFINE_string("fixture_dir", "/tmp/jaxcircuits_graph_bench", "where the fixture is made or reused")
flags.DEFINE_integer("layers", 12, "model layers (each with a transcoder)")
flags.DEFINE_integer("d_model", 768, "model width")
flags.DEFINE_integer("heads", 12, "attention heads")
flags.DEFINE_integer("vocab", 2048, "vocabulary")
flags.DEFINE_integer("width", 2048, "transcoder features a layer")
flags.DEFINE_float("enc_bias", -2.5, "mean encoder bias (pre-activations ~ N(it, 1): about 0.6% fire at -2.5)")
flags.DEFINE_integer("seed", 0, "seed of the fixture and the prompt")
flags.DEFINE_integer("seq_len", 20, "prompt tokens, <bos> included")
flags.DEFINE_integer("max_feature_nodes", 0, "feature nodes of both (0: every active feature)")
flags.DEFINE_integer("ct_batch_size", 512, "circuit-tracer's batch_size (its attribute()'s default)")
flags.DEFINE_integer("batch_size", 32, "jaxcircuits' batch_size (attribute()'s default)")
flags.DEFINE_integer("ct_threads", 0, "torch threads of circuit-tracer (0: torch's default, all cores)")
flags.DEFINE_integer("reps", 3, "timed calls of each after the first")
flags.DEFINE_float("rel_tol", 1e-4, "max |A_ours - A_ct| / max |A_ct|")
flags.DEFINE_string("out_dir", os.path.join(REPO, "benchmarks", "results"), "JSON results directory")
flags.DEFINE_string("results_md", os.path.join(REPO, "benchmarks", "RESULTS_graph.md"), "report ('' to skip)")
flags.DEFINE_string("note", "", "the run's conditions in a sentence, kept in the JSON and the report")


def _ct(*args) -> None:
    subprocess.run([FLAGS.ct_python, os.path.join(REPO, "benchmarks", "ct_reference.py"), *map(str, args)],
                   check=True, cwd=REPO)


def fixture() -> dict:
    """fixture.json of --fixture_dir, made by circuit-tracer's venv unless one of this shape is there."""
    path = os.path.join(FLAGS.fixture_dir, "fixture.json")
    want = {k: getattr(FLAGS, k) for k in SHAPE}
    if os.path.exists(path):
        with open(path) as f:
            have = json.load(f)
        if {k: have.get("n_layers" if k == "layers" else k) for k in SHAPE} == want:
            return have
    _ct("fixture", FLAGS.fixture_dir, "--arch", "gpt2", "--layers", FLAGS.layers, "--d-model", FLAGS.d_model,
        "--heads", FLAGS.heads, "--vocab", FLAGS.vocab, "--width", FLAGS.width, "--enc-bias", FLAGS.enc_bias,
        "--seed", FLAGS.seed)
    with open(path) as f:
        return json.load(f)


def circuit_tracer(tokens) -> dict:
    """circuit-tracer's graph and timings (`ct_reference.circuit_tracer_graph`'s fields)."""
    out = os.path.join(FLAGS.fixture_dir, "ct_graph.npz")
    opts = ["--max-feature-nodes", FLAGS.max_feature_nodes] if FLAGS.max_feature_nodes else []
    opts += ["--threads", FLAGS.ct_threads] if FLAGS.ct_threads else []
    _ct("graph", os.path.join(FLAGS.fixture_dir, "model"), os.path.join(FLAGS.fixture_dir, "transcoders"), "--tokens",
        ",".join(map(str, tokens)), "--out", out, "--reps", FLAGS.reps, "--batch-size", FLAGS.ct_batch_size, *opts)
    return dict(np.load(out))


def ours(tokens):
    """(our graph, timings {first: (wall, cpu), reps: [[wall, cpu]], pieces}) on the fixture."""
    from jaxcircuits.dictionaries import files, splice
    from jaxcircuits.methods import graphs as G
    from jaxcircuits.weights.hf import load_hf_dir
    cfg, params = load_hf_dir(os.path.join(FLAGS.fixture_dir, "model"))
    p2, c2 = splice.attach(params, cfg, files.load(os.path.join(FLAGS.fixture_dir, "transcoders"), cfg, params=params))
    run = lambda: G.attribute(p2, c2, tokens, max_feature_nodes=FLAGS.max_feature_nodes or None,   # noqa: E731
                              batch_size=FLAGS.batch_size)
    graph, first, reps = timing.first_and_reps(run, FLAGS.reps)
    # the pieces, each as attribute runs it: the replacement, then the rows of the same batches
    t = time.perf_counter()
    rep = jax.block_until_ready(G.local_replacement(p2, c2, tokens))
    replacement_s = time.perf_counter() - t
    acts = np.array(rep.acts)
    acts[:, :G.ZERO_POSITIONS] = 0
    src = G._sources(rep, np.argwhere(acts != 0).astype(np.int32))
    vecs = G.logit_vectors(rep.params, graph.logit_ids)
    L, T, _ = rep.errors.shape
    t = time.perf_counter()
    G._rows(rep, src, np.full(len(vecs), L), np.full(len(vecs), T - 1), vecs * 0, vecs)
    for i in range(0, len(graph.features), FLAGS.batch_size):
        l, p, f = graph.features[np.resize(np.arange(i, min(i + FLAGS.batch_size, len(graph.features))),
                                           FLAGS.batch_size)].T
        G._rows(rep, src, l, p, rep.dicts["w_enc"][l, :, f])
    rows_s = time.perf_counter() - t
    return graph, {"first": first, "reps": reps.tolist(), "replacement_s": replacement_s, "rows_s": rows_s}


def main(argv):
    del argv
    if not os.access(FLAGS.ct_python, os.X_OK):
        sys.exit(f"graph_vs_circuit_tracer needs --ct_python, an interpreter with circuit-tracer 0.5.0 (its own venv: "
                 f"see this module's docstring); {FLAGS.ct_python!r} is not executable")
    start = machine_load()
    print(load_line(start, start), flush=True)
    fx = fixture()
    rng = np.random.default_rng(FLAGS.seed)
    tokens = [1] + rng.integers(3, FLAGS.vocab, FLAGS.seq_len - 1).tolist()        # <bos> = 1: kept by circuit-tracer
    ct = circuit_tracer(tokens)
    graph, mine = ours(np.asarray(ct["input_tokens"]))
    from jaxcircuits.methods import graphs as G
    order = G.node_order(graph, G.node_keys(ct["active_features"][ct["selected_features"]], graph.n_layers,
                                            len(ct["input_tokens"]), ct["logit_tokens"]))
    A, R = graph.adjacency[np.ix_(order, order)], ct["adjacency"]
    rel = float(np.abs(A - R).max() / np.abs(R).max())
    failures = [] if rel <= FLAGS.rel_tol else [f"adjacency: max |diff| / max |A| = {rel:.2g} > {FLAGS.rel_tol}"]
    if graph.n_active != len(ct["active_features"]) or not np.array_equal(graph.logit_ids, ct["logit_tokens"]):
        failures.append("active features or logit nodes differ")
    ct_wall, ct_cpu = float(np.median(ct["wall_s"])), float(np.median(ct["cpu_s"]))
    reps = np.asarray(mine["reps"])
    wall, cpu = float(np.median(reps[:, 0])), float(np.median(reps[:, 1]))
    end = machine_load()
    result = {"date": datetime.date.today().isoformat(),
              "command": "python -m benchmarks.graph_vs_circuit_tracer " + " ".join(sys.argv[1:]), "note": FLAGS.note,
              "load_start": start, "load_end": end, "load_line": load_line(start, end),
              "environment": {**timing.environment(PACKAGES), "circuit_tracer": json.loads(str(ct["versions"]))},
              "fixture": fx, "tokens": tokens, "n_active": graph.n_active, "feature_nodes": len(graph.features),
              "nodes": len(graph.adjacency), "logits": len(graph.logit_ids),
              "circuit_tracer": {"batch_size": FLAGS.ct_batch_size, "threads": int(ct["torch_threads"]),
                                 "first_wall_s": float(ct["first_wall_s"]), "first_cpu_s": float(ct["first_cpu_s"]),
                                 "wall_s": ct["wall_s"].tolist(), "cpu_s": ct["cpu_s"].tolist(),
                                 "median_wall_s": ct_wall, "median_cpu_s": ct_cpu},
              "jaxcircuits": {"batch_size": FLAGS.batch_size, "first_wall_s": mine["first"][0],
                              "first_cpu_s": mine["first"][1], "reps": mine["reps"], "median_wall_s": wall,
                              "median_cpu_s": cpu, "replacement_s": mine["replacement_s"], "rows_s": mine["rows_s"]},
              "ratio_wall": ct_wall / wall, "ratio_cpu": ct_cpu / cpu, "adjacency_rel_diff": rel,
              "rel_tol": FLAGS.rel_tol, "failures": failures}
    timing.finish(result, "graph_vs_circuit_tracer", render(result), FLAGS.out_dir, FLAGS.results_md)


def render(r: dict) -> str:
    fx, ct, jc = r["fixture"], r["circuit_tracer"], r["jaxcircuits"]
    rest = jc["median_wall_s"] - jc["replacement_s"] - jc["rows_s"]
    lines = [f"# Attribution graphs: jaxcircuits vs circuit-tracer ({r['date']})", "", r["load_line"], "", "Command:", "",
             f"    {r['command']}", ""]
    if r.get("note"):
        lines += [f"Note: {r['note']}", ""]
    lines += [f"Fixture: random-weight GPT-2, {fx['n_layers']} layers, d = {fx['d_model']}, {fx['heads']} heads, "
              f"vocabulary {fx['vocab']}; a random skip ReLU transcoder of {fx['width']} features on every layer "
              f"(circuit-tracer's format, ln2.hook_normalized), encoder bias {fx['enc_bias']}; prompt of "
              f"{len(r['tokens'])} tokens (<bos> first). {r['n_active']} active features, {r['feature_nodes']} "
              f"feature nodes, {r['logits']} logit nodes, {r['nodes']} nodes. Versions: {json.dumps(r['environment'])}.",
              "", "| tool | batch | first call s | median wall s | median CPU s |", "|---|---:|---:|---:|---:|",
              f"| circuit-tracer `attribute` ({ct['threads']} torch threads) | {ct['batch_size']} | "
              f"{ct['first_wall_s']:.2f} | {ct['median_wall_s']:.2f} | {ct['median_cpu_s']:.2f} |",
              f"| jaxcircuits `graphs.attribute` | {jc['batch_size']} | {jc['first_wall_s']:.2f} (compile) | "
              f"{jc['median_wall_s']:.2f} | {jc['median_cpu_s']:.2f} |", "",
              f"**jaxcircuits / circuit-tracer: {r['ratio_wall']:.1f}x wall, {r['ratio_cpu']:.1f}x CPU** (goal >= 5x). "
              f"Adjacency: max |diff| = {r['adjacency_rel_diff']:.1e} of max |A| (tolerance {r['rel_tol']:.0e}).", "",
              "## Where jaxcircuits' time goes", "",
              f"- local replacement (real run, activations, errors, frozen norm scales): {jc['replacement_s']:.2f} s",
              f"- rows (backward passes a layer at a time from the batch's top layer over the prefix of positions "
              f"holding it, and the edges): {jc['rows_s']:.2f} s",
              f"- the rest (node bookkeeping, influence, assembly): {rest:.2f} s", ""]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    app.run(main)
