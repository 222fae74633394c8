"""The patched forward for many masks: shared prefix, KV-cached suffix, vmap, chunks, devices.

The target run is computed once (`TargetRun`). A mask can change nothing before the first layer
it touches (`Plan.start_layer`) nor, under causal attention, any position before the first one it
touches: each patched run starts from the cached residual stream at `start_layer`, recomputes
only the final `Plan.suffix_len` positions, and reads earlier keys/values from the target's cache.
`suffix_len == T` is the full-position path.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxcircuits.interventions import SOURCE_OF, Intervention, Mask
from jaxcircuits.models.config import ModelConfig
from jaxcircuits.models.transformer import (check_tokens, final_norm, forward, layer_from_z, layer_kv,
                                            run_layers, slice_layers)

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
    """Run the target once, keeping what every patched run shares."""
    check_tokens(tokens, cfg)
    tokens = jnp.asarray(tokens)
    attn_mask = jnp.ones(tokens.shape, jnp.int32) if attn_mask is None else jnp.asarray(attn_mask)
    if pos_ids is None:
        pos_ids = jnp.maximum(jnp.cumsum(attn_mask, -1) - 1, 0).astype(jnp.int32)
    _, cache = forward(params, cfg, tokens, attn_mask, pos_ids, return_logits=False,
                       collect=("resid_pre", "head_out", "kv"))
    return TargetRun(tokens, attn_mask, jnp.asarray(pos_ids), cache["resid_pre"], cache["head_out"],
                     cache["kv"])


# Sites read before a layer's head outputs z: a mask touching them at the first layer needs the
# whole layer recomputed; otherwise the patched run starts from the target's cached z there.
_BEFORE_Z = ("resid_pre", "pattern")


@dataclasses.dataclass(frozen=True)
class Plan:
    """Static shape of the patched computation.

    start_layer: first layer any mask touches; suffix_len: final positions recomputed (T = all);
    from_z: the first layer is touched only at or after its head outputs z.
    """

    start_layer: int
    suffix_len: int
    from_z: bool = False


def make_plan(touched: dict, pos_w) -> Plan:
    """Plan from {site: layers any mask may touch there} and the position weights [B, T] (host)."""
    layers = sorted({int(l) for ls in touched.values() for l in ls})
    if not layers:
        raise ValueError("the masks touch no layer")
    cols = np.flatnonzero(np.asarray(pos_w).any(0))
    if not len(cols):
        raise ValueError("the position weights select no position")
    from_z = not any(layers[0] in touched.get(s, ()) for s in _BEFORE_Z)
    return Plan(layers[0], int(np.asarray(pos_w).shape[1] - cols[0]), from_z)


def layers_touched(mask: Mask) -> dict:
    """{site: sorted layers} where a concrete mask (leaves [L, ...] or [N, L, ...]) is nonzero."""
    out = {}
    for s in mask.sites():
        a = np.abs(np.asarray(getattr(mask, s)))
        layer_axis = a.ndim - (2 if s in ("head_out", "attn_block", "pattern") else 1)
        per_layer = a.sum(axis=tuple(i for i in range(a.ndim) if i != layer_axis))
        out[s] = np.flatnonzero(per_layer > 0).tolist()
    return out


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


def _narrow(iv: Intervention, start: int, stop: Optional[int], first_pos: int) -> Intervention:
    """An intervention's layers [start, stop) and positions [first_pos, T)."""
    tail = lambda a, axis: a[(slice(None),) * axis + (slice(first_pos, None),)]
    src = {k: tail(v, 3 if k == "pattern" else 2) for k, v in slice_layers(iv.source, start, stop).items()}
    return Intervention(slice_layers(iv.mask, start, stop), src, tail(iv.pos_w, 1))


def _one_layer(tree, l: int):
    """Layer l of stacked params, or of an intervention's mask and source (pos_w kept)."""
    if isinstance(tree, Intervention):
        return Intervention(_one_layer(tree.mask, l), _one_layer(tree.source, l), tree.pos_w)
    return jax.tree.map(lambda a: a[l], tree)


def patched_hidden(params, cfg: ModelConfig, target: TargetRun, mask: Mask, source, pos_w: Array,
                   plan: Plan, n_out: int) -> Array:
    """Final-normed hidden states [B, n_out, D] of the last n_out positions under one mask.

    mask leaves [L, ...] over all layers (zero before plan.start_layer), source aligned to the
    target ([L, B, T, ...]), pos_w [B, T] zero before the last plan.suffix_len positions.
    Computes only what the mask can change: layers from start_layer (from its cached z when
    plan.from_z), the final plan.suffix_len positions (earlier keys/values from the target),
    and in the last layer queries only for the n_out positions the metric reads.
    """
    L, T = cfg.n_layers, target.tokens.shape[1]
    L0, R = plan.start_layer, plan.suffix_len
    if n_out > R:
        raise ValueError(f"metric reads {n_out} final positions but only {R} are recomputed")
    layers, first = params["layers"], T - R
    iv = _narrow(Intervention(mask, source, pos_w), 0, None, first)
    pos = target.pos_ids[:, first:]
    x = target.resid_pre[L0][:, first:]
    start = L0
    if plan.from_z:
        x = layer_from_z(_one_layer(layers, L0), cfg, x, target.head_out[L0][:, first:],
                         _one_layer(iv, L0))
        start = L0 + 1
    split = L - 1 if R > n_out else L      # the last layer runs on its own only if it can shrink
    if start < split:
        kv = None if R == T else slice_layers(target.kv, start, split)
        x, _ = run_layers(slice_layers(layers, start, split), cfg, x, pos, target.attn_mask, kv=kv,
                          write_index=first, intervention=_narrow(iv, start, split, 0))
    if start <= L - 1 and split == L - 1:
        # Last layer: keys/values for every recomputed position, queries for the n_out read.
        k, v = layer_kv(_one_layer(layers, L - 1), cfg, x, pos, _one_layer(iv, L - 1))
        if R < T:
            k = jax.lax.dynamic_update_slice_in_dim(target.kv[0][L - 1], k.astype(target.kv[0].dtype), first, 1)
            v = jax.lax.dynamic_update_slice_in_dim(target.kv[1][L - 1], v.astype(target.kv[1].dtype), first, 1)
        x, _ = run_layers(slice_layers(layers, L - 1), cfg, x[:, R - n_out:], pos[:, R - n_out:],
                          target.attn_mask, kv=(k[None], v[None]), write_index=T - n_out,
                          intervention=_narrow(iv, L - 1, None, R - n_out))
    return final_norm(params, cfg, x[:, -n_out:])


def masks_metric_fn(params, cfg: ModelConfig, target: TargetRun, masks: Mask, source, pos_w,
                    metric, plan: Plan) -> Array:
    """Metric [N, B] for a batch of masks (leaves [N, L, ...]), vmapped over the mask axis."""
    def one(m):
        return metric(params, patched_hidden(params, cfg, target, m, source, pos_w, plan,
                                             metric.n_positions))
    return jax.vmap(one)(masks)


masks_metric = jax.jit(masks_metric_fn, static_argnames=("cfg", "plan"))


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


def chunking(n: int, chunk_size: int, shard: bool):
    """(chunk size, sharding or None) for n items: at most n per chunk, and with shard=True and
    several devices a multiple of the device count, split over them by `mask_axis_sharding`."""
    chunk_size = max(1, min(chunk_size, n))
    if not shard or jax.device_count() == 1:
        return chunk_size, None
    return math.ceil(chunk_size / jax.device_count()) * jax.device_count(), mask_axis_sharding()


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
    n = getattr(masks, masks.sites()[0]).shape[0]
    chunk_size, sharding = chunking(n, chunk_size, shard)
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
