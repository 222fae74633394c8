"""Greedy generation with a fixed-size KV cache, optionally under an intervention.

Phase control: `prefill` patches the prompt pass (an `Intervention` on the prompt's positions);
`decode` patches every generated token with a one-position replacement (e.g. the source's
position-0 activation, as the original even-heads code did: `positions.decode_intervention`).
Either, both or neither.
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp

from jaxcircuits import checks
from jaxcircuits.models.config import ModelConfig
from jaxcircuits.models.transformer import (Context, KVCache, Tap, check_inputs, default_positions, embed, final_norm,
                                            logits_of, run_layers)

Array = jax.Array


@functools.partial(jax.jit, static_argnames=("cfg", "max_new_tokens"))
def _generate(params, cfg, tokens, attn_mask, max_new_tokens, prefill, decode, eos_id):
    B, T = tokens.shape
    S = T + max_new_tokens
    dtype = params["embed"]["tokens"].dtype
    kv0 = KVCache(*(jnp.zeros((cfg.n_layers, B, S, cfg.n_kv_heads, cfg.d_head), dtype) for _ in range(2)))
    key_valid = jnp.concatenate([attn_mask, jnp.ones((B, max_new_tokens), attn_mask.dtype)], 1)
    pos = default_positions(attn_mask)
    x, _, cache = run_layers(params["layers"], cfg, embed(params, cfg, tokens, pos), Context(pos, key_valid, kv0),
                             prefill, collect=("kv",))
    first = jnp.argmax(logits_of(params, final_norm(params, cfg, x[:, -1])), -1).astype(jnp.int32)

    def step(carry, i):
        kv, tok, done = carry
        p = pos[:, -1:] + 1 + i
        x, _, c = run_layers(params["layers"], cfg, embed(params, cfg, tok[:, None], p),
                             Context(p, key_valid, KVCache(*kv, T + i)), decode, collect=("kv",))
        nxt = jnp.argmax(logits_of(params, final_norm(params, cfg, x[:, -1])), -1).astype(jnp.int32)
        done = done | (tok == eos_id)
        nxt = jnp.where(done, eos_id, nxt)
        return (c["kv"], nxt, done), nxt

    init = (cache["kv"], first, jnp.zeros((B,), bool))
    _, rest = jax.lax.scan(step, init, jnp.arange(max_new_tokens - 1))
    return jnp.concatenate([first[:, None], rest.T], 1)


def generate(params, cfg: ModelConfig, tokens, attn_mask=None, max_new_tokens: int = 20, *,
             prefill: Optional[Tap] = None, decode: Optional[Tap] = None,
             eos_id: Optional[int] = None) -> Array:
    """Greedy continuation tokens int32 [B, max_new_tokens] of left-padded prompts [B, T] (checked by
    `check_inputs`, the interventions by their `Tap.checked`; ValueError naming the argument).

    prefill: intervention on the prompt pass (mask leaves [L, ...], pos_w [B, T]).
    decode: intervention on each generated token (source leaves [L, B, 1, ...], pos_w [B, 1];
    see `decode_intervention`). After `eos_id` every token is `eos_id`.
    """
    max_new_tokens = checks.count("max_new_tokens", max_new_tokens)
    tokens, attn_mask, _ = check_inputs(cfg, tokens, attn_mask, n_new=max_new_tokens - 1)
    if "inv_scale" in params["final_norm"]:
        raise ValueError("params carry frozen norm scales (dla.freeze_norms), which fix the reference run's "
                         "positions: generation needs the plain params")
    B, T = tokens.shape
    if prefill is not None:
        prefill = prefill.checked(cfg, B, T, "prefill")
    if decode is not None:
        decode = decode.checked(cfg, B, 1, "decode", per_token=True)
    eos = cfg.eos_token_id if eos_id is None else eos_id
    eos = -1 if eos is None else eos
    return _generate(params, cfg, tokens, attn_mask, max_new_tokens, prefill, decode, jnp.int32(eos))
