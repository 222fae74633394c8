"""Position maps between a source and a target run, position selectors, aligning a source, and
one-position sources for patching generated tokens.

Runs are left-padded batches: slot t of row b holds a real token where attn_mask[b, t] == 1.
A position map is int32 [B, T_tgt]: for each target slot, the source slot whose activation
replaces it, or -1 (unmapped: never patched).
"""

from __future__ import annotations

import difflib
from typing import Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from jaxcircuits.interventions import sites
from jaxcircuits.interventions.sites import Intervention, Mask, Source

Selector = Union[str, Sequence[int]]


def _real_slots(mask_row: np.ndarray) -> np.ndarray:
    return np.flatnonzero(np.asarray(mask_row))


def _pairwise(tgt_attn_mask, src_attn_mask, pair_fn) -> np.ndarray:
    tgt_attn_mask, src_attn_mask = np.asarray(tgt_attn_mask), np.asarray(src_attn_mask)
    if tgt_attn_mask.shape[0] != src_attn_mask.shape[0]:
        raise ValueError(f"source batch {src_attn_mask.shape[0]} != target batch {tgt_attn_mask.shape[0]}")
    out = np.full(tgt_attn_mask.shape, -1, np.int32)
    for b in range(tgt_attn_mask.shape[0]):
        t, s = _real_slots(tgt_attn_mask[b]), _real_slots(src_attn_mask[b])
        for ti, si in pair_fn(t, s, b):
            out[b, t[ti]] = s[si]
    return out


def right_aligned(tgt_attn_mask, src_attn_mask) -> np.ndarray:
    """Last real token to last real token, and so on back to the shorter prompt's start."""
    return _pairwise(tgt_attn_mask, src_attn_mask, lambda t, s, b: [
        (len(t) - 1 - i, len(s) - 1 - i) for i in range(min(len(t), len(s)))])


def left_aligned(tgt_attn_mask, src_attn_mask) -> np.ndarray:
    """Real token i to real token i, i < min(lengths): what the original even-heads code did."""
    return _pairwise(tgt_attn_mask, src_attn_mask, lambda t, s, b: [(i, i) for i in range(min(len(t), len(s)))])


def token_matched(tgt_tokens, tgt_attn_mask, src_tokens, src_attn_mask) -> np.ndarray:
    """Target tokens mapped to identical source tokens in the longest matching blocks (difflib)."""
    tgt_tokens, src_tokens = np.asarray(tgt_tokens), np.asarray(src_tokens)

    def pairs(t, s, b):
        sm = difflib.SequenceMatcher(a=tgt_tokens[b, t].tolist(), b=src_tokens[b, s].tolist(),
                                     autojunk=False)
        return [(blk.a + i, blk.b + i) for blk in sm.get_matching_blocks() for i in range(blk.size)]

    return _pairwise(tgt_attn_mask, src_attn_mask, pairs)


def select(selector: Selector, tgt_attn_mask) -> np.ndarray:
    """Position weights float32 [B, T] of the target's real tokens.

    selector: 'all'; 'last'; 'last:k' (the final k real tokens); or a list of real-token indices
    (negative counts from the end, as in Python).
    """
    tgt_attn_mask = np.asarray(tgt_attn_mask)
    w = np.zeros(tgt_attn_mask.shape, np.float32)
    for b in range(tgt_attn_mask.shape[0]):
        t = _real_slots(tgt_attn_mask[b])
        if isinstance(selector, str):
            if selector == "all":
                idx = np.arange(len(t))
            elif selector == "last" or selector.startswith("last:"):
                k = 1 if selector == "last" else int(selector.split(":", 1)[1])
                idx = np.arange(max(len(t) - k, 0), len(t))
            else:
                raise ValueError(f"position selector {selector!r}: use 'all', 'last', 'last:k' or indices")
        else:
            idx = np.asarray(selector, np.int64)
            if np.any(idx >= len(t)) or np.any(idx < -len(t)):
                raise ValueError(f"positions {list(selector)} out of range for a prompt of {len(t)} tokens")
            idx = idx % len(t)
        w[b, t[idx]] = 1.0
    return w


def weights(selector: Selector, pos_map) -> np.ndarray:
    """Selector weights restricted to mapped positions: float32 [B, T_tgt]."""
    pos_map = np.asarray(pos_map)
    return select(selector, pos_map >= 0) * (pos_map >= 0)


def align(source: Source, pos_map) -> Source:
    """Gather a source cache (entries [L, B, S, ...]; see `sites` for each entry's position axes)
    to target slots: every position axis is mapped (pattern: query rows and key columns).

    Unmapped target slots get zeros (their position weight must be 0).
    """
    pos_map = jnp.asarray(pos_map)
    idx = jnp.maximum(pos_map, 0)
    valid = pos_map >= 0
    out = {}
    for name, a in source.items():
        v = True
        for ax in sites.source_entry(name).pos_axes:
            axis = ax + 1                                    # + the layer axis
            shape = [1] * a.ndim
            shape[1], shape[axis] = idx.shape
            a = jnp.take_along_axis(a, idx.reshape(shape), axis=axis)
            v = v & valid.reshape(shape)
        out[name] = a * v
    return out


def decode_intervention(mask: Mask, source: dict) -> Intervention:
    """Patch every generated token: `mask` (leaves [L, ...]) toward one-position `source` leaves
    [L, B, 1, ...] (see `source_at_position`)."""
    batch = jax.tree.leaves(source)[0].shape[1]
    return Intervention(mask, source, jnp.ones((batch, 1), jnp.float32))


def source_at_position(source: dict, position=0) -> dict:
    """One-position replacement [L, B, 1, ...] from a source cache's slot `position` (an int, or
    int [B] per row, e.g. each left-padded row's first real token; ValueError unless in [0, T))."""
    out, pos = {}, np.asarray(position) if not isinstance(position, jax.core.Tracer) else None
    for k, v in source.items():
        axes = sites.source_entry(k).pos_axes
        if len(axes) > 1:            # key positions (pattern): no one-position replacement
            continue
        axis = axes[0] + 1          # + the layer axis
        if pos is not None and (not np.issubdtype(pos.dtype, np.integer) or pos.min() < 0 or pos.max() >= v.shape[axis]):
            raise ValueError(f"position={pos.tolist()}: expected integer slot(s) in [0, {v.shape[axis]}), the "
                             f"positions of source {k!r}")
        idx = jnp.broadcast_to(jnp.asarray(position, jnp.int32), (v.shape[1],))
        idx = idx.reshape(1, -1, *([1] * (v.ndim - 2)))
        out[k] = jnp.take_along_axis(v, idx, axis=axis)
    return out
