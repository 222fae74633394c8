"""experiments.weight_space end to end on a tiny random Llama with SmolLM2's tokenizer, and the
pieces of its low-rank channel check (pair directions, bases, the rank-k pair patch)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcircuits.methods import weight_space as ws
from jaxcircuits.interventions.problem import PatchingProblem, target_run
from jaxcircuits.engine.patching import patched_metric
from jaxcircuits.interventions.metrics import LogitDiff
from jaxcircuits.models import transformer
from jaxcircuits.interventions.sites import Mask
from jaxcircuits.studies import weight_space as study
from jaxcircuits.tasks import multiple_choice as mc
from tests.conftest import random_tokens, run_binary


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
    assert all(np.isfinite(c["full_delta"]) and c["random_delta_std"] >= 0 for c in res["check"])
    assert "| top-k patched | random-k patched (mean) | (std) | full patch (rank 8) |" in report
    assert all(len(s) == 8 for s in res["spectra"].values())          # d_head singular values
    assert set(res["massive"]["zeroed"]) == {"0", "1", "8"} and len(res["massive"]["concentration"]["q"]) == 2
    for c in "qkv":
        assert (out / f"composition_{c}.png").stat().st_size > 0


def test_weight_space_bad_ranks_is_one_usage_line(tiny_dir, tmp_path):
    r = run_binary("experiments.weight_space", f"--model={tiny_dir}", "--ranks=1,99", f"--out={tmp_path / 'x'}")
    assert r.returncode != 0 and "--ranks=1,99" in r.stderr and "Traceback" not in r.stderr


def test_rotated_options_moves_the_answer():
    p = mc.multiple_choice(1, 0)[0]
    r = mc.rotated_options(p)
    right = p.text.split("\n")[1 + p.answer].split(". ", 1)[1]                 # the right option's text
    assert f"{r.answer_text}. {right}" in r.text and r.answer_text != p.answer_text
    assert r.text.replace("Answer:", "").count("A.") == 1
    c = mc.ChoicePrompt("a red pen, a blue cup and a green book. What color is the cup? Answer:", ("red", "blue", "green"), 1)
    assert mc.rotated_options(c) == mc.ChoicePrompt(
        "a blue pen, a green cup and a red book. What color is the cup? Answer:", ("blue", "green", "red"), 1)
    with pytest.raises(ValueError, match="nothing to rotate"):
        mc.rotated_options(mc.ChoicePrompt("What color? Answer:", ("red", "blue"), 0))


def test_pair_directions_are_the_links_singular_directions(tiny):
    _, cfg, params = tiny("llama_gqa")
    ov, qk = (ws.head_factors(params, cfg, k) for k in ws.HEAD_MATRICES)
    for typ, reader in zip(ws.COMPOSITIONS, (qk.dense(), jnp.swapaxes(qk.dense(), -1, -2), ov.dense())):
        d = np.asarray(study.pair_directions(params, cfg, {"type": typ, "writer": (0, 1), "reader": (1, 2)}))
        link = np.asarray(params["layers"]["o"]["w"][0, 1], np.float64) @ np.asarray(reader[1, 2], np.float64)
        u, s, _ = np.linalg.svd(link)                                                    # dense reference
        np.testing.assert_allclose(d @ d.T, np.eye(cfg.d_head), atol=1e-5)
        np.testing.assert_allclose(np.linalg.norm(d @ link, axis=1), s, rtol=1e-4)     # ordered by sigma
        np.testing.assert_allclose(np.abs(d[0] @ u[:, 0]), 1.0, atol=1e-4)


def test_pair_patch_full_rank_is_the_plain_patch_and_rank_zero_the_plain_run(tiny):
    _, cfg, params = tiny("llama_gqa")
    tgt, src = random_tokens(0, 2, 6), random_tokens(1, 2, 6)
    _, cache = transformer.run_with_cache(params, cfg, src, sites=("head_out",))
    metric = LogitDiff(good=jnp.array([[5], [6]]), bad=jnp.array([[7], [8]]))
    problem = PatchingProblem.make(target_run(params, cfg, tgt), dict(cache), np.ones((2, 6), np.float32), metric)
    writer, ranks, n_random = (0, 1), (1, 3), 2
    dirs = study.pair_directions(params, cfg, {"type": "v", "writer": writer, "reader": (1, 0)})
    bases = study.pair_bases(jax.random.PRNGKey(0), dirs, ranks, n_random)
    assert bases.shape == (2 + 2 * 3, cfg.d_head, cfg.d_head)
    for b, k in zip(np.asarray(bases), [0, *[k for k in ranks for _ in range(1 + n_random)], cfg.d_head]):
        np.testing.assert_allclose(b @ b.T, np.diag((np.arange(cfg.d_head) < k).astype(float)), atol=1e-5)
    np.testing.assert_allclose(bases[1], np.asarray(dirs) * (np.arange(cfg.d_head) < 1)[:, None])
    got = study.pair_patch(params, cfg, problem, writer, bases)
    mask = np.zeros((cfg.n_layers, cfg.n_heads), np.float32)
    mask[writer] = 1.0
    plain_patch = float(patched_metric(params, cfg, problem, Mask(head_out=jnp.asarray(mask))).mean())
    _, c = transformer.forward(params, cfg, tgt, collect=("final_norm",), return_logits=False)
    plain_run = float(metric(params, c["final_norm"][:, -1:]).mean())
    np.testing.assert_allclose(got[-1], plain_patch, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got[0], plain_run, rtol=1e-4, atol=1e-5)
    assert not np.isclose(plain_patch, plain_run, atol=1e-3)                         # the patch does something
    assert all(not np.isclose(g, plain_run, atol=1e-6) for g in got[1:-1])
