"""The forward pass of GPT-2 and Llama-family models as pure functions over a params pytree.

The layer is `block.block`, run under one `jax.lax.scan` over the stacked layer params
(`run_layers`); `run` adds the embeddings before it and the final norm after. What a run does at
the block's named places is its `Tap`: the plain run (this module's `Tap`), the cached run
(`collect`), the node-patched run (`interventions.sites.Intervention`), the edge-patched run
(`interventions.edges`), the residual decomposition (`methods.dla`). The same code serves the
KV-cached suffix run (`Context.kv`, used by generation and by the patched fast paths in
`engine.patching`), queries at the last positions only (`Context.n_queries`), known head outputs
(`Context.z`) and the vmapped sweep.

Shapes: B batch, T query positions of this call, S key slots, D model width, H query heads,
K KV heads, Dh head dim, F MLP width, V vocab, L layers of this call.
"""

from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxcircuits.models.block import (Attn, KVCache, LayerIO, attend, attention_mask, block, dense, layer_allowed,
                                      mlp, named_norm, norm, one_unit, project, rope_tables, rotate)
from jaxcircuits.models.config import ModelConfig
from jaxcircuits.models.layers import soft_cap

Array = jax.Array
Params = dict
__all__ = ["Attn", "KVCache", "LayerIO", "attend", "block", "dense", "mlp", "norm", "project", "rope_tables",
           "rotate", "Tap", "Context", "run_layers", "run", "forward_fn", "forward", "run_with_cache", "token_embeddings", "embed",
           "final_norm", "logits_of", "unembed_matrix", "check_inputs", "default_positions", "attention_mask"]


class Tap:
    """What a run does at the block's places, as a pytree handed to the compiled run: `per_layer()`
    is a pytree with leaves [L, ...] that the layer scan slices (None: nothing per layer), `init(x)`
    the carry handed from layer to layer (given the embedded x [B, T, D]), `io(layer, carry, collect)`
    the `LayerIO` of one layer (layer: its slice of per_layer()) or, with layer None, of the model's
    top ('embed', 'logits'). This base class is the plain run; subclasses are `flax.struct`
    dataclasses. `checked` validates a tap for a run of `batch` x `n_pos` before any work (`name`
    prefixes its errors; `per_token`: it will patch one generated token at a time); `layers(start,
    stop)` is the tap of layers [start, stop) (the patched fast paths)."""

    def per_layer(self):
        return None

    def init(self, x: Array):
        return None

    def io(self, layer, carry, collect: Sequence[str]) -> LayerIO:
        return LayerIO(collect, carry)

    def checked(self, cfg: ModelConfig, batch: int, n_pos: int, name: str = "intervention",
                per_token: bool = False) -> "Tap":
        return self

    def layers(self, start: int, stop: int) -> "Tap":
        return self


PLAIN = Tap()


@struct.dataclass
class Context:
    """What the layers of a call read besides x [B, T, D]: pos_ids [B, T] (RoPE); key_valid [B, S],
    the key slots holding real tokens; kv, caches of S slots (`KVCache`; None: S = T, slot t holds
    position t); z, head outputs [L, B, T, H, Dh] already known (their attention is skipped);
    n_queries, only the last n_queries positions get queries and outputs (one layer only);
    first_layer, the model's index of the call's first layer (per-layer features read it)."""

    pos_ids: Array
    key_valid: Array
    kv: Optional[KVCache] = None
    z: Optional[Array] = None
    n_queries: Optional[int] = struct.field(pytree_node=False, default=None)
    first_layer: int = struct.field(pytree_node=False, default=0)


def run_layers(layers: dict, cfg: ModelConfig, x: Array, ctx: Context, tap: Optional[Tap] = None, carry=None,
               collect: Sequence[str] = ()) -> Tuple[Array, object, Dict[str, Array]]:
    """Run the stacked `layers` (any contiguous range of the model) over x [B, T, D] under `tap`
    (its `per_layer()` leaves hold these layers), starting from `carry`.

    Returns (x [B, Tq, D], the tap's carry after the last layer, {name: [L, ...]} of the `collect`ed
    names each layer records; a name no layer records is a ValueError).
    """
    x, carry, cache, names = _layers(layers, cfg, x, ctx, tap or PLAIN, carry, collect)
    _check_collected(collect, cache, names)
    return x, carry, cache


def _layers(layers: dict, cfg: ModelConfig, x: Array, ctx: Context, tap: Tap, carry, collect: Sequence[str]):
    """`run_layers`, also returning the set of names the layers record (unchecked)."""
    T = x.shape[1]
    tq = ctx.n_queries or T
    write_index = 0 if ctx.kv is None else ctx.kv.write_index
    mask = lambda window: attention_mask(ctx.key_valid, tq, write_index + T - tq, window)
    allowed = (mask(cfg.sliding_window), None if cfg.window_layers is None else mask(None))
    names = set()

    def body(state, xs):
        x, carry = state
        p, kv, z, layer, i = xs
        io = tap.io(layer, carry, collect)
        kv = None if kv is None else KVCache(*kv, write_index)
        x = block(cfg, p, x, io, Attn(rope_tables(cfg, ctx.pos_ids, i), layer_allowed(cfg, allowed, i), kv, z, ctx.n_queries))
        names.update(io.names)
        return (x, io.carry), io.cache

    n_layers = jax.tree.leaves(layers)[0].shape[0]
    xs = (layers, None if ctx.kv is None else (ctx.kv.k, ctx.kv.v), ctx.z, tap.per_layer(),
          ctx.first_layer + jnp.arange(n_layers))
    if tq == T:
        (x, carry), cache = jax.lax.scan(body, (x, carry), xs)
    else:                                   # the output has fewer positions than the input: no scan carry
        if n_layers != 1:
            raise ValueError(f"n_queries={tq} < {T} positions needs one layer, got {n_layers}")
        (x, carry), cache = body((x, carry), jax.tree.map(lambda a: a[0], xs))
        cache = jax.tree.map(lambda a: a[None], cache)
    return x, carry, cache, names


def _check_collected(collect: Sequence[str], cache: dict, known) -> None:
    """ValueError naming what `collect` asks for that the run does not record (at trace time)."""
    unknown = sorted(set(collect) - set(cache) - set(known) - {"*"})
    if unknown:
        raise ValueError(f"unknown cache site(s) {unknown}; a run records {sorted(known)}")


def run(params: Params, cfg: ModelConfig, tokens: Array, ctx: Context, tap: Optional[Tap] = None,
        collect: Sequence[str] = (), n_out: Optional[int] = None):
    """The whole model on tokens [B, T] under `tap`: (final-normed hidden states [B, n, D] of the last
    n = n_out positions (all when None), the cache of the `collect`ed names (per layer stacked
    [L, B, ...]; 'resid_final', 'final_norm' [B, T | n, D]), the tap's final carry)."""
    tap = tap or PLAIN
    x = embed(params, cfg, tokens, ctx.pos_ids)
    bottom = tap.io(None, tap.init(x), collect)
    x = bottom.write("embed", one_unit(x))
    x, carry, cache, names = _layers(params["layers"], cfg, x, ctx, tap, bottom.carry, collect)
    top = tap.io(None, carry, collect)
    top.record("resid_final", x)
    h = top.read("logits", x, lambda x: named_norm(cfg, params, "final_norm", x if n_out is None else x[:, -n_out:], top))
    top.record("final_norm", h)
    cache = {**cache, **bottom.cache, **top.cache}
    _check_collected(collect, cache, names | bottom.names | top.names)
    return h, cache, top.carry


def token_embeddings(params: Params, cfg: ModelConfig, tokens: Array) -> Array:
    """The token embeddings of tokens [...] -> [..., D], times sqrt(D) in their dtype with
    cfg.scaled_embeddings (as HF Gemma: the float32 factor cast to it)."""
    x = params["embed"]["tokens"][tokens]
    return x * jnp.asarray(np.float32(cfg.d_model ** 0.5), x.dtype) if cfg.scaled_embeddings else x


def embed(params: Params, cfg: ModelConfig, tokens: Array, pos_ids: Array) -> Array:
    """Token (+ learned position) embeddings: tokens [B, T] -> [B, T, D] (`token_embeddings`)."""
    x = token_embeddings(params, cfg, tokens)
    if cfg.position_embedding == "learned":
        x = x + params["embed"]["positions"][pos_ids]
    return x


def final_norm(params: Params, cfg: ModelConfig, x: Array) -> Array:
    """The final norm of x [..., D]."""
    return norm(cfg, params["final_norm"], x)


def unembed_matrix(params: Params) -> Array:
    """[D, V]: the output embedding (the tied input embedding, transposed, when absent)."""
    return params["unembed"]["w"] if "unembed" in params else params["embed"]["tokens"].T


def logits_of(params: Params, h: Array, vocab_ids: Optional[Array] = None) -> Array:
    """float32 logits of final-normed h [..., D]: [..., V], or only columns `vocab_ids` [..., n];
    soft-capped when the params carry a 'logit_softcap' (Gemma-2, `params.config_leaves`)."""
    w = unembed_matrix(params)
    if vocab_ids is None:
        logits = jnp.einsum("...d,dv->...v", h, w, preferred_element_type=jnp.float32)
    else:
        cols = jnp.moveaxis(jnp.take(w, vocab_ids, axis=1), 0, -1)       # [*vocab_ids.shape, D]
        logits = jnp.einsum("...d,...nd->...n", h.astype(jnp.float32), cols.astype(jnp.float32))
    return logits if "logit_softcap" not in params else soft_cap(logits, params["logit_softcap"].astype(jnp.float32))


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
               pos_ids: Optional[Array] = None, intervention: Optional[Tap] = None,
               collect: Tuple[str, ...] = (), return_logits: bool = True):
    """Full forward: tokens [B, T] -> (logits [B, T, V] float32 or None, cache).

    attn_mask [B, T] (1 = real token; left padding): defaults to all ones; pos_ids default to
    `default_positions(attn_mask)`. intervention: a `Tap` (e.g. `sites.Intervention`). cache holds
    the `collect`ed entries (per-layer ones stacked [L, B, ...]; 'resid_final' and 'final_norm'
    [B, T, D]).
    """
    if attn_mask is None:
        attn_mask = jnp.ones(tokens.shape, jnp.int32)
    if pos_ids is None:
        pos_ids = default_positions(attn_mask)
    h, cache, _ = run(params, cfg, tokens, Context(pos_ids, attn_mask), intervention, collect)
    return (logits_of(params, h) if return_logits else None), cache


_forward = jax.jit(forward_fn, static_argnames=("cfg", "collect", "return_logits"))


def forward(params: Params, cfg: ModelConfig, tokens, attn_mask=None, pos_ids=None,
            intervention: Optional[Tap] = None, collect: Sequence[str] = (), return_logits: bool = True):
    """`forward_fn`, compiled once per (cfg, shapes, collect, return_logits), after checking its
    inputs on the host (`check_inputs`; the intervention's `Tap.checked`, which for an `Intervention`
    also selects the source to the mask's footprint). Inside a trace only shapes are checked."""
    tokens, attn_mask, pos_ids = check_inputs(cfg, tokens, attn_mask, pos_ids)
    check_frozen_norms(params, tokens.shape)
    if intervention is not None:
        intervention = intervention.checked(cfg, *tokens.shape)
    return _forward(params, cfg, tokens, attn_mask, pos_ids, intervention, collect=tuple(collect),
                    return_logits=return_logits)


def run_with_cache(params: Params, cfg: ModelConfig, tokens, attn_mask=None, pos_ids=None,
                   sites: Sequence[str] = ("*",)):
    """Plain run returning (logits [B, T, V], cache of `sites`; '*': every entry the run records),
    inputs checked (`forward`)."""
    return forward(params, cfg, tokens, attn_mask, pos_ids, collect=tuple(sites))
