"""Attention-output SAEs (Kissane et al. 2024, "Interpreting Attention Layer Outputs with Sparse
Autoencoders"): an SAE on the heads' z concatenated, [B, T, H * Dh] (host 'head_out', TransformerLens'
hook_z), read head by head.

The encoder is linear before its activation, so a feature's pre-activation splits exactly into one
part per head plus a constant:

    pre[f] = sum_h z_h @ w_enc[h * Dh:(h + 1) * Dh, f] + (b_enc - b_dec @ w_enc if subtract_b_dec else b_enc)[f]

`head_parts` gives the parts (direct feature attribution by head); where a feature fires (f > 0;
for 'relu', 'jumprelu' and 'topk' f = pre there) they sum to its activation. `head_feature_map`
averages each feature's per-head shares where it fires: the head <-> feature map.
"""

from __future__ import annotations

from typing import Tuple

import jax
import jax.numpy as jnp

from jaxcircuits.dictionaries.core import DictConfig, Params, encode

Array = jax.Array


def _check_z(dc: DictConfig, z: Array) -> Tuple[int, int]:
    """(H, Dh) of z [..., H, Dh]; ValueError unless H * Dh is the dictionary's d_in."""
    if z.ndim < 2 or z.shape[-1] * z.shape[-2] != dc.d_in:
        raise ValueError(f"z has shape {tuple(z.shape)}, expected [..., H, Dh] with H * Dh = the dictionary's "
                         f"d_in {dc.d_in} (an SAE on the heads' z concatenated)")
    return z.shape[-2], z.shape[-1]


def head_parts(dc: DictConfig, p: Params, z: Array) -> Tuple[Array, Array]:
    """(parts [..., H, F], const [F]) of z [..., H, Dh]: parts[..., h, f] = z_h @ w_enc[h-th block, f]
    and const the encoder's bias (less b_dec's part with subtract_b_dec), so that
    parts.sum(-2) + const = `core.pre_acts` of z flattened."""
    H, Dh = _check_z(dc, z)
    w = p["w_enc"].astype(z.dtype).reshape(H, Dh, dc.width)
    parts = jnp.einsum("...he,hef->...hf", z, w)
    const = p["b_enc"].astype(z.dtype)
    if dc.subtract_b_dec:
        const = const - p["b_dec"].astype(z.dtype) @ p["w_enc"].astype(z.dtype)
    return parts, const


def head_feature_map(dc: DictConfig, p: Params, z: Array, valid: Array | None = None) -> Tuple[Array, Array]:
    """(shares [F, H], fires [F]) over every position of z [B, T, H, Dh] (valid [B, T]: the positions
    counted, default all): shares[f, h] is head h's mean share parts[h, f] / sum_h' |parts[h', f]| where
    feature f fires; fires[f] counts those positions (shares 0 where it never fires)."""
    _check_z(dc, z)
    parts, _ = head_parts(dc, p, z)                                       # [B, T, H, F]
    f = encode(dc, p, z.reshape(*z.shape[:-2], dc.d_in))                  # [B, T, F]
    on = f > 0
    if valid is not None:
        on = on & jnp.asarray(valid, bool)[..., None]
    share = parts / jnp.maximum(jnp.abs(parts).sum(-2, keepdims=True), jnp.finfo(parts.dtype).tiny)
    fires = on.sum((0, 1))
    total = jnp.einsum("bthf,btf->fh", share, on.astype(share.dtype))
    return total / jnp.maximum(fires, 1)[:, None], fires
