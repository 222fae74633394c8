"""The benchmarks run end to end (on tiny shapes) and report measured, checked values."""

import importlib.util
import itertools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.conftest import run_binary

TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 3, "num_attention_heads": 8,
        "num_key_value_heads": 2, "head_dim": 8, "vocab_size": 97}
TINY_HF = {  # HF configs of the peer check: GPT-2 and a grouped-query Llama
    "gpt2": dict(model_type="gpt2", n_layer=3, n_embd=32, n_head=4, vocab_size=53, n_positions=16,
                 bos_token_id=0, eos_token_id=0),
    "llama": dict(model_type="llama", hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=8, intermediate_size=64, vocab_size=53,
                  max_position_embeddings=16, hidden_act="silu", bos_token_id=0, eos_token_id=0),
}
TOOLS = {"TransformerLens": "transformer_lens", "nnsight": "nnsight", "transformers": "transformers"}


def test_llama8b_sweep_tiny_shape(tmp_path):
    out = run_binary("benchmarks.llama8b_sweep", f"--shape_json={json.dumps(TINY)}", "--layer=1", "--k=2",
                     "--seq_len=5", "--chunk_size=4", "--dtype=float32", f"--out={tmp_path}")
    assert out.returncode == 0, out.stderr[-3000:]
    [path] = tmp_path.glob("llama8b_sweep-float32-all-*.json")
    result = json.loads(path.read_text())
    assert (result["subsets"], result["chunks"], result["chunks_timed"]) == (6, 2, 2)   # C(4, 2), 4 a chunk
    assert not result["extrapolated"] and result["shape_overrides"] == TINY
    assert "measured: 6 subsets" in out.stdout


def test_llama8b_sweep_extrapolates_when_told(tmp_path):
    out = run_binary("benchmarks.llama8b_sweep", f"--shape_json={json.dumps(TINY)}", "--layer=1", "--k=2",
                     "--seq_len=5", "--chunk_size=2", "--max_chunks=1", "--positions=last", f"--out={tmp_path}")
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(next(tmp_path.glob("llama8b_sweep-bfloat16-last-*.json")).read_text())
    assert (result["chunks"], result["chunks_timed"], result["extrapolated"]) == (3, 2, True)


@pytest.mark.parametrize("arch", sorted(TINY_HF))
def test_every_peer_variant_matches_jaxcircuits(arch):
    """Each installed peer variant (one forward per subset, or S subsets stacked with per-row head
    masks, S not dividing the subsets) gives jaxcircuits' values on both position selectors."""
    from jaxcircuits.interventions import positions as P
    from benchmarks import peers
    from benchmarks.sweep_vs_peers import (GOOD, BAD, Shape, build_hf_model, head_masks, jaxcircuits_sweep,
                                           load_into_jaxcircuits)

    shape = Shape(TINY_HF[arch], layer=1, k=2)
    hf_model = build_hf_model(shape, seed=0)
    cfg, params = load_into_jaxcircuits(hf_model)
    rng = np.random.default_rng(0)
    tgt, src = (rng.integers(0, cfg.vocab_size, (2, 5)).astype(np.int32) for _ in range(2))
    subsets = list(itertools.combinations(range(cfg.n_heads), shape.k))          # 6 subsets
    masks = head_masks(cfg, shape.layer, subsets)
    names = [n for n, kind in peers.PEERS.items() if importlib.util.find_spec(TOOLS[kind.family])]
    models = peers.build_models(hf_model, names)
    for where in ("all", "last"):
        positions = np.flatnonzero(P.select(where, np.ones(tgt.shape))[0])
        ours = np.asarray(jaxcircuits_sweep(params, cfg, tgt, src, masks, where, chunk_size=4)())
        problem = peers.Problem(tgt, src, shape.layer, positions, GOOD, BAD, cfg.n_heads)
        checked = []
        for name in names:
            if where in peers.PEERS[name].wheres:
                peer = peers.make_peer(name, models, problem, stack=4 if peers.PEERS[name].batched else 1)
                peer.prepare()
                np.testing.assert_allclose(peer.run(subsets), ours, atol=2e-5, err_msg=f"{name}/{where}")
                checked.append(name)
        plain = peers.make_peer("hf_hook", models, problem)
        plain.prepare()
        unpatched = plain.run([()])
        assert np.abs(ours - unpatched).min() > 1e-4          # every subset's patch changes every value
        assert {"hf_hook", "hf_batched"} <= set(checked) and ("hf_kv_batched" in checked) == (where == "last")


def test_peer_rejects_what_it_cannot_patch():
    from benchmarks import peers

    problem = peers.Problem(np.zeros((1, 3), np.int32), np.zeros((1, 3), np.int32), 0, np.arange(3), 1, 2, 4)
    with pytest.raises(ValueError, match=r"last position \(2\) only, got positions \[0, 1, 2\]"):
        peers.HFKV(None, problem).prepare()
    with pytest.raises(ValueError, match="stack must be >= 1, got 0"):
        peers.HFHook(None, problem, stack=0)
    with pytest.raises(ValueError, match=r"unknown peers \['tl_fast'\]"):
        peers.build_models(None, ["tl_fast"])


def test_benchmark_headers_state_the_measured_load():
    """The load line is a measurement, and a run that starts loaded says so first."""
    from benchmarks.timing import QUIET_LOAD, load_line, machine_load
    now = machine_load()
    assert len(now["loadavg"]) == 3 and now["cores"] >= 1
    quiet = {"loadavg": [0.1, 0.2, 0.3], "cores": 2, "quiet": True}
    busy = {"loadavg": [10.9, 8.0, 6.0], "cores": 2, "quiet": False}
    assert load_line(quiet, busy).startswith("Machine load: quiet") and "[0.1, 0.2, 0.3] at the start" in load_line(quiet, busy)
    line = load_line(busy, quiet)
    assert line.startswith("**LOADED MACHINE**") and "[10.9, 8.0, 6.0]" in line and "quote quiet runs only" in line
    assert QUIET_LOAD < 1
    assert "at the end" not in load_line(busy) and load_line(busy).startswith("**LOADED MACHINE**")


def test_profile_names_each_op_by_its_jax_operation(tmp_path):
    """The profiler helpers attribute a compiled op's time to the jax operation it was made from."""
    from benchmarks.path_profile import UNNAMED, by_jax_op, op_seconds
    f = jax.jit(lambda a, b: jnp.tanh(jnp.einsum("ij,jk->ik", a, b)))
    a = jnp.ones((256, 256))
    f(a, a).block_until_ready()
    ops = op_seconds(lambda: f(a, a), str(tmp_path))
    assert UNNAMED in ops and all(s >= 0 for s in ops.values())
    named = by_jax_op(ops, f.lower(a, a).compile().as_text())
    assert any(k.startswith("ij,jk->ik") for k in named), named


def test_sae_vs_saelens_says_what_it_needs(tmp_path):
    """Without sae-lens (not in the test environment) the SAE benchmark exits at once with one line
    naming the bench extra; the full run is benchmarks/RESULTS_sae.md."""
    if importlib.util.find_spec("sae_lens") is not None:
        pytest.skip("sae-lens is installed: the missing-peer path is not reachable")
    out = run_binary("benchmarks.sae_vs_saelens", f"--out_dir={tmp_path}", "--results_md=")
    assert out.returncode != 0
    assert "needs sae-lens==6.54.12" in out.stderr.strip().splitlines()[-1]
    assert not list(tmp_path.iterdir())


def test_graph_vs_circuit_tracer(tmp_path):
    """Without circuit-tracer's interpreter the graph benchmark exits at once with one line; with it
    (JAXCIRCUITS_CIRCUIT_TRACER_PYTHON) a tiny run agrees and reports both tools' times."""
    ct = os.environ.get("JAXCIRCUITS_CIRCUIT_TRACER_PYTHON")
    out = run_binary("benchmarks.graph_vs_circuit_tracer", f"--ct_python={tmp_path / 'none'}", f"--out_dir={tmp_path}",
                     "--results_md=")
    assert out.returncode != 0 and "needs --ct_python" in out.stderr.strip().splitlines()[-1]
    assert not list(tmp_path.iterdir())
    if not ct:
        pytest.skip("the live run needs JAXCIRCUITS_CIRCUIT_TRACER_PYTHON (circuit-tracer 0.5.0's interpreter)")
    out = run_binary("benchmarks.graph_vs_circuit_tracer", f"--ct_python={ct}", f"--fixture_dir={tmp_path / 'fx'}",
                     "--layers=2", "--d_model=64", "--heads=4", "--vocab=101", "--width=128", "--enc_bias=-1",
                     "--seq_len=8", "--reps=1", f"--out_dir={tmp_path}", "--results_md=")
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(next(tmp_path.glob("graph_vs_circuit_tracer-*.json")).read_text())
    assert not result["failures"] and result["adjacency_rel_diff"] < 1e-5 and result["n_active"] > 50
    assert result["circuit_tracer"]["median_wall_s"] > 0 and result["jaxcircuits"]["median_wall_s"] > 0
