"""The IOI study end to end through its binary, on a tiny random Llama carrying SmolLM2's tokenizer."""

import json

import jax.numpy as jnp
import numpy as np
import pytest

from tests.conftest import run_binary

def _run(*flags):
    return run_binary("experiments.ioi", *flags)


def test_ioi_end_to_end(tiny_dir, tmp_path):
    out = tmp_path / "ioi"
    r = _run(f"--model={tiny_dir}", "--n_prompts=2", "--top_heads=3", f"--out={out}")
    assert r.returncode == 0, r.stderr[-3000:]
    report = (out / "report.md").read_text()
    assert report.startswith("# IOI") and "python -m experiments.ioi" in report
    for heading in ("Setup", "Baselines", "Per-head patching map", "Candidate heads", "Attribution patching",
                    "Patching subsets of the top heads", "Patch sweep: threshold and redundancy",
                    "Mean ablation of the top heads (clean run)", "Ablation sweep: threshold and redundancy"):
        assert f"## {heading}" in report, heading
    res = json.loads((out / "results.json").read_text())
    assert {"baselines", "head_map", "head_map_raw", "attribution", "attribution_correlation", "top_heads",
            "negative_heads", "patch_top", "ablate_top", "prompts"} <= set(res)
    assert np.asarray(res["head_map"]).shape == (2, 4) and np.asarray(res["attribution"]).shape == (2, 4)
    assert len(res["top_heads"]) == len(res["negative_heads"]) == 3
    for name in ("Patch sweep: threshold and redundancy", "Ablation sweep: threshold and redundancy"):
        assert res[name]["n_subsets"] == 8                    # all subsets of 3 heads
    for key in ("patch_top", "ablate_top"):
        assert np.asarray(res[key]["metric"]).shape == (8, 2)
    # The empty subset is the unpatched run: the corrupted / the clean baseline.
    np.testing.assert_allclose(np.mean(res["patch_top"]["metric"][0]), res["baselines"]["corrupted"], atol=1e-4)
    np.testing.assert_allclose(np.mean(res["ablate_top"]["metric"][0]), res["baselines"]["clean"], atol=1e-4)
    for png in ("head_patch_map.png", "attribution_vs_exact.png"):
        assert (out / png).stat().st_size > 0
    assert (out / "sweeps" / "patch_top" / "results.npz").exists()


@pytest.mark.parametrize("flags,message", [
    (["--top_heads=13"], "--top_heads must be in [1, 12]"),
    (["--top_heads=0"], "--top_heads must be in [1, 12]"),
    (["--n_prompts=0"], "--n_prompts must be >= 1"),
    (["--chunk_size=-1"], "--chunk_size must be >= 0"),
    (["--dtype=float16"], "dtype"),
])
def test_bad_flags_stop_before_loading_a_model(flags, message):
    r = _run("--model=/does/not/exist", *flags)
    assert r.returncode != 0
    assert message in r.stderr + r.stdout
    assert "/does/not/exist" not in r.stderr + r.stdout


def test_attribution_matches_finite_differences(tiny_dir):
    import jaxcircuits as jc
    from jaxcircuits.interventions import positions as P
    from jaxcircuits.methods.attribution import attribution_patching
    from jaxcircuits.tasks.ioi import corrupt, generate_ioi, ioi_batch
    model = jc.load(tiny_dir, cache=False)
    clean = generate_ioi(2, 0, model.tokenizer)
    cb, xb = ioi_batch(clean, model.tokenizer), ioi_batch(corrupt(clean, 1, model.tokenizer), model.tokenizer)
    _, cache = jc.run_with_cache(model.params, model.cfg, cb.ids, jnp.asarray(cb.attn_mask), sites=("head_out",))
    pos_map = P.right_aligned(xb.attn_mask, cb.attn_mask)
    target = jc.target_run(model.params, model.cfg, xb.ids, xb.attn_mask)
    problem = jc.PatchingProblem.make(target, P.align(cache, pos_map), P.weights("all", pos_map), cb.metric)
    grad = attribution_patching(model.params, model.cfg, problem, "head_out")
    l, h = np.unravel_index(np.argmax(np.abs(grad)), grad.shape)
    eps = 1e-2
    masks = np.zeros((3, *grad.shape), np.float32)
    masks[1, l, h], masks[2, l, h] = eps, 2 * eps
    f = jc.run_masks(model.params, model.cfg, problem, jc.Mask(head_out=masks), shard=False).mean(-1)
    fd = (4 * (f[1] - f[0]) - (f[2] - f[0])) / (2 * eps)             # second-order one-sided difference
    np.testing.assert_allclose(grad[l, h], fd, rtol=2e-2, atol=1e-4)
    assert np.abs(grad).max() > 1e-4


def test_ioi_on_a_local_gpt2_dir(tmp_path):
    """GPT-2 family end to end: a tiny random GPT2LMHeadModel with OpenAI's real BPE tokenizer."""
    import shutil
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel
    from tests import fixtures_tokenizers as F
    model_dir = tmp_path / "gpt2"
    shutil.copytree(F.gpt2_dir(), model_dir)
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=64)).save_pretrained(model_dir)
    out = tmp_path / "ioi"
    r = _run(f"--model={model_dir}", "--n_prompts=2", "--top_heads=2", f"--out={out}")
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    assert np.asarray(res["head_map"]).shape == (2, 4)
    assert res["Patch sweep: threshold and redundancy"]["n_subsets"] == 4
