"""Greedy generation with a fixed-size KV cache, optionally under an intervention.

Phase control: `prefill` patches the prompt pass (an `Intervention` on the prompt's positions);
`decode` patches every generated token with a one-position replacement (e.g. the source's
position-0 activation, as the original even-heads code did: `decode_intervention`). Either,
both or neither.
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp

from jaxcircuits.interventions import sites
from jaxcircuits.models.config import ModelConfig
from jaxcircuits.models.transformer import (KVCache, check_inputs, default_positions, embed, final_norm,
                                            logits_of, run_layers)
from jaxcircuits.interventions.sites import Intervention, Mask

Array = jax.Array


@functools.partial(jax.jit, static_argnames=("cfg", "max_new_tokens"))
def _generate(params, cfg, tokens, attn_mask, max_new_tokens, prefill, decode, eos_id):
    B, T = tokens.shape
    S = T + max_new_tokens
    dtype = params["embed"]["tokens"].dtype
    kv0 = KVCache(*(jnp.zeros((cfg.n_layers, B, S, cfg.n_kv_heads, cfg.d_head), dtype) for _ in range(2)))
    key_valid = jnp.concatenate([attn_mask, jnp.ones((B, max_new_tokens), attn_mask.dtype)], 1)
    pos = default_positions(attn_mask)
    x, cache = run_layers(params["layers"], cfg, embed(params, cfg, tokens, pos), pos, key_valid,
                          kv=kv0, intervention=prefill, collect=("kv",))
    first = jnp.argmax(logits_of(params, final_norm(params, cfg, x[:, -1])), -1).astype(jnp.int32)

    def step(carry, i):
        kv, tok, done = carry
        p = pos[:, -1:] + 1 + i
        x, c = run_layers(params["layers"], cfg, embed(params, cfg, tok[:, None], p), p, key_valid,
                          kv=KVCache(*kv, T + i), intervention=decode, collect=("kv",))
        nxt = jnp.argmax(logits_of(params, final_norm(params, cfg, x[:, -1])), -1).astype(jnp.int32)
        done = done | (tok == eos_id)
        nxt = jnp.where(done, eos_id, nxt)
        return (c["kv"], nxt, done), nxt

    init = (cache["kv"], first, jnp.zeros((B,), bool))
    _, rest = jax.lax.scan(step, init, jnp.arange(max_new_tokens - 1))
    return jnp.concatenate([first[:, None], rest.T], 1)


def generate(params, cfg: ModelConfig, tokens, attn_mask=None, max_new_tokens: int = 20, *,
             prefill: Optional[Intervention] = None, decode: Optional[Intervention] = None,
             eos_id: Optional[int] = None) -> Array:
    """Greedy continuation tokens int32 [B, max_new_tokens] of left-padded prompts [B, T] (checked by
    `check_inputs`, the interventions by `sites.check_intervention`; ValueError naming the argument).

    prefill: intervention on the prompt pass (mask leaves [L, ...], pos_w [B, T]).
    decode: intervention on each generated token (source leaves [L, B, 1, ...], pos_w [B, 1];
    see `decode_intervention`). After `eos_id` every token is `eos_id`.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens}, expected >= 1")
    tokens, attn_mask, _ = check_inputs(cfg, tokens, attn_mask, n_new=max_new_tokens - 1)
    if "inv_scale" in params["final_norm"]:
        raise ValueError("params carry frozen norm scales (dla.freeze_norms), which fix the reference run's "
                         "positions: generation needs the plain params")
    B, T = tokens.shape
    if prefill is not None:
        prefill = sites.check_intervention(prefill, cfg, B, T, "prefill")
    if decode is not None:
        keyed = [s for s in decode.mask.sites() if len(sites.get(s).pos_axes) > 1]
        if keyed:
            raise ValueError(f"site(s) {keyed} index key positions and cannot be patched during decoding")
        decode = sites.check_intervention(decode, cfg, B, 1, "decode")
    eos = cfg.eos_token_id if eos_id is None else eos_id
    eos = -1 if eos is None else eos
    return _generate(params, cfg, tokens, attn_mask, max_new_tokens, prefill, decode, jnp.int32(eos))


def decode_intervention(mask: Mask, source: dict) -> Intervention:
    """Patch every generated token: `mask` (leaves [L, ...]) toward one-position `source` leaves
    [L, B, 1, ...] (see `source_at_position`)."""
    batch = jax.tree.leaves(source)[0].shape[1]
    return Intervention(mask, source, jnp.ones((batch, 1), jnp.float32))


def source_at_position(source: dict, position=0) -> dict:
    """One-position replacement [L, B, 1, ...] from a source cache's slot `position` (an int, or
    int [B] per row, e.g. each left-padded row's first real token)."""
    out = {}
    for k, v in source.items():
        axes = sites.source_entry(k).pos_axes
        if len(axes) > 1:            # key positions (pattern): no one-position replacement
            continue
        axis = axes[0] + 1          # + the layer axis
        idx = jnp.broadcast_to(jnp.asarray(position, jnp.int32), (v.shape[1],))
        idx = idx.reshape(1, -1, *([1] * (v.ndim - 2)))
        out[k] = jnp.take_along_axis(v, idx, axis=axis)
    return out
