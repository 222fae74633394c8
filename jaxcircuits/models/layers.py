"""The tables a `ModelConfig` chooses from: norms, activations, q/k norms (HF's ``ACT2FN`` idea).

A config names a row of each table; `ModelConfig` rejects a name that is not a key here, so adding
a norm or an activation is one row. Every norm reads a frozen 1/scale from its params when it has
one (`inv_scale`, see `dla.freeze_norms`): the frozen-LN model, linear between nonlinearities.
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple, Tuple

import jax
import jax.numpy as jnp

Array = jax.Array


def _inv_scale(p: dict, h: Array, computed) -> Array:
    """A norm's 1 / scale [..., T', 1] for h [..., T', D] (float32): `computed(h)`, or the frozen
    `p['inv_scale']` [B, T, 1] of a reference run (`dla.freeze_norms`), whose last T' positions
    line up with h (full runs and the patched suffix runs alike)."""
    if "inv_scale" not in p:
        return computed(h)
    inv = p["inv_scale"]
    return inv[:, inv.shape[1] - h.shape[-2]:].astype(jnp.float32)


def _centred(x: Array) -> Array:
    h = x.astype(jnp.float32)
    return h - h.mean(-1, keepdims=True)


def mean_square_inv(h: Array, eps: float) -> Array:
    """1 / sqrt(mean(h^2) + eps) [..., 1]: LayerNorm's of centred h, RMSNorm's of h."""
    return jax.lax.rsqrt((h * h).mean(-1, keepdims=True) + eps)


def ln_free_inv(h: Array, eps: float) -> Array:
    """1 / sqrt(eps) [..., 1]: the LN-free norm's constant scale."""
    return jnp.full((*h.shape[:-1], 1), eps ** -0.5, jnp.float32)


def layer_norm(p: dict, x: Array, eps: float, inv=mean_square_inv) -> Array:
    """LayerNorm with scale and bias, computed in float32 and cast back (as HF GPT-2)."""
    h = _centred(x)
    h = h * _inv_scale(p, h, lambda h: inv(h, eps))
    return (h * p["scale"].astype(jnp.float32) + p["bias"].astype(jnp.float32)).astype(x.dtype)


def rms_norm(p: dict, x: Array, eps: float) -> Array:
    """RMSNorm: normalised in float32, cast back, then scaled (as HF Llama)."""
    h = x.astype(jnp.float32)
    h = h * _inv_scale(p, h, lambda h: mean_square_inv(h, eps))
    return p["scale"] * h.astype(x.dtype)


def unit_offset_rms_norm(p: dict, x: Array, eps: float) -> Array:
    """RMSNorm times (1 + scale), all in float32, then cast back (as HF Gemma-2)."""
    h = x.astype(jnp.float32)
    h = h * _inv_scale(p, h, lambda h: mean_square_inv(h, eps))
    return (h * (1.0 + p["scale"].astype(jnp.float32))).astype(x.dtype)


class NormKind(NamedTuple):
    """fn(params, x, eps); the names of its parameter leaves (each [D]); inv(h, eps): its 1/scale
    of a float32 input h [..., D] (centred first when `centred`), which freezing fixes; offset: the
    norm multiplies by scale + offset (`norm_weight`)."""

    fn: Callable[[dict, Array, float], Array]
    leaves: Tuple[str, ...]
    inv: Callable[[Array, float], Array]
    centred: bool
    offset: float = 0.0


NORMS = {
    "layernorm": NormKind(layer_norm, ("scale", "bias"), mean_square_inv, True),
    "rmsnorm": NormKind(rms_norm, ("scale",), mean_square_inv, False),
    # LN-free checkpoints (GPT-2 with its norms fine-tuned away, published as eps 1e12, scale 1e6):
    # (x - mean) / sqrt(eps), then the affine part: linear in x.
    "ln_free": NormKind(functools.partial(layer_norm, inv=ln_free_inv), ("scale", "bias"), ln_free_inv, True),
    # Gemma-2: weights stored as offsets from 1
    "rmsnorm_unit_offset": NormKind(unit_offset_rms_norm, ("scale",), mean_square_inv, False, offset=1.0),
}


def norm_weight(kind: str, p: dict) -> Array:
    """The float32 weight [..., D] norm `kind` multiplies its normalised input by: p['scale'] + its offset."""
    return p["scale"].astype(jnp.float32) + NORMS[kind].offset


def norm_linear(kind: str, p: dict, x: Array, inv: Array) -> Array:
    """The linear part of norm `kind` (leaves p) at a fixed 1/scale inv (broadcasting to [..., T, 1]):
    weight * N(x) * inv, float32 [..., T, D], for x [..., T, D]; N centres x for centred kinds
    (LayerNorm). The norm's bias, where it has one, is its constant part, not included."""
    return _norm_input(kind, x) * inv * norm_weight(kind, p)


def frozen_norm_linear(kind: str, p: dict, x: Array) -> Array:
    """`norm_linear` at the frozen 1/scale of p (`_inv_scale`: its last T positions) of x [..., B, T, D]
    -> float32 [..., B, T, D]. The frozen norm is this plus its bias: affine, so it distributes over a
    sum of writes."""
    return norm_linear(kind, p, x, _inv_scale(p, x, None))


def norm_input_scale(kind: str, x: Array, eps: float) -> Array:
    """1 / scale [..., 1] (float32) that norm `kind` applies to x [..., D]: what freezing fixes."""
    return NORMS[kind].inv(_norm_input(kind, x), eps)


def _norm_input(kind: str, x: Array) -> Array:
    """x as norm `kind` scales it: float32, centred for centred kinds (LayerNorm)."""
    return _centred(x) if NORMS[kind].centred else x.astype(jnp.float32)


def soft_cap(x: Array, cap: float) -> Array:
    """cap * tanh(x / cap): x squashed into (-cap, cap) (Gemma-2's attention scores and logits)."""
    return cap * jnp.tanh(x / cap)


_gelu_tanh = functools.partial(jax.nn.gelu, approximate=True)
ACTIVATIONS = {
    "gelu_new": _gelu_tanh,
    "gelu_pytorch_tanh": _gelu_tanh,
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
}

POSITION_EMBEDDINGS = ("learned", "rotary")

# q/k norm kind -> how many trailing axes of the per-head values [..., U, Dh] one norm spans (its
# scale has their shape): each head's Dh (Qwen3), or the whole projection U * Dh (OLMo-2).
QK_NORMS = {"head": 1, "proj": 2}
