"""Interventions as pytree masks.

A `Mask` mirrors the model's per-layer sites; every leaf is optional and holds blend weights
m in [0, 1]. At a site with the run's own activation x and replacement s the model computes

    x + m * w_pos * (s - x)

where w_pos [B, T] selects positions (1 = patch this position). A batch of masks is a `Mask` whose
leaves have a leading axis, so `jax.vmap` runs many interventions in one call and `jax.grad`
with respect to a mask is attribution patching. An all-zero mask leaves the run bit-for-bit
unchanged.

Sites (L layers, H query heads, NB residual blocks, D model width, Dh head dim):
  resid_pre  [L]      the residual stream entering layer l, [B, T, D]
  head_out   [L, H]   per-head attention output z (the o_proj input), [B, T, H, Dh]: true heads
  attn_block [L, NB]  NB equal blocks of D/NB dims of the o_proj OUTPUT, [B, T, D]; residual
                      coordinates, not heads (what the original "even heads" code patched).
                      Its replacement is the source's `attn_out`.
  attn_out   [L]      the whole attention output (after o_proj), [B, T, D]
  pattern    [L, H]   attention probabilities of a head, [B, H, Tq, S]; positions select queries
  mlp_out    [L]      the MLP output, [B, T, D]

Replacements (`Source`) hold the same site names with a leading [L] axis and the shapes above,
aligned to the target's positions (see `jaxcircuits.positions`).
"""

from __future__ import annotations

from typing import Dict, Optional

import jax
from flax import struct

Array = jax.Array

SITES = ("resid_pre", "head_out", "attn_block", "attn_out", "pattern", "mlp_out")
# The cache entry each mask site takes its replacement from.
SOURCE_OF = {"resid_pre": "resid_pre", "head_out": "head_out", "attn_block": "attn_out",
             "attn_out": "attn_out", "pattern": "pattern", "mlp_out": "mlp_out"}
# Activation sites a run can cache: the per-layer sites ([L] leading), 'kv' ((k, v), each
# [L, B, S, K, Dh]) and 'final_norm' ([B, T, D], the final norm output).
CACHE_SITES = ("resid_pre", "head_out", "attn_out", "pattern", "mlp_out", "kv", "final_norm")

Source = Dict[str, Array]


@struct.dataclass
class Mask:
    """Blend weights per site; `None` leaves the site untouched. Shapes in the module doc."""

    resid_pre: Optional[Array] = None
    head_out: Optional[Array] = None
    attn_block: Optional[Array] = None
    attn_out: Optional[Array] = None
    pattern: Optional[Array] = None
    mlp_out: Optional[Array] = None

    def sites(self):
        """Names of the sites this mask touches (leaves that are not None)."""
        return tuple(s for s in SITES if getattr(self, s) is not None)


@struct.dataclass
class Intervention:
    """What one patched run applies.

    mask:   a `Mask` (leaves with a leading [L] axis, sliced per layer by the layer scan)
    source: replacement activations for the mask's sites, `Source` aligned to the target
    pos_w:  [B, T] float position weights of the target run (1 = intervene at this position)
    """

    mask: Mask
    source: Source
    pos_w: Array


def blend(x: Array, s: Array, w: Array) -> Array:
    """x + w * (s - x), with w broadcast against x. w == 0 returns x exactly."""
    return x + w.astype(x.dtype) * (s.astype(x.dtype) - x)


def site_weights(m: Array, pos_w: Array, site: str) -> Array:
    """Per-element weight of a site from its per-layer mask `m` and positions `pos_w` [B, T].

    Returns an array broadcastable against the site's activation (shapes in the module doc).
    """
    if site in ("resid_pre", "attn_out", "mlp_out"):      # m: []
        return (m * pos_w)[..., None]                        # [B, T, 1]
    if site == "head_out":                                 # m: [H]
        return pos_w[:, :, None, None] * m[None, None, :, None]   # [B, T, H, 1]
    if site == "attn_block":                               # m: [NB]
        return pos_w[:, :, None, None] * m[None, None, :, None]   # [B, T, NB, 1]
    if site == "pattern":                                  # m: [H]
        return m[None, :, None, None] * pos_w[:, None, :, None]   # [B, H, Tq, 1]
    raise ValueError(f"unknown site {site!r}; known: {SITES}")


def apply_site(x: Array, site: str, mask_l: Optional[Mask], source_l: Optional[Source],
               pos_w: Optional[Array]) -> Array:
    """Blend activation `x` of one layer's `site` toward its replacement, if the mask has it."""
    m = None if mask_l is None else getattr(mask_l, site)
    if m is None:
        return x
    s = source_l[SOURCE_OF[site]]
    w = site_weights(m, pos_w, site)
    if site != "attn_block":
        return blend(x, s, w)
    nb = m.shape[-1]
    shape = x.shape
    blocks = lambda a: a.reshape(*shape[:-1], nb, shape[-1] // nb)
    return blend(blocks(x), blocks(s), w).reshape(shape)
