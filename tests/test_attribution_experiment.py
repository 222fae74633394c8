"""experiments.attribution end to end on a tiny random Llama with SmolLM2's tokenizer."""

import json

import numpy as np

from tests.conftest import run_binary


def test_attribution_report_end_to_end(tiny_dir, tmp_path):
    out = tmp_path / "attr"
    r = run_binary("experiments.attribution", f"--model={tiny_dir}", "--n_prompts=2", "--ig_steps=2", "--top=2",
                   f"--out={out}")
    assert r.returncode == 0, r.stderr[-3000:]
    report = (out / "report.md").read_text()
    assert report.startswith("# Attribution")
    for heading in ("Setup", "Agreement between methods", "Findings", "Maps and scatter plots"):
        assert f"## {heading}" in report, heading
    res = json.loads((out / "results.json").read_text())
    maps = {m: np.asarray(v) for m, v in res["maps"].items()}
    assert set(maps) == {"DLA", "AP", "IG", "exact"} and all(v.shape == (2, 4) for v in maps.values())
    assert {"AP vs exact", "IG vs exact", "DLA vs exact"} <= set(res["correlations"])
    for m in ("DLA", "AP", "IG", "exact"):
        assert (out / f"map_{m}.png").stat().st_size > 0
    # The findings name exactly the heads in every method's top 2.
    tops = [set(np.argsort(-v, axis=None)[:2].tolist()) for v in maps.values()]
    every = sorted(set.intersection(*tops))
    assert res["agree_all"] == [f"L{i // 4}H{i % 4}" for i in every]


def test_attribution_bad_top_is_one_usage_line(tiny_dir, tmp_path):
    r = run_binary("experiments.attribution", f"--model={tiny_dir}", "--top=99", f"--out={tmp_path / 'x'}")
    assert r.returncode != 0 and "--top=99 out of range [1, 8]" in r.stderr and "Traceback" not in r.stderr
