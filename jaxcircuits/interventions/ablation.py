"""Ablation sources: replacements that stand for "this activation removed" rather than a run.

Each returns a `Source` with the entries and shapes of the cache it is given, to use wherever an
aligned source goes (`PatchingProblem.make`, `Intervention`).
"""

from __future__ import annotations

import jax.numpy as jnp

from jaxcircuits.interventions import sites
from jaxcircuits.interventions.sites import Source


def zeros_like_source(source: Source) -> Source:
    """Zero-ablation replacement with the shapes of `source`."""
    return {k: jnp.zeros_like(v) for k, v in source.items()}


def mean_source(source: Source, tgt_attn_mask=None) -> Source:
    """Mean-ablation replacement: each entry averaged over batch and real positions, broadcast back.

    tgt_attn_mask [B, T] (1 = real) weights the average; defaults to all positions. Entries indexed by
    key positions too (attention patterns) have no mean over positions and raise ValueError.
    """
    out = {}
    for k, a in source.items():
        axes = sites.source_entry(k).pos_axes
        if len(axes) > 1:
            raise ValueError(f"mean ablation of {k!r} (indexed by key positions) is not defined; patch from a run")
        axis = axes[0] + 1                                     # + the layer axis
        w = jnp.ones((a.shape[1], a.shape[axis])) if tgt_attn_mask is None else jnp.asarray(tgt_attn_mask, a.dtype)
        shape = [1] * a.ndim
        shape[1], shape[axis] = w.shape
        w = w.reshape(shape)
        mean = (a * w).sum((1, axis), keepdims=True) / w.sum((1, axis), keepdims=True)
        out[k] = jnp.broadcast_to(mean, a.shape)
    return out
