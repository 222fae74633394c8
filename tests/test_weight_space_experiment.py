"""experiments.weight_space end to end on a tiny random Llama with SmolLM2's tokenizer."""

import json

import numpy as np

from tests.conftest import run_binary


def test_weight_space_report_end_to_end(tiny_dir, tmp_path):
    out = tmp_path / "ws"
    r = run_binary("experiments.weight_space", f"--model={tiny_dir}", "--n_prompts=2", "--top=2", "--ranks=1,2",
                   "--n_random=2", "--zero_dims=1,8", f"--out={out}")
    assert r.returncode == 0, r.stderr[-3000:]
    report = (out / "report.md").read_text()
    assert report.startswith("# Weight space")
    for heading in ("Composition", "Spectra", "Q/K massive values", "Low-rank channel check"):
        assert f"## {heading}" in report, heading
    res = json.loads((out / "results.json").read_text())
    assert len(res["top_pairs"]) == 6 and all(p["writer"][0] == 0 and p["reader"][0] == 1 for p in res["top_pairs"])
    assert len(res["check"]) == 2 * 2 and all(np.isfinite(c["top_delta"]) for c in res["check"])
    assert all(len(s) == 8 for s in res["spectra"].values())          # d_head singular values
    assert set(res["massive"]["zeroed"]) == {"0", "1", "8"} and len(res["massive"]["concentration"]["q"]) == 2
    for c in "qkv":
        assert (out / f"composition_{c}.png").stat().st_size > 0


def test_weight_space_bad_ranks_is_one_usage_line(tiny_dir, tmp_path):
    r = run_binary("experiments.weight_space", f"--model={tiny_dir}", "--ranks=1,99", f"--out={tmp_path / 'x'}")
    assert r.returncode != 0 and "--ranks=1,99" in r.stderr and "Traceback" not in r.stderr
