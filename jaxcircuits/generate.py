"""Greedy generation with a fixed-size KV cache, optionally under an intervention.

Phase control: `prefill` patches the prompt pass (an `Intervention` on the prompt's positions);
`decode` patches every generated token with a one-position replacement (e.g. the source's
position-0 activation, as the original even-heads code did). Either, both or neither.
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp

from jaxcircuits.interventions import Intervention, Mask
from jaxcircuits.models.config import ModelConfig
from jaxcircuits.models.transformer import (check_tokens, default_positions, embed, final_norm,
                                            logits_of, run_layers)

Array = jax.Array


@functools.partial(jax.jit, static_argnames=("cfg", "max_new_tokens"))
def _generate(params, cfg, tokens, attn_mask, max_new_tokens, prefill, decode_mask, decode_source,
              eos_id):
    B, T = tokens.shape
    S = T + max_new_tokens
    dtype = params["embed"]["tokens"].dtype
    kv0 = tuple(jnp.zeros((cfg.n_layers, B, S, cfg.n_kv_heads, cfg.d_head), dtype) for _ in range(2))
    key_valid = jnp.concatenate([attn_mask, jnp.ones((B, max_new_tokens), attn_mask.dtype)], 1)
    pos = default_positions(attn_mask)
    x, cache = run_layers(params["layers"], cfg, embed(params, cfg, tokens, pos), pos, key_valid,
                          kv=kv0, intervention=prefill, collect=("kv",))
    first = jnp.argmax(logits_of(params, final_norm(params, cfg, x[:, -1])), -1).astype(jnp.int32)
    decode_iv = None
    if decode_mask is not None:
        decode_iv = Intervention(decode_mask, decode_source, jnp.ones((B, 1), jnp.float32))

    def step(carry, i):
        kv, tok, done = carry
        p = pos[:, -1:] + 1 + i
        x, c = run_layers(params["layers"], cfg, embed(params, cfg, tok[:, None], p), p, key_valid,
                          kv=kv, write_index=T + i, intervention=decode_iv, collect=("kv",))
        nxt = jnp.argmax(logits_of(params, final_norm(params, cfg, x[:, -1])), -1).astype(jnp.int32)
        done = done | (tok == eos_id)
        nxt = jnp.where(done, eos_id, nxt)
        return (c["kv"], nxt, done), nxt

    init = (cache["kv"], first, jnp.zeros((B,), bool))
    _, rest = jax.lax.scan(step, init, jnp.arange(max_new_tokens - 1))
    return jnp.concatenate([first[:, None], rest.T], 1)


def generate(params, cfg: ModelConfig, tokens, attn_mask=None, max_new_tokens: int = 20, *,
             prefill: Optional[Intervention] = None, decode_mask: Optional[Mask] = None,
             decode_source: Optional[dict] = None, eos_id: Optional[int] = None) -> Array:
    """Greedy continuation tokens int32 [B, max_new_tokens] of left-padded prompts [B, T].

    prefill: intervention on the prompt pass (mask leaves [L, ...], pos_w [B, T]).
    decode_mask / decode_source: applied to each generated token; decode_source leaves
    [L, B, 1, ...] (see `source_at_position`). After `eos_id` every token is `eos_id`.
    """
    check_tokens(tokens, cfg)
    tokens = jnp.asarray(tokens, jnp.int32)
    attn_mask = jnp.ones(tokens.shape, jnp.int32) if attn_mask is None else jnp.asarray(attn_mask, jnp.int32)
    if (decode_mask is None) != (decode_source is None):
        raise ValueError("decode_mask and decode_source go together")
    if decode_mask is not None and decode_mask.pattern is not None:
        raise ValueError("attention patterns cannot be patched during decoding")
    eos = cfg.eos_token_id if eos_id is None else eos_id
    eos = -1 if eos is None else eos
    return _generate(params, cfg, tokens, attn_mask, max_new_tokens, prefill, decode_mask,
                     decode_source, jnp.int32(eos))


def source_at_position(source: dict, position=0) -> dict:
    """One-position replacement [L, B, 1, ...] from a source cache's slot `position` (an int, or
    int [B] per row, e.g. each left-padded row's first real token)."""
    out = {}
    for k, v in source.items():
        if k == "pattern":
            continue
        idx = jnp.broadcast_to(jnp.asarray(position, jnp.int32), (v.shape[1],))
        idx = idx.reshape(1, -1, 1, *([1] * (v.ndim - 3)))
        out[k] = jnp.take_along_axis(v, idx, axis=2)
    return out
