"""The chunk size of a batch, from the free memory and the compiler's own memory analysis.

A chunk of c items (masks, or members of a subset family) runs as one compiled call. Its memory
is what XLA assigns to the call's temporaries and outputs (`Compiled.memory_analysis()`: temp +
output bytes; the arguments, params and the problem, already exist), which grows linearly in c.
The run engine first compiles the largest chunk (`MAX_CHUNK`, at most the batch) and keeps it when
its bytes x runtime fit (`runner.chunk_from_memory`: one compilation, the one that runs); else
`estimate` compiles the call at two chunk sizes (C1, C2 items on one device) and extrapolates:

    per_item = (bytes(C2) - bytes(C1)) / (C2 - C1)        fixed = bytes(C1) - C1 * per_item + made
    memory(c) = fixed + c * per_item * runtime            per device, c items on it

so a new model feature, site or method needs no memory code (made: the arrays the batch created
for its call, `runner.ChunkCall.made`: the source cut to the masks' footprint, the plan's layer
params). runtime is what executing adds to
the buffer assignment: 1 on accelerators (not measured here), `CPU_RUNTIME` on CPU, where the
executed peak RSS holds 1.3-1.65x the assigned bytes (XLA:CPU's matmul runtime;
benchmarks/RESULTS_chunk_memory.md). `ChunkMemory.chunk_size` picks the largest power of two c per
device with memory(c) <= FRACTION x the free memory (`free_bytes`), times the devices the chunk is
split over, at most `MAX_CHUNK`. The extrapolation is checked against XLA's assignment at large
chunks (tests/test_chunk_memory.py) and memory(c) against the peak RSS
(benchmarks/RESULTS_chunk_memory.md).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import jax
import numpy as np
from absl import logging

# Share of the free memory a chunk may take: headroom for fragmentation, the compiler and the
# estimate's error.
FRACTION = 0.5
# Largest chunk chosen from memory: on CPU throughput no longer grows past ~128 subsets
# (benchmarks/RESULTS.md, chunk series), while larger chunks coarsen progress and resume. An
# explicit chunk_size is not capped.
MAX_CHUNK = 256
# Executed peak / buffer assignment on XLA:CPU (1.3-1.65 measured).
CPU_RUNTIME = 1.5
# The two chunk sizes (items on one device) the call is compiled at: large enough that the
# buffers growing with the chunk outweigh the fixed ones (below ~16 items XLA:CPU's assignment is
# not yet linear in the chunk).
PROBES = (32, 64)


def _on_cpu() -> bool:
    return jax.devices()[0].platform == "cpu"


@dataclasses.dataclass(frozen=True)
class ChunkMemory:
    """Memory of a chunk on one device: `fixed` bytes plus `per_item` x `runtime` bytes for each
    item on it (per_item, fixed: from the compiler's buffer assignment; runtime: what executing adds)."""

    per_item: float
    fixed: float
    runtime: float = 1.0

    def bytes(self, items_per_device: int) -> int:
        """Predicted bytes of a chunk with this many items on each device."""
        return int(self.fixed + items_per_device * self.per_item * self.runtime)

    def chunk_size(self, n_devices: int = 1, free: Optional[int] = None, fraction: float = FRACTION,
                   max_chunk: int = MAX_CHUNK) -> int:
        """Items per chunk split over n_devices: the largest power of two per device whose `bytes`
        fit in fraction x `free` (bytes free per device, default `free_bytes(n_devices)`), times
        n_devices, at most max(max_chunk, n_devices). At least one per device, with a warning when
        that is predicted to exceed fraction x free; MemoryError, before anything runs, when one
        item's own bytes exceed all the free memory (`fixed` is left out there: free memory may
        already hold what it counts)."""
        free = free_bytes(n_devices) if free is None else free
        fits = int((fraction * free - self.fixed) // max(self.per_item * self.runtime, 1.0))
        if self.per_item * self.runtime > free:
            raise MemoryError(f"one item per device is predicted to need {self.per_item * self.runtime / 1e9:.3g} GB "
                              f"(+ {self.fixed / 1e9:.3g} GB fixed) of {free / 1e9:.3g} GB free: use fewer or shorter "
                              "prompts, or a device with more memory")
        if fits < 1:
            logging.warning("memory: one item is predicted to need %.3g GB (+ %.3g GB fixed) of %.3g GB free; "
                            "running one per device per chunk", self.per_item * self.runtime / 1e9,
                            self.fixed / 1e9, free / 1e9)
        cap = max(1, max_chunk // n_devices)
        return n_devices * 2 ** int(np.log2(min(max(fits, 1), cap)))


def executable_bytes(compiled) -> int:
    """Temp + output bytes of a compiled program per device (XLA's buffer assignment)."""
    m = compiled.memory_analysis()
    return int(m.temp_size_in_bytes + m.output_size_in_bytes)


def compiled_bytes(lowered) -> int:
    """`executable_bytes` of a lowered call, compiled."""
    return executable_bytes(lowered.compile())


def tree_bytes(tree) -> int:
    """Bytes of the array leaves of a pytree."""
    return int(sum(np.prod(np.shape(a)) * np.dtype(a.dtype).itemsize for a in jax.tree.leaves(tree)
                   if hasattr(a, "dtype")))


def runtime() -> float:
    """What executing adds to the buffer assignment on this platform (`CPU_RUNTIME` on CPU, else 1)."""
    return CPU_RUNTIME if _on_cpu() else 1.0


_ESTIMATES: dict = {}


def estimate(lower: Callable[[int], object], key=None) -> ChunkMemory:
    """The `ChunkMemory` of a call from `lower(c)`, its lowering for a chunk of c items on one
    device, compiled at the `PROBES` sizes. `key` (hashable, or None): calls with the same key
    share one estimate, computed once per process."""
    if key is not None and key in _ESTIMATES:
        return _ESTIMATES[key]
    c1, c2 = PROBES
    b1, b2 = compiled_bytes(lower(c1)), compiled_bytes(lower(c2))
    per_item = max((b2 - b1) / (c2 - c1), 0.0)
    mem = ChunkMemory(per_item, max(b1 - c1 * per_item, 0.0), runtime())
    if key is not None:
        _ESTIMATES[key] = mem
    return mem


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


def describe(mem: ChunkMemory, chunk: int, n_devices: int, free: int) -> str:
    """One line: the chunk size, its predicted memory per device and the free bytes per device."""
    return (f"chunk size {chunk} ({chunk // n_devices} per device): predicted {mem.bytes(chunk // n_devices) / 1e9:.3g} "
            f"GB per device ({mem.per_item * mem.runtime / 1e6:.3g} MB per item + {mem.fixed / 1e6:.3g} MB fixed) "
            f"of {free / 1e9:.3g} GB free")
