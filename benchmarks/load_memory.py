"""Peak host memory (RSS) and wall time of loading params, each load in a fresh subprocess.

Cases: the embedded SmolLM2-135M GGUF (Q4_1) and a random Llama-3.2-1B-shaped HF checkpoint
(hidden 2048, 16 layers, 32/8 heads, mlp 8192, vocab 128256, tied; bf16 safetensors, one shard per
layer, written straight from numpy) — each without the cache, cold (convert + write the cache) and
cached (restore). Peak RSS is the child's VmHWM (ru_maxrss would inherit the parent's peak across
exec); "after imports" is its RSS just before loading.

    python benchmarks/load_memory.py [--output benchmarks/RESULTS_loading.md] [--skip_1b]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LLAMA_1B = dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                head_dim=64, intermediate_size=8192, vocab_size=128256)


def status_mib(field: str) -> float:
    """A memory field of /proc/self/status ('VmRSS', or 'VmHWM' = peak RSS of this process image)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":")) / 1024


def child(source: str, dtype: str, cache: bool) -> dict:
    """Load once in this process; report times, RSS and params size."""
    sys.path.insert(0, REPO)
    import jax
    import jax.numpy as jnp

    from jaxcircuits.weights import load_params

    after_imports = status_mib("VmRSS")
    t = time.perf_counter()
    _, params, _ = load_params(source, dtype=getattr(jnp, dtype), cache=cache)
    wall = time.perf_counter() - t
    return {"wall_s": wall, "peak_rss_mib": status_mib("VmHWM"),
            "rss_after_imports_mib": after_imports,
            "params_mib": sum(x.nbytes for x in jax.tree.leaves(params)) / 2**20}


def write_llama_1b(path: str, seed: int = 0) -> None:
    """A random bf16 Llama-1B-shaped HF checkpoint: config.json + one safetensors shard per layer + index."""
    import ml_dtypes
    from safetensors.numpy import save_file

    c = LLAMA_1B
    D, F, V, Dh = c["hidden_size"], c["intermediate_size"], c["vocab_size"], c["head_dim"]
    H, K = c["num_attention_heads"], c["num_key_value_heads"]
    rng = np.random.default_rng(seed)

    def rand(*shape):
        return (0.02 * rng.standard_normal(shape, dtype=np.float32)).astype(ml_dtypes.bfloat16)

    shards = {"model-embed.safetensors": {"model.embed_tokens.weight": rand(V, D),
                                          "model.norm.weight": rand(D)}}
    weight_map = {}
    for name, tensors in shards.items():
        save_file(tensors, os.path.join(path, name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, name))
    for i in range(c["num_hidden_layers"]):
        p, name = f"model.layers.{i}.", f"model-layer{i:02d}.safetensors"
        tensors = {p + "input_layernorm.weight": rand(D), p + "post_attention_layernorm.weight": rand(D),
                   p + "self_attn.q_proj.weight": rand(H * Dh, D), p + "self_attn.k_proj.weight": rand(K * Dh, D),
                   p + "self_attn.v_proj.weight": rand(K * Dh, D), p + "self_attn.o_proj.weight": rand(D, H * Dh),
                   p + "mlp.gate_proj.weight": rand(F, D), p + "mlp.up_proj.weight": rand(F, D),
                   p + "mlp.down_proj.weight": rand(D, F)}
        save_file(tensors, os.path.join(path, name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, name))
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    config = {"model_type": "llama", "hidden_act": "silu", "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
              "max_position_embeddings": 131072, "tie_word_embeddings": True, **c}
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)


def run_child(source: str, dtype: str, cache: bool, cache_dir: str) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", source, "--dtype", dtype]
    cmd += [] if cache else ["--no_cache"]
    env = {**os.environ, "JAXCIRCUITS_CACHE": cache_dir}
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def report(rows, argv) -> str:
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    lines = [
        "# Params loading: peak RSS and wall time", "",
        f"- date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
        f"- machine: {platform.machine()} {platform.processor() or ''} {os.cpu_count()}-core CPU, "
        f"{mem:.0f} GiB RAM, {platform.platform()}, Python {platform.python_version()}",
        f"- command: `{' '.join(shlex.quote(a) for a in argv)}`",
        "- each row is one fresh subprocess; peak RSS = VmHWM, which includes the 'after imports' baseline "
        "and file pages mapped at the time (safetensors: the tensor being read; GGUF: the whole mmapped file)",
        "- cache: none = convert only; cold = convert + write the orbax cache entry; cached = restore the entry",
        "",
        "| model | dtype | cache | wall s | peak RSS MiB | RSS after imports MiB | params MiB | (peak - imports) / params |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for name, dtype, mode, r in rows:
        ratio = (r["peak_rss_mib"] - r["rss_after_imports_mib"]) / r["params_mib"]
        lines.append(f"| {name} | {dtype} | {mode} | {r['wall_s']:.2f} | {r['peak_rss_mib']:.0f} | "
                     f"{r['rss_after_imports_mib']:.0f} | {r['params_mib']:.0f} | {ratio:.2f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--child", metavar="SOURCE", help=argparse.SUPPRESS)
    ap.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)
    ap.add_argument("--no_cache", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--skip_1b", action="store_true", help="only the SmolLM2 GGUF")
    ap.add_argument("--output", help="also write the markdown report to this file")
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.dtype, not args.no_cache)))
        return
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        cases = [("smollm2-135m-instruct (GGUF Q4_1)", "smollm2-135m-instruct", "float32")]
        if not args.skip_1b:
            ckpt = os.path.join(tmp, "llama-1b")
            os.makedirs(ckpt)
            t = time.perf_counter()
            write_llama_1b(ckpt)
            print(f"wrote random 1B checkpoint in {time.perf_counter() - t:.1f} s", file=sys.stderr)
            cases += [("random Llama-1B shape (HF bf16, 17 shards)", ckpt, "bfloat16"),
                      ("random Llama-1B shape (HF bf16, 17 shards)", ckpt, "float32")]
        for name, source, dtype in cases:
            cache_dir = os.path.join(tmp, f"cache-{dtype}-{len(rows)}")
            for mode, cache in (("none", False), ("cold", True), ("cached", True)):
                r = run_child(source, dtype, cache, cache_dir)
                print(name, dtype, mode, r, file=sys.stderr)
                rows.append((name, dtype, mode, r))
    text = report(rows, ["python", *sys.argv])
    print(text)
    if args.output:
        with open(args.output, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
