"""The even-heads sweep at full size: all C(16, 8) = 12,870 eight-subsets of the 16 even heads of
layer 10 of a Llama-3.1-8B-shaped model (random weights), for one prompt.

    python -m benchmarks.llama8b_sweep                          # bf16, all positions, every subset
    python -m benchmarks.llama8b_sweep --positions=last --dtype=float32 --chunk_size=128
    python -m benchmarks.llama8b_sweep --max_chunks=2           # time 2 chunks, extrapolate (CPU)
    python -m benchmarks.llama8b_sweep --dry_run                # the chunk size and memory it would use

--chunk_size=0 (the default) chooses the chunk from the devices' free memory and the compiler's
memory analysis of the chunk's call (`jaxcircuits.engine.memory`); the run prints the chunk size and
its predicted memory either way (--dry_run: from shapes alone, compiled but not run).

Each chunk is `sweep.sweep_call`, the call `sweep.run_sweep` repeats (one compiled call: masks
unranked on device, patched forward from the cached target run, logit difference at the last
position), with the mask axis sharded over all local devices; run_sweep adds per chunk only an npz
write with its fsync and SHA-256, and once per sweep a SHA-256 of the params for the spec's
fingerprint. The first chunk (compile + run) is timed apart from the steady-state chunks. With
--max_chunks the sweep time is extrapolated from the steady-state rate and says so.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
import time

from absl import app, flags

import jax
import jax.numpy as jnp
import numpy as np

from jaxcircuits.engine import memory
from jaxcircuits.interventions import positions as P
from jaxcircuits.interventions.metrics import LogitDiff
from jaxcircuits.models.config import ModelConfig
from jaxcircuits.models.params import init_params, num_params
from jaxcircuits.models.transformer import run_with_cache
from jaxcircuits.interventions.problem import PatchingProblem, target_run
from jaxcircuits.engine.patching import plan_layers
from jaxcircuits.engine.runner import ChunkCall, chunk_devices, chunking, to_host
from jaxcircuits.engine.subsets import Pool, of_size
from jaxcircuits.engine.sweep import Sweep, family_metric, rank_items, sweep_call

# Llama-3.1-8B's config.json, less the fields that do not change the computation.
LLAMA_3_1_8B = dict(
    model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
    num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=128256,
    max_position_embeddings=131072, rms_norm_eps=1e-5, rope_theta=500000.0, hidden_act="silu",
    rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                      original_max_position_embeddings=8192),
    tie_word_embeddings=False, attention_bias=False, mlp_bias=False)

FLAGS = flags.FLAGS
flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"], "params and activations dtype")
flags.DEFINE_enum("positions", "all", ["all", "last"], "positions patched")
flags.DEFINE_integer("layer", 10, "layer whose even heads are swept")
flags.DEFINE_integer("k", 8, "subset size (of the 16 even heads)")
flags.DEFINE_integer("seq_len", 20, "prompt tokens (random ids)")
flags.DEFINE_integer("chunk_size", 0, "subsets per compiled call (a multiple of the device count); 0: from the "
                     "free memory (jaxcircuits.engine.memory)", lower_bound=0)
flags.DEFINE_bool("dry_run", False, "print the chunk size and predicted memory from shapes alone, then exit")
flags.DEFINE_integer("max_chunks", 0, "time only this many chunks after the first and extrapolate (0 = all)")
flags.DEFINE_integer("seed", 0, "seed of weights and prompts")
flags.DEFINE_string("shape_json", "", "HF config fields overriding the Llama-3.1-8B shape (JSON; for tests)")
flags.DEFINE_string("out", os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"),
                    "directory for the results JSON")


def main(argv):
    del argv
    hf = {**LLAMA_3_1_8B, **json.loads(FLAGS.shape_json or "{}")}
    cfg = ModelConfig.from_hf(hf)
    dtype = jnp.dtype(FLAGS.dtype)
    rng = np.random.default_rng(FLAGS.seed)
    tgt, src = (rng.integers(0, cfg.vocab_size, (1, FLAGS.seq_len)).astype(np.int32) for _ in range(2))
    pos_w = P.select(FLAGS.positions, np.ones(tgt.shape))
    metric = LogitDiff(good=jnp.array([[11]]), bad=jnp.array([[13]]))
    pool = Pool("head_out", tuple((FLAGS.layer, h) for h in range(0, cfg.n_heads, 2)))
    family = of_size(pool.n, FLAGS.k)
    sweep = Sweep.make(cfg, pool, family, pos_w)
    items = rank_items(family)
    n = family.size()
    n_dev = chunk_devices(True)

    def problem_of(params):
        target = target_run(params, cfg, tgt)
        _, cache = run_with_cache(params, cfg, src, sites=("head_out",))
        return PatchingProblem.make(target, {"head_out": cache["head_out"]}, pos_w, metric)

    def choose_chunk(call):
        """(chunk, sharding, free bytes per device, predicted bytes) now, printed with the prediction."""
        mem = memory.estimate(lambda c: call.lower(items.take(0, c)))
        free = memory.free_bytes(n_dev)
        chunk, sharding = chunking(n, FLAGS.chunk_size or mem.chunk_size(n_dev, free), shard=True)
        print(f"{'--chunk_size' if FLAGS.chunk_size else 'from memory'}: {memory.describe(mem, chunk, n_dev, free)}; "
              f"{n} subsets in {math.ceil(n / chunk)} chunks", flush=True)
        return chunk, sharding, free, mem.bytes(chunk // n_dev)

    if FLAGS.dry_run:                                   # from shapes alone: compiled, nothing allocated
        shapes = jax.eval_shape(lambda: init_params(cfg, jax.random.PRNGKey(FLAGS.seed), dtype))
        layers = jax.eval_shape(lambda p: plan_layers(p, cfg, sweep.plan, metric.n_positions), shapes)
        choose_chunk(ChunkCall(family_metric, dict(params=shapes, problem=jax.eval_shape(problem_of, shapes), layers=layers),
                               dict(cfg=cfg, sweep=sweep), "ranks"))
        return

    t = time.perf_counter()
    params = jax.block_until_ready(init_params(cfg, jax.random.PRNGKey(FLAGS.seed), dtype))
    init_s = time.perf_counter() - t
    print(f"{num_params(params) / 1e9:.2f} B params ({FLAGS.dtype}) in {init_s:.1f} s on "
          f"{jax.device_count()} x {jax.devices()[0].device_kind}", flush=True)

    t = time.perf_counter()
    problem = jax.block_until_ready(problem_of(params))
    setup_s = time.perf_counter() - t
    call = sweep_call(params, cfg, problem, sweep)
    chunk, sharding, free, predicted = choose_chunk(call)   # free memory with params and caches resident
    n_chunks = math.ceil(n / chunk)

    def run_chunk(i):
        ranks = items.take(i * chunk, chunk)
        return to_host(call(ranks if sharding is None else jax.device_put(ranks, sharding)))

    t = time.perf_counter()
    run_chunk(0)
    first_s = time.perf_counter() - t
    timed = n_chunks - 1 if not FLAGS.max_chunks else min(FLAGS.max_chunks, n_chunks - 1)
    t = time.perf_counter()
    for i in range(1, 1 + timed):
        run_chunk(i)
    steady_s = time.perf_counter() - t
    per_chunk = steady_s / max(timed, 1)
    sweep_s = first_s + per_chunk * (n_chunks - 1)     # measured when timed == n_chunks - 1
    result = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": "python -m benchmarks.llama8b_sweep " + " ".join(
            f"--{f}={FLAGS[f].value}" for f in ("dtype", "positions", "layer", "k", "seq_len",
                                                "chunk_size", "max_chunks", "seed")),
        "device": f"{jax.device_count()} x {jax.devices()[0].device_kind}",
        "platform": platform.platform(), "jax": jax.__version__,
        "params_b": num_params(params) / 1e9, "subsets": n, "chunk_size": chunk, "chunks": n_chunks,
        "chunk_from_memory": not FLAGS.chunk_size, "predicted_chunk_bytes_per_device": predicted,
        "free_bytes_per_device": free,
        "chunks_timed": 1 + timed, "extrapolated": timed < n_chunks - 1,
        "init_s": init_s, "target_and_source_s": setup_s, "first_chunk_s": first_s,
        "steady_subsets_per_s": chunk / per_chunk, "sweep_s": sweep_s,
        "shape_overrides": json.loads(FLAGS.shape_json or "{}"),
    }
    print(json.dumps(result, indent=1))
    os.makedirs(FLAGS.out, exist_ok=True)
    name = f"llama8b_sweep-{FLAGS.dtype}-{FLAGS.positions}-{jax.devices()[0].platform}.json"
    with open(os.path.join(FLAGS.out, name), "w") as f:
        json.dump(result, f, indent=1)
    print(f"{'extrapolated' if result['extrapolated'] else 'measured'}: {n} subsets in {sweep_s:.1f} s "
          f"({result['steady_subsets_per_s']:.1f} subsets/s steady, first chunk {first_s:.1f} s)")


if __name__ == "__main__":
    app.run(main)
