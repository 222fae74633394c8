"""The patched forward for many masks: shared prefix, KV-cached suffix, vmap, chunks, devices.

The target run is computed once (`TargetRun`). A mask can change nothing before the first layer
it touches (`Plan.start_layer`) nor, under causal attention, any position before the first one it
touches: each patched run starts from the cached residual stream at `start_layer`, recomputes
only the final `Plan.suffix_len` positions, and reads earlier keys/values from the target's cache.
`suffix_len == T` is the full-position path.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxcircuits.interventions import SITES, SOURCE_OF, Intervention, Mask
from jaxcircuits.models.config import ModelConfig
from jaxcircuits.models.transformer import check_tokens, final_norm, forward, run_layers, slice_layers

Array = jax.Array


@struct.dataclass
class TargetRun:
    """The unpatched target run's cached state.

    tokens, attn_mask, pos_ids: [B, T]; resid_pre: [L, B, T, D]; kv: (k, v) each [L, B, T, K, Dh].
    """

    tokens: Array
    attn_mask: Array
    pos_ids: Array
    resid_pre: Array
    kv: tuple


def target_run(params, cfg: ModelConfig, tokens, attn_mask=None, pos_ids=None) -> TargetRun:
    """Run the target once, keeping what every patched run shares."""
    check_tokens(tokens, cfg)
    tokens = jnp.asarray(tokens)
    attn_mask = jnp.ones(tokens.shape, jnp.int32) if attn_mask is None else jnp.asarray(attn_mask)
    if pos_ids is None:
        pos_ids = jnp.maximum(jnp.cumsum(attn_mask, -1) - 1, 0).astype(jnp.int32)
    _, cache = forward(params, cfg, tokens, attn_mask, pos_ids, collect=("resid_pre", "kv"),
                       return_logits=False)
    return TargetRun(tokens, attn_mask, jnp.asarray(pos_ids), cache["resid_pre"], cache["kv"])


@dataclasses.dataclass(frozen=True)
class Plan:
    """Static shape of the patched computation: first layer touched, final positions recomputed."""

    start_layer: int
    suffix_len: int


def make_plan(layers_touched, pos_w) -> Plan:
    """Plan from the layers any mask may touch (ints) and the position weights [B, T] (host)."""
    layers_touched = sorted(set(int(l) for l in layers_touched))
    if not layers_touched:
        raise ValueError("the masks touch no layer")
    cols = np.flatnonzero(np.asarray(pos_w).any(0))
    if not len(cols):
        raise ValueError("the position weights select no position")
    return Plan(start_layer=layers_touched[0], suffix_len=int(np.asarray(pos_w).shape[1] - cols[0]))


def layers_touched(mask: Mask) -> list:
    """Layers where a concrete mask (leaves [L, ...] or [N, L, ...]) has any nonzero weight."""
    out = set()
    for s in mask.sites():
        a = np.abs(np.asarray(getattr(mask, s)))
        layer_axis = a.ndim - (2 if s in ("head_out", "attn_block", "pattern") else 1)
        per_layer = a.sum(axis=tuple(i for i in range(a.ndim) if i != layer_axis))
        out |= set(np.flatnonzero(per_layer > 0).tolist())
    return sorted(out)


def check_mask(mask: Mask, cfg: ModelConfig, batched: bool) -> None:
    """Raise ValueError for mask leaves of the wrong shape or values outside [0, 1]."""
    lead = 1 if batched else 0
    want = {"resid_pre": (cfg.n_layers,), "attn_out": (cfg.n_layers,), "mlp_out": (cfg.n_layers,),
            "head_out": (cfg.n_layers, cfg.n_heads), "pattern": (cfg.n_layers, cfg.n_heads)}
    if not mask.sites():
        raise ValueError("the mask touches no site")
    for s in mask.sites():
        a = getattr(mask, s)
        shape = tuple(a.shape[lead:])
        if s == "attn_block":
            ok = len(shape) == 2 and shape[0] == cfg.n_layers and shape[1] > 0 and cfg.d_model % shape[1] == 0
            exp = f"({cfg.n_layers}, n_blocks) with n_blocks dividing d_model={cfg.d_model}"
        else:
            ok, exp = shape == want[s], want[s]
        if not ok:
            raise ValueError(f"mask site {s!r} has shape {shape}{' after the batch axis' if batched else ''}, expected {exp}")
        if not isinstance(a, jax.core.Tracer):
            v = np.asarray(a)
            if np.isnan(v).any() or v.min() < 0 or v.max() > 1:
                raise ValueError(f"mask site {s!r} has values outside [0, 1] or NaN")


def patched_hidden(params, cfg: ModelConfig, target: TargetRun, mask: Mask, source, pos_w: Array,
                   plan: Plan, n_out: int) -> Array:
    """Final-normed hidden states [B, n_out, D] of the last n_out positions under one mask.

    mask leaves [L, ...] over all layers (those before plan.start_layer must be zero), source
    aligned to the target ([L, B, T, ...]), pos_w [B, T] zero before the last plan.suffix_len.
    """
    L0, R = plan.start_layer, plan.suffix_len
    T = target.tokens.shape[1]
    if n_out > R:
        raise ValueError(f"metric reads {n_out} final positions but only {R} are recomputed")
    tail = lambda a, axis: jax.lax.slice_in_dim(a, T - R, T, axis=axis)
    src = {k: tail(v, 3 if k == "pattern" else 2) for k, v in slice_layers(source, L0).items()}
    iv = Intervention(mask=slice_layers(mask, L0), source=src, pos_w=tail(pos_w, 1))
    kv = None if R == T else slice_layers(target.kv, L0)
    x, _ = run_layers(slice_layers(params["layers"], L0), cfg, tail(target.resid_pre[L0], 1),
                      tail(target.pos_ids, 1), target.attn_mask, kv=kv, write_index=T - R,
                      intervention=iv)
    return final_norm(params, cfg, x[:, -n_out:])


@functools.partial(jax.jit, static_argnames=("cfg", "plan"))
def masks_metric(params, cfg: ModelConfig, target: TargetRun, masks: Mask, source, pos_w,
                 metric, plan: Plan) -> Array:
    """Metric [N, B] for a batch of masks (leaves [N, L, ...]), vmapped over the mask axis."""
    def one(m):
        return metric(params, patched_hidden(params, cfg, target, m, source, pos_w, plan,
                                             metric.n_positions))
    return jax.vmap(one)(masks)


def needed_source(masks: Mask, source) -> dict:
    """The source entries the mask's sites read (raises naming a missing one)."""
    need = {SOURCE_OF[s] for s in masks.sites()}
    missing = need - set(source)
    if missing:
        raise ValueError(f"source lacks {sorted(missing)} needed by mask sites {masks.sites()}")
    return {k: source[k] for k in need}


def mask_axis_sharding(n_devices: Optional[int] = None):
    """NamedSharding that splits axis 0 over the local devices (a 1-D mesh named 'masks')."""
    devs = np.array(jax.devices()[:n_devices or jax.device_count()])
    mesh = jax.sharding.Mesh(devs, ("masks",))
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("masks"))


def run_masks(params, cfg: ModelConfig, target: TargetRun, masks: Mask, source, pos_w, metric, *,
              plan: Optional[Plan] = None, chunk_size: int = 256, shard: bool = True,
              on_chunk: Optional[Callable[[int, np.ndarray], None]] = None) -> np.ndarray:
    """Metric [N, B] for N masks, run in chunks of `chunk_size` (one compilation for all chunks).

    masks: `Mask` with leaves [N, L, ...] (host or device). The last chunk is padded with zero
    masks and trimmed. With shard=True and several devices, each chunk's mask axis is split over
    them (chunk_size is rounded up to a multiple of the device count). `plan` defaults to the
    layers the masks touch and the positions pos_w selects. on_chunk(start, values) sees each chunk.
    """
    check_mask(masks, cfg, batched=True)
    source = needed_source(masks, source)
    pos_w = jnp.asarray(pos_w, jnp.float32)
    if plan is None:
        plan = make_plan(layers_touched(masks), pos_w)
    leaves = [getattr(masks, s) for s in masks.sites()]
    n = leaves[0].shape[0]
    sharding = mask_axis_sharding() if shard and jax.device_count() > 1 else None
    if sharding is not None:
        chunk_size = math.ceil(chunk_size / jax.device_count()) * jax.device_count()
    chunk_size = min(chunk_size, n) if sharding is None else chunk_size
    out = []
    for start in range(0, n, chunk_size):
        def take(a):
            a = np.asarray(a[start:start + chunk_size])
            pad = chunk_size - a.shape[0]
            return np.concatenate([a, np.zeros((pad, *a.shape[1:]), a.dtype)]) if pad else a
        chunk = jax.tree.map(take, masks)
        if sharding is not None:
            chunk = jax.device_put(chunk, sharding)
        vals = np.asarray(masks_metric(params, cfg, target, chunk, source, pos_w, metric, plan))
        vals = vals[:min(chunk_size, n - start)]
        if on_chunk is not None:
            on_chunk(start, vals)
        out.append(vals)
    return np.concatenate(out)
