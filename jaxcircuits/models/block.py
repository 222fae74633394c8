"""The transformer layer, written once.

`block` says how a layer computes, top to bottom like the math. Every place where a run may watch
or change the layer is a call on the run's `LayerIO`:

  io.site(name, x)         a node site (`interventions.sites`): 'resid_pre', 'head_q', 'head_k',
                           'head_v', 'pattern', 'head_out', 'attn_block', 'attn_out', 'mlp_in',
                           'mlp_neuron', 'mlp_out', 'features'; returns the activation as this run
                           has it (patched, recorded)
  io.read(group, x, f)     a receiver group reads the residual stream x [B, T, D] through f: the
                           query heads 'q', the key and value heads 'k', 'v', the MLP 'mlp' (and,
                           at the model's top, the unembedding 'logits'). f maps x to the group's
                           value [B, T, U, ...] (U units) and, given one input per unit
                           [U, B, T, D], maps unit u's input to unit u's value
  io.write(group, parts)   a sender group adds `Parts.total` to the residual stream: the heads
                           'heads', the MLP 'mlp' (at the top, the embeddings 'embed'); `Parts`
                           splits the total into each unit's share
  io.record(name, value)   a value a run may keep: 'kv', and each norm's input scale 'scale:<norm>'

`LayerIO` itself is the plain run (nothing changes; collected names are kept). The node-patched
run (`interventions.sites.Intervention`), the edge-patched run (`interventions.edges`) and the
residual decomposition (`methods.dla`) are other implementations, chosen by the caller; fast paths
(a KV-cached prefix, queries at the last positions only, head outputs already known) are fields
of the attention context `Attn`, not branches in the block. Model features (`ModelConfig`) are
read here and in `layers.py`, nowhere else.

A spliced dictionary (cfg.splice, `dictionaries.splice.attach`) is such a feature: right after its
host's write site (resid_pre, head_out, attn_out or mlp_out; a transcoder reads 'mlp_in' and
writes 'mlp_out') `spliced` encodes the features f, passes them through the site 'features' (so
they are patched and recorded like any site) and adds back what a patch changed (`spliced`).

Shapes: B batch, T positions of this call (the last Tq of them with queries), S key slots, D model
width, H query heads, K KV heads, Dh head dim, F MLP width, U units of a group.
"""

from __future__ import annotations

import functools
import math
from typing import Callable, Dict, NamedTuple, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxcircuits.dictionaries.core import HOSTS, decode, encode
from jaxcircuits.models.config import ModelConfig
from jaxcircuits.models.layers import ACTIVATIONS, NORMS, QK_NORMS, frozen_norm_linear, norm_input_scale, soft_cap
from jaxcircuits.models.params import sublayer_norm

Array = jax.Array


class Parts(NamedTuple):
    """A sender group's write to the residual stream: total [B, T, D] = sum_u of(act)[u] + const,
    with act the units' activation (positions on axis 1), of(act) -> [U, B, T, D] each unit's share
    (linear in act) and const [D] or [B, T, D] (or None) the part that belongs to no unit."""

    total: Array
    act: Array
    of: Callable[[Array], Array]
    const: Optional[Array] = None


def one_unit(x: Array) -> Parts:
    """The write of a group that is one unit (the MLP, the embeddings): x [B, T, D] itself."""
    return Parts(x, x, lambda a: a[None])


class LayerIO:
    """The plain run at the places of one layer (or, with layer None, of the model's top): sites and
    reads pass through, writes add their total. A name the run `collect`s ('*': every name) is kept
    in `cache`; `carry` is what the run hands to the next layer (`transformer.Tap`); `names` holds
    every name recorded."""

    def __init__(self, collect: Sequence[str] = (), carry=None):
        self.collect, self.carry = tuple(collect), carry
        self.cache: Dict[str, Array] = {}
        self.names: set = set()

    def site(self, name: str, x: Array) -> Array:
        self.record(name, x)
        return x

    def read(self, group: str, x: Array, f: Callable[[Array], Array]) -> Array:
        return f(x)

    def write(self, group: str, parts: Parts) -> Array:
        return parts.total

    def record(self, name: str, value) -> None:
        """Keep `value` (or `value()`, when callable: computed only if kept) as `name`, if collected
        (the first value recorded under a name stands)."""
        self.names.add(name)
        if (name in self.collect or "*" in self.collect) and name not in self.cache:
            self.cache[name] = value() if callable(value) else value


@struct.dataclass
class KVCache:
    """Keys and values k, v [L, B, S, K, Dh] of S slots; a call writes its T positions' keys and
    values at slots write_index..write_index+T-1 and its queries attend to every slot up to theirs.

    Or tuples of parts along the slot axis (e.g. a target's cached prefix shared by every patched
    run), holding write_index slots in all: a call's keys are appended as a last part and attention
    reads the parts where they lie, so a prefix shared across a vmapped batch is never copied."""

    k: Array
    v: Array
    write_index: int | Array = 0


@struct.dataclass
class Attn:
    """One layer's attention context: rope, cos and sin [B, T, R/2] of the call's positions (None
    without RoPE); allowed [B, Tq, S], the key slots each query reads; kv, this layer's `KVCache`
    (None: the call's own keys, S = T); z, head outputs [B, Tq, H, Dh] already known (attention is
    then not computed); n_queries, Tq (None: every position has a query)."""

    rope: Optional[Tuple[Array, Array]]
    allowed: Array
    kv: Optional[KVCache] = None
    z: Optional[Array] = None
    n_queries: Optional[int] = struct.field(pytree_node=False, default=None)


# ---- the layer ------------------------------------------------------------------------------------

def block(cfg: ModelConfig, p: dict, x: Array, io: LayerIO, att: Attn) -> Array:
    """One layer on x [B, T, D] -> [B, Tq, D]:

        a = attn(norm1(x));  x + a + mlp(norm2(x + a))                           sequential (GPT-2, Llama)
        a = attn(norm1(x));  x + a + mlp(norm2(x))                               cfg.parallel_residual (GPT-NeoX)
        a = post_norm1(attn(x));  x + a + post_norm2(mlp(x + a))                 cfg.post_norms only (OLMo-2)
        a = post_norm1(attn(norm1(x)));  x + a + post_norm2(mlp(norm2(x + a)))   pre_ and post_norms (Gemma-2)
    """
    x = spliced(cfg, p, io, "resid_pre", io.site("resid_pre", x))
    z = spliced(cfg, p, io, "head_out", io.site("head_out", attention(cfg, p, x, io, att) if att.z is None else att.z))
    x = x[:, x.shape[1] - z.shape[1]:]                                   # the positions with queries
    a = io.write("heads", attn_output(cfg, p, z, io))
    mlp_in = x if cfg.parallel_residual else x + a
    m = io.write("mlp", one_unit(io.read("mlp", mlp_in, lambda h: mlp(cfg, p, h, io))))
    return x + a + m


def same_layer_reads(cfg: ModelConfig) -> Dict[str, Tuple[str, ...]]:
    """{receiver group: the sender groups of its own layer whose writes it reads}, as `block` wires
    them (a receiver reads every write of earlier layers; the edge graph reads this table)."""
    return {"q": (), "k": (), "v": (), "mlp": () if cfg.parallel_residual else ("heads",)}


def check_writes_sum(cfg: ModelConfig, what: str) -> None:
    """ValueError unless the residual stream is the sum of the senders' writes, as `what` (edges,
    direct logit attribution) reads it: a resid_pre dictionary spliced without its error replaces
    the stream by its reconstruction."""
    if cfg.splice is not None and cfg.splice.host == "resid_pre" and not cfg.splice.keep_error:
        raise ValueError(f"{what}: a resid_pre dictionary spliced without its error (keep_error=False) replaces the "
                         "residual stream by its reconstruction, so the stream is not the sum of the senders' "
                         "writes and this is not exact; it is refused (splice with keep_error=True)")


def attention(cfg: ModelConfig, p: dict, x: Array, io: LayerIO, att: Attn) -> Array:
    """Head outputs z [B, Tq, H, Dh] of the layer input x [B, T, D]: keys and values of all T
    positions (after the cache's, `att.kv`), queries of the last Tq."""
    heads = lambda name: lambda h: heads_of(cfg, p, name, sub_norm(cfg, p, "norm1", h, io, after=False))
    k = io.site("head_k", rotate(io.read("k", x, heads("k")), att.rope))
    v = io.site("head_v", io.read("v", x, heads("v")))
    tq = att.n_queries or x.shape[1]
    rope_q = None if att.rope is None else tuple(a[:, a.shape[1] - tq:] for a in att.rope)
    q = io.site("head_q", rotate(io.read("q", x[:, x.shape[1] - tq:], heads("q")), rope_q))
    k, v = _with_cache(att.kv, k, v)
    io.record("kv", lambda: (k, v) if not isinstance(k, tuple) else (jnp.concatenate(k, 1), jnp.concatenate(v, 1)))
    return attend(cfg, q, k, v, att.allowed, io)


def attn_output(cfg: ModelConfig, p: dict, z: Array, io: LayerIO) -> Parts:
    """The attention's write: o_proj(z) [B, Tq, D] (site 'attn_block'), normed by post_norm1 with
    cfg.post_norms (site 'attn_out'); head h's share z_h W_O[h], the o_proj bias shared by none.
    A post-norm with frozen scales (`methods.dla.freeze_norms`) is an affine map N: head h's share
    N_lin(z_h W_O[h]), shared by none N_lin(b_O) + its bias (`layers.frozen_norm_linear`); one that
    normalises the heads' sum by its own scale mixes them: no per-head share (`_unsplit`)."""
    out = io.site("attn_out", sub_norm(cfg, p, "norm1", io.site("attn_block", dense(p["o"], z, "bthe,hed->btd")), io,
                                       after=True))
    out = spliced(cfg, p, io, "attn_out", out)
    if cfg.splice is not None and cfg.splice.host == "attn_out" and not cfg.splice.keep_error:
        return Parts(out, z, _unsplit("heads", "an attn_out dictionary spliced without its error reconstructs the "
                                               "sum of the heads' outputs"))
    heads = lambda z: jnp.einsum("bthe,hed->hbtd", z, p["o"]["w"])
    bias, post = p["o"].get("b"), sublayer_norm(cfg, "norm1", after=True)
    if post is None:
        return Parts(out, z, heads, bias)
    if "inv_scale" not in p[post]:
        return Parts(out, z, _unsplit("heads", "post_norms (OLMo-2, Gemma-2): post_norm1 normalises the sum of the "
                                               "heads' outputs by its scale; freeze the norms (methods.dla."
                                               "freeze_norms) to make it a linear map that splits exactly"))
    lin = lambda y: frozen_norm_linear(cfg.norm, p[post], y).astype(out.dtype)
    const = lin(jnp.broadcast_to(0.0 if bias is None else bias, out.shape)) + p[post].get("bias", 0.0)
    return Parts(out, z, lambda z: lin(heads(z)), const)


def _unsplit(group: str, why: str) -> Callable[[Array], Array]:
    """`Parts.of` of a write that has no share per unit: raises ValueError naming the feature."""
    def of(act):
        raise ValueError(f"the {group!r} write of this model has no share per unit ({why}), so edges and "
                         "direct logit attribution of its units are not exact; they are refused")
    return of


def mlp(cfg: ModelConfig, p: dict, x: Array, io: LayerIO) -> Array:
    """MLP of the residual x [B, T, D]: down(act(gate(h)) * up(h)) when gated, else down(act(up(h))),
    h = norm2(x) (cfg.pre_norms; else h = x), then post_norm2 of the output (cfg.post_norms); sites
    'mlp_in' (h), 'mlp_neuron' (the down-projection's input) and 'mlp_out' (then a spliced mlp_out
    dictionary or transcoder, `spliced`)."""
    h = io.site("mlp_in", sub_norm(cfg, p, "norm2", x, io, after=False))
    act = ACTIVATIONS[cfg.activation]
    up = dense(p["up"], h, "btd,df->btf")
    hidden = act(dense(p["gate"], h, "btd,df->btf")) * up if cfg.gated_mlp else act(up)
    out = dense(p["down"], io.site("mlp_neuron", hidden), "btf,fd->btd")
    return spliced(cfg, p, io, "mlp_out", io.site("mlp_out", sub_norm(cfg, p, "norm2", out, io, after=True)), h)


def spliced(cfg: ModelConfig, p: dict, io: LayerIO, site: str, x: Array, read: Optional[Array] = None) -> Array:
    """x [B, T, ...] at node site `site` after the spliced dictionary (cfg.splice), where its host writes
    there (`dictionaries.core.HOSTS`); else x. The dictionary (params p['dict']) reads r, x itself or,
    when its host reads another site ('mlp_in' for a transcoder), `read`:

        f  = encode(r)                 [B, T, cfg.dict_width]
        f' = io.site('features', f)    patched, recorded
        x + (f' - f) W_dec             cfg.splice.keep_error: exactly x while f' = f
        decode(f')                     without the error, on the layers with a dictionary (p['dict']['on'])

    head_out's z [B, T, H, Dh] is read and written flat, [B, T, H * Dh]. Layers without a dictionary
    skip it (`jax.lax.cond` on p['dict']['on'], a per-layer scalar: a real branch in the layer scan and
    under vmap over masks): f = 0 there and x passes unchanged."""
    sp = cfg.splice
    if sp is None or HOSTS[sp.host][1] != site:
        return x
    d, dc = p["dict"], sp.dictionary
    on = d["on"] > 0
    flat = x.reshape(*x.shape[:2], -1)
    r = flat if HOSTS[sp.host][0] == site else read
    f = jax.lax.cond(on, lambda r: encode(dc, d, r), lambda r: jnp.zeros((*r.shape[:-1], dc.width), r.dtype), r)
    f2 = io.site("features", f)
    if sp.keep_error:
        write = lambda flat, f, f2, r: flat + jnp.einsum("btf,fd->btd", f2 - f, d["w_dec"].astype(f.dtype))
    else:
        write = lambda flat, f, f2, r: decode(dc, d, f2, r).astype(flat.dtype)
    out = jax.lax.cond(on, write, lambda flat, f, f2, r: flat, flat, f, f2, r)
    return out.reshape(x.shape)


# ---- pieces -------------------------------------------------------------------------------------

def norm(cfg: ModelConfig, p: dict, x: Array) -> Array:
    """The config's norm (`layers.NORMS`) of x [..., T, D] with leaves `p`."""
    return NORMS[cfg.norm].fn(p, x, cfg.norm_eps)


def named_norm(cfg: ModelConfig, p: dict, name: str, x: Array, io: LayerIO) -> Array:
    """`norm` with leaves p[name]; `io` records its input scale [..., T, 1] as 'scale:<name>' (what
    `methods.dla.freeze_norms` fixes)."""
    io.record(f"scale:{name}", lambda: norm_input_scale(cfg.norm, x, cfg.norm_eps))
    return norm(cfg, p[name], x)


def sub_norm(cfg: ModelConfig, p: dict, name: str, x: Array, io: LayerIO, after: bool) -> Array:
    """`named_norm` of a sublayer's input x (after=False) or output (after=True) by sublayer norm
    `name` ('norm1', 'norm2') there (`params.sublayer_norm`); x unchanged where the config has none."""
    leaf = sublayer_norm(cfg, name, after)
    return x if leaf is None else named_norm(cfg, p, leaf, x, io)


def dense(p: dict, x: Array, spec: str) -> Array:
    """einsum(spec, x, p['w']) + p['b'] (when present)."""
    y = jnp.einsum(spec, x, p["w"])
    return y + p["b"] if "b" in p else y


def project(p: dict, h: Array) -> Array:
    """Per-head projection [B, T, U, Dh] (p['w'] [D, U, Dh]) of normed h: [B, T, D], read by every
    head, or [U, B, T, D], head u reading row u (contracted unit-major, then moved into place)."""
    if h.ndim == 3:
        return dense(p, h, "btd,due->btue")
    y = jnp.moveaxis(jnp.einsum("ubtd,due->ubte", h, p["w"]), 0, 2)
    return y + p["b"] if "b" in p else y


def heads_of(cfg: ModelConfig, p: dict, name: str, h: Array) -> Array:
    """Head values [B, T, U, Dh] of projection `name` ('q', 'k', 'v') of normed h (as `project`),
    then its q/k norm p[name + '_norm'], where the config has one (`layers.QK_NORMS`). A norm over the
    whole projection gives head u of per-unit h [U, B, T, D] from every head's value of row u."""
    leaves = p.get(f"{name}_norm")
    if leaves is None:
        return project(p[name], h)
    span = QK_NORMS[cfg.qk_norm]
    if h.ndim == 3 or span == 1:
        return _qk_norm(cfg, leaves, project(p[name], h), span)
    every = dense(p[name], h, "ubtd,dve->ubtve")                        # each row's value of every head
    return jnp.moveaxis(jnp.diagonal(_qk_norm(cfg, leaves, every, span), axis1=0, axis2=3), -1, 2)


def _qk_norm(cfg: ModelConfig, leaves: dict, x: Array, span: int) -> Array:
    """The config's norm of x [..., U, Dh] over its last `span` axes, with leaves of their shape."""
    flat = x.reshape(*x.shape[:x.ndim - span], -1)
    return norm(cfg, {k: v.reshape(-1) for k, v in leaves.items()}, flat).reshape(x.shape)


def attention_mask(key_valid: Array, n_queries: int, write_index: int | Array = 0,
                   window: Optional[int] = None) -> Array:
    """allowed [B, T, S]: causal over slots (query t sits at slot write_index + t), real keys and,
    with a sliding `window`, the keys of its last `window` slots only (slot > query slot - window, as HF)."""
    S = key_valid.shape[1]
    q_slot, k_slot = (write_index + jnp.arange(n_queries))[:, None], jnp.arange(S)[None, :]
    near = k_slot > q_slot - (S if window is None else window)
    return ((k_slot <= q_slot) & near)[None] & key_valid[:, None, :].astype(bool)


def layer_allowed(cfg: ModelConfig, allowed: Tuple[Array, Optional[Array]], layer: Array) -> Array:
    """allowed [B, Tq, S] of layer `layer` (an index, traced in the layer scan) from allowed = (with
    cfg.sliding_window, without it (None without cfg.window_layers)): the first on a layer with the
    window (cfg.window_layers; every layer when None)."""
    if cfg.window_layers is None:
        return allowed[0]
    return jnp.where(jnp.asarray(cfg.window_layers)[layer], *allowed)


def rope_tables(cfg: ModelConfig, pos_ids: Array, layer: Array) -> Optional[Tuple[Array, Array]]:
    """cos, sin [B, T, R/2] (float32) of layer `layer` (an index, traced in the layer scan) for integer
    positions `pos_ids` [B, T], R = the head dims that rotate (`RopeConfig.dims`: Dh, or its partial
    fraction), at the layer's frequencies (`layer_inv_freqs`); None without RoPE."""
    if cfg.position_embedding != "rotary":
        return None
    ang = pos_ids.astype(jnp.float32)[..., None] * jnp.asarray(layer_inv_freqs(cfg), jnp.float32)[layer]
    return jnp.cos(ang), jnp.sin(ang)


def layer_inv_freqs(cfg: ModelConfig) -> np.ndarray:
    """RoPE inverse frequencies of each layer [L, R/2]: cfg.local_rope's on a layer with the sliding window
    (cfg.window_layers; every layer when None), cfg.rope's on the others, 0 (a rotation by 0: `rotate`
    is the identity) on a layer without RoPE (cfg.rope_layers)."""
    dims = cfg.rope.dims(cfg.d_head)
    local = cfg.window_layers or (True,) * cfg.n_layers
    rotates = cfg.rope_layers or (True,) * cfg.n_layers
    rope = lambda i: cfg.local_rope if cfg.local_rope is not None and local[i] else cfg.rope
    return np.stack([rope(i).inv_freq(dims) * rotates[i] for i in range(cfg.n_layers)])


def rotate(x: Array, rope: Optional[Tuple[Array, Array]]) -> Array:
    """HF's rotate-half RoPE on the first R dims of x [B, T, n, Dh] with cos/sin [B, T, R/2], the
    other Dh - R passing through (identity for None; the inverse rotation is (cos, -sin))."""
    if rope is None:
        return x
    cos, sin = rope
    half = cos.shape[-1]
    x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:2 * half].astype(jnp.float32)
    c, s = cos[:, :, None, :], sin[:, :, None, :]
    return jnp.concatenate([(x1 * c - x2 * s).astype(x.dtype), (x2 * c + x1 * s).astype(x.dtype), x[..., 2 * half:]], -1)


def _with_cache(kv: Optional[KVCache], k: Array, v: Array):
    """This call's keys and values with the layer's cache: written into it at write_index, or
    appended as a last part; unchanged without a cache."""
    if kv is None:
        return k, v
    if isinstance(kv.k, tuple):
        return (*kv.k, k.astype(kv.k[0].dtype)), (*kv.v, v.astype(kv.v[0].dtype))
    put = lambda c, a: jax.lax.dynamic_update_slice_in_dim(c, a.astype(c.dtype), kv.write_index, axis=1)
    return put(kv.k, k), put(kv.v, v)


def attend(cfg: ModelConfig, q: Array, k, v, allowed: Array, io: LayerIO) -> Array:
    """Softmax attention of q [B, T, H, Dh] over k, v [B, S, K, Dh] (or tuples of parts along S, read
    in place) (GQA: query head h reads KV head h // n_groups) where allowed [B, T, S]: z [B, T, H, Dh];
    site 'pattern'. Scores scaled by (cfg.query_pre_attn_scalar or Dh)^-1/2, then soft-capped
    (cfg.attn_logit_softcap: c * tanh(s / c)) before the mask."""
    B, T = q.shape[:2]
    ks, vs = (k, v) if isinstance(k, tuple) else ((k,), (v,))
    qg = q.reshape(B, T, cfg.n_kv_heads, cfg.n_groups, cfg.d_head)
    scores = jnp.concatenate([jnp.einsum("btkge,bske->bkgts", qg, kp) for kp in ks], -1)
    scale = math.sqrt(cfg.query_pre_attn_scalar or cfg.d_head)
    scores = scores.astype(jnp.float32).reshape(B, cfg.n_heads, T, -1) / scale
    if cfg.attn_logit_softcap is not None:
        scores = soft_cap(scores, cfg.attn_logit_softcap)
    scores = jnp.where(allowed[:, None], scores, jnp.finfo(jnp.float32).min)
    pattern = io.site("pattern", jax.nn.softmax(scores, axis=-1))
    pg = pattern.astype(vs[0].dtype).reshape(B, cfg.n_kv_heads, cfg.n_groups, T, -1)
    bounds = np.cumsum([0] + [vp.shape[1] for vp in vs])
    z = [jnp.einsum("bkgts,bske->btkge", pg[..., a:b], vp) for a, b, vp in zip(bounds, bounds[1:], vs)]
    return functools.reduce(jnp.add, z).reshape(B, T, cfg.n_heads, cfg.d_head)
