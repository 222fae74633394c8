"""The patched forward for many masks: shared prefix, KV-cached suffix, vmap, chunks, devices.

A `PatchingProblem` holds what every patched run of one experiment shares: the target run
(computed once, `TargetRun`), the source aligned to it, the position weights and the metric.
A mask can change nothing before the first layer it touches (`Plan.start_layer`) nor, under causal
attention, any position before the first one it touches: each patched run starts from the cached
residual stream at `start_layer`, recomputes only the final `Plan.suffix_len` positions, and reads
earlier keys/values from the target's cache. `suffix_len == T` is the full-position path.
These fast paths live here; the model's block (`models.transformer.block`) stays the plain math.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, Optional, Tuple

import jax
import numpy as np
from absl import logging
from flax import struct

from jaxcircuits import logs
from jaxcircuits.engine import memory
from jaxcircuits.interventions import sites
from jaxcircuits.models import transformer as M
from jaxcircuits.interventions.metrics import check_token_ids
from jaxcircuits.models.config import ModelConfig
from jaxcircuits.interventions.sites import Intervention, LayerHooks, Mask, Source

Array = jax.Array


@struct.dataclass
class TargetRun:
    """The unpatched target run's cached state.

    tokens, attn_mask, pos_ids: [B, T]; resid_pre: [L, B, T, D]; head_out: [L, B, T, H, Dh];
    kv: (k, v) each [L, B, T, K, Dh].
    """

    tokens: Array
    attn_mask: Array
    pos_ids: Array
    resid_pre: Array
    head_out: Array
    kv: tuple


def target_run(params, cfg: ModelConfig, tokens, attn_mask=None, pos_ids=None) -> TargetRun:
    """Run the target once, keeping what every patched run shares (inputs: `M.check_inputs`)."""
    tokens, attn_mask, pos_ids = M.check_inputs(cfg, tokens, attn_mask, pos_ids)
    _, cache = M.forward(params, cfg, tokens, attn_mask, pos_ids, return_logits=False,
                         collect=("resid_pre", "head_out", "kv"))
    return TargetRun(tokens, attn_mask, pos_ids, cache["resid_pre"], cache["head_out"], cache["kv"])


@struct.dataclass
class PatchingProblem:
    """One patching experiment: which run is patched, from what, where, and what is measured.

    target: the `TargetRun` [B, T]; source: replacement activations aligned to the target
    (`positions.align`; entries [L, B, T, ...]); pos_w: float32 [B, T] position weights
    (1 = patch); metric: a metric (`jaxcircuits.interventions.metrics`) of the final hidden states -> [B].
    Build it with `PatchingProblem.make`, which checks the pieces against each other.
    """

    target: TargetRun
    source: Source
    pos_w: Array
    metric: Any

    @classmethod
    def make(cls, target: TargetRun, source: Source, pos_w, metric) -> "PatchingProblem":
        """Check shapes (source entries [L, B, ...] with the target's T positions: `sites.check_source`;
        pos_w [B, T], finite: `sites.check_pos_w`; metric batch B) and build. Source values are checked
        where the masks run can read them (`for_footprint`): NaN elsewhere is harmless."""
        L, (B, T) = target.resid_pre.shape[0], target.tokens.shape
        pos_w = sites.check_pos_w(pos_w, B, T)
        sites.check_source(source, L, B, T)
        for leaf in jax.tree.leaves(metric):
            if getattr(leaf, "ndim", 0) and leaf.shape[0] != B:
                raise ValueError(f"metric {type(metric).__name__} has batch {leaf.shape[0]} (a field of shape "
                                 f"{tuple(leaf.shape)}), expected the target's batch {B} on axis 0")
        return cls(target, dict(source), pos_w, metric)

    def for_footprint(self, cfg: ModelConfig, footprint: Mask) -> "PatchingProblem":
        """The problem with only the source entries the sites of `footprint` read, checked against
        `cfg` and zero outside the footprint (leaves [L, *units], nonzero where the masks run may
        patch), NaN or inf inside it a ValueError (`sites.select_source`). Call it once per batch,
        outside jit: `run_masks`, `patched_metric` and `run_sweep` do. Also checks the metric's token
        ids against the vocabulary (`metrics.check_token_ids`)."""
        check_token_ids(self.metric, cfg.vocab_size)
        return self.replace(source=sites.select_source(cfg, self.source, footprint, self.pos_w))


@dataclasses.dataclass(frozen=True)
class Plan:
    """Static shape of the patched computation.

    start_layer: first layer any mask touches; suffix_len: final positions recomputed (T = all);
    from_z: the first layer is touched only at or after its head outputs z (no `before_z` site).
    """

    start_layer: int
    suffix_len: int
    from_z: bool = False


def make_plan(touched: dict, pos_w) -> Plan:
    """Plan from {site: layers any mask may touch there} and the position weights [B, T] (host)."""
    layers = sorted({int(l) for ls in touched.values() for l in ls})
    if not layers:
        raise ValueError("the masks touch no layer")
    from_z = not any(layers[0] in touched[s] for s in touched if sites.get(s).before_z)
    return Plan(layers[0], _suffix_len(pos_w), from_z)


def _suffix_len(pos_w) -> int:
    """Final positions from the first one any row of pos_w [B, T] (host) selects to the end."""
    cols = np.flatnonzero(np.asarray(pos_w).any(0))
    if not len(cols):
        raise ValueError("the position weights select no position")
    return int(np.asarray(pos_w).shape[1] - cols[0])


def layers_touched(mask: Mask) -> dict:
    """{site: sorted layers} where a concrete mask (leaves [L, ...] or [N, L, ...]) is nonzero."""
    out = {}
    for s in mask.sites():
        a = np.abs(np.asarray(getattr(mask, s)))
        layer_axis = a.ndim - 1 - len(sites.get(s).units)
        per_layer = a.sum(axis=tuple(i for i in range(a.ndim) if i != layer_axis))
        out[s] = np.flatnonzero(per_layer > 0).tolist()
    return out


def _narrow(iv: Intervention, start: int, stop: Optional[int], first_pos: int) -> Intervention:
    """An intervention's layers [start, stop) and (query) positions [first_pos, T)."""
    def tail(name, a):
        if sites.split_key(name):                                # transforms have no positions
            return a
        axis = sites.source_entry(name).pos_axes[0] + 1          # + the layer axis
        return a[(slice(None),) * axis + (slice(first_pos, None),)]
    src = {k: tail(k, v) for k, v in _layers(iv.source, start, stop).items()} if iv.source else iv.source
    return Intervention(_layers(iv.mask, start, stop), src, iv.pos_w[:, first_pos:])


def _layers(tree, start: int, stop: Optional[int] = None):
    """Every leaf sliced to layers [start, stop) along axis 0 (None-safe)."""
    return jax.tree.map(lambda a: a[start:stop], tree)


def _one_layer(tree, l: int):
    """Layer l of stacked params, or of an intervention's mask and source (pos_w kept)."""
    if isinstance(tree, Intervention):
        return Intervention(_one_layer(tree.mask, l), _one_layer(tree.source, l), tree.pos_w)
    return jax.tree.map(lambda a: a[l], tree)


@struct.dataclass
class PlanLayers:
    """The layer params a plan's patched run reads, cut from the stacked params once, outside the
    compiled call (slicing a stacked array inside it copies the slice on every call): `first` (layer
    start_layer, when the plan starts from its cached z), `mid` (the scanned layers, stacked) and
    `last` (layer L-1 when it runs alone with queries only for the metric's positions); None where
    the plan has no such part."""

    first: Optional[dict]
    mid: Optional[dict]
    last: Optional[dict]


def _bounds(cfg: ModelConfig, plan: Plan, n_out: int) -> Tuple[int, int]:
    """(first scanned layer, end of the scan) of `plan` for a metric reading n_out positions."""
    start = plan.start_layer + int(plan.from_z)
    split = cfg.n_layers - 1 if plan.suffix_len > n_out else cfg.n_layers   # the last layer runs alone if it can shrink
    return start, split


@functools.partial(jax.jit, static_argnames=("cfg", "plan", "n_out"))
def plan_layers(params, cfg: ModelConfig, plan: Plan, n_out: int) -> PlanLayers:
    """The `PlanLayers` of `plan` (metric reading n_out positions) from stacked params."""
    layers, L = params["layers"], cfg.n_layers
    start, split = _bounds(cfg, plan, n_out)
    return PlanLayers(_one_layer(layers, plan.start_layer) if plan.from_z else None,
                      _layers(layers, start, split) if start < split else None,
                      _one_layer(layers, L - 1) if start <= L - 1 and split == L - 1 else None)



def patched_hidden(params, cfg: ModelConfig, problem: PatchingProblem, mask: Mask, plan: Plan,
                   layers: Optional[PlanLayers] = None) -> Array:
    """Final-normed hidden states [B, n, D] of the last n = metric.n_positions positions under one mask.

    mask leaves [L, ...] over all layers (zero before plan.start_layer); problem.pos_w zero before
    the last plan.suffix_len positions. Computes only what the mask can change: layers from
    start_layer (from the target's cached z when plan.from_z), the final plan.suffix_len positions
    (earlier keys/values from the target, read in place), and in the last layer queries only for
    the n positions the metric reads. `layers`: the plan's `PlanLayers` (cut here when None).
    """
    target, n_out = problem.target, problem.metric.n_positions
    L, T = cfg.n_layers, target.tokens.shape[1]
    L0, R = plan.start_layer, plan.suffix_len
    if n_out > R:
        raise ValueError(f"metric reads {n_out} final positions but only {R} are recomputed")
    layers = plan_layers(params, cfg, plan, n_out) if layers is None else layers
    first = T - R
    iv = _narrow(Intervention(mask, problem.source, problem.pos_w), 0, None, first)
    pos = target.pos_ids[:, first:]
    x = target.resid_pre[L0][:, first:]
    if plan.from_z:
        z = target.head_out[L0][:, first:]
        x = M.block(cfg, layers.first, x, lambda h: z, LayerHooks(_one_layer(iv, L0), ()))
    start, split = _bounds(cfg, plan, n_out)
    if layers.mid is not None:
        kv = None if R == T else M.KVCache(*((c[start:split, :, :first],) for c in target.kv), first)
        x, _ = M.run_layers(layers.mid, cfg, x, pos, target.attn_mask, kv=kv, intervention=_narrow(iv, start, split, 0))
    if layers.last is not None:
        # Last layer: keys/values for every recomputed position, queries for the n_out read.
        p, hooks = layers.last, LayerHooks(_one_layer(iv, L - 1), ())
        _, k, v = M.qkv(cfg, p, M.norm(cfg, p["norm1"], hooks("resid_pre", x)), M.rope_tables(cfg, pos), hooks)
        # Keys/values as parts read in place: the target's prefix (shared by every mask), then this run's.
        parts = [(c[L - 1:, :, :first], own[None, :, :R - n_out].astype(c.dtype)) for c, own in zip(target.kv, (k, v))]
        parts = [tuple(a for a in kv if a.shape[2]) for kv in parts]
        x, _ = M.run_layers(jax.tree.map(lambda a: a[None], p), cfg, x[:, R - n_out:], pos[:, R - n_out:],
                            target.attn_mask, kv=M.KVCache(*parts, T - n_out),
                            intervention=_narrow(iv, L - 1, None, R - n_out))
    return M.final_norm(params, cfg, x[:, -n_out:])


def _plan_for(problem: PatchingProblem, mask: Mask) -> Plan:
    """The cheapest plan for a concrete mask; for a traced one, every layer and the positions
    pos_w selects (all positions when pos_w is traced too)."""
    if not any(isinstance(a, jax.core.Tracer) for a in jax.tree.leaves(mask)):
        return make_plan(layers_touched(mask), problem.pos_w)
    if isinstance(problem.pos_w, jax.core.Tracer):
        return Plan(0, problem.target.tokens.shape[1])
    return Plan(0, _suffix_len(problem.pos_w))


def patched_metric(params, cfg: ModelConfig, problem: PatchingProblem, mask: Mask,
                   plan: Optional[Plan] = None) -> Array:
    """The metric [B] of the target run patched by one `mask` (leaves [L, ...]); differentiable in
    the mask (`jax.grad` of its mean at mask 0 is attribution patching). The mask and, where
    concrete, the source inside its footprint are checked (`PatchingProblem.for_footprint`; a traced
    mask's footprint is every unit of its sites). `plan` defaults to the cheapest one valid for the
    mask (see `_plan_for`)."""
    sites.check_mask(mask, cfg)
    problem = problem.for_footprint(cfg, sites.footprint(mask))
    plan = plan or _plan_for(problem, mask)
    return problem.metric(params, patched_hidden(params, cfg, problem, mask, plan))


def masks_metric_fn(params, cfg: ModelConfig, problem: PatchingProblem, masks: Mask, plan: Plan,
                    layers: Optional[PlanLayers] = None) -> Array:
    """Metric [N, B] for a batch of masks (leaves [N, L, ...]), vmapped over the mask axis; the
    problem is already cut to the masks' footprint and `layers` are the plan's (`run_masks`)."""
    return jax.vmap(lambda m: problem.metric(params, patched_hidden(params, cfg, problem, m, plan, layers)))(masks)


masks_metric = jax.jit(masks_metric_fn, static_argnames=("cfg", "plan"))


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
    """Devices a chunk's mask axis is split over: every device with shard=True, else one."""
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


def chunk_from_memory(params, cfg: ModelConfig, problem: PatchingProblem, plan: Plan, shard: bool) -> int:
    """The chunk size that fits the free memory of the devices a chunk is split over: the
    `memory.footprint` of `plan`'s patched runs of `problem` (formula in `jaxcircuits.engine.memory`),
    `memory.Footprint.chunk_size`; logged with its predicted memory (`memory.describe`)."""
    n_dev = chunk_devices(shard)
    fp = memory.footprint(params, cfg, plan, problem.target.tokens.shape, problem.metric)
    free = memory.free_bytes(n_dev)
    chunk = fp.chunk_size(n_dev, free)
    logging.info("%s", memory.describe(fp, chunk, n_dev, free))
    return chunk


def run_masks(params, cfg: ModelConfig, problem: PatchingProblem, masks: Mask, *,
              plan: Optional[Plan] = None, chunk_size: Optional[int] = None, shard: bool = True,
              on_chunk: Optional[Callable[[int, np.ndarray], None]] = None) -> np.ndarray:
    """Metric [N, B] for N masks, run in chunks of `chunk_size` (one compilation for all chunks).

    masks: `Mask` with leaves [N, L, ...] (host or device). chunk_size None or 0: the size that
    fits the free memory (`chunk_from_memory`). The last chunk is padded with zero
    masks and trimmed. With shard=True and several devices, each chunk's mask axis is split over
    them (chunk_size is rounded up to a multiple of the device count). `plan` defaults to the
    layers the masks touch and the positions pos_w selects. on_chunk(start, values) sees each chunk.
    Batches of more than one chunk show a progress bar (`logs.progress`).
    The masks (`sites.check_mask`) and the source inside the batch's footprint
    (`PatchingProblem.for_footprint`) are checked once, before the first chunk.
    """
    sites.check_mask(masks, cfg, batched=True)
    touched = sites.footprint(masks, batched=True)
    plan = plan or make_plan(layers_touched(touched), problem.pos_w)
    problem = problem.for_footprint(cfg, touched)
    n = getattr(masks, masks.sites()[0]).shape[0]
    chunk_size, sharding = chunking(n, chunk_size or chunk_from_memory(params, cfg, problem, plan, shard), shard)
    layers = plan_layers(params, cfg, plan, problem.metric.n_positions)
    return run_chunks(lambda chunk: masks_metric(params, cfg, problem, chunk, plan, layers), masks, n, chunk_size,
                      sharding, "run_masks", on_chunk)


def run_chunks(call: Callable[[Any], Array], masks, n: int, chunk_size: int, sharding, label: str,
               on_chunk: Optional[Callable[[int, np.ndarray], None]] = None) -> np.ndarray:
    """call(chunk) [c, B] over the n masks of a batch (a pytree with leaves [n, ...], host or device), in
    chunks of chunk_size (the last padded with zero masks and trimmed, so one compilation serves all),
    each put on `sharding` when given (`chunking`): [n, B] on the host. on_chunk(start, values) sees
    each chunk; batches of more than one chunk show a progress bar named `label`."""
    out = []
    with logs.progress(n, label, "mask", leave=False, disable=n <= chunk_size) as bar:
        for start in range(0, n, chunk_size):
            def take(a):
                a = np.asarray(a[start:start + chunk_size])
                pad = chunk_size - a.shape[0]
                return np.concatenate([a, np.zeros((pad, *a.shape[1:]), a.dtype)]) if pad else a
            chunk = jax.tree.map(take, masks)
            if sharding is not None:
                chunk = jax.device_put(chunk, sharding)
            vals = to_host(call(chunk))[:min(chunk_size, n - start)]
            bar.update(len(vals))
            if on_chunk is not None:
                on_chunk(start, vals)
            out.append(vals)
    return np.concatenate(out)
