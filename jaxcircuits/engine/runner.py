"""The run engine: one loop over the chunks of a batch, for mask batches and sweeps alike.

A batch is N items (masks, or the ranks of a subset family's members) evaluated by one compiled
call (`ChunkCall`) in chunks of C items. Every chunk is padded to C (one compilation serves all),
split over the devices when sharded (a 1-D mesh named 'masks'), its values [c, B] trimmed, handed to
`RunOptions.on_chunk`, and kept by a `Store` when the batch streams to disk (a sweep directory:
chunks already there are not recomputed), under a progress bar. C comes from `RunOptions.chunk_size`,
else from the store (a resumed sweep keeps its own), else from the free memory and the compiler's
memory analysis of the call (`memory.estimate`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Dict, NamedTuple, Optional, Protocol

import jax
import numpy as np
from absl import logging

from jaxcircuits import logs
from jaxcircuits.engine import memory

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class RunOptions:
    """How a batch runs. chunk_size: items per compiled call (None or 0: the largest that fits the
    free memory; a resumed sweep keeps its own); shard: split each chunk over every device (the chunk
    size rounded up to a multiple of the device count); on_chunk(start, values [c, B]): called after
    each chunk with the index of its first item; resume: a sweep continues from what its directory
    holds (else an existing sweep there is an error); describe: free JSON a sweep stores in its spec."""

    chunk_size: Optional[int] = None
    shard: bool = True
    on_chunk: Optional[Callable[[int, np.ndarray], None]] = None
    resume: bool = True
    describe: Optional[dict] = None


@dataclasses.dataclass(frozen=True)
class ChunkCall:
    """A batch's compiled call: fn(**args, **static, <chunk>=chunk) -> values [c, B], with fn a
    `jax.jit` function, `static` its static arguments and `chunk` the name of the argument a chunk
    goes to. `key`: hashable identity of everything but the chunk's values (calls with equal keys
    share a memory estimate), None: estimate anew; `made`: bytes the batch allocated for the call
    besides the call's own (e.g. the source cut to the masks' footprint, the plan's layer params),
    resident while it runs (`memory.tree_bytes`)."""

    fn: Callable
    args: dict
    static: dict
    chunk: str
    key: Any = None
    made: int = 0

    def __call__(self, chunk):
        return self.fn(**self.args, **self.static, **{self.chunk: chunk})

    def lower(self, chunk):
        return self.fn.lower(**self.args, **self.static, **{self.chunk: chunk})

    def through(self, exe) -> Callable:
        """The call of a chunk through `exe`, this call compiled (`lower(...).compile()`) for chunks of
        its shapes."""
        return lambda chunk: exe(**self.args, **{self.chunk: chunk})


class Items(NamedTuple):
    """The N items of a batch: take(lo, c) -> the chunk of c items from lo (a pytree with leaves
    [c, ...], padded past N so that every chunk has one shape); unit names an item in progress bars."""

    n: int
    take: Callable[[int, int], Any]
    unit: str = "mask"


def stacked(tree) -> Items:
    """Items of a pytree whose leaves are [N, ...] (host or device): chunks padded with zeros."""
    n = int(np.shape(jax.tree.leaves(tree)[0])[0])

    def take(lo: int, c: int):
        def part(a):
            a = np.asarray(a[lo:lo + c])
            pad = c - a.shape[0]
            return np.concatenate([a, np.zeros((pad, *a.shape[1:]), a.dtype)]) if pad else a
        return jax.tree.map(part, tree)
    return Items(n, take)


class Store(Protocol):
    """Where a batch's chunks stream to (a sweep directory). `chunk_size()`: the size it was started
    with (None: none yet); `open(chunk_size, bounds)` -> {chunk index: values} of the chunks it holds
    (bounds: each chunk's [lo, hi)); `save(i, lo, hi, values)`; `finish(values [N, B])`."""

    def chunk_size(self) -> Optional[int]: ...

    def open(self, chunk_size: int, bounds: list) -> Dict[int, np.ndarray]: ...

    def save(self, i: int, lo: int, hi: int, values: np.ndarray) -> None: ...

    def finish(self, values: np.ndarray) -> None: ...


def mask_axis_sharding(n_devices: Optional[int] = None):
    """NamedSharding that splits axis 0 over the local devices (a 1-D mesh named 'masks')."""
    devs = np.array(jax.devices()[:n_devices or jax.device_count()])
    mesh = jax.sharding.Mesh(devs, ("masks",))
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("masks"))


def to_host(x) -> np.ndarray:
    """A result sharded over the devices of every process, as a whole host array in each process
    (`multihost_utils.process_allgather`; a plain copy with one process)."""
    if jax.process_count() == 1:
        return np.asarray(x)
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def chunk_devices(shard: bool) -> int:
    """Devices a chunk's item axis is split over: every device with shard=True, else one."""
    return jax.device_count() if shard else 1


def chunking(n: int, chunk_size: int, shard: bool):
    """(chunk size, sharding or None) for n items: at most n per chunk, and with shard=True and
    several devices a multiple of the device count, split over them by `mask_axis_sharding`."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size}: expected >= 1 (or None / 0 for the size from free memory)")
    chunk_size = min(chunk_size, n)
    if chunk_devices(shard) == 1:
        return chunk_size, None
    return math.ceil(chunk_size / jax.device_count()) * jax.device_count(), mask_axis_sharding()


def _shaped(chunk, sharding):
    """The shapes and dtypes of a chunk's leaves, placed with `sharding` (None: unplaced)."""
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), np.asarray(a).dtype, sharding=sharding), chunk)


# Executables of the largest chunks compiled by `chunk_from_memory`, by (call key, chunk shapes), so
# that a batch of the same signature runs without compiling again (at most `_KEEP`, oldest dropped).
_EXECUTABLES: dict = {}
_KEEP = 16


def _compiled(call: ChunkCall, chunk):
    """The executable of `call` for chunks shaped like `chunk`, kept in `_EXECUTABLES` when the call
    has a key."""
    if call.key is None:
        return call.lower(chunk).compile()
    key = (call.key, jax.tree.structure(chunk), tuple((a.shape, a.dtype, a.sharding) for a in jax.tree.leaves(chunk)))
    if key not in _EXECUTABLES:
        if len(_EXECUTABLES) >= _KEEP:
            _EXECUTABLES.pop(next(iter(_EXECUTABLES)))
        _EXECUTABLES[key] = call.lower(chunk).compile()
    return _EXECUTABLES[key]


def chunk_from_memory(call: ChunkCall, items: Items, shard: bool):
    """(chunk size, the call compiled for it or None) that fits the free memory of the devices a
    chunk is split over: the largest chunk (`memory.MAX_CHUNK`, at most every item) when XLA's
    buffer assignment of its compiled call (times the runtime factor) fits, and then that executable;
    else the size `memory.estimate` of the call gives (two more compilations). Logged with its
    prediction."""
    n_dev = chunk_devices(shard)
    free = memory.free_bytes(n_dev)
    size, sharding = chunking(items.n, max(memory.MAX_CHUNK, n_dev), shard)
    exe = _compiled(call, _shaped(items.take(0, size), sharding))
    per_device = size // n_dev
    whole = memory.ChunkMemory(memory.executable_bytes(exe) / per_device, call.made, memory.runtime())
    if whole.bytes(per_device) <= memory.FRACTION * free:
        logging.info("%s", memory.describe(whole, size, n_dev, free))
        return size, call.through(exe)
    mem = memory.estimate(lambda c: call.lower(items.take(0, c)), call.key)
    mem = dataclasses.replace(mem, fixed=mem.fixed + call.made)
    size = mem.chunk_size(n_dev, free)
    logging.info("%s", memory.describe(mem, size, n_dev, free))
    return size, None


def run_chunks(call: ChunkCall, items: Items, opts: RunOptions, label: str, store: Optional[Store] = None) -> np.ndarray:
    """call(chunk) for every chunk of `items`: values [N, B] on the host, in item order.

    The chunk size is opts.chunk_size, else (resuming) the store's, else from memory
    (`chunk_from_memory`, whose executable then runs the chunks); chunks the store already holds are
    not recomputed. Each computed chunk goes to store.save, then opts.on_chunk;
    batches of more than one chunk show a progress bar named `label`; the store's `finish` sees the
    whole result. An empty batch (N = 0) gives empty values [0, B], compiling nothing."""
    n = items.n
    if n == 0:
        if store is not None:
            raise ValueError(f"{label}: the batch is empty")
        out = jax.eval_shape(call, items.take(0, 1))
        return np.zeros((0, *out.shape[1:]), out.dtype)
    size, run = opts.chunk_size or (store is not None and opts.resume and store.chunk_size()), None
    if not size:
        size, run = chunk_from_memory(call, items, opts.shard)
    size, sharding = chunking(n, size, opts.shard)
    run = run or call
    bounds = [(lo, min(lo + size, n)) for lo in range(0, n, size)]
    parts = store.open(size, bounds) if store is not None else {}
    done = sum(bounds[i][1] - bounds[i][0] for i in parts)
    with logs.progress(n, label, items.unit, done, leave=store is not None,
                       disable=store is None and len(bounds) == 1) as bar:
        for i, (lo, hi) in enumerate(bounds):
            if i in parts:
                continue
            chunk = items.take(lo, size)
            if sharding is not None:
                chunk = jax.device_put(chunk, sharding)
            vals = to_host(run(chunk))[:hi - lo]
            if store is not None:
                store.save(i, lo, hi, vals)
            parts[i] = vals
            bar.update(hi - lo)
            if opts.on_chunk is not None:
                opts.on_chunk(lo, vals)
    out = np.concatenate([parts[i] for i in range(len(bounds))])
    if store is not None:
        store.finish(out)
    return out
