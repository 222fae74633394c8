"""The forward pass of GPT-2 and Llama-family models as pure functions over a params pytree.

One block function, parameterised by `ModelConfig`'s features, runs under one `jax.lax.scan` over
the stacked layer params. The same code serves the plain run, the cached run (`collect`), the
patched run (`intervention`), the KV-cached suffix run (`kv`, used by generation and by the
patched fast paths in `jaxcircuits.engine.patching`) and the vmapped sweep. Each intervention site
(`jaxcircuits.interventions.sites`) is one `hooks(name, x)` call at its place.

Shapes: B batch, T query positions of this call, S key slots, D model width, H query heads,
K KV heads, Dh head dim, F MLP width, V vocab, L layers of this call.
"""

from __future__ import annotations

import functools
import math
from typing import Callable, Dict, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxcircuits.models.config import ModelConfig
from jaxcircuits.models.layers import ACTIVATIONS, NORMS
from jaxcircuits.interventions.sites import CACHE_SITES, Intervention, LayerHooks, check_intervention

Array = jax.Array
Params = dict


@struct.dataclass
class KVCache:
    """Keys and values k, v [L, B, S, K, Dh] of S slots; a call writes its T positions' keys and
    values at slots write_index..write_index+T-1 and its queries attend to every slot up to theirs.

    Or tuples of parts along the slot axis (e.g. a target's cached prefix shared by every patched
    run, then a run's own keys), holding write_index slots in all: a call's keys are appended as a
    last part and attention reads the parts where they lie, so a prefix shared across a vmapped
    batch is never copied per run."""

    k: Array
    v: Array
    write_index: int | Array = 0


def norm(cfg: ModelConfig, p: dict, x: Array) -> Array:
    """The config's norm (`layers.NORMS`) of x [..., D] with leaves `p`."""
    return NORMS[cfg.norm].fn(p, x, cfg.norm_eps)


def dense(p: dict, x: Array, spec: str) -> Array:
    """einsum(spec, x, p['w']) + p['b'] (when present)."""
    y = jnp.einsum(spec, x, p["w"])
    return y + p["b"] if "b" in p else y


def rope_tables(cfg: ModelConfig, pos_ids: Array) -> Optional[Tuple[Array, Array]]:
    """cos, sin [B, T, Dh/2] (float32) for integer positions `pos_ids` [B, T]; None without RoPE."""
    if cfg.position_embedding != "rotary":
        return None
    inv = jnp.asarray(cfg.rope.inv_freq(cfg.d_head), jnp.float32)
    ang = pos_ids.astype(jnp.float32)[..., None] * inv
    return jnp.cos(ang), jnp.sin(ang)


def rotate(x: Array, rope: Optional[Tuple[Array, Array]]) -> Array:
    """HF's rotate-half RoPE on x [B, T, n, Dh] with cos/sin [B, T, Dh/2] (identity for None)."""
    if rope is None:
        return x
    cos, sin = rope
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
    c, s = cos[:, :, None, :], sin[:, :, None, :]
    return jnp.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], -1).astype(x.dtype)


def qkv(cfg: ModelConfig, p: dict, h: Array, rope, hooks: LayerHooks) -> Tuple[Array, Array, Array]:
    """Per-head q [B, T, H, Dh] and k, v [B, T, K, Dh] of normed h [B, T, D], RoPE applied."""
    q = hooks("head_q", rotate(dense(p["q"], h, "btd,dhe->bthe"), rope))
    k = hooks("head_k", rotate(dense(p["k"], h, "btd,dke->btke"), rope))
    v = hooks("head_v", dense(p["v"], h, "btd,dke->btke"))
    return q, k, v


def attend(cfg: ModelConfig, q: Array, k, v, allowed: Array, hooks: LayerHooks) -> Array:
    """Softmax attention of q [B, T, H, Dh] over k, v [B, S, K, Dh] (or tuples of parts along S, read
    in place) (GQA: query head h reads KV head h // n_groups) where allowed [B, T, S]: z [B, T, H, Dh]."""
    B, T = q.shape[:2]
    ks, vs = (k, v) if isinstance(k, tuple) else ((k,), (v,))
    qg = q.reshape(B, T, cfg.n_kv_heads, cfg.n_groups, cfg.d_head)
    scores = jnp.concatenate([jnp.einsum("btkge,bske->bkgts", qg, kp) for kp in ks], -1)
    scores = scores.astype(jnp.float32).reshape(B, cfg.n_heads, T, -1) / math.sqrt(cfg.d_head)
    scores = jnp.where(allowed[:, None], scores, jnp.finfo(jnp.float32).min)
    pattern = hooks("pattern", jax.nn.softmax(scores, axis=-1))
    pg = pattern.astype(vs[0].dtype).reshape(B, cfg.n_kv_heads, cfg.n_groups, T, -1)
    bounds = np.cumsum([0] + [vp.shape[1] for vp in vs])
    z = [jnp.einsum("bkgts,bske->btkge", pg[..., a:b], vp) for a, b, vp in zip(bounds, bounds[1:], vs)]
    return functools.reduce(jnp.add, z).reshape(B, T, cfg.n_heads, cfg.d_head)


def self_attention(cfg: ModelConfig, p: dict, h: Array, rope, allowed: Array, kv: Optional[KVCache],
                   hooks: LayerHooks) -> Array:
    """Head outputs z [B, T, H, Dh] of normed h; with `kv` (one layer's), this call's keys and
    values are written into it first. Records 'kv' (the layer's keys and values)."""
    q, k, v = qkv(cfg, p, h, rope, hooks)
    if kv is not None and isinstance(kv.k, tuple):
        k, v = (*kv.k, k.astype(kv.k[0].dtype)), (*kv.v, v.astype(kv.v[0].dtype))
    elif kv is not None:
        k = jax.lax.dynamic_update_slice_in_dim(kv.k, k.astype(kv.k.dtype), kv.write_index, axis=1)
        v = jax.lax.dynamic_update_slice_in_dim(kv.v, v.astype(kv.v.dtype), kv.write_index, axis=1)
    hooks.record("kv", (k, v) if not isinstance(k, tuple) else (jnp.concatenate(k, 1), jnp.concatenate(v, 1)))
    return attend(cfg, q, k, v, allowed, hooks)


def attn_output(cfg: ModelConfig, p: dict, z: Array, hooks: LayerHooks) -> Array:
    """o_proj of head outputs z [B, T, H, Dh]: [B, T, D]."""
    out = hooks("attn_block", dense(p["o"], z, "bthe,hed->btd"))
    return hooks("attn_out", out)


def mlp(cfg: ModelConfig, p: dict, h: Array, hooks: LayerHooks) -> Array:
    """MLP of normed h [B, T, D]: down(act(gate(h)) * up(h)) when gated, else down(act(up(h)))."""
    act = ACTIVATIONS[cfg.activation]
    up = dense(p["up"], h, "btd,df->btf")
    hidden = act(dense(p["gate"], h, "btd,df->btf")) * up if cfg.gated_mlp else act(up)
    return hooks("mlp_out", dense(p["down"], hooks("mlp_neuron", hidden), "btf,fd->btd"))


def block(cfg: ModelConfig, p: dict, x: Array, heads: Callable[[Array], Array], hooks: LayerHooks) -> Array:
    """One pre-norm block: x + attn(norm1(x)), then + mlp(norm2(x)). `heads` maps normed h to the
    head outputs z [B, T, H, Dh] (`self_attention`, or a cached z on a patched fast path)."""
    x = hooks("resid_pre", x)
    z = hooks("head_out", heads(norm(cfg, p["norm1"], x)))
    x = x + attn_output(cfg, p, z, hooks)
    return x + mlp(cfg, p, norm(cfg, p["norm2"], x), hooks)


def attention_mask(key_valid: Array, n_queries: int, write_index: int | Array = 0) -> Array:
    """allowed [B, T, S]: causal over slots (query t sits at slot write_index + t) and real keys."""
    S = key_valid.shape[1]
    q_slot = write_index + jnp.arange(n_queries)
    return (jnp.arange(S)[None, :] <= q_slot[:, None])[None] & key_valid[:, None, :].astype(bool)


def _scan_body(cfg, collect, rope, allowed, pos_w, write_index, x, per_layer):
    """One layer of `run_layers`' scan: per_layer = (params_l, (k_l, v_l) or None, mask_l, source_l)."""
    p, kv, mask_l, source_l = per_layer
    hooks = LayerHooks(None if mask_l is None else Intervention(mask_l, source_l, pos_w), collect)
    kv = None if kv is None else KVCache(*kv, write_index)
    heads = functools.partial(self_attention, cfg, p, rope=rope, allowed=allowed, kv=kv, hooks=hooks)
    return block(cfg, p, x, heads, hooks), hooks.cache


def run_layers(layers: dict, cfg: ModelConfig, x: Array, pos_ids: Array, key_valid: Array, *,
               kv: Optional[KVCache] = None, intervention: Optional[Intervention] = None,
               collect: Sequence[str] = ()) -> Tuple[Array, Dict[str, Array]]:
    """Run the stacked `layers` (any contiguous range of the model) over x [B, T, D].

    pos_ids [B, T]: positions (for RoPE). key_valid [B, S]: key slots that hold real tokens.
    kv: optional caches of S slots (see `KVCache`); without kv, S = T and slot t holds position t.
    intervention: mask and source leaves with a leading axis of this call's L layers; pos_w [B, T].
    collect: per-layer sites to return, stacked [L, ...] (names in `sites.CACHE_SITES`).
    Returns (x, {site: stacked activations}).
    """
    write_index = 0 if kv is None else kv.write_index
    allowed = attention_mask(key_valid, x.shape[1], write_index)
    mask_l, source_l, pos_w = (None, None, None) if intervention is None else (
        intervention.mask, intervention.source, intervention.pos_w)
    body = functools.partial(_scan_body, cfg, tuple(collect), rope_tables(cfg, pos_ids), allowed, pos_w,
                             write_index)
    return jax.lax.scan(body, x, (layers, None if kv is None else (kv.k, kv.v), mask_l, source_l))


def embed(params: Params, cfg: ModelConfig, tokens: Array, pos_ids: Array) -> Array:
    """Token (+ learned position) embeddings: tokens [B, T] -> [B, T, D]."""
    x = params["embed"]["tokens"][tokens]
    if cfg.position_embedding == "learned":
        x = x + params["embed"]["positions"][pos_ids]
    return x


def final_norm(params: Params, cfg: ModelConfig, x: Array) -> Array:
    return norm(cfg, params["final_norm"], x)


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


def check_inputs(cfg: ModelConfig, tokens, attn_mask=None, pos_ids=None, n_new: int = 0) -> Tuple[Array, Array, Array]:
    """(tokens, attn_mask, pos_ids) as int32 [B, T] with the defaults filled in (all ones;
    `default_positions`), or ValueError: tokens must be integer ids in [0, vocab) with B, T >= 1;
    attn_mask 0/1, left-padded (no 0 after a 1) with a real token in every row; with learned
    position embeddings, positions (plus `n_new` more for generation) in [0, max_positions), as HF
    requires (rotary models take any position, as in HF). Values are checked where concrete.
    """
    tokens = jnp.asarray(tokens)
    if tokens.ndim != 2 or 0 in tokens.shape:
        raise ValueError(f"tokens has shape {tuple(tokens.shape)}, expected [batch, seq] with batch, seq >= 1")
    if not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise ValueError(f"tokens (shape {tokens.shape}) has dtype {tokens.dtype}, expected integer ids")
    attn_mask = jnp.ones(tokens.shape, jnp.int32) if attn_mask is None else jnp.asarray(attn_mask)
    if attn_mask.shape != tokens.shape:
        raise ValueError(f"attn_mask has shape {tuple(attn_mask.shape)}, expected the tokens' {tuple(tokens.shape)}")
    if pos_ids is not None and jnp.shape(pos_ids) != tokens.shape:
        raise ValueError(f"pos_ids has shape {tuple(jnp.shape(pos_ids))}, expected the tokens' {tuple(tokens.shape)}")
    if not isinstance(tokens, jax.core.Tracer):
        t = np.asarray(tokens)
        if t.min() < 0 or t.max() >= cfg.vocab_size:
            raise ValueError(f"token ids must lie in [0, {cfg.vocab_size}); tokens (shape {t.shape}) has min "
                             f"{t.min()}, max {t.max()}")
    if not isinstance(attn_mask, jax.core.Tracer):
        m = np.asarray(attn_mask)
        if not np.isin(m, (0, 1)).all():
            raise ValueError(f"attn_mask (shape {m.shape}) must hold 0 (padding) and 1 (real token) only")
        empty, right = ~m.any(-1), (np.diff(m.astype(np.int32), axis=-1) < 0).any(-1)
        if empty.any():
            raise ValueError(f"attn_mask (shape {m.shape}) row {int(np.argmax(empty))} is all padding: "
                             "every row needs a real token")
        if right.any():
            raise ValueError(f"attn_mask (shape {m.shape}) row {int(np.argmax(right))} has a 0 after a 1: "
                             "batches must be left-padded")
    attn_mask = attn_mask.astype(jnp.int32)
    pos_ids = default_positions(attn_mask) if pos_ids is None else jnp.asarray(pos_ids, jnp.int32)
    if cfg.position_embedding == "learned" and not isinstance(pos_ids, jax.core.Tracer):
        p = np.asarray(pos_ids)
        lo, hi = int(p.min()), int(p.max()) + n_new
        if lo < 0 or hi >= cfg.max_positions:
            more = f" (with {n_new} generated after the prompt)" if n_new else ""
            raise ValueError(f"positions span [{lo}, {hi}]{more} for tokens of shape {tuple(p.shape)}; learned "
                             f"position embeddings need [0, max_positions={cfg.max_positions}) (HF raises too)")
    return tokens.astype(jnp.int32), attn_mask, pos_ids


def check_frozen_norms(params: Params, shape: Tuple[int, int]) -> None:
    """ValueError unless frozen norm scales (`dla.freeze_norms`), if any, fit a run of `shape`
    (B, T): the reference run's batch B and at least T positions (runs read its last T)."""
    inv = params["final_norm"].get("inv_scale")
    if inv is not None and (inv.shape[0] != shape[0] or inv.shape[1] < shape[1]):
        raise ValueError(f"params carry frozen norm scales of a reference run of shape {tuple(inv.shape[:2])}; "
                         f"a run of shape {tuple(shape)} needs the same batch and at most its positions")


def forward_fn(params: Params, cfg: ModelConfig, tokens: Array, attn_mask: Optional[Array] = None,
               pos_ids: Optional[Array] = None, intervention: Optional[Intervention] = None,
               collect: Tuple[str, ...] = (), return_logits: bool = True):
    """Full forward: tokens [B, T] -> (logits [B, T, V] float32 or None, cache).

    attn_mask [B, T] (1 = real token; left padding): defaults to all ones; pos_ids default to
    `default_positions(attn_mask)`. cache holds the `collect`ed sites (per-layer ones stacked
    [L, B, ...]; 'resid_final' and 'final_norm' [B, T, D]).
    """
    unknown = set(collect) - set(CACHE_SITES)
    if unknown:
        raise ValueError(f"unknown cache site(s) {sorted(unknown)}; known: {CACHE_SITES}")
    if attn_mask is None:
        attn_mask = jnp.ones(tokens.shape, jnp.int32)
    if pos_ids is None:
        pos_ids = default_positions(attn_mask)
    x = embed(params, cfg, tokens, pos_ids)
    after = ("resid_final", "final_norm")
    x, cache = run_layers(params["layers"], cfg, x, pos_ids, attn_mask, intervention=intervention,
                          collect=tuple(s for s in collect if s not in after))
    h = final_norm(params, cfg, x)
    cache.update({k: v for k, v in zip(after, (x, h)) if k in collect})
    return (logits_of(params, h) if return_logits else None), cache


_forward = jax.jit(forward_fn, static_argnames=("cfg", "collect", "return_logits"))


def forward(params: Params, cfg: ModelConfig, tokens, attn_mask=None, pos_ids=None,
            intervention: Optional[Intervention] = None, collect: Sequence[str] = (), return_logits: bool = True):
    """`forward_fn`, compiled once per (cfg, shapes, collect, return_logits), after checking its
    inputs on the host (`check_inputs`; `sites.check_intervention`, which also selects the source
    to the mask's footprint). Inside a trace only shapes are checked."""
    tokens, attn_mask, pos_ids = check_inputs(cfg, tokens, attn_mask, pos_ids)
    check_frozen_norms(params, tokens.shape)
    if intervention is not None:
        intervention = check_intervention(intervention, cfg, *tokens.shape)
    return _forward(params, cfg, tokens, attn_mask, pos_ids, intervention, collect=tuple(collect),
                    return_logits=return_logits)


def run_with_cache(params: Params, cfg: ModelConfig, tokens, attn_mask=None, pos_ids=None,
                   sites: Sequence[str] = CACHE_SITES):
    """Plain run returning (logits [B, T, V], cache of `sites`), inputs checked (`forward`)."""
    return forward(params, cfg, tokens, attn_mask, pos_ids, collect=tuple(sites))
