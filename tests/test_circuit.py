"""Circuit evaluation: faithfulness by hand, top-k, ground truth on hand-built tables, head and edge
levels against direct patched runs, and the circuit binary end to end on a tiny model."""

import json

import jax.numpy as jnp
import numpy as np
import pytest

from jaxcircuits.stats.criteria import Criterion
from jaxcircuits.methods import circuits
from jaxcircuits.interventions import sites
from jaxcircuits.interventions.metrics import LogitDiff
from jaxcircuits.models import transformer as M
from jaxcircuits.interventions.problem import PatchingProblem, target_run
from jaxcircuits.engine.patching import patched_metric
from jaxcircuits.interventions.sites import Mask
from tests.conftest import random_tokens, run_binary
from tests.test_ux import third_party_lines

B, T = 2, 6


def test_faithfulness_by_hand():
    full, none = np.array([3.0, 1.0]), np.array([0.5, -0.5])          # means 2.0 and 0.0
    metric = np.array([[1.0, 0.0], [2.5, 1.5], [0.5, -0.5]])            # means 0.5, 2.0, 0.0
    np.testing.assert_allclose(circuits.faithfulness(metric, full, none), [0.25, 1.0, 0.0])
    assert np.isnan(circuits.faithfulness(metric, full, full)).all()    # no gap: not defined


def test_top_k_ties_and_sizes():
    kept = circuits.top_k([0.5, 2.0, 0.5, -1.0], [0, 1, 2, 3, 4])
    np.testing.assert_array_equal(kept.astype(int), [[0, 0, 0, 0], [0, 1, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0],
                                                     [1, 1, 1, 1]])       # tie 0.5: the lower index first
    with pytest.raises(ValueError, match="sizes must lie in"):
        circuits.top_k([1.0, 2.0], [3])
    np.testing.assert_array_equal(circuits.curve_sizes(5, 0, 10), [1, 2, 3, 4, 5])
    grid = circuits.curve_sizes(1000, 0, 8)
    assert grid[0] == 1 and grid[-1] == 1000 and len(grid) == 8 and (np.diff(grid) > 0).all()


# Three units; row r = bitmask r; per prompt mean +- 0.1, full (row 7) mean 2, none (row 0) mean 0.
MEANS = np.array([0.0, 0.5, 1.0, 1.7, 1.8, 1.9, 1.5, 2.0])     # {0,1} and {2} succeed, {1,2} does not


def _hand_truth():
    return circuits.GroundTruth.of(MEANS[:, None] + np.array([-0.1, 0.1]), Criterion.parse("recovery>=0.8"))


def test_ground_truth_from_a_hand_built_table():
    gt = _hand_truth()
    np.testing.assert_allclose(gt.faith, MEANS / 2)
    np.testing.assert_array_equal(gt.success, MEANS / 2 >= 0.8)
    np.testing.assert_array_equal(gt.minimal.astype(int), [[0, 0, 1], [1, 1, 0]])    # {2}, then {0, 1}
    np.testing.assert_allclose(gt.frontier(), [0.0, 0.9, 0.95, 1.0])


def test_distances_to_the_nearest_minimal_set_by_hand():
    gt = _hand_truth()
    sets = np.array([[0, 1, 0], [0, 1, 1], [0, 0, 1], [0, 0, 0], [1, 1, 1]], bool)
    c = circuits.compare(gt, sets)
    np.testing.assert_array_equal(c["size"], [1, 2, 1, 0, 3])
    np.testing.assert_allclose(c["faithfulness"], [0.5, 0.75, 0.9, 0.0, 1.0])
    np.testing.assert_array_equal(c["sufficient"], [False, False, True, False, True])
    np.testing.assert_array_equal(c["minimal"], [False, False, True, False, False])
    # {1}: Hamming 2 to {2}, 1 to {0,1}; Jaccard 1 and 1/2.  {1,2}: Hamming 1 / 2; Jaccard 1/2 / 2/3.
    # {}: Hamming 1 to {2}; Jaccard 1 to both.  {0,1,2}: Hamming 2 / 1; Jaccard 2/3 / 1/3.
    np.testing.assert_array_equal(c["hamming"], [1, 1, 0, 1, 1])
    np.testing.assert_allclose(c["jaccard"], [0.5, 0.5, 0.0, 1.0, 1 / 3])
    np.testing.assert_allclose(c["frontier"], [0.9, 0.95, 0.9, 0.0, 1.0])
    hamming, jaccard = circuits.nearest(sets, np.zeros((0, 3), bool))
    assert (hamming == -1).all() and np.isnan(jaccard).all()


def _problem(tiny):
    _, cfg, params = tiny("llama_gqa")
    _, cache = M.run_with_cache(params, cfg, random_tokens(2, B, T), sites=sites.EDGE_SOURCE)
    metric = LogitDiff(good=jnp.array([[5], [6]]), bad=jnp.array([[7], [8]]))
    return cfg, params, PatchingProblem.make(target_run(params, cfg, random_tokens(1, B, T)), cache,
                                             np.ones((B, T), np.float32), metric)


def test_head_and_edge_levels_against_direct_patched_runs(tiny):
    """Head level: a kept set equals the looped patched run of the complementary head mask. Edge
    level: keeping every edge but those out of head L0H1 equals patching that head alone."""
    cfg, params, problem = _problem(tiny)
    L, H = cfg.n_layers, cfg.n_heads
    kept = np.random.RandomState(0).rand(2, L * H) < 0.5
    no_l0h1 = np.arange(L * H)[None] != 1
    cv = circuits.curves(params, cfg, problem, "head", {"random": kept, "no L0H1": no_l0h1})
    looped = [patched_metric(params, cfg, problem, Mask(head_out=(~k).reshape(L, H).astype(np.float32)))
              for k in (*kept, np.zeros(L * H, bool))]
    np.testing.assert_allclose(cv.metric["random"], np.stack(looped[:2]), atol=1e-5)
    np.testing.assert_allclose(cv.none, looped[2], atol=1e-5)
    _, plain = M.forward(params, cfg, problem.target.tokens, collect=("final_norm",), return_logits=False)
    np.testing.assert_allclose(cv.full, problem.metric(params, plain["final_norm"][:, -1:]), atol=1e-5)
    np.testing.assert_allclose(cv.faith["random"], circuits.faithfulness(np.stack(looped[:2]), cv.full, cv.none),
                               atol=1e-4)
    np.testing.assert_array_equal(cv.sizes["random"], kept.sum(1))

    labels = sites.LEVELS["edge"].labels(cfg)
    out_of = np.array([lab.startswith("L0H1->") for lab in labels])
    assert out_of.sum() > 0
    edge_m, edge_full, _ = circuits.evaluate(params, cfg, problem, "edge", ~out_of[None])
    np.testing.assert_allclose(edge_m, cv.metric["no L0H1"], atol=1e-4)
    np.testing.assert_allclose(edge_full, cv.full, atol=1e-5)
    assert np.abs(edge_m - edge_full).max() > 1e-4                      # the check is not vacuous


def _run(*flags):
    return run_binary("experiments.circuit", *flags)


def test_circuit_binary_head_level_end_to_end(tiny_dir, tmp_path):
    out = tmp_path / "circuit"
    r = _run(f"--model={tiny_dir}", "--n_prompts=2", "--layer=1", "--method=path,eap_ig,learned", "--ig_steps=2",
             "--lambdas=0.3,3", "--learned_steps=10", "--chunk_size=8", f"--out={out}")
    assert r.returncode == 0, r.stderr[-3000:]
    report = (out / "report.md").read_text()
    assert report.startswith("# Circuits") and "python -m experiments.circuit" in report
    assert third_party_lines(r.stderr) == []
    headings = [l[3:] for l in report.splitlines() if l.startswith("## ")]
    assert headings == ["Findings", "Setup", "Faithfulness vs circuit size", "Ground truth: exhaustive sweep of one layer",
                        "Circuit graph"]
    res = json.loads((out / "results.json").read_text())
    assert set(res["scores"]) == {"path", "eap_ig", "learned"}
    for m in ("path", "eap_ig"):
        c = res["curves"][m]
        assert c["size"] == list(range(1, 9))                            # 2 layers x 4 heads, every size
        assert c["faithfulness"][-1] == pytest.approx(1.0, abs=1e-5)      # every head kept = the full model
    assert len(res["curves"]["learned"]["size"]) == 2                    # one circuit per penalty
    gt = res["ground_truth"]
    assert gt["layer"] == 1 and len(gt["faithfulness"]) == 16
    assert gt["faithfulness"][0] == pytest.approx(0.0, abs=1e-6) and gt["faithfulness"][-1] == pytest.approx(1.0)
    for m, c in gt["methods"].items():
        assert c["size"] == ([1, 2, 3, 4] if m != "learned" else sorted(c["size"]))
        assert all(f <= fr + 1e-9 for f, fr in zip(c["faithfulness"], c["frontier"]))
        # A set is one of the minimal sufficient sets exactly when it lies at Hamming distance 0 from one.
        assert c["minimal"] == [h == 0 and s for h, s in zip(c["hamming"], c["sufficient"])]
    # Patching every head at every position is the corrupted run at the final position.
    assert res["baselines"]["none"] == pytest.approx(res["baselines"]["corrupted"], abs=1e-4)
    for png in ("faithfulness.png", "ground_truth.png", "circuit.png"):
        assert (out / png).stat().st_size > 0


def test_circuit_binary_edge_level(tiny_dir, tmp_path):
    out = tmp_path / "edge"
    r = _run(f"--model={tiny_dir}", "--n_prompts=2", "--level=edge", "--method=path,eap", "--n_points=6",
             "--chunk_size=16", f"--out={out}")
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    n_edges = len(res["scores"]["path"])
    assert n_edges == 13 + 58 + 11               # layer 0, layer 1 (6 senders x 9 receivers + 4 head->MLP), logits
    for c in res["curves"].values():
        assert c["size"][-1] == n_edges and c["faithfulness"][-1] == pytest.approx(1.0, abs=1e-5)
    # Every edge patched reads the corrupted run everywhere: the corrupted run's metric.
    assert res["baselines"]["none"] == pytest.approx(res["baselines"]["corrupted"], abs=1e-4)
    assert "ground_truth" not in res and (out / "circuit.png").stat().st_size > 0


@pytest.mark.parametrize("flags,message", [
    (["--method=acdc"], "--method=acdc: known methods are"),
    (["--level=edge", "--method=learned", "--lambdas=-1"], "--lambdas must be values >= 0"),
])
def test_bad_flags_stop_before_loading_a_model(flags, message):
    r = _run("--model=/does/not/exist", *flags)
    assert r.returncode != 0
    assert message in r.stderr + r.stdout
    assert "/does/not/exist" not in r.stderr + r.stdout
