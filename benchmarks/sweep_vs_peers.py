"""Head-subset patching sweep: jaxcircuits against the tools researchers use today, in one run.

    python -m benchmarks.sweep_vs_peers                 # GPT-2 small + SmolLM2-135M shapes, 3 reps
    python -m benchmarks.sweep_vs_peers --scaling       # + subsets/s and peak RSS vs N and chunk size
    python -m benchmarks.sweep_vs_peers --shapes=gpt2-small --reps=5 --peer_subsets=64

Per model shape: a random-weight HF model is built (seeded), written with `save_pretrained` and
loaded into jaxcircuits with `load_hf_dir`; the TransformerLens, HF-hook and nnsight peers take
the same weights from the HF model (see benchmarks/peers.py). Target = one random prompt batch, source
("clean") = a second one; every k-head subset of one layer has its heads' z (the o_proj input)
patched from the source, at all positions or at the last one; metric = logit(GOOD) - logit(BAD)
at the last position, per prompt.

jaxcircuits runs every subset (`run_masks`, one compiled call per chunk); the peers (one forward
per subset, or S subsets stacked per forward with S tuned per peer over --stacks) run the first
--peer_subsets subsets and their subsets/s is extrapolated; the report quotes jaxcircuits' ratio
against each tool's strongest variant per position selector. The
methods are interleaved over --reps repetitions (order rotated each repetition) and medians are
reported. Each peer's values must match jaxcircuits' on the same subsets (|diff| <= --atol), or the
run fails after writing its results. Timing: jaxcircuits' time includes its target run and source
cache; a peer's one-time setup (source cache, prefix cache) is excluded (in the peer's favour).

The arithmetic floor: FLOPs per subset of each jaxcircuits path (`subset_flops`) over the
machine's best float32 matmul rate (measured at the start and before every repetition; the best
sample counts, since a shared CPU only ever lowers it); jaxcircuits' fraction of that floor.

Outputs: a table on stdout, benchmarks/results/sweep_vs_peers-<date>.json and benchmarks/RESULTS.md.
"""

from __future__ import annotations

import dataclasses
import datetime
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Sequence

os.environ.setdefault("HF_HUB_OFFLINE", "1")        # nothing is loaded from a hub

from absl import app, flags

import jax
import jax.numpy as jnp
import numpy as np

from jaxcircuits.interventions import positions as P
from jaxcircuits.interventions.metrics import LogitDiff
from jaxcircuits.models.config import ModelConfig
from jaxcircuits.models.params import init_params
from jaxcircuits.models.transformer import forward, run_with_cache
from jaxcircuits.interventions.problem import PatchingProblem, target_run
from jaxcircuits.engine.patching import run_masks
from jaxcircuits.interventions.sites import Mask
from jaxcircuits.engine.subsets import Pool

from benchmarks.load_memory import status_mib
from benchmarks import timing
from benchmarks.timing import load_line, machine_load

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The versions recorded with the results (`timing.environment`).
PACKAGES = ("jax", "jaxlib", "numpy", "flax", "torch", "transformers", "transformer-lens", "nnsight")
GOOD, BAD = 11, 13       # the two fixed tokens of the logit difference

FLAGS = flags.FLAGS
flags.DEFINE_list("shapes", ["gpt2-small", "smollm2-135m"], "model shapes to run (keys of SHAPES)")
flags.DEFINE_list("peers", ["tl_loop", "tl_batched", "tl_prefix", "tl_prefix_batched", "tl_bridge",
                            "tl_bridge_batched", "hf_hook", "hf_batched", "nnsight", "nnsight_batched"],
                  "peers timed with all-position patching (benchmarks.peers.PEERS); empty for jaxcircuits only")
flags.DEFINE_list("positions", ["all", "last"], "position selectors patched ('all', 'last')")
flags.DEFINE_list("last_peers", ["tl_loop", "tl_batched", "tl_prefix_batched", "tl_bridge_batched", "hf_batched",
                                 "hf_kv_batched", "nnsight_batched"],
                  "peers timed with last-position patching (a peer without a KV cache costs as much as 'all')")
flags.DEFINE_list("stacks", ["4", "8", "16", "32"],
                  "stack sizes S tried for each batched peer (one stack each, after a warm-up); the fastest is timed")
flags.DEFINE_string("peers_path", "", "site-packages directory of another environment (same Python and torch) "
                    "holding the peers (transformer-lens, nnsight; auto-circuit for benchmarks.edges_vs_autocircuit), "
                    "appended to sys.path; empty: this interpreter's own")
flags.DEFINE_integer("reps", 3, "interleaved repetitions per method")
flags.DEFINE_integer("peer_subsets", 32, "subsets each peer runs per repetition (extrapolated)")
flags.DEFINE_integer("chunk_size", 64, "jaxcircuits masks per compiled call")
flags.DEFINE_integer("batch", 8, "prompts per batch")
flags.DEFINE_integer("seq_len", 24, "tokens per prompt")
flags.DEFINE_integer("seed", 0, "seed of weights, prompts and random masks")
flags.DEFINE_float("atol", 1e-3, "max |peer - jaxcircuits| allowed on the peer's subsets")
flags.DEFINE_string("out_dir", os.path.join(REPO, "benchmarks", "results"), "JSON results directory")
flags.DEFINE_string("results_md", os.path.join(REPO, "benchmarks", "RESULTS.md"),
                    "markdown report to write ('' to skip)")
flags.DEFINE_bool("scaling", False, "also run the scaling series (one subprocess per point)")
flags.DEFINE_string("scaling_shape", "gpt2-small", "shape of the scaling series")
flags.DEFINE_list("scaling_positions", ["last", "all"], "position selectors of the scaling series")
flags.DEFINE_list("scaling_subsets", ["100", "1000", "10000", "100000"], "N of the subsets series")
flags.DEFINE_list("scaling_chunks", ["16", "32", "64", "128", "256", "512"], "chunk sizes of the chunk series")
flags.DEFINE_integer("scaling_chunk_n", 1024, "subsets per point of the chunk series")
flags.DEFINE_float("scaling_budget_s", 180.0,
                   "skip a scaling point whose projected sweep time (from the last rate) exceeds this")
flags.DEFINE_string("render_json", "", "only re-render the table and --results_md from this results JSON")
flags.DEFINE_string("note", "", "the run's conditions in a sentence, kept in the JSON and printed in --results_md "
                    "(with --render_json: replaces the JSON's note in the rendering)")
flags.DEFINE_string("scaling_point", "", "internal: run one scaling point (JSON) and print its result")


@dataclasses.dataclass(frozen=True)
class Shape:
    """A model shape (HF config fields; random weights) and the layer/subset size of its sweep."""

    hf: dict
    layer: int
    k: int


SHAPES: Dict[str, Shape] = {
    "gpt2-small": Shape(dict(model_type="gpt2"), layer=9, k=6),                 # GPT2Config defaults
    "smollm2-135m": Shape(dict(
        model_type="llama", hidden_size=576, num_hidden_layers=30, num_attention_heads=9,
        num_key_value_heads=3, head_dim=64, intermediate_size=1536, vocab_size=49152,
        tie_word_embeddings=True, rope_theta=100000.0, rms_norm_eps=1e-5,
        max_position_embeddings=8192, hidden_act="silu"), layer=15, k=4),
}


# --------------------------------------------------------------------------- setup
def build_hf_model(shape: Shape, seed: int):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    hf = dict(shape.hf)
    config = AutoConfig.for_model(hf.pop("model_type"), **hf)
    return AutoModelForCausalLM.from_config(config).eval()


def load_into_jaxcircuits(hf_model):
    """save_pretrained -> load_hf_dir: jaxcircuits gets exactly the HF model's weights."""
    from jaxcircuits.weights.hf import load_hf_dir

    with tempfile.TemporaryDirectory() as d:
        hf_model.save_pretrained(d)
        cfg, params = load_hf_dir(d)
    return cfg, jax.tree.map(jnp.asarray, params)


def prompts(cfg: ModelConfig, seed: int):
    rng = np.random.default_rng(seed)
    shape = (FLAGS.batch, FLAGS.seq_len)
    return (rng.integers(0, cfg.vocab_size, shape).astype(np.int32),
            rng.integers(0, cfg.vocab_size, shape).astype(np.int32))


def head_masks(cfg: ModelConfig, layer: int, subsets: Sequence[Sequence[int]]) -> np.ndarray:
    """head_out masks [N, L, H]: ones at (layer, head) for each subset's heads."""
    selected = np.zeros((len(subsets), cfg.n_heads), bool)
    for i, s in enumerate(subsets):
        selected[i, list(s)] = True
    return np.asarray(Pool.heads(layer, cfg.n_heads).scatter(selected, (cfg.n_layers, cfg.n_heads)))


def metric(batch: int) -> LogitDiff:
    """The benchmark's metric: logit(GOOD) - logit(BAD) at the last position of each of `batch` prompts."""
    return LogitDiff(good=jnp.full((batch, 1), GOOD, jnp.int32), bad=jnp.full((batch, 1), BAD, jnp.int32))


def jaxcircuits_sweep(params, cfg, tgt, src, masks: np.ndarray, where: str, chunk_size: int):
    """The whole jaxcircuits sweep as a closure: target run, source cache, run_masks -> [N, B]."""
    pos_w = P.select(where, np.ones(tgt.shape))
    metric_ = metric(tgt.shape[0])
    mask = Mask(head_out=masks)

    def sweep():
        target = target_run(params, cfg, tgt)
        _, cache = run_with_cache(params, cfg, src, sites=("head_out",))
        problem = PatchingProblem.make(target, {"head_out": cache["head_out"]}, pos_w, metric_)
        return run_masks(params, cfg, problem, mask, chunk_size=chunk_size, shard=False)
    return sweep


_COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration",
                   "/jax/core/compile/jaxpr_to_mlir_module_duration",
                   "/jax/core/compile/backend_compile_duration")
_compile_s = [0.0]


def _on_event(event: str, duration_secs: float, **kwargs) -> None:
    if event in _COMPILE_EVENTS:
        _compile_s[0] += duration_secs


jax.monitoring.register_event_duration_secs_listener(_on_event)


def first_call(fn):
    """(wall s, compile s) of fn() after jax.clear_caches(): every trace/lower/compile it needs."""
    jax.clear_caches()
    c0, t = _compile_s[0], time.perf_counter()
    fn()
    return time.perf_counter() - t, _compile_s[0] - c0


# --------------------------------------------------------------------------- the floor
def subset_flops(cfg: ModelConfig, layer: int, batch: int, seq: int, recomputed: int) -> int:
    """Matmul FLOPs of one head_out-patched run at `layer` in jaxcircuits' path.

    recomputed: positions recomputed (seq = all-position path, 1 = last-position path). Layer
    `layer` starts from the cached z: o_proj + MLP; layers layer+1..L-2 are full layers over the
    recomputed positions (attention against all seq keys, as computed); the last layer computes
    K/V for the recomputed positions and q/attention/o/MLP for the last position only; then the
    final norm and 2 unembedding columns. Norms and elementwise ops are not counted.
    """
    D, H, K, Dh, F = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.d_head, cfg.d_mlp
    mlp = 2 * D * F * (3 if cfg.gated_mlp else 2)
    o, q, kv, attn = 2 * H * Dh * D, 2 * D * H * Dh, 2 * D * 2 * K * Dh, 4 * H * seq * Dh

    def block(n_query, n_kv):     # one layer: n_kv positions projected to K/V, n_query full rows
        return n_query * (q + attn + o + mlp) + n_kv * kv

    R = recomputed
    per_prompt = R * (o + mlp)
    per_prompt += sum(block(R, R) for _ in range(layer + 1, cfg.n_layers - 1))
    per_prompt += block(1, R) + 2 * 2 * D
    return batch * per_prompt


# --------------------------------------------------------------------------- timing
@dataclasses.dataclass
class Method:
    name: str           # 'jaxcircuits' or a peer name
    where: str          # position selector
    n_subsets: int
    fn: object          # () -> values [n_subsets, B]
    stack: int = 1      # a peer's subsets per forward
    times: List[float] = dataclasses.field(default_factory=list)
    values: np.ndarray = None

    @property
    def key(self):
        return f"{self.name}/{self.where}"


def interleave(methods: List[Method], reps: int, matmul_samples: List[float]) -> None:
    """Time every method `reps` times, rotating the order each repetition; keep rep 0's values.
    A matmul-rate sample is taken before each repetition."""
    for rep in range(reps):
        matmul_samples.append(timing.matmul_gflops())
        for m in methods[rep % len(methods):] + methods[:rep % len(methods)]:
            t = time.perf_counter()
            v = m.fn()
            m.times.append(time.perf_counter() - t)
            if m.values is None:
                m.values = np.asarray(v)
            print(f"  rep {rep}: {m.key:<22} {m.times[-1]:8.3f} s  ({m.n_subsets} subsets)", flush=True)


def tune_stack(peer, subsets: Sequence[Sequence[int]], label: str) -> Dict[str, float]:
    """Set `peer.stack` to the fastest of --stacks (at most len(subsets)): one timed stack of each
    S after a warm-up stack of the largest. Returns {S: subsets/s}."""
    stacks = sorted({min(int(s), len(subsets)) for s in FLAGS.stacks})
    peer.stack = stacks[-1]
    peer.run(subsets[:stacks[-1]])
    rate = {}
    for s in stacks:
        peer.stack = s
        t = time.perf_counter()
        peer.run(subsets[:s])
        rate[str(s)] = s / (time.perf_counter() - t)
    peer.stack = int(max(rate, key=rate.get))
    print(f"  tuned {label}: S={peer.stack} ("
          + ", ".join(f"S={s}: {r:.1f}/s" for s, r in rate.items()) + ")", flush=True)
    return rate


def run_shape(name: str, matmul_samples: List[float]) -> dict:
    """Build one shape's models, time every method interleaved, check the peers' values."""
    from benchmarks import peers as peer_lib

    shape = SHAPES[name]
    print(f"\n== {name}: layer {shape.layer}, all {shape.k}-head subsets", flush=True)
    hf_model = build_hf_model(shape, FLAGS.seed)
    cfg, params = load_into_jaxcircuits(hf_model)
    tgt, src = prompts(cfg, FLAGS.seed)
    subsets = list(itertools.combinations(range(cfg.n_heads), shape.k))
    masks = head_masks(cfg, shape.layer, subsets)
    n_peer = min(FLAGS.peer_subsets, len(subsets))
    t = time.perf_counter()
    models = peer_lib.build_models(hf_model, FLAGS.peers + FLAGS.last_peers)
    print(f"  {len(subsets)} subsets; peer models built in {time.perf_counter() - t:.1f} s", flush=True)
    logits = np.asarray(forward(params, cfg, jnp.asarray(tgt))[0])
    unpatched = logits[:, -1, GOOD] - logits[:, -1, BAD]

    methods, compile_info, warm, tuning = [], {}, [], {}
    for where in FLAGS.positions:
        positions = np.flatnonzero(P.select(where, np.ones(tgt.shape))[0])
        sweep = jaxcircuits_sweep(params, cfg, tgt, src, masks, where, FLAGS.chunk_size)
        # First call on one chunk: the same compiled shapes as the full sweep.
        warm.append(jaxcircuits_sweep(params, cfg, tgt, src, masks[:FLAGS.chunk_size], where, FLAGS.chunk_size))
        compile_info[where] = first_call(warm[-1])
        methods.append(Method("jaxcircuits", where, len(subsets), sweep))
        problem = peer_lib.Problem(tgt, src, shape.layer, positions, GOOD, BAD, cfg.n_heads)
        for p in (FLAGS.peers if where == "all" else FLAGS.last_peers):
            if where not in peer_lib.PEERS[p].wheres:
                continue
            peer = peer_lib.make_peer(p, models, problem)
            peer.prepare()
            peer.run(subsets[:1])           # warm-up (untimed)
            if peer_lib.PEERS[p].batched:
                tuning[f"{p}/{where}"] = tune_stack(peer, subsets[:n_peer], f"{p}/{where}")
            methods.append(Method(p, where, n_peer, lambda peer=peer: peer.run(subsets[:n_peer]), peer.stack))
    for w in warm:                          # first_call cleared the other paths' compiles
        w()
    interleave(methods, FLAGS.reps, matmul_samples)

    jc = {m.where: m for m in methods if m.name == "jaxcircuits"}
    flops = {w: subset_flops(cfg, shape.layer, FLAGS.batch, FLAGS.seq_len,
                             FLAGS.seq_len if w == "all" else 1) for w in FLAGS.positions}
    rows, failures = {}, []
    for m in methods:
        med = float(np.median(m.times))
        row = {"name": m.name, "positions": m.where, "subsets": m.n_subsets, "times_s": m.times,
               "median_s": med, "subsets_per_s": m.n_subsets / med}
        ref = jc[m.where]
        if m.name == "jaxcircuits":
            row.update(first_chunk_s=compile_info[m.where][0], compile_s=compile_info[m.where][1],
                       flops_per_subset=flops[m.where],
                       max_patch_effect=float(np.abs(m.values - unpatched[None]).max()))
        else:
            diff = float(np.abs(m.values - ref.values[:m.n_subsets]).max())
            row.update(max_abs_diff=diff, checked_subsets=m.n_subsets, family=peer_lib.PEERS[m.name].family,
                       stack=m.stack, stack_tuning=tuning.get(m.key))
            if not diff <= FLAGS.atol:
                failures.append(f"{name} {m.key}: max |peer - jaxcircuits| = {diff:.3g} > atol {FLAGS.atol}")
        rows[m.key] = row
    for key, row in rows.items():
        if row["name"] != "jaxcircuits":
            row["jaxcircuits_speedup"] = rows[f"jaxcircuits/{row['positions']}"]["subsets_per_s"] / row["subsets_per_s"]
    return {"layer": shape.layer, "k": shape.k, "n_subsets": len(subsets), "peer_subsets": n_peer,
            "hf_config": hf_model.config.to_diff_dict(), "methods": rows, "failures": failures}


# --------------------------------------------------------------------------- scaling series
def scaling_point(spec: dict) -> dict:
    """One point, in this (fresh) process: random k-head masks at the shape's layer."""
    shape = SHAPES[spec["shape"]]
    cfg = ModelConfig.from_hf(shape.hf)
    params = init_params(cfg, jax.random.PRNGKey(FLAGS.seed))
    tgt, src = prompts(cfg, FLAGS.seed)
    rng = np.random.default_rng(FLAGS.seed)
    subsets = [rng.choice(cfg.n_heads, shape.k, replace=False) for _ in range(spec["n"])]
    masks = head_masks(cfg, shape.layer, subsets)
    rss_setup = status_mib("VmRSS")
    first_s, compile_s = first_call(
        jaxcircuits_sweep(params, cfg, tgt, src, masks[:spec["chunk"]], spec["where"], spec["chunk"]))
    sweep = jaxcircuits_sweep(params, cfg, tgt, src, masks, spec["where"], spec["chunk"])
    t = time.perf_counter()
    sweep()
    wall = time.perf_counter() - t
    return {**spec, "wall_s": wall, "subsets_per_s": spec["n"] / wall, "first_chunk_s": first_s,
            "compile_s": compile_s,
            "rss_after_setup_mib": rss_setup,
            "peak_rss_mib": status_mib("VmHWM")}


def _run_point(spec: dict) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.sweep_vs_peers", f"--scaling_point={json.dumps(spec)}",
           f"--seed={FLAGS.seed}", f"--batch={FLAGS.batch}", f"--seq_len={FLAGS.seq_len}"]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    lines = [l for l in out.stdout.splitlines() if l.startswith("SCALING_RESULT ")]
    if out.returncode or not lines:
        raise RuntimeError(f"scaling point {spec} failed:\n{out.stderr[-3000:]}")
    r = json.loads(lines[-1].split(" ", 1)[1])
    print(f"  {r['where']:<4} N={r['n']:<6} chunk={r['chunk']:<4} {r['subsets_per_s']:9.1f} subsets/s  "
          f"peak RSS {r['peak_rss_mib']:7.0f} MiB (after setup {r['rss_after_setup_mib']:.0f})", flush=True)
    return r


def scaling_series() -> List[dict]:
    """Subsets/s and peak RSS vs N (chunk --chunk_size) and vs chunk size (N --scaling_chunk_n).

    Points run in increasing cost; a point projected (from the last rate of its series) to take
    longer than --scaling_budget_s is recorded as skipped."""
    print(f"\n== scaling series ({FLAGS.scaling_shape}; one subprocess per point)", flush=True)
    out = []
    for where in FLAGS.scaling_positions:
        series = [("subsets", int(float(n)), FLAGS.chunk_size) for n in FLAGS.scaling_subsets]
        series += [("chunk", FLAGS.scaling_chunk_n, int(c)) for c in FLAGS.scaling_chunks]
        rate = {}
        for kind, n, chunk in series:
            spec = {"series": kind, "shape": FLAGS.scaling_shape, "where": where, "n": n, "chunk": chunk}
            if kind in rate and n / rate[kind] > FLAGS.scaling_budget_s:
                out.append({**spec, "skipped": f"projected {n / rate[kind]:.0f} s > budget {FLAGS.scaling_budget_s:.0f} s"})
                print(f"  {where:<4} N={n:<6} chunk={chunk:<4} skipped ({out[-1]['skipped']})", flush=True)
                continue
            out.append(_run_point(spec))
            rate[kind] = out[-1]["subsets_per_s"]
    return out


# --------------------------------------------------------------------------- reporting
TARGET_SHAPE = "gpt2-small"     # the targets below are stated for this shape's sweep on a 2-core CPU
TARGETS = [  # (description, key, threshold): key -> measured value (see `evaluate_targets`)
    ("all-position >= 15x the TL loop", "all_vs_tl_loop", 15),
    ("all-position >= 5x the TL prefix trick", "all_vs_tl_prefix", 5),
    ("all-position >= 10x the strongest peer (issue #26)", "all_vs_strongest", 10),
    ("last-position >= 10x the strongest peer", "last_vs_strongest", 10),
    ("last-position >= 150x the TL loop", "last_vs_tl_loop", 150),
    ("all-position >= 30 subsets/s", "all_rate", 30),
    ("last-position >= 300 subsets/s", "last_rate", 300),
    ("compile < 20 s (slowest path)", "compile_s", -20),    # negative: an upper bound
]


def add_floor(shape: dict, gflops: float) -> None:
    """Floor subsets/s of each jaxcircuits path at `gflops`, and the measured fraction of it."""
    for row in shape["methods"].values():
        if "flops_per_subset" in row:
            row["floor_subsets_per_s"] = gflops * 1e9 / row["flops_per_subset"]
            row["floor_fraction"] = row["subsets_per_s"] / row["floor_subsets_per_s"]


def strongest_peers(shape: dict) -> List[dict]:
    """Per position selector and peer tool (family), its fastest variant and jaxcircuits' ratio to it."""
    best = {}
    for row in shape["methods"].values():
        key = (row["positions"], row.get("family"))
        if key[1] and (key not in best or row["subsets_per_s"] > best[key]["subsets_per_s"]):
            best[key] = row
    return [{"positions": where, "family": family, "variant": row["name"], "stack": row["stack"],
             "subsets_per_s": row["subsets_per_s"], "jaxcircuits_speedup": row["jaxcircuits_speedup"]}
            for (where, family), row in best.items()]


def evaluate_targets(shape: dict) -> List[dict]:
    rows = shape["methods"]

    def get(key, field):
        return rows[key][field] if key in rows else None

    def strongest(where):
        ratios = [r["jaxcircuits_speedup"] for k, r in rows.items()
                  if k.endswith(f"/{where}") and not k.startswith("jaxcircuits") and "jaxcircuits_speedup" in r]
        return min(ratios, default=None)

    value = {"all_vs_tl_loop": get("tl_loop/all", "jaxcircuits_speedup"),
             "all_vs_strongest": strongest("all"), "last_vs_strongest": strongest("last"),
             "all_vs_tl_prefix": get("tl_prefix/all", "jaxcircuits_speedup"),
             "last_vs_tl_loop": get("tl_loop/last", "jaxcircuits_speedup"),
             "all_rate": get("jaxcircuits/all", "subsets_per_s"),
             "last_rate": get("jaxcircuits/last", "subsets_per_s"),
             "compile_s": max((r["compile_s"] for r in rows.values() if "compile_s" in r), default=None)}
    floor = {"all_rate": get("jaxcircuits/all", "floor_subsets_per_s"),
             "last_rate": get("jaxcircuits/last", "floor_subsets_per_s")}
    out = []
    for desc, key, thr in TARGETS:
        v = value[key]
        met = None if v is None else (v <= -thr if thr < 0 else v >= thr)
        note = ""
        if floor.get(key) is not None:
            note = f"floor here {floor[key]:.1f} subsets/s" + (" (target above it)" if floor[key] < thr else "")
        out.append({"target": desc, "value": v, "met": met, "note": note})
    return out


def table(result: dict) -> str:
    lines = []
    for name, shape in result["shapes"].items():
        lines += [f"\n### {name} (layer {shape['layer']}, {shape['n_subsets']} subsets of {shape['k']} heads; "
                  f"peers timed on {shape['peer_subsets']})\n",
                  "| method | positions | S | subsets timed | median s | subsets/s | jaxcircuits speedup | "
                  "max abs diff vs jaxcircuits |",
                  "|---|---|---:|---:|---:|---:|---:|---:|"]
        for row in shape["methods"].values():
            speed = f"{row['jaxcircuits_speedup']:.1f}x" if "jaxcircuits_speedup" in row else "-"
            diff = f"{row['max_abs_diff']:.2e}" if "max_abs_diff" in row else "-"
            lines.append(f"| {row['name']} | {row['positions']} | {row.get('stack', '-')} | {row['subsets']} | "
                         f"{row['median_s']:.3f} | "
                         f"{row['subsets_per_s']:.1f} | {speed} | {diff} |")
        lines += ["", "Strongest variant of each peer (jaxcircuits' ratio against it):", "",
                  "| positions | peer | strongest variant | S | subsets/s | jaxcircuits speedup |",
                  "|---|---|---|---:|---:|---:|"]
        for b in shape["strongest"]:
            lines.append(f"| {b['positions']} | {b['family']} | {b['variant']} | {b['stack']} | "
                         f"{b['subsets_per_s']:.1f} | {b['jaxcircuits_speedup']:.1f}x |")
        lines += ["", "| jaxcircuits path | first chunk s | compile s | MFLOP/subset | floor subsets/s | "
                      "fraction of floor | max patch effect |", "|---|---:|---:|---:|---:|---:|---:|"]
        for row in shape["methods"].values():
            if row["name"] == "jaxcircuits":
                lines.append(f"| {row['positions']} | {row['first_chunk_s']:.2f} | {row['compile_s']:.2f} | "
                             f"{row['flops_per_subset'] / 1e6:.0f} | {row['floor_subsets_per_s']:.1f} | "
                             f"{row['floor_fraction']:.1%} | {row['max_patch_effect']:.3f} |")
        if not shape["targets"]:
            lines.append(f"\n(The speed targets are stated for the {TARGET_SHAPE} sweep only.)")
        else:
            lines += ["", "| target | measured | met | note |", "|---|---:|---|---|"]
        for t in shape["targets"]:
            v = "-" if t["value"] is None else f"{t['value']:.1f}"
            met = "-" if t["met"] is None else ("yes" if t["met"] else "NO")
            lines.append(f"| {t['target']} | {v} | {met} | {t.get('note', '')} |")
        for f in shape["failures"]:
            lines.append(f"\n**CHECK FAILED**: {f}")
    if result.get("scaling"):
        lines += [f"\n### Scaling ({result['flags']['scaling_shape']}, random k-head masks, one process per point)\n",
                  "| series | positions | N | chunk | subsets/s | peak RSS MiB (VmHWM) | RSS after setup MiB |",
                  "|---|---|---:|---:|---:|---:|---:|"]
        for r in result["scaling"]:
            if "skipped" in r:
                lines.append(f"| {r['series']} | {r['where']} | {r['n']} | {r['chunk']} | skipped: {r['skipped']} | | |")
            else:
                lines.append(f"| {r['series']} | {r['where']} | {r['n']} | {r['chunk']} | {r['subsets_per_s']:.1f} | "
                             f"{r['peak_rss_mib']:.0f} | {r['rss_after_setup_mib']:.0f} |")
    return "\n".join(lines)


def markdown(result: dict) -> str:
    env = result["environment"]
    v = env["versions"]
    return "\n".join([
        "# Head-subset patching sweep: jaxcircuits vs peers",
        "",
        load_line(result["load_start"], result["load_end"]),
        "",
        f"Generated by `benchmarks/sweep_vs_peers.py` on {result['date']}. Reproduce with:",
        "",
        f"    {result['command']}",
        "",
        f"- Machine: {env['cpu']}, {env['cores']} cores ({env['platform']}); torch threads {env['torch_threads']}; "
        f"jax devices {', '.join(env['jax_devices'])}.",
        "- The matmul samples below show how much of the machine the benchmark had.",
        f"- Versions: jax {v['jax']}, jaxlib {v['jaxlib']}, torch {v['torch']}, transformers {v['transformers']}, "
        f"transformer_lens {v['transformer-lens']}, nnsight {v.get('nnsight')}, numpy {v['numpy']}, Python {env['python']}.",
        f"- float32 matmul rate (jax, 2048^2, best of 7 per sample): {result['matmul_gflops']:.1f} GFLOP/s, the "
        f"best of the samples taken at the start and before every repetition "
        f"(all: {', '.join(f'{x:.0f}' for x in result.get('matmul_gflops_samples', [result['matmul_gflops']]))}).",
        f"- Sweep: {result['flags']['batch']} prompts x {result['flags']['seq_len']} random tokens, random weights "
        f"(seed {result['flags']['seed']}), head_out patching, metric logit[{GOOD}] - logit[{BAD}] at the last "
        f"position; {result['flags']['reps']} interleaved repetitions, medians; jaxcircuits chunk size "
        f"{result['flags']['chunk_size']}. Peers run the first {result['flags']['peer_subsets']} subsets "
        "(rate extrapolated) and must match jaxcircuits within "
        f"{result['flags']['atol']:g}. JSON: `{result['json']}`.",
        "- Methods (benchmarks/peers.py): `tl_loop` = TransformerLens HookedTransformer.run_with_hooks, hook on "
        "blocks.{l}.attn.hook_z; `tl_prefix` = the same from the target's cached blocks.{l}.hook_resid_pre "
        "(`start_at_layer=l`); `tl_bridge` = TransformerLens TransformerBridge (wraps the HF model), same hook; "
        "`hf_hook` = plain transformers, forward pre-hook on o_proj/c_proj, `logits_to_keep=1`; `hf_kv` = the "
        "same, last position only, the first T-1 positions run once into a KV cache and each forward runs the "
        "last token against it; `nnsight` = nnsight's `NNsight(model).trace`, assigning o_proj's input, "
        "`logits_to_keep=1`. Plain names run one forward per subset (S = 1); `_batched` variants stack S subsets "
        "on the batch axis (the target repeated S times) with a per-row head mask in the hook, S the fastest of "
        f"{', '.join(result['flags'].get('stacks', []))} on one stack each before timing (the S column; the "
        "tried rates are in the JSON's `stack_tuning`). jaxcircuits' time includes its target run and source "
        "cache; the peers' one-time setup (source z, cached resid_pre or KV prefix) is excluded. First chunk s = the first call on one chunk after jax.clear_caches() (compiles "
        "every shape the sweep uses); compile s = jax's trace + lowering + backend-compile event durations in it.",
        "- Floor: matmul FLOPs per subset of each jaxcircuits path (`subset_flops`) at the matmul rate above.",
        "- jaxcircuits speedup = jaxcircuits' subsets/s / the peer's subsets/s, same positions; the claims "
        "quote it against each tool's strongest variant (the 'Strongest variant' table). A peer whose values "
        "differ from jaxcircuits' by more than the tolerance fails the run.",
        "- Peers: `pip install -e .[bench]` (transformer-lens 3.9.0, the last release "
        "with HookedTransformer, and nnsight 0.8.1; both install beside transformers 5.24 and torch 2.13 CPU). "
        "TransformerLens' TransformerBridge is the one measured; transformer-lens 4.x is the same distribution, "
        "so it cannot be installed beside 3.9.0 and is not measured separately.",
        "- Noise: when other processes compete for the cores, torch's OpenMP threads slow down far more "
        "than XLA's, which inflates the speedups; the per-repetition times are in the JSON, and the ratios "
        "that matter are those of a run on a quiet machine (load average near 0).",
        *([f"- Note: {result['note']}"] if result.get("note") else []),
        "- Re-render this file from the JSON: `python -m benchmarks.sweep_vs_peers --render_json=<json>`.",
        table(result),
        "",
        "## Where the time goes, chunk size, several processes",
        "",
        "- Per path, one chunk's compiled ops timed by jax's profiler and grouped into matmul, data movement "
        "and elementwise work, against the floor: `python -m benchmarks.path_profile` (its table is in "
        "`benchmarks/RESULTS_path_profile.md`).",
        "- Chunk size from free memory (`chunk_size=None` or a binary's `--chunk_size=0`; a number overrides): "
        "memory(c) = fixed + c x per_subset x runtime, the largest power of two that fits half the free memory "
        "(capped at 256); the terms and their check against measured peak memory (within 20%) are in "
        "`benchmarks/RESULTS_chunk_memory.md` and `jaxcircuits/engine/memory.py`.",
        "- Several processes: `tests/test_multiprocess.py` runs one sharded sweep and `run_masks` in two local "
        "`jax.distributed` processes (two CPU devices each) into one output directory and checks the results "
        "equal a single-process run, one process writing each chunk file (commands in BUILD.md).",
        "",
    ])


def main(argv):
    del argv
    if FLAGS.scaling_point:
        print("SCALING_RESULT " + json.dumps(scaling_point(json.loads(FLAGS.scaling_point))), flush=True)
        return
    if FLAGS.render_json:
        with open(FLAGS.render_json) as f:
            result = json.load(f)
        result["note"] = FLAGS.note or result.get("note", "")
        for name, shape in result["shapes"].items():
            shape["targets"] = evaluate_targets(shape) if name == TARGET_SHAPE else []
            shape["strongest"] = strongest_peers(shape)
        print(table(result))
        if FLAGS.results_md:
            with open(FLAGS.results_md, "w") as f:
                f.write(markdown(result))
        return
    unknown = [s for s in FLAGS.shapes if s not in SHAPES]
    if unknown:
        raise app.UsageError(f"unknown shapes {unknown}; known: {sorted(SHAPES)}")
    from benchmarks.peers import PEERS, use_site_packages
    use_site_packages(FLAGS.peers_path, "peers_path")
    unknown = [p for p in FLAGS.peers + FLAGS.last_peers if p not in PEERS]
    if unknown:
        raise app.UsageError(f"unknown peers {unknown}; known: {sorted(PEERS)}")
    bad = [s for s in FLAGS.stacks if not (s.isdigit() and int(s) >= 1)]
    if bad:
        raise app.UsageError(f"--stacks must be integers >= 1, got {bad}")
    import torch
    torch.set_grad_enabled(False)
    date = datetime.datetime.now().strftime("%Y-%m-%d")
    os.makedirs(FLAGS.out_dir, exist_ok=True)
    json_path = os.path.join(FLAGS.out_dir, f"sweep_vs_peers-{date}.json")
    result = {"date": datetime.datetime.now().isoformat(timespec="seconds"),
              "command": "python -m benchmarks.sweep_vs_peers " + " ".join(sys.argv[1:]),
              "load_start": machine_load(), "note": FLAGS.note,
              "environment": timing.environment(PACKAGES), "json": os.path.relpath(json_path, REPO),
              "flags": {f: FLAGS[f].value for f in ("shapes", "peers", "positions", "last_peers", "reps",
                                                    "peer_subsets", "stacks",
                                                    "chunk_size", "batch", "seq_len", "seed", "atol",
                                                    "scaling", "scaling_shape")}}
    print(load_line(result["load_start"]), flush=True)
    samples = result["matmul_gflops_samples"] = [timing.matmul_gflops()]
    print(f"float32 matmul: {samples[0]:.1f} GFLOP/s", flush=True)
    result["shapes"] = {name: run_shape(name, samples) for name in FLAGS.shapes}
    result["matmul_gflops"] = max(samples)
    for name, shape in result["shapes"].items():
        add_floor(shape, result["matmul_gflops"])
        shape["targets"] = evaluate_targets(shape) if name == TARGET_SHAPE else []
        shape["strongest"] = strongest_peers(shape)
    if FLAGS.scaling:
        result["scaling"] = scaling_series()
    result["load_end"] = machine_load()
    with open(json_path, "w") as f:
        json.dump(result, f, indent=1)
    print(table(result))
    print(f"\nwrote {json_path}")
    if FLAGS.results_md:
        with open(FLAGS.results_md, "w") as f:
            f.write(markdown(result))
        print(f"wrote {FLAGS.results_md}")
    failures = [f for s in result["shapes"].values() for f in s["failures"]]
    if failures:
        sys.exit("RESULT CHECK FAILED:\n  " + "\n  ".join(failures))


if __name__ == "__main__":
    app.run(main)
