"""The forward pass of GPT-2 and Llama-family models as pure functions over a params pytree.

One layer function, parameterised by `ModelConfig`, runs under one `jax.lax.scan` over the stacked
layer params. The same code serves the plain run, the cached run (`collect`), the patched run
(`intervention`), the KV-cached suffix run (`kv`, used by generation and by the last-position
fast path) and the vmapped sweep.

Shapes: B batch, T query positions of this call, S key slots, D model width, H query heads,
K KV heads, Dh head dim, V vocab, L layers of this call.
"""

from __future__ import annotations

import functools
import math
from typing import Dict, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxcircuits.interventions import CACHE_SITES, Intervention, apply_site
from jaxcircuits.models.config import ModelConfig

Array = jax.Array
Params = dict


def _norm(p: dict, x: Array, cfg: ModelConfig) -> Array:
    """LayerNorm (gpt2) or RMSNorm (llama), computed in float32, as HF does."""
    h = x.astype(jnp.float32)
    if cfg.family == "gpt2":
        mu = h.mean(-1, keepdims=True)
        var = ((h - mu) ** 2).mean(-1, keepdims=True)
        h = (h - mu) * jax.lax.rsqrt(var + cfg.norm_eps)
        return (h * p["scale"].astype(jnp.float32) + p["bias"].astype(jnp.float32)).astype(x.dtype)
    h = h * jax.lax.rsqrt((h * h).mean(-1, keepdims=True) + cfg.norm_eps)
    return p["scale"] * h.astype(x.dtype)


def _activation(cfg: ModelConfig, x: Array) -> Array:
    if cfg.activation == "gelu_new":
        return jax.nn.gelu(x, approximate=True)
    if cfg.activation == "gelu":
        return jax.nn.gelu(x, approximate=False)
    if cfg.activation == "relu":
        return jax.nn.relu(x)
    return jax.nn.silu(x)


def _dense(p: dict, x: Array, spec: str) -> Array:
    y = jnp.einsum(spec, x, p["w"])
    return y + p["b"] if "b" in p else y


def rope_tables(cfg: ModelConfig, pos_ids: Array) -> Tuple[Array, Array]:
    """cos, sin [B, T, Dh/2] (float32) for integer positions `pos_ids` [B, T]."""
    inv = jnp.asarray(cfg.rope.inv_freq(cfg.d_head), jnp.float32)
    ang = pos_ids.astype(jnp.float32)[..., None] * inv
    return jnp.cos(ang), jnp.sin(ang)


def _rotate(x: Array, cos: Array, sin: Array) -> Array:
    """HF's rotate-half RoPE on x [B, T, n, Dh] with cos/sin [B, T, Dh/2]."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
    c, s = cos[:, :, None, :], sin[:, :, None, :]
    return jnp.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], -1).astype(x.dtype)


def _qkv(cfg, p, h, rope):
    """Projections of normed h [B, T, D]: q [B, T, H, Dh], k, v [B, T, K, Dh] (RoPE applied)."""
    q = _dense(p["q"], h, "btd,dhe->bthe")
    k = _dense(p["k"], h, "btd,dke->btke")
    v = _dense(p["v"], h, "btd,dke->btke")
    if rope is not None:
        q, k = _rotate(q, *rope), _rotate(k, *rope)
    return q, k, v


def _attention(cfg, p, h, rope, allowed, kv, write_index, iv):
    """Self-attention up to the per-head outputs: (z [B, T, H, Dh], pattern, new (k, v))."""
    q, k, v = _qkv(cfg, p, h, rope)
    if kv is not None:
        k = jax.lax.dynamic_update_slice_in_dim(kv[0], k.astype(kv[0].dtype), write_index, axis=1)
        v = jax.lax.dynamic_update_slice_in_dim(kv[1], v.astype(kv[1].dtype), write_index, axis=1)
    B, T = q.shape[:2]
    qg = q.reshape(B, T, cfg.n_kv_heads, cfg.n_groups, cfg.d_head)
    scores = jnp.einsum("btkge,bske->bkgts", qg, k).astype(jnp.float32) / math.sqrt(cfg.d_head)
    scores = scores.reshape(B, cfg.n_heads, T, -1)
    scores = jnp.where(allowed[:, None], scores, jnp.finfo(jnp.float32).min)
    pattern = jax.nn.softmax(scores, axis=-1)
    pattern = apply_site(pattern, "pattern", *iv)
    pg = pattern.astype(v.dtype).reshape(B, cfg.n_kv_heads, cfg.n_groups, T, -1)
    z = jnp.einsum("bkgts,bske->btkge", pg, v).reshape(B, T, cfg.n_heads, cfg.d_head)
    return apply_site(z, "head_out", *iv), pattern, (k, v)


def _mlp(cfg, p, h):
    up = _dense(p["up"], h, "btd,df->btf")
    if cfg.family == "llama":
        up = _activation(cfg, _dense(p["gate"], h, "btd,df->btf")) * up
    else:
        up = _activation(cfg, up)
    return _dense(p["down"], up, "btf,fd->btd")


def _after_z(cfg, p, x, z, iv):
    """The rest of a block from (patched) head outputs z: o_proj, residual add, MLP."""
    out = _dense(p["o"], z, "bthe,hed->btd")
    out = apply_site(out, "attn_block", *iv)
    out = apply_site(out, "attn_out", *iv)
    x = x + out
    mlp = apply_site(_mlp(cfg, p, _norm(p["norm2"], x, cfg)), "mlp_out", *iv)
    return x + mlp, {"attn_out": out, "mlp_out": mlp}


def _iv_tuple(intervention: Optional[Intervention]):
    if intervention is None:
        return None, None, None
    return intervention.mask, intervention.source, intervention.pos_w


def _layer(cfg, collect, rope, allowed, write_index, pos_w, x, per_layer):
    """One block: x [B, T, D] -> x. `per_layer` = (params_l, kv_l, mask_l, source_l)."""
    p, kv, mask_l, source_l = per_layer
    iv = (mask_l, source_l, pos_w)
    x = apply_site(x, "resid_pre", *iv)
    z, pattern, new_kv = _attention(cfg, p, _norm(p["norm1"], x, cfg), rope, allowed, kv,
                                    write_index, iv)
    out, tail_sites = _after_z(cfg, p, x, z, iv)
    sites = {"resid_pre": x, "head_out": z, "pattern": pattern, "kv": new_kv, **tail_sites}
    return out, {s: sites[s] for s in collect}


def layer_from_z(p: dict, cfg: ModelConfig, x: Array, z: Array,
                 intervention: Optional[Intervention] = None) -> Array:
    """Finish one layer (params_l unstacked) from its input x [B, T, D] and the run's own head
    outputs z [B, T, H, Dh]; the intervention (one layer's leaves) patches z and later sites."""
    iv = _iv_tuple(intervention)
    return _after_z(cfg, p, x, apply_site(z, "head_out", *iv), iv)[0]


def layer_kv(p: dict, cfg: ModelConfig, x: Array, pos_ids: Array,
             intervention: Optional[Intervention] = None) -> Tuple[Array, Array]:
    """Keys and values [B, T, K, Dh] of one layer (params_l unstacked) for input x [B, T, D]."""
    x = apply_site(x, "resid_pre", *_iv_tuple(intervention))
    rope = rope_tables(cfg, pos_ids) if cfg.family == "llama" else None
    _, k, v = _qkv(cfg, p, _norm(p["norm1"], x, cfg), rope)
    return k, v


def slice_layers(tree, start: int, stop: Optional[int] = None):
    """Every leaf sliced to layers [start, stop) along axis 0 (None-safe)."""
    return jax.tree.map(lambda a: a[start:stop], tree)


def run_layers(layers: dict, cfg: ModelConfig, x: Array, pos_ids: Array, key_valid: Array, *,
               kv: Optional[Tuple[Array, Array]] = None, write_index: int | Array = 0,
               intervention: Optional[Intervention] = None,
               collect: Sequence[str] = ()) -> Tuple[Array, Dict[str, Array]]:
    """Run the stacked `layers` (any contiguous range of the model) over x [B, T, D].

    pos_ids [B, T]: positions (for RoPE). key_valid [B, S]: key slots that hold real tokens.
    kv: optional (k, v) caches, each [L, B, S, K, Dh]; this call's T keys are written at slots
        write_index..write_index+T-1 and queries attend to every slot up to their own. Without kv,
        S = T and slot t holds position t of x.
    intervention: mask and source leaves with a leading axis of this call's L layers; pos_w [B, T].
    collect: per-layer sites to return, stacked [L, ...] (names in `CACHE_SITES`).
    Returns (x, {site: stacked activations}).
    """
    B, T = x.shape[:2]
    S = T if kv is None else kv[0].shape[2]
    q_slot = write_index + jnp.arange(T)
    allowed = (jnp.arange(S)[None, :] <= q_slot[:, None])[None] & key_valid[:, None, :].astype(bool)
    rope = rope_tables(cfg, pos_ids) if cfg.family == "llama" else None
    mask_l, source_l, pos_w = _iv_tuple(intervention)
    body = functools.partial(_layer, cfg, tuple(collect), rope, allowed, write_index, pos_w)
    return jax.lax.scan(body, x, (layers, kv, mask_l, source_l))


def embed(params: Params, cfg: ModelConfig, tokens: Array, pos_ids: Array) -> Array:
    """Token (+ learned position, gpt2) embeddings: tokens [B, T] -> [B, T, D]."""
    x = params["embed"]["tokens"][tokens]
    if cfg.family == "gpt2":
        x = x + params["embed"]["positions"][pos_ids]
    return x


def final_norm(params: Params, cfg: ModelConfig, x: Array) -> Array:
    return _norm(params["final_norm"], x, cfg)


def unembed_matrix(params: Params) -> Array:
    """[D, V]: the output embedding (the tied input embedding, transposed, when absent)."""
    return params["unembed"]["w"] if "unembed" in params else params["embed"]["tokens"].T


def logits_of(params: Params, h: Array, vocab_ids: Optional[Array] = None) -> Array:
    """float32 logits of final-normed h [..., D]: [..., V], or only columns `vocab_ids` [..., n]."""
    w = unembed_matrix(params)
    if vocab_ids is None:
        return jnp.einsum("...d,dv->...v", h, w, preferred_element_type=jnp.float32)
    cols = jnp.take(w, vocab_ids, axis=1)                     # [D, *vocab_ids.shape]
    cols = jnp.moveaxis(cols, 0, -1)                          # [*vocab_ids.shape, D]
    return jnp.einsum("...d,...nd->...n", h.astype(jnp.float32), cols.astype(jnp.float32))


def default_positions(attn_mask: Array) -> Array:
    """Position ids [B, T] from a (left-)padding mask: count of real tokens before each slot."""
    return jnp.maximum(jnp.cumsum(attn_mask, axis=-1) - 1, 0).astype(jnp.int32)


def check_tokens(tokens, cfg: ModelConfig) -> None:
    """Raise ValueError for token ids outside [0, vocab) (host arrays only; tracers pass)."""
    if isinstance(tokens, jax.core.Tracer):
        return
    t = np.asarray(tokens)
    if t.ndim != 2:
        raise ValueError(f"tokens must be [batch, seq], got shape {t.shape}")
    if t.size and (t.min() < 0 or t.max() >= cfg.vocab_size):
        raise ValueError(f"token ids must lie in [0, {cfg.vocab_size}); got min {t.min()}, max {t.max()}")


def forward_fn(params: Params, cfg: ModelConfig, tokens: Array, attn_mask: Optional[Array] = None,
            pos_ids: Optional[Array] = None, intervention: Optional[Intervention] = None,
            collect: Tuple[str, ...] = (), return_logits: bool = True):
    """Full forward: tokens [B, T] -> (logits [B, T, V] float32 or None, cache).

    attn_mask [B, T] (1 = real token; left padding): defaults to all ones; pos_ids default to
    `default_positions(attn_mask)`. cache holds the `collect`ed sites (per-layer ones stacked
    [L, B, ...]; 'final_norm' [B, T, D]).
    """
    unknown = set(collect) - set(CACHE_SITES)
    if unknown:
        raise ValueError(f"unknown cache site(s) {sorted(unknown)}; known: {CACHE_SITES}")
    if attn_mask is None:
        attn_mask = jnp.ones(tokens.shape, jnp.int32)
    if pos_ids is None:
        pos_ids = default_positions(attn_mask)
    x = embed(params, cfg, tokens, pos_ids)
    layer_sites = tuple(s for s in collect if s != "final_norm")
    x, cache = run_layers(params["layers"], cfg, x, pos_ids, attn_mask, intervention=intervention,
                          collect=layer_sites)
    h = final_norm(params, cfg, x)
    if "final_norm" in collect:
        cache["final_norm"] = h
    return (logits_of(params, h) if return_logits else None), cache


forward = jax.jit(forward_fn, static_argnames=("cfg", "collect", "return_logits"))
forward.__doc__ = "`forward_fn` compiled once per (cfg, shapes, collect, return_logits)."


def run_with_cache(params: Params, cfg: ModelConfig, tokens, attn_mask=None, pos_ids=None,
                   sites: Sequence[str] = CACHE_SITES):
    """Plain run returning (logits [B, T, V], cache of `sites`). Checks token ids first."""
    check_tokens(tokens, cfg)
    return forward(params, cfg, jnp.asarray(tokens), attn_mask, pos_ids, collect=tuple(sites))
