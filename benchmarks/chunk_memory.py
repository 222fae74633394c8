"""Peak memory of `run_masks` chunks on CPU vs `jaxcircuits.engine.memory`'s prediction.

Each case runs in a fresh subprocess on one CPU device: a random model (float32), a target and a
source run of random tokens, 2 x chunk head_out masks at one layer (every other head). It calls
`run_masks` (compile, then two chunks) after resetting the peak RSS (`/proc/self/clear_refs`) and
reports measured = peak RSS (VmHWM) - RSS before the call, against predicted =
`memory.estimate(...).bytes(chunk)` (fixed + chunk x per_item x runtime, extrapolated from the
compiler's memory analysis at two small chunks) and XLA's own buffer assignment of the compiled
chunk (temp + output bytes, `Compiled.memory_analysis`). Each case also checks that the chunk
`run_masks` chooses from memory (chunk_size=None) is predicted to fit the free memory.

    python -m benchmarks.chunk_memory [--output benchmarks/RESULTS_chunk_memory.md] [--cases=a,b]
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import shlex
import subprocess
import sys

from benchmarks.load_memory import status_mib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GPT2_SMALL = dict(model_type="gpt2", n_embd=768, n_layer=12, n_head=12, n_positions=1024, vocab_size=50257)
SMOLLM2 = dict(model_type="llama", hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
               num_attention_heads=9, num_key_value_heads=3, head_dim=64, vocab_size=49152,
               max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=100000.0, hidden_act="silu",
               tie_word_embeddings=True)
# name: (HF config, batch, tokens, positions patched, layer, metric, chunk). Chunks are sized so a
# chunk's activations are 0.3-1 GB, well above the allocator's and the runtime's noise.
CASES = {
    "gpt2-small-all": (GPT2_SMALL, 8, 24, "all", 6, "logit_diff", 128),
    "gpt2-small-last": (GPT2_SMALL, 8, 24, "last", 6, "logit_diff", 256),
    "smollm2-long-all": (SMOLLM2, 1, 256, "all", 20, "logit_diff", 64),
    "smollm2-answer-prob-last": (SMOLLM2, 8, 24, "last", 20, "answer_prob", 256),
}


def child(name: str) -> dict:
    """Run case `name` in this process; report predicted and measured bytes."""
    sys.path.insert(0, REPO)
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxcircuits.engine import memory, runner
    from jaxcircuits.interventions import positions as P
    from jaxcircuits.interventions.metrics import AnswerProb, LogitDiff
    from jaxcircuits.models.config import ModelConfig
    from jaxcircuits.models.params import init_params
    from jaxcircuits.models.transformer import run_with_cache
    from jaxcircuits.interventions.problem import PatchingProblem, target_run
    from jaxcircuits.engine.patching import make_plan, masks_call, run_masks
    from jaxcircuits.interventions.sites import Mask

    hf, batch, seq, positions, layer, metric_name, chunk = CASES[name]
    cfg = ModelConfig.from_hf(hf)
    params = init_params(cfg, jax.random.PRNGKey(0))
    rng = np.random.default_rng(0)
    tgt, src = (rng.integers(0, cfg.vocab_size, (batch, seq)).astype(np.int32) for _ in range(2))
    metric = (LogitDiff(good=jnp.full((batch, 1), 11), bad=jnp.full((batch, 1), 13)) if metric_name == "logit_diff"
              else AnswerProb(ids=jnp.full((batch, 2), 11).at[:, 1].set(13)))
    _, cache = run_with_cache(params, cfg, src, sites=("head_out",))
    problem = PatchingProblem.make(target_run(params, cfg, tgt), {"head_out": cache["head_out"]},
                                   P.select(positions, np.ones(tgt.shape)), metric)
    m = np.zeros((2 * chunk, cfg.n_layers, cfg.n_heads), np.float32)
    m[:, layer, ::2] = 1.0
    masks = Mask(head_out=m)
    plan = make_plan({"head_out": [layer]}, problem.pos_w)
    call, items = masks_call(params, cfg, problem, masks)                       # as run_masks does
    mem = memory.estimate(lambda c: call.lower(items.take(0, c)))
    mem = dataclasses.replace(mem, fixed=mem.fixed + call.made)

    jax.block_until_ready((params, problem))
    before = status_mib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")                                                               # VmHWM := VmRSS
    jax.block_until_ready(run_masks(params, cfg, problem, masks, chunk_size=chunk, shard=False))
    measured = (status_mib("VmHWM") - before) * 2**20

    free = memory.free_bytes(1)
    chosen = runner.chunk_from_memory(call, items, shard=False)[0]
    return {"case": name, "chunk": chunk, "plan": [plan.start_layer, plan.suffix_len, plan.from_z],
            "per_item": mem.per_item, "fixed": mem.fixed, "predicted": mem.bytes(chunk),
            "xla": memory.compiled_bytes(call.lower(items.take(0, chunk))), "measured": measured,
            "rss_before_mib": before, "free": free,
            "chunk_from_memory": chosen, "chosen_fits": mem.bytes(chosen) <= memory.FRACTION * free}


def run_case(name: str) -> dict:
    env = dict(os.environ, PYTHONPATH=REPO, XLA_FLAGS="--xla_force_host_platform_device_count=1")
    out = subprocess.run([sys.executable, "-m", "benchmarks.chunk_memory", "--child", name], cwd=REPO, env=env,
                         capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"case {name} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def table(rows, command: str) -> str:
    import jax
    mb = lambda b: f"{b / 2**20:.0f}"
    lines = [
        "# Chunk size from memory: predicted vs measured peak memory (CPU)", "",
        f"- Date: {datetime.date.today().isoformat()}; machine: {platform.platform()}, {os.cpu_count()} CPUs; "
        f"jax {jax.__version__}; one CPU device, float32.",
        f"- Command: `{command}`",
        "- Measured: peak RSS (VmHWM, reset by /proc/self/clear_refs) minus RSS before a `run_masks` call "
        "of 2 chunks (it compiles, then runs), in a fresh process per case: the first call, because XLA:CPU "
        "keeps a run's buffers resident for the next call (compiling alone adds ~20 MiB). Predicted: "
        "`memory.estimate(...).bytes(chunk)` = fixed + chunk x per_item x runtime, extrapolated from the compiler's "
        "buffer assignment at chunks of 32 and 64 (`jaxcircuits/engine/memory.py`, BUILD.md \"Chunk size\"). "
        "XLA: the compiled chunk's temp + output bytes (its buffer assignment).", "",
        "| case | plan (start, R, from_z) | chunk | per item MiB | fixed MiB | predicted MiB | XLA MiB | "
        "measured MiB | measured / predicted | from memory: chunk (free GiB) |",
        "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['case']} | {tuple(r['plan'])} | {r['chunk']} | {r['per_item'] / 2**20:.2f} | "
                     f"{mb(r['fixed'])} | {mb(r['predicted'])} | {mb(r['xla'])} | {mb(r['measured'])} | "
                     f"{r['measured'] / r['predicted']:.2f} | {r['chunk_from_memory']} ({r['free'] / 2**30:.1f}) |")
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--cases", default=",".join(CASES), help="comma-separated case names")
    ap.add_argument("--output", default="", help="write the results table (markdown) here")
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child)))
        return
    rows = []
    for name in args.cases.split(","):
        rows.append(run_case(name))
        r = rows[-1]
        print(f"{name}: chunk {r['chunk']} predicted {r['predicted'] / 2**20:.0f} MiB, XLA {r['xla'] / 2**20:.0f} MiB, "
              f"measured {r['measured'] / 2**20:.0f} MiB ({r['measured'] / r['predicted']:.2f}x); from memory: "
              f"chunk {r['chunk_from_memory']} (predicted to fit: {r['chosen_fits']})", flush=True)
        if not r["chosen_fits"]:
            raise SystemExit(f"{name}: run_masks chose chunk {r['chunk_from_memory']}, predicted not to fit")
    text = table(rows, "python -m benchmarks.chunk_memory " + " ".join(shlex.quote(a) for a in sys.argv[1:]))
    print(text)
    if args.output:
        with open(args.output, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
