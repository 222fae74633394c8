"""Where a patched sweep's time goes, per path: one chunk's compiled ops, timed by jax's profiler.

    python -m benchmarks.path_profile            # GPT-2-small shape, head_out subsets of layer 9, chunk 64

One chunk of `run_masks` (the sweep of `benchmarks.sweep_vs_peers`: all positions, or the last
position with the KV-cached prefix) runs under `jax.profiler.trace`; the trace's per-op events are
summed by kind of op:

  matmul       XLA:CPU's matmul fusions (YNNPACK 'ynn_fusion', 'dot', 'gemm'), with what XLA fused into them
  data movement  copies, slices, transposes, concatenations, dynamic slices / updates
  elementwise  every other fusion (norms, nonlinearity, softmax, blends, reductions)
  unnamed thunks  the executors' time outside every named op event (XLA:CPU's own dot thunks,
               e.g. a batched matmul it does not hand to YNNPACK, emit none)

and set against the chunk's wall time and its floor: `sweep_vs_peers.subset_flops` (which the
compiled program's own FLOP count, `cost_analysis()['flops']`, is printed beside) at the best
measured float32 rate of one large square matmul. The matmul share over the floor's share tells
how fast this backend's matmuls run at the path's shapes against the square one.
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import re
import tempfile
import time
from typing import Callable, Dict

from absl import app, flags  # noqa: F401  (the flags of sweep_vs_peers)

import jax
import numpy as np

from benchmarks import sweep_vs_peers as S
from benchmarks.timing import load_line, machine_load, matmul_gflops
from jaxcircuits.interventions import positions as P
from jaxcircuits.models.transformer import run_with_cache
from jaxcircuits.interventions.problem import PatchingProblem, target_run
from jaxcircuits.engine.patching import layers_touched, make_plan, masks_metric, run_masks
from jaxcircuits.interventions.sites import Mask, footprint

FLAGS = flags.FLAGS
# --chunk_size, --reps (timed calls per measurement, the best kept), --batch, --seq_len, --seed: the flags of
# benchmarks.sweep_vs_peers.


def best_seconds(f: Callable[[], object], reps: int) -> float:
    """Best wall seconds of `reps` calls of f() after one warm-up call."""
    jax.block_until_ready(f())
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        jax.block_until_ready(f())
        times.append(time.perf_counter() - t)
    return min(times)


OP_KINDS = (("matmul", ("ynn", "dot", "gemm")),
         ("data movement", ("copy", "slice", "transpose", "concatenate", "dynamic-update", "pad", "gather")))
UNNAMED = "unnamed thunks"      # executor time outside any named op event (XLA:CPU's own dot thunks)
KINDS = (*(k for k, _ in OP_KINDS), "elementwise", UNNAMED)


def kind_of(op: str) -> str:
    """The kind (`KINDS`) of a compiled op named `op`."""
    if op == UNNAMED:
        return UNNAMED
    return next((k for k, marks in OP_KINDS if any(m in op for m in marks)), "elementwise")


def op_seconds(run: Callable[[], object], trace_dir: str) -> Dict[str, float]:
    """{op name: seconds} of one run(), from jax.profiler's trace (events of compiled ops, summed over
    the executor's threads), and `UNNAMED`: the executors' time not inside a named op event."""
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
        jax.block_until_ready(run())
    (path,) = glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True)
    events = json.load(gzip.open(path))
    events = events["traceEvents"] if isinstance(events, dict) else events
    out, executing, workers = collections.Counter(), 0.0, set()
    for e in events:
        name = e.get("name", "")
        if e.get("ph") != "X" or "dur" not in e:
            continue
        if name == "ThunkExecutor::Execute":
            executing += e["dur"] / 1e6
            workers.add(e.get("tid"))
        elif not name.startswith("$") and "::" not in name and not name.startswith(("np.", "Slinky")):
            out[(e.get("tid"), name)] += e["dur"] / 1e6
    named = collections.Counter()
    for (tid, name), sec in out.items():
        named[name] += sec
    inside = sum(sec for (tid, name), sec in out.items() if tid in workers)
    named[UNNAMED] = max(executing - inside, 0.0)
    return dict(named)


def jax_ops(hlo_text: str) -> Dict[str, str]:
    """{compiled op name: the jax operation it was made from} of a compiled program's text (its
    op_name metadata past the traced function's frames, e.g. 'sr,sbtd->rbtd/dot_general', 'reduce_sum')."""
    found = re.finditer(r"^\s*(?:ROOT )?%(\S+) = .*?op_name=\"([^\"]*)\"", hlo_text, re.M)
    return {m.group(1): m.group(2).rsplit("closed_call/", 1)[-1].rsplit(")/", 1)[-1] for m in found}


def by_jax_op(ops: Dict[str, float], hlo_text: str) -> Dict[str, float]:
    """`op_seconds` summed by the jax operation of each compiled op (`jax_ops`; ops without metadata
    keep their compiled names)."""
    names, out = jax_ops(hlo_text), collections.Counter()
    for op, sec in ops.items():
        out[names.get(op, op)] += sec
    return dict(out)


def main(argv):
    del argv
    start = machine_load()
    print(load_line(start), flush=True)
    shape = S.SHAPES["gpt2-small"]
    cfg, params = S.load_into_jaxcircuits(S.build_hf_model(shape, FLAGS.seed))
    tgt, src = S.prompts(cfg, FLAGS.seed)
    rng = np.random.default_rng(FLAGS.seed)
    subsets = [sorted(rng.choice(cfg.n_heads, shape.k, replace=False)) for _ in range(FLAGS.chunk_size)]
    masks = S.head_masks(cfg, shape.layer, subsets)
    rate = max(matmul_gflops() for _ in range(3)) * 1e9
    B, T = tgt.shape
    print(f"float32 matmul rate {rate / 1e9:.0f} GFLOP/s; chunk {FLAGS.chunk_size} masks x {B} prompts x {T} tokens; "
          f"head_out subsets of layer {shape.layer}")
    print("(op seconds are summed over the trace's threads, shares are of that sum; the profiled call is slower "
          "than the timed one)")
    print("| path | chunk s | floor s (share of chunk s) | XLA GFLOP / floor GFLOP | "
          + " | ".join(f"{k} op s (share)" for k in KINDS) + " |")
    print("|---|---:|---:|---:|" + "---:|" * len(KINDS))
    for where, R in (("all", T), ("last", 1)):
        problem = PatchingProblem.make(target_run(params, cfg, tgt), run_with_cache(params, cfg, src, sites=(
            "head_out",))[1], P.select(where, np.ones(tgt.shape)), S.metric(B))
        run = lambda: run_masks(params, cfg, problem, Mask(head_out=masks), chunk_size=FLAGS.chunk_size, shard=False)
        chunk_s = best_seconds(run, FLAGS.reps)
        flops = FLAGS.chunk_size * S.subset_flops(cfg, shape.layer, B, T, R)
        with tempfile.TemporaryDirectory() as d:
            ops = op_seconds(run, d)
        by_kind = collections.Counter()
        for op, sec in ops.items():
            by_kind[kind_of(op)] += sec
        compiled = masks_metric.lower(params, cfg, problem.for_footprint(cfg, footprint(Mask(head_out=masks), True)),
                                      Mask(head_out=masks), make_plan(layers_touched(Mask(head_out=masks)),
                                                                      problem.pos_w)).compile().cost_analysis()
        xla = (compiled[0] if isinstance(compiled, list) else compiled)["flops"]
        total = sum(by_kind.values())
        cells = " | ".join(f"{by_kind[k]:.3f} ({by_kind[k] / total:.0%})" for k in KINDS)
        print(f"| {where} | {chunk_s:.3f} | {flops / rate:.3f} ({flops / rate / chunk_s:.0%}) | "
              f"{xla / 1e9:.1f} / {flops / 1e9:.1f} | {cells} |")
        top = sorted(ops.items(), key=lambda kv: -kv[1])[:6]
        print("  top ops: " + ", ".join(f"{n} {t:.3f} s" for n, t in top))
    print(load_line(start, machine_load()))


if __name__ == "__main__":
    app.run(main)
