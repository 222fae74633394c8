"""The SAE study end to end through its binary, on a tiny random Llama carrying SmolLM2's tokenizer."""

import numpy as np
import pytest

from tests.conftest import report_parts, run_binary


def _run(*flags):
    return run_binary("experiments.sae", *flags)


def test_sae_end_to_end(tiny_dir, tmp_path, corpus_path):
    out = tmp_path / "sae"
    r = _run(f"--model={tiny_dir}", "--layer=1", "--width=16", "--k=4", "--steps=6", "--batch=32", "--documents=12",
             "--seq_len=32", "--eval_rows=2", "--n_prompts=3", "--top_features=2", f"--out={out}")
    assert r.returncode == 0, r.stderr[-3000:]
    report, headings, findings, res = report_parts(out)
    assert report.startswith("# SAE") and "python -m experiments.sae" in report
    assert headings == ["Findings", "Setup", "Training", "Evaluation (held-out corpus rows)", "IOI features",
                        "Feature patching (confirmation)"]
    assert "explains" in findings and "CE loss" in findings
    assert "At final, patching the top features by difference" in findings
    ev = res["evaluation"]
    assert 0 <= ev["dead_fraction"] <= 1 and 0 < ev["l0"] <= 4 and ev["explained_variance"] <= 1
    assert ev["ce"]["clean"] > 0 and f"{ev['ce']['recovered']:.3f}" in report
    assert set(res["ioi_features"]) == {"final", "S2"}
    for d in res["ioi_features"].values():
        assert len(d["features"]) == 2 and np.asarray(d["heads"]).shape == (2, 4)
    patch = res["feature_patching"]
    assert len(patch["rows"]) == len(patch["recovery"]) == 9 and patch["n_prompts"] == 3      # 3 position sets
    assert [len(v[0]) for v in patch["attribution"].values()] == [2, 2, 2]
    assert "feature_contexts.html" in report and (out / "feature_contexts.html").stat().st_size > 0
    assert len(res["training"]["loss"]) == 6 and (out / "checkpoints").is_dir()


@pytest.mark.parametrize("flags,message", [
    (["--k=64", "--width=32"], "--k=64 active features exceed --width=32"),
    (["--preset=huge"], "preset"),
])
def test_bad_flags_are_one_line_errors(flags, message):
    r = _run("--model=/does/not/exist", *flags)
    assert r.returncode != 0
    err = r.stderr.strip().splitlines()
    assert message in err[-1] and len(err) == 1, r.stderr
