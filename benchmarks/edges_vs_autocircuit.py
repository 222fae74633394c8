"""Edge patching and edge attribution: jaxcircuits against auto-circuit, in one run.

    python -m benchmarks.edges_vs_autocircuit                       # GPT-2 small shape, 1,000 masks
    python -m benchmarks.edges_vs_autocircuit --n_masks=200 --ac_masks=8 --batch=4 --seq_len=16

A random-weight HF GPT-2 of the shape (`sweep_vs_peers.SHAPES`, seeded) is loaded into jaxcircuits
(`load_hf_dir`) and into TransformerLens (`peers.hooked_transformer`: the same weights, no LayerNorm
folding or other processing), which auto-circuit wraps (`patchable_model`, factorized, separate
q/k/v inputs, every position patched at once). Target ("clean" in auto-circuit) = one random prompt
batch, source ("corrupt") = a second one; metric = logit(GOOD) - logit(BAD) at the last position.
Both tools read a receiver's input as resid + sum_s m[s, r] (src_s - cur_s) over its senders (embed,
every head's z W_O, every MLP), so an edge mask means the same thing in both (`AutoCircuit` maps
auto-circuit's per-receiver-module masks to `edges.EdgeMask` and back).

Edge-mask sweep: --n_masks random masks (each valid edge on with probability --density).
jaxcircuits runs them all (`run_masks` of `Mask(edges=...)`, --edge_chunk masks per compiled call; its time
includes the target run and source cache, its compile is timed apart on a first chunk);
auto-circuit runs one mask at a time inside `patch_mode` (mask parameters set per mask, as its
`run_circuits` does), on the first --ac_masks masks, extrapolated to --n_masks (its source
activations are computed once, untimed). Their values must agree on those masks (--edge_atol).

EAP over all edges, one batch: jaxcircuits `attribution.attribution_patching(..., 'edges')` (first call with
compile, then warm) against auto-circuit's `mask_gradient_prune_scores(mask_val=0, grad_function=
"logit", answer_function="avg_diff")`, whose score is minus our gradient (its loss is the negated
mean logit difference); the scores must agree (--edge_atol).

auto-circuit 1.0.1 was written for TransformerLens 1-2; under TransformerLens 3 the one name it
imports that was renamed (`HookedTransformerKeyValueCache`, a type for KV caches it never uses
here) is aliased by `import_auto_circuit`. Outputs: a table on stdout,
benchmarks/results/edges_vs_autocircuit-<date>.json and --results_md.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import importlib.util
import json
import os
import re
import sys
import tempfile
import time
import types

os.environ.setdefault("HF_HUB_OFFLINE", "1")        # nothing is loaded from a hub

from absl import app, flags

import jax
import jax.numpy as jnp
import numpy as np

from jaxcircuits.interventions import edges, sites
from jaxcircuits.engine.patching import masks_call, run_masks
from jaxcircuits.interventions.sites import Mask
from jaxcircuits.methods.attribution import attribution_patching
from jaxcircuits.interventions.metrics import LogitDiff
from jaxcircuits.models.transformer import run_with_cache
from jaxcircuits.interventions.problem import PatchingProblem, target_run

from benchmarks.path_profile import KINDS, UNNAMED, by_jax_op, kind_of, op_seconds
from benchmarks.peers import use_site_packages
from benchmarks.timing import environment, load_line, machine_load
from benchmarks.sweep_vs_peers import (BAD, GOOD, PACKAGES, REPO, SHAPES, build_hf_model, first_call,
                                       load_into_jaxcircuits, prompts)

FLAGS = flags.FLAGS        # --batch, --seq_len, --seed, --out_dir, --peers_path: benchmarks.sweep_vs_peers' flags


def import_auto_circuit() -> types.SimpleNamespace:
    """auto-circuit's pieces used here, importable under TransformerLens 3 (see the module doc);
    ImportError when auto_circuit is not installed."""
    if importlib.util.find_spec("auto_circuit") is None:
        raise ImportError("auto_circuit is not installed (pip install --no-deps auto-circuit==1.0.1; see setup.py)")
    import transformer_lens

    if not hasattr(transformer_lens, "HookedTransformerKeyValueCache"):
        from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache

        transformer_lens.HookedTransformerKeyValueCache = TransformerLensKeyValueCache
        alias = types.ModuleType("transformer_lens.past_key_value_caching")
        alias.HookedTransformerKeyValueCache = TransformerLensKeyValueCache
        sys.modules.setdefault(alias.__name__, alias)
    from auto_circuit.data import PromptDataLoader, PromptDataset
    from auto_circuit.prune_algos.mask_gradient import mask_gradient_prune_scores
    from auto_circuit.types import AblationType
    from auto_circuit.utils.ablation_activations import src_ablations
    from auto_circuit.utils.graph_utils import patch_mode, patchable_model

    return types.SimpleNamespace(**{f.__name__: f for f in (
        PromptDataLoader, PromptDataset, mask_gradient_prune_scores, src_ablations, patch_mode, patchable_model)},
        AblationType=AblationType)


class AutoCircuit:
    """auto-circuit's patchable model of a HF GPT-2 and the map between its masks and `edges.EdgeMask`.

    Its receiver modules blocks.{l}.hook_{q,k,v}_input hold masks [H, n_in] and blocks.{l}.hook_mlp_in
    [n_in], over its first n_in senders (the same order as `EdgeGraph.sender_labels`: 'Resid Start',
    then per layer 'A{l}.{h}' and 'MLP {l}'); the last layer's hook_resid_post holds the unembedding's
    [S]. `tgt`, `src` [B, T] and `good`, `bad` [B] fix the batch."""

    def __init__(self, hf_model, tgt, src, good, bad):
        import torch

        from benchmarks.peers import hooked_transformer

        if hf_model.config.model_type != "gpt2":
            raise ValueError(f"auto-circuit's graph has one k and v receiver per query head: GPT-2 only, "
                             f"got {hf_model.config.model_type!r}")
        self.ac = import_auto_circuit()
        tl = hooked_transformer(hf_model)
        tl.set_use_attn_result(True)
        tl.set_use_split_qkv_input(True)
        tl.set_use_hook_mlp_in(True)
        self.model = self.ac.patchable_model(tl, factorized=True, slice_output="last_seq", separate_qkv=True,
                                             device=torch.device("cpu"))
        c = hf_model.config
        self.graph = edges.EdgeGraph(c.n_layer, c.n_head, c.n_head)
        self.dests = sorted(self.model.dest_wrappers, key=lambda w: w.module_name)
        self.tgt, self.src = torch.as_tensor(tgt).long(), torch.as_tensor(src).long()
        self.good, self.bad = torch.as_tensor(good).long(), torch.as_tensor(bad).long()

    def _place(self, name: str):
        """(layer, receiver slice of `EdgeGraph`'s [L, S, R] layout) of a receiver module; (None, None)
        for the unembedding's."""
        l, kind = re.fullmatch(r"blocks\.(\d+)\.hook_(\w+)", name).groups()
        H, K = self.graph.n_heads, self.graph.n_kv_heads
        places = {"q_input": slice(0, H), "k_input": slice(H, H + K), "v_input": slice(H + K, H + 2 * K),
                  "mlp_in": slice(H + 2 * K, H + 2 * K + 1)}
        return (int(l), places[kind]) if kind in places else (None, None)

    def edge_mask(self, tensors: dict) -> edges.EdgeMask:
        """Their {module name: mask or score tensor} -> EdgeMask (float32, zero where they have no edge)."""
        g = self.graph
        layers = np.zeros((g.n_layers, g.n_senders, g.n_receivers), np.float32)
        final = np.zeros(g.n_senders, np.float32)
        for name, v in tensors.items():
            v = np.asarray(v.detach(), np.float32)
            l, r = self._place(name)
            if l is None:
                final[:] = v
            else:
                v = v.reshape(-1, v.shape[-1])                             # [receivers, n_in]
                layers[l, :v.shape[1], r] = v.T
        return edges.EdgeMask(layers, final)

    def masks_of(self, mask: edges.EdgeMask) -> dict:
        """One EdgeMask (leaves [L, S, R], [S]) -> their {module name: mask tensor}."""
        import torch

        out = {}
        for w in self.dests:
            l, r = self._place(w.module_name)
            n_in = w.patch_mask.shape[-1]
            v = np.asarray(mask.final) if l is None else np.asarray(mask.layers)[l, :n_in, r].T
            out[w.module_name] = torch.tensor(v.reshape(w.patch_mask.shape), dtype=torch.float32)
        return out

    def source_outs(self):
        """Their sender outputs [S, B, T, D] on the source batch (the patch values)."""
        return self.ac.src_ablations(self.model, self.src, self.ac.AblationType.RESAMPLE)

    def run(self, masks, src_outs) -> np.ndarray:
        """Metric [N, B] of the target batch under each of `masks` ({module: tensor} each), one forward a
        mask inside patch_mode, as run_circuits does."""
        import torch

        rows = torch.arange(len(self.tgt))
        out = []
        with self.ac.patch_mode(self.model, src_outs):
            for m in masks:
                for w in self.dests:
                    w.patch_mask.data = m[w.module_name]
                with torch.inference_mode():
                    logits = self.model(self.tgt)[self.model.out_slice]
                out.append((logits[rows, self.good] - logits[rows, self.bad]).numpy())
        return np.stack(out)

    def eap(self) -> np.ndarray:
        """float32 [E] in `EdgeGraph.edges` order: minus auto-circuit's EAP score (the gradient of the mean
        logit difference w.r.t. each edge's mask at 0, clean = target, corrupt = source)."""
        import torch

        data = self.ac.PromptDataset(self.tgt, self.src, list(self.good[:, None]), list(self.bad[:, None]))
        loader = self.ac.PromptDataLoader(data, seq_len=None, diverge_idx=0, batch_size=len(self.tgt))
        scores = self.ac.mask_gradient_prune_scores(self.model, loader, None, grad_function="logit",
                                                    answer_function="avg_diff", mask_val=0.0,
                                                    ablation_type=self.ac.AblationType.RESAMPLE,
                                                    clean_corrupt="corrupt")
        with torch.no_grad():
            return -np.asarray(self.graph.flat(self.edge_mask(scores)))


def edge_problem(params, cfg, tgt, src, good, bad) -> PatchingProblem:
    """Target run of tgt, source cache of src (`sites.EDGE_SOURCE`), every position, logit(good) - logit(bad)."""
    _, cache = run_with_cache(params, cfg, src, sites=sites.EDGE_SOURCE)
    metric = LogitDiff(good=jnp.asarray(good, jnp.int32)[:, None], bad=jnp.asarray(bad, jnp.int32)[:, None])
    return PatchingProblem.make(target_run(params, cfg, tgt), cache, np.ones(tgt.shape, np.float32), metric)


def random_masks(graph: edges.EdgeGraph, n: int, density: float, seed: int) -> edges.EdgeMask:
    """n masks (leaves [n, ...]): each valid edge 1 with probability `density`, else 0."""
    on = np.random.default_rng(seed).random((n, graph.n_edges)) < density
    return jax.tree.map(np.asarray, graph.unflat(on.astype(np.float32)))


def chunk_profile(params, cfg, problem: PatchingProblem, masks: edges.EdgeMask) -> dict:
    """One chunk of the sweep (--edge_chunk masks, compiled) under jax's profiler: {'by_kind': {kind of
    compiled op (`path_profile.KINDS`): seconds}, 'by_op': {jax operation (`path_profile.by_jax_op`):
    seconds}}, summed over the executor's threads."""
    call, items = masks_call(params, cfg, problem, Mask(edges=masks))
    chunk = items.take(0, FLAGS.edge_chunk)
    jax.block_until_ready(call(chunk))
    with tempfile.TemporaryDirectory() as d:
        ops = op_seconds(lambda: call(chunk), d)
    kinds = {k: sum(sec for op, sec in ops.items() if kind_of(op) == k) for k in KINDS}
    return {"by_kind": kinds, "by_op": by_jax_op(ops, call.lower(chunk).compile().as_text())}


# --------------------------------------------------------------------------- the run
def timed(fn):
    """(fn(), wall seconds, CPU seconds of this process: all its threads)."""
    t, c = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - t, time.process_time() - c


def run() -> dict:
    shape = SHAPES[FLAGS.shape]
    hf_model = build_hf_model(shape, FLAGS.seed)
    cfg, params = load_into_jaxcircuits(hf_model)
    graph = edges.EdgeGraph.of(cfg)
    tgt, src = prompts(cfg, FLAGS.seed)
    good, bad = np.full(FLAGS.batch, GOOD), np.full(FLAGS.batch, BAD)
    peer = AutoCircuit(hf_model, tgt, src, good, bad)
    masks = random_masks(graph, FLAGS.n_masks, FLAGS.density, FLAGS.seed)
    n_ac = min(FLAGS.ac_masks, FLAGS.n_masks)
    print(f"== {FLAGS.shape}: {graph.n_edges} edges, batch {FLAGS.batch} x {FLAGS.seq_len} tokens, "
          f"{FLAGS.n_masks} masks (auto-circuit on {n_ac})", flush=True)
    problem = lambda: edge_problem(params, cfg, tgt, src, good, bad)
    ours = lambda m: run_masks(params, cfg, problem(), Mask(edges=m), chunk_size=FLAGS.edge_chunk, shard=False)
    times = {}

    def record(key, n, fn):
        out, wall, cpu = timed(fn)
        times[key] = {"n": n, "wall_s": wall, "cpu_s": cpu, "per_s": n / wall, "per_cpu_s": n / cpu}
        print(f"  {key:<24} {n:5d} in {wall:8.1f} s wall, {cpu:8.1f} s CPU", flush=True)
        return out

    first_s, compile_s = first_call(lambda: ours(jax.tree.map(lambda a: a[:FLAGS.edge_chunk], masks)))
    print(f"  jaxcircuits first chunk {first_s:.1f} s (compile {compile_s:.1f} s)", flush=True)
    jc_vals = record("jaxcircuits sweep", FLAGS.n_masks, lambda: ours(masks))
    profile = chunk_profile(params, cfg, problem(), masks)
    ac_masks = [peer.masks_of(jax.tree.map(lambda a: a[i], masks)) for i in range(n_ac)]
    src_outs = peer.source_outs()
    peer.run(ac_masks[:1], src_outs)                                   # warm-up (untimed)
    ac_vals = record("auto-circuit sweep", n_ac, lambda: peer.run(ac_masks, src_outs))
    eap_first = timed(lambda: attribution_patching(params, cfg, problem(), "edges"))
    jc_eap = record("jaxcircuits EAP", 1, lambda: attribution_patching(params, cfg, problem(), "edges"))
    ac_eap = record("auto-circuit EAP", 1, peer.eap)
    checks = {"sweep": (ac_vals, jc_vals[:n_ac]), "eap": (ac_eap, jc_eap)}
    result = {"shape": FLAGS.shape, "n_edges": graph.n_edges, "hf_config": hf_model.config.to_diff_dict(),
              "times": times, "first_chunk_s": first_s, "compile_s": compile_s, "eap_first_call_s": eap_first[1],
              "max_abs_diff": {k: float(np.abs(a - b).max()) for k, (a, b) in checks.items()},
              "max_abs": {k: float(np.abs(b).max()) for k, (a, b) in checks.items()},
              "sweep_spread": float(np.ptp(jc_vals, axis=0).max()), "profile": profile,
              "ratios": {"sweep_wall": times["jaxcircuits sweep"]["per_s"] / times["auto-circuit sweep"]["per_s"],
                         "sweep_cpu": times["jaxcircuits sweep"]["per_cpu_s"] / times["auto-circuit sweep"]["per_cpu_s"],
                         "eap_wall": times["auto-circuit EAP"]["wall_s"] / times["jaxcircuits EAP"]["wall_s"],
                         "eap_cpu": times["auto-circuit EAP"]["cpu_s"] / times["jaxcircuits EAP"]["cpu_s"]}}
    result["failures"] = [f"{k}: max |auto-circuit - jaxcircuits| = {d:.3g} > atol {FLAGS.edge_atol}"
                          for k, d in result["max_abs_diff"].items() if not d <= FLAGS.edge_atol]
    return result


def markdown(result: dict) -> str:
    t, r, f, env = result["times"], result["ratios"], result["flags"], result["environment"]
    row = lambda name, key: (f"| {name} | {t[key]['n']} | {t[key]['wall_s']:.1f} | {t[key]['cpu_s']:.1f} | "
                             f"{t[key]['per_s']:.3f} | {t[key]['per_cpu_s']:.3f} |")
    head = ["| tool | runs timed | wall s | CPU s | per wall s | per CPU s |", "|---|---:|---:|---:|---:|---:|"]
    return "\n".join([
        "# Edge patching and EAP: jaxcircuits vs auto-circuit", "",
        load_line(result["load_start"], result["load_end"]), "",
        f"Command: `{result['command']}` ({result['date']}).", "",
        f"Machine: {env['cpu']}, {env['cores']} cores; CPU s (this process's CPU time, all threads) is steadier "
        f"than wall time under contention. torch threads {env['torch_threads']}; "
        + ", ".join(f"{k} {v}" for k, v in env["versions"].items() if v) + ".", "",
        "auto-circuit 1.0.1 runs from `pip install --no-deps auto-circuit==1.0.1` plus the packages its imports "
        "need (setup.py's `bench` extra); under TransformerLens 3 one renamed type is aliased (`import_auto_circuit`).", "",
        f"Model: {result['shape']} shape, random weights (seed {f['seed']}), {result['n_edges']} edges; batch "
        f"{f['batch']} x {f['seq_len']} tokens, every position patched; metric logit(GOOD) - logit(BAD) at the "
        "last position.", "",
        f"## Edge-mask sweep ({f['n_masks']} random masks, each edge on with probability {f['density']})", "",
        *head, row(f"jaxcircuits `run_masks` of edge masks (chunk {f['edge_chunk']})", "jaxcircuits sweep"),
        row("auto-circuit, one mask at a time in `patch_mode`", "auto-circuit sweep"), "",
        f"jaxcircuits / auto-circuit, masks per second: **{r['sweep_wall']:.1f}x** wall, **{r['sweep_cpu']:.1f}x** "
        f"CPU (issue target >= 10x). auto-circuit ran the first {t['auto-circuit sweep']['n']} masks (its rate "
        f"extrapolated); its source activations are not in its time. jaxcircuits' time includes its target run "
        f"and source cache; its first chunk (trace, compile, run) took {result['first_chunk_s']:.1f} s, of it "
        f"compile {result['compile_s']:.1f} s, not in its time.", "",
        f"Values: max |auto-circuit - jaxcircuits| on the shared masks {result['max_abs_diff']['sweep']:.2e} "
        f"(values up to {result['max_abs']['sweep']:.3f}; largest spread over masks of one prompt "
        f"{result['sweep_spread']:.3f}).", "",
        "## EAP over all edges, one batch", "",
        *head, row("jaxcircuits `attribution_patching(..., 'edges')` (warm)", "jaxcircuits EAP"),
        row("auto-circuit `mask_gradient_prune_scores(mask_val=0)`", "auto-circuit EAP"), "",
        f"auto-circuit / jaxcircuits time: {r['eap_wall']:.1f}x wall, {r['eap_cpu']:.1f}x CPU. jaxcircuits' first "
        f"call (with compile) took {result['eap_first_call_s']:.1f} s wall. Scores: max |auto-circuit - "
        f"jaxcircuits| {result['max_abs_diff']['eap']:.2e} (scores up to {result['max_abs']['eap']:.3g}).", "",
        *profile_section(result["profile"], f["edge_chunk"]),
        *(f"**CHECK FAILED**: {x}" for x in result["failures"]), ""])


# What each jax operation of the edge forward is (`EdgeIO`, `models.block`), for the profile's table.
PARTS = {"sr,sbtd->rbtd": "every receiver's sum over the senders (once per layer)",
         "su,sbtd->ubtd": "the MLP's sum over its own layer's heads",
         "ubtd,due->ubte": "q/k/v projection of each receiver's own input",
         "btd,due->btue": "fused q/k/v projection of the residual (receivers with no edge: the plain run's value)",
         "btd,df->btf": "MLP up projection", "btf,fd->btd": "MLP down projection",
         "bthe,hed->hbtd": "each head's write z_h W_O[h] (sender deltas)", "bthe,hed->btd": "o projection",
         "reduce_sum": "norms (mean and variance of each receiver's input)",
         "add": "receivers' inputs x + sums (and norm biases broadcast to them)", "mul": "norm scales, deltas x pos_w",
         "slice": "each group's rows of the receivers' sums",
         "broadcast_in_dim": "the sender-delta carry [S, B, T, D] set up for each mask",
         "scatter": "a sender group's deltas written into the carry",
         UNNAMED: "XLA:CPU dot thunks without an event of their own: mostly the receivers' sum over the senders (`sr,sbtd->rbtd`)"}


def profile_section(profile: dict, chunk: int) -> list:
    """Markdown lines: the profiled chunk's time by kind of op and by jax operation (top 12)."""
    total = sum(profile["by_kind"].values())
    top = sorted(profile["by_op"].items(), key=lambda kv: -kv[1])[:12]
    return ["## Where the edge forward's time goes (one chunk under jax's profiler)", "",
            f"One compiled chunk ({chunk} masks) of the sweep above, in this run (same load), its ops' time summed "
            f"over XLA's threads ({total:.2f} s; the profiled call is slower than an untimed one) "
            "(`benchmarks.path_profile.op_seconds`), by kind of compiled op (`path_profile.kind_of`: XLA:CPU runs "
            "the per-receiver norms as YNNPACK fusions too, so they count as matmul there): "
            + ", ".join(f"{k} {s / total:.0%}" for k, s in profile["by_kind"].items()) + ".", "",
            "| jax operation (compiled ops made from it) | what it is | s | share |", "|---|---|---:|---:|",
            *(f"| `{op}` | {PARTS.get(op.split('/')[0], '')} | {s:.3f} | {s / total:.1%} |" for op, s in top), "",
            "What is structural: every receiver reads its own input, so a layer normalises and projects R = H + 2K + 1 "
            "inputs (the per-receiver q/k/v projections and norms) where a plain layer does one; the fused projection "
            "of the residual is kept so that a receiver without an edge (and the all-zero mask) gives the plain run's "
            "value bit for bit; the sum over senders is one contraction per layer ([R, S] x [S, B T D], the carry read "
            "once). Its rows of senders that come after the layer are zeros (about half of them): skipping them needs "
            "static per-layer sender counts, i.e. an unrolled layer loop (longer compiles).", ""]


def main(argv):
    del argv
    jax.config.update("jax_default_matmul_precision", "highest")
    load = machine_load()
    print(load_line(load), flush=True)
    use_site_packages(FLAGS.peers_path, "peers_path")
    result = run()
    result.update(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  command="python -m benchmarks.edges_vs_autocircuit " + " ".join(sys.argv[1:]),
                  load_start=load, load_end=machine_load(), environment=environment(PACKAGES),
                  flags={k: getattr(FLAGS, k) for k in ("seed", "batch", "seq_len", "n_masks", "ac_masks",
                                                        "edge_chunk", "density", "edge_atol")})
    result["environment"]["versions"]["auto-circuit"] = importlib.metadata.version("auto-circuit")
    os.makedirs(FLAGS.out_dir, exist_ok=True)
    path = os.path.join(FLAGS.out_dir, f"edges_vs_autocircuit-{datetime.date.today()}.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    text = markdown(result)
    print(text)
    if FLAGS.results_md_edges:
        with open(FLAGS.results_md_edges, "w") as f:
            f.write(text)
    if result["failures"]:
        sys.exit(1)


if __name__ == "__main__":
    flags.DEFINE_string("shape", "gpt2-small", "model shape (benchmarks.sweep_vs_peers.SHAPES; GPT-2 only)")
    flags.DEFINE_integer("n_masks", 1000, "random edge masks of the sweep")
    flags.DEFINE_integer("ac_masks", 16, "masks auto-circuit runs (its rate is extrapolated)")
    flags.DEFINE_integer("edge_chunk", 8, "jaxcircuits masks per compiled call")
    flags.DEFINE_float("density", 0.5, "probability of each edge being on in a random mask")
    flags.DEFINE_float("edge_atol", 1e-4, "max |auto-circuit - jaxcircuits| allowed (sweep values and EAP scores)")
    flags.DEFINE_string("results_md_edges", os.path.join(REPO, "benchmarks", "RESULTS_edges.md"),
                        "markdown report to write ('' to skip)")
    app.run(main)
