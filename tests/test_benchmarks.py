"""The full-size sweep benchmark runs end to end (on a tiny shape) and reports a measured sweep."""

import json

from tests.conftest import run_binary

TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 3, "num_attention_heads": 8,
        "num_key_value_heads": 2, "head_dim": 8, "vocab_size": 97}


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
