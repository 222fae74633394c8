"""Sweeps: equal to the plain patched forward, resumable after kill -9, deterministic."""

import os
import signal
import subprocess
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcircuits.interventions import positions as P
from jaxcircuits.interventions.metrics import LogitDiff
from jaxcircuits.models.transformer import forward, run_with_cache
from jaxcircuits.interventions.problem import PatchingProblem, target_run
from jaxcircuits.interventions.sites import Intervention, Mask
from jaxcircuits.engine.subsets import Pool, all_subsets, of_size, sampled_per_size, unrank_np
from jaxcircuits.engine.sweep import blend_crossing, blend_curve, load_results, run_sweep
from tests import sweep_worker


def _plain(params, cfg, tokens, mask, source, pos_w, metric):
    iv = Intervention(mask, source, jnp.asarray(pos_w, jnp.float32))
    _, c = forward(params, cfg, jnp.asarray(tokens), intervention=iv, collect=("final_norm",),
                   return_logits=False)
    return np.asarray(metric(params, c["final_norm"][:, -1:]))


@pytest.mark.parametrize("site,where", [("head_out", "all"), ("attn_block", "last"), ("mlp_out", "last"),
                                        ("head_k", "last"), ("mlp_neuron", "all")])
def test_sweep_equals_subsets_one_by_one(tiny, tmp_path, site, where):
    _, cfg, params = tiny("llama_gqa")
    rng = np.random.RandomState(1)
    tgt, src = rng.randint(3, 100, (2, 7)), rng.randint(3, 100, (2, 7))
    _, cache = run_with_cache(params, cfg, src, sites=("head_out", "attn_out", "mlp_out", "head_k", "mlp_neuron"))
    pos_w = P.select(where, np.ones(tgt.shape))
    metric = LogitDiff(good=jnp.array([[5], [6]]), bad=jnp.array([[7], [9]]))
    pool = {"head_out": Pool.heads(1, cfg.n_heads), "attn_block": Pool.blocks(2, 4),
            "mlp_out": Pool("mlp_out", ((0,), (1,), (2,))), "head_k": Pool("head_k", ((1, 0), (1, 1), (2, 1))),
            "mlp_neuron": Pool("mlp_neuron", ((0, 3), (1, 50), (2, 95), (2, 7)))}[site]
    family = of_size(pool.n, 2) if site not in ("mlp_out", "head_k") else all_subsets(3)
    problem = PatchingProblem.make(target_run(params, cfg, tgt), cache, pos_w, metric)
    res = run_sweep(params, cfg, problem, pool, family, str(tmp_path / "s"), chunk_size=5, shard=False)
    assert len(res.ranks) == family.size()
    shape = pool.site_shape(cfg)
    for r, bits in enumerate(unrank_np(family, np.arange(family.size()))):
        mask = Mask(**{site: jnp.asarray(pool.scatter(bits, shape))})
        want = _plain(params, cfg, tgt, mask, cache, pos_w, metric)
        np.testing.assert_allclose(res.metric[r], want, atol=2e-5, err_msg=str(bits))
    np.testing.assert_array_equal(res.subsets(pool.n), unrank_np(family, res.ranks))
    again = load_results(str(tmp_path / "s"))
    np.testing.assert_array_equal(again.metric, res.metric)


def test_deterministic_across_chunk_sizes_and_device_counts(tmp_path):
    """Bit-identical for the same command; across chunk sizes and device counts equal up to
    float32 rounding (XLA picks GEMM blockings by batch shape)."""
    prob = sweep_worker.problem()
    assert jax.device_count() == 4
    runs = [run_sweep(*prob, str(tmp_path / f"r{cs}{sh}"), chunk_size=cs, shard=sh)
            for cs, sh in [(4, False), (7, False), (8, True), (70, True)]]
    for r in runs[1:]:
        np.testing.assert_array_equal(r.ranks, runs[0].ranks)
        np.testing.assert_allclose(r.metric, runs[0].metric, rtol=1e-5, atol=1e-5)
    again = run_sweep(*prob, str(tmp_path / "again"), chunk_size=4, shard=False)
    np.testing.assert_array_equal(again.metric, runs[0].metric)


def test_resume_after_sigkill_loses_and_duplicates_nothing(tmp_path, tmp_path_factory):
    out, ref = str(tmp_path / "killed"), str(tmp_path / "ref")
    env, cmd, root = sweep_worker.env(tmp_path_factory.getbasetemp()), sweep_worker.CMD, sweep_worker.ROOT
    proc = subprocess.Popen(cmd + [out, "0.3"], cwd=root, env=env)
    deadline = time.time() + 120
    while time.time() < deadline and sweep_worker.chunks_done(out) < 3:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert 3 <= sweep_worker.chunks_done(out) < 18, sweep_worker.chunks_done(out)
    assert not os.path.exists(os.path.join(out, "results.npz"))
    subprocess.run(cmd + [out], cwd=root, env=env, check=True, timeout=300)
    subprocess.run(cmd + [ref], cwd=root, env=env, check=True, timeout=300)
    got, want = load_results(out), load_results(ref)
    np.testing.assert_array_equal(got.ranks, np.arange(70))
    np.testing.assert_array_equal(got.bitmask, want.bitmask)
    np.testing.assert_array_equal(got.metric, want.metric)


def test_resume_refuses_a_different_sweep(tmp_path):
    params, cfg, problem, pool, family = sweep_worker.problem()
    out = str(tmp_path / "s")
    run_sweep(params, cfg, problem, pool, family, out, chunk_size=16, shard=False)
    with pytest.raises(ValueError, match="different sweep.*family"):
        run_sweep(params, cfg, problem, pool, of_size(8, 3), out, chunk_size=16, shard=False)
    with pytest.raises(FileExistsError, match="already holds a sweep"):
        run_sweep(params, cfg, problem, pool, family, out, chunk_size=16, shard=False, resume=False)
    with pytest.raises(ValueError, match="family has 6 units, pool has 8"):
        run_sweep(params, cfg, problem, pool, of_size(6, 2), str(tmp_path / "t"))
    with pytest.raises(ValueError, match="do not fit site shape"):
        run_sweep(params, cfg, problem, Pool.heads(5, 8), family, str(tmp_path / "u"))


def test_sampled_family_sweep(tmp_path):
    params, cfg, problem, pool, _ = sweep_worker.problem()
    fam = sampled_per_size(8, [2, 5], 6, seed=0)
    res = run_sweep(params, cfg, problem, pool, fam, str(tmp_path / "s"), chunk_size=5, shard=False)
    assert sorted(res.subsets(8).sum(1).tolist()) == [2] * 6 + [5] * 6


def test_blend_crossing_agrees_with_a_fine_grid():
    params, cfg, problem, pool, _ = sweep_worker.problem()
    base = Mask(head_out=jnp.zeros((2, 8)).at[1].set(1.0))
    # A metric whose aggregate crosses zero inside (0, 1): shift by the midpoint value.
    ends = blend_curve(params, cfg, problem, base, [0.0, 1.0], shard=False).mean(-1)
    assert abs(ends[1] - ends[0]) > 1e-3
    level = float(ends.mean())
    res = blend_crossing(params, cfg, problem, base, level=level, tol=1e-3, shard=False)
    grid = np.linspace(0, 1, 2001)
    vals = blend_curve(params, cfg, problem, base, grid, chunk_size=512, shard=False).mean(-1) - level
    cross = np.flatnonzero(np.sign(vals[:-1]) != np.sign(vals[1:]))
    assert res["high"] - res["low"] <= 1e-3
    assert any(res["low"] - 5e-4 <= grid[c] <= res["high"] + 5e-4 for c in cross)


def test_non_finite_metric_stops_the_sweep_naming_the_ranks(tiny, tmp_path):
    _, cfg, params = tiny("llama_gqa")
    bad = dict(params, final_norm={"scale": params["final_norm"]["scale"].at[0].set(jnp.nan)})
    rng = np.random.RandomState(2)
    tgt, src = rng.randint(3, 100, (2, 5)), rng.randint(3, 100, (2, 5))
    _, cache = run_with_cache(params, cfg, src, sites=("head_out",))
    metric = LogitDiff(good=jnp.array([[5], [6]]), bad=jnp.array([[7], [9]]))
    with pytest.raises(FloatingPointError, match=r"non-finite metric values for ranks 0\.\.3"):
        problem = PatchingProblem.make(target_run(bad, cfg, tgt), cache, P.select("last", np.ones(tgt.shape)), metric)
        run_sweep(bad, cfg, problem, Pool.heads(1, cfg.n_heads), of_size(cfg.n_heads, 1), str(tmp_path / "s"),
                  chunk_size=4, shard=False)
    assert not os.listdir(tmp_path / "s" / "chunks")          # nothing non-finite was written
