"""The attribution-graph study end to end through its binary, on a tiny random Llama carrying SmolLM2's
tokenizer, with transcoders trained for a few steps."""

import json

import pytest

from tests.conftest import report_parts, run_binary

FLAGS = ("--layers=0,1", "--width=16", "--k=4", "--steps=4", "--batch=32", "--documents=12", "--seq_len=32",
         "--eval_rows=2", "--top_nodes=6", "--region_size=3", "--max_n_logits=3")


def _run(*flags):
    return run_binary("experiments.graph", *flags)


def test_graph_end_to_end(tiny_dir, tmp_path, corpus_path):
    out = tmp_path / "graph"
    r = _run(f"--model={tiny_dir}", *FLAGS, f"--out={out}")
    assert r.returncode == 0, r.stderr[-3000:]
    report, headings, findings, res = report_parts(out)
    assert report.startswith("# Attribution graph of 'The capital of France is'") and "experiments.graph" in report
    assert headings == ["Findings", "Setup", "Transcoders", "Graph", "Single-node edits in the real model",
                        "Region: every subset of the last position's top features"]
    assert "replacement score" in findings and "Edit scale:2 of 6 single feature nodes" in findings
    assert "Region of the 3 top features" in findings
    assert set(res["transcoders"]) == {"0", "1"} and res["graph"]["n_features"] > 0
    assert set(res["node_checks"]) == {"zero", "scale:2", "set:1"}
    assert len(res["node_checks"]["zero"]["measured"]) == 6 and res["node_checks"]["zero"]["real_gradient"]["n"] == 6
    region = res["region"]
    assert len(region["nodes"]) == 3 and set(region["carrying"]) == {"0.5", "0.8"}
    graph_file = json.loads((out / "graphs" / "the-capital-of-france-is.json").read_text())
    assert graph_file["metadata"]["prompt_tokens"][0] == "<|im_start|>" and graph_file["nodes"]
    assert "<svg" in (out / "graph.html").read_text()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["layer_0", "layer_1"]
    again = _run(f"--model={tiny_dir}", *FLAGS[:-2], "--region_size=20", f"--out={out}")     # training restored
    assert again.returncode != 0
    assert "--region_size=20: region size 20 exceeds the" in again.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize("flags,message", [
    (["--node_threshold=1.5"], "--node_threshold must lie in [0, 1], got 1.5"),
    (["--region_size=21"], "--region_size=21: 2^n subsets are run, n at most 20"),
    (["--edits=zero,scale"], "--edits must be edits zero, scale:C or set:V, got 'scale'"),
    (["--prompt= "], "--prompt is empty"),
    (["--transcoders=/does/not/exist"], "--transcoders=/does/not/exist: not a directory"),
])
def test_bad_flags_are_one_line_errors(flags, message):
    r = _run("--model=/does/not/exist", *flags)
    assert r.returncode != 0
    err = r.stderr.strip().splitlines()
    assert message in err[-1] and len(err) == 1, r.stderr
