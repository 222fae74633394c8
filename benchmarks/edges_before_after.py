"""Our edge sweep and EAP alone, runnable from any checkout since 2026-11 (before/after comparisons
on one machine): the edge benchmark's model, prompts and problem (`benchmarks.sweep_vs_peers`' helpers,
which every such checkout has), 32 random masks at chunk 8, then EAP over all edges, two warm
repetitions each. Run from a checkout's root:

    python benchmarks/edges_before_after.py /tmp/values.npy     # saves the sweep's values

It prints wall and CPU seconds per repetition (benchmarks/RESULTS_edges.md quotes one pair of runs).
"""
import os, sys, time
sys.path.insert(0, os.getcwd())
from absl import flags
import benchmarks.sweep_vs_peers as S
flags.FLAGS(["x", "--batch=8", "--seq_len=24"])
import jax, jax.numpy as jnp, numpy as np
from jaxcircuits.interventions import edges, sites
from jaxcircuits.engine.patching import run_masks
from jaxcircuits.interventions.sites import Mask
from jaxcircuits.methods.attribution import attribution_patching
from jaxcircuits.interventions.metrics import LogitDiff
from jaxcircuits.models.transformer import run_with_cache
from jaxcircuits.interventions.problem import PatchingProblem, target_run
hf = S.build_hf_model(S.SHAPES["gpt2-small"], 0)
cfg, params = S.load_into_jaxcircuits(hf)
graph = edges.EdgeGraph.of(cfg)
tgt, src = S.prompts(cfg, 0)
good, bad = np.full(8, S.GOOD), np.full(8, S.BAD)
def problem():
    _, cache = run_with_cache(params, cfg, src, sites=sites.EDGE_SOURCE)
    metric = LogitDiff(good=jnp.asarray(good, jnp.int32)[:, None], bad=jnp.asarray(bad, jnp.int32)[:, None])
    return PatchingProblem.make(target_run(params, cfg, tgt), cache, np.ones(tgt.shape, np.float32), metric)
on = np.random.default_rng(0).random((32, graph.n_edges)) < 0.5
masks = jax.tree.map(np.asarray, graph.unflat(on.astype(np.float32)))
ours = lambda m: run_masks(params, cfg, problem(), Mask(edges=m), chunk_size=8, shard=False)
ours(jax.tree.map(lambda a: a[:8], masks))
for _ in range(2):
    t, c = time.perf_counter(), time.process_time(); v = ours(masks); print("sweep32", round(time.perf_counter() - t, 2), round(time.process_time() - c, 2), flush=True)
attribution_patching(params, cfg, problem(), "edges")
for _ in range(2):
    t, c = time.perf_counter(), time.process_time(); attribution_patching(params, cfg, problem(), "edges"); print("eap", round(time.perf_counter() - t, 2), round(time.process_time() - c, 2), flush=True)
np.save(sys.argv[1], np.asarray(v))
