"""The chunk size of a batch of patched runs, from the free memory and a run's activation footprint.

A chunk of c subsets runs as one compiled call (`patching.masks_metric`, `sweep.family_metric`):
one patched run (`patching.patched_hidden`) per subset, vmapped. The layers run one at a time
(a scan), so a subset's memory is what one layer holds live at once, not a sum over layers. With
B prompts of T tokens, a `Plan` recomputing the final R = suffix_len positions (their queries read
S = T key slots), and the config's D, H, K, Dh, F, one subset holds per prompt, in bytes, the most
of (a: bytes of an activation element; the softmax is float32):

    projections  a * R * (2D + H*Dh + 2*K*Dh)            residual x, normed h, q; k and v of the R
                                                         recomputed positions (earlier slots are
                                                         read in place from the target's cache)
    softmax      4 * 3 * H * R * S  +  a * 2 * R * D     scores, exp, pattern (float32) over [H, R, S];
                                                         residual and attention output
    mlp          a * R * (2D + 3F)  (gated)              residual and normed h; gate, up, act(gate)*up
                 a * R * (2D + 2F)  (not gated)          residual and normed h; up, act(up)

and the metric on the final hidden states h [B, n, D] holds its largest array that depends on h
(full-vocabulary logits [B, n', V] float32 for `AnswerProb`, a few columns for `LogitDiff`), found
by tracing it (the rest of its computation fuses into that array's consumers):

    per_subset = max(B * max(projections, softmax, mlp), metric)       XLA's buffer assignment
    fixed      = a * (L - start_layer) * (one layer's parameter count)
                                                         a copy of the recomputed layers' weights
                                                         (the layer loop's slice of the stacked params)
    memory(c)  = fixed + c * per_subset * runtime        per device, c subsets on it

runtime is what executing adds to the buffer assignment: 1 on accelerators (not measured here),
`CPU_RUNTIME` on CPU, where the executed peak RSS holds 1.3-1.65x the assigned per-subset
bytes (XLA:CPU's matmul runtime; benchmarks/RESULTS_chunk_memory.md).

`chunk_size` picks the largest power of two c per device with memory(c) <= FRACTION x the free
memory (`free_bytes`), times the devices the chunk is split over, at most `MAX_CHUNK`. The
three-point maximum is checked against XLA:CPU's buffer assignment (within 10%, head dims >= 32:
with smaller ones XLA:CPU fuses the scores away and the softmax term over-predicts;
tests/test_chunk_memory.py) and memory(c) against peak RSS (benchmarks/RESULTS_chunk_memory.md). XLA:CPU
computes bf16 matmuls in float32, so there a = 4 whatever the params' dtype (for bf16 params this
over-predicts, the safe side); elsewhere a is the params' itemsize.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import numpy as np
from absl import logging
from jax.extend import core as jcore

from jaxcircuits.models.config import ModelConfig

# Share of the free memory a chunk may take: headroom for fragmentation, the compiler and the
# estimate's error.
FRACTION = 0.5
# Largest chunk chosen from memory: on CPU throughput no longer grows past ~128 subsets
# (benchmarks/RESULTS.md, chunk series), while larger chunks coarsen progress and resume. An
# explicit chunk_size is not capped.
MAX_CHUNK = 256
# Executed peak / buffer assignment of the per-subset bytes on XLA:CPU (1.3-1.65 measured).
CPU_RUNTIME = 1.5
# Arrays the metric's largest one stands for (the array, its exponent, their normalised result).
METRIC_COPIES = 1


def _on_cpu() -> bool:
    return jax.devices()[0].platform == "cpu"


def activation_bytes(params) -> int:
    """Bytes of one activation element: 4 on CPU (XLA:CPU runs bf16 matmuls in float32), else the
    residual stream's dtype (the token embedding's)."""
    if _on_cpu():
        return 4
    return int(np.dtype(params["embed"]["tokens"].dtype).itemsize)


def layer_bytes(cfg: ModelConfig, suffix_len: int, seq_len: int, a: int) -> dict:
    """{'projections', 'softmax', 'mlp'}: bytes one subset holds per prompt at each point of a layer
    (formula in the module docstring) for R = suffix_len recomputed positions of seq_len slots."""
    R, S, D, F = suffix_len, seq_len, cfg.d_model, cfg.d_mlp
    H, KDh = cfg.n_heads, cfg.n_kv_heads * cfg.d_head
    return {"projections": a * R * (2 * D + H * cfg.d_head + 2 * KDh),
            "softmax": 4 * 3 * H * R * S + a * 2 * R * D,
            "mlp": a * R * (2 * D + (3 if cfg.gated_mlp else 2) * F)}


def _largest_dependent(jaxpr, tainted) -> int:
    """Bytes of the largest array in `jaxpr` computed from the invars flagged in `tainted` (into
    sub-jaxprs called with the same arguments, such as pjit and custom_jvp calls)."""
    live = {v for v, t in zip(jaxpr.invars, tainted) if t}
    largest = 0
    for eqn in jaxpr.eqns:
        flags = [not isinstance(v, jcore.Literal) and v in live for v in eqn.invars]
        if not any(flags):
            continue
        for sub in jcore.jaxprs_in_params(eqn.params):
            if len(sub.invars) == len(flags):
                largest = max(largest, _largest_dependent(sub, flags))
        for v in eqn.outvars:
            live.add(v)
            largest = max(largest, int(np.prod(v.aval.shape)) * np.dtype(v.aval.dtype).itemsize)
    return largest


def metric_bytes(params, metric, batch: int, d_model: int, dtype) -> int:
    """Bytes of the largest array of `metric(params, h)` that depends on h [batch, n, d_model]
    of `dtype` (traced, not compiled; params may be `jax.ShapeDtypeStruct`s)."""
    h = jax.ShapeDtypeStruct((batch, metric.n_positions, d_model), dtype)
    closed = jax.make_jaxpr(lambda p, x: metric(p, x))(params, h)
    n_params = len(jax.tree.leaves(params))
    tainted = [False] * n_params + [True] * (len(closed.jaxpr.invars) - n_params)
    return _largest_dependent(closed.jaxpr, tainted)


@dataclasses.dataclass(frozen=True)
class Footprint:
    """Memory of a chunk on one device: `fixed` bytes plus `per_subset` x `runtime` bytes for each
    subset on it (per_subset: the buffers the compiler assigns; runtime: what executing adds).
    `phases` holds the per-prompt `layer_bytes` and the metric's bytes it was built from."""

    per_subset: int
    fixed: int
    runtime: float = 1.0
    phases: dict = dataclasses.field(compare=False, default_factory=dict)

    def bytes(self, subsets_per_device: int) -> int:
        """Predicted bytes of a chunk with this many subsets on each device."""
        return int(self.fixed + subsets_per_device * self.per_subset * self.runtime)

    def chunk_size(self, n_devices: int = 1, free: Optional[int] = None, fraction: float = FRACTION,
                   max_chunk: int = MAX_CHUNK) -> int:
        """Subsets per chunk split over n_devices: the largest power of two per device whose
        `bytes` fit in fraction x `free` (bytes free per device, default `free_bytes(n_devices)`),
        times n_devices, at most max(max_chunk, n_devices). At least one per device, with a
        warning when even that is predicted not to fit."""
        free = free_bytes(n_devices) if free is None else free
        fits = int((fraction * free - self.fixed) // (self.per_subset * self.runtime))
        if fits < 1:
            logging.warning("memory: one subset is predicted to need %.3g GB (+ %.3g GB fixed) of %.3g GB "
                            "free; running one per device per chunk", self.per_subset * self.runtime / 1e9,
                            self.fixed / 1e9,
                            free / 1e9)
        cap = max(1, max_chunk // n_devices)
        return n_devices * 2 ** int(np.log2(min(max(fits, 1), cap)))


def footprint(params, cfg: ModelConfig, plan, shape, metric) -> Footprint:
    """The `Footprint` of patched runs under `plan` (a `patching.Plan`) of a target of `shape` (B, T)
    measured by `metric` (formula in the module docstring). params may be `jax.ShapeDtypeStruct`s."""
    batch, seq_len = shape
    a = activation_bytes(params)
    phases = layer_bytes(cfg, plan.suffix_len, seq_len, a)
    phases["metric"] = metric_bytes(params, metric, batch, cfg.d_model, params["embed"]["tokens"].dtype)
    per_layer = sum(int(np.prod(x.shape[1:])) for x in jax.tree.leaves(params["layers"]))
    per_subset = max(batch * max(phases[k] for k in ("projections", "softmax", "mlp")), phases["metric"])
    runtime = CPU_RUNTIME if _on_cpu() else 1.0
    return Footprint(per_subset, a * (cfg.n_layers - plan.start_layer) * per_layer, runtime, phases)


def _meminfo_available() -> int:
    """The host's MemAvailable (/proc/meminfo), lowered to a cgroup v2 limit minus usage if set."""
    with open("/proc/meminfo") as f:
        avail = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    try:
        with open("/sys/fs/cgroup/memory.max") as f, open("/sys/fs/cgroup/memory.current") as g:
            limit = f.read().strip()
            if limit != "max":
                avail = min(avail, int(limit) - int(g.read()))
    except (OSError, ValueError):
        pass
    return avail


def free_bytes(n_devices: int = 1) -> int:
    """Bytes free per device for a chunk split over n_devices local devices: the least
    bytes_limit - bytes_in_use of their `memory_stats()` (GPU, TPU), or where a device has none
    (CPU) the host's available memory shared among them. In several processes, the least over
    processes, so that all choose the same chunk size."""
    devices = jax.local_devices()[:n_devices]
    stats = [d.memory_stats() for d in devices]
    if all(s and "bytes_limit" in s for s in stats):
        free = min(s["bytes_limit"] - s.get("bytes_in_use", 0) for s in stats)
    else:
        free = _meminfo_available() // len(devices)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        free = int(np.min(multihost_utils.process_allgather(np.int64(free))))
    return int(free)


def describe(fp: Footprint, chunk: int, n_devices: int, free: int) -> str:
    """One line: the chunk size, its predicted memory per device and the free bytes per device."""
    return (f"chunk size {chunk} ({chunk // n_devices} per device): predicted {fp.bytes(chunk // n_devices) / 1e9:.3g} GB "
            f"per device ({fp.per_subset * fp.runtime / 1e6:.3g} MB per subset + {fp.fixed / 1e6:.3g} MB fixed) "
            f"of {free / 1e9:.3g} GB free")
