"""The tables a `ModelConfig` chooses from: norms and activations (HF's ``ACT2FN`` idea).

A config names a row of each table; `ModelConfig` rejects a name that is not a key here, so adding
a norm or an activation is one row.
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple, Tuple

import jax
import jax.numpy as jnp

Array = jax.Array


def layer_norm(p: dict, x: Array, eps: float) -> Array:
    """LayerNorm with scale and bias, computed in float32 and cast back (as HF GPT-2)."""
    h = x.astype(jnp.float32)
    mu = h.mean(-1, keepdims=True)
    var = ((h - mu) ** 2).mean(-1, keepdims=True)
    h = (h - mu) * jax.lax.rsqrt(var + eps)
    return (h * p["scale"].astype(jnp.float32) + p["bias"].astype(jnp.float32)).astype(x.dtype)


def rms_norm(p: dict, x: Array, eps: float) -> Array:
    """RMSNorm: normalised in float32, cast back, then scaled (as HF Llama)."""
    h = x.astype(jnp.float32)
    h = h * jax.lax.rsqrt((h * h).mean(-1, keepdims=True) + eps)
    return p["scale"] * h.astype(x.dtype)


class NormKind(NamedTuple):
    """fn(params, x, eps) and the names of its parameter leaves (each [D])."""

    fn: Callable[[dict, Array, float], Array]
    leaves: Tuple[str, ...]


NORMS = {
    "layernorm": NormKind(layer_norm, ("scale", "bias")),
    "rmsnorm": NormKind(rms_norm, ("scale",)),
}

ACTIVATIONS = {
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
}

POSITION_EMBEDDINGS = ("learned", "rotary")
