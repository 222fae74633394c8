"""A sparse dictionary's math, once: encode, decode, and the table of its activation kinds.

A dictionary reads an activation x [..., d_in] and writes [..., d_out] through F features:

    pre = (x - b_dec if subtract_b_dec else x) @ w_enc + b_enc          [..., F]
    f   = KINDS[kind](pre, ...)                                         [..., F]  (>= 0, sparse)
    out = f @ w_dec + b_dec (+ x @ w_skip for a transcoder with skip)   [..., d_out]

An SAE has d_out = d_in and reconstructs x; a transcoder reads an MLP's input and writes its
output. Params are a dict of arrays (a pytree; `DictConfig.param_shapes` lists them):

  w_enc [d_in, F], b_enc [F], w_dec [F, d_out], b_dec [d_out]
  threshold [F]                       'jumprelu': f = relu(pre) where pre > threshold, else 0 (SAELens,
                                      Gemma Scope)
  r_mag [F], b_mag [F]                'gated': f = 1[pre > 0] * relu(x (w_enc * exp(r_mag)) + b_mag), b_enc
                                      being the gate's bias (SAELens' b_gate)
  w_skip [d_in, d_out]                a transcoder's linear skip (`DictConfig.skip`)

'relu' is relu(pre); 'topk' keeps the k largest of relu(pre) per row (ties: the lowest index).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Dict, NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp

from jaxcircuits import checks

Array = jax.Array
Params = Dict[str, Array]


def _relu(dc: "DictConfig", p: Params, pre: Array, x: Array) -> Array:
    return jax.nn.relu(pre)


def _topk(dc: "DictConfig", p: Params, pre: Array, x: Array) -> Array:
    acts = jax.nn.relu(pre)
    _, idx = jax.lax.top_k(acts, dc.k)
    keep = jnp.zeros(acts.shape, bool)
    keep = jnp.put_along_axis(keep, idx, True, axis=-1, inplace=False)
    return jnp.where(keep, acts, 0)


def _jumprelu(dc: "DictConfig", p: Params, pre: Array, x: Array) -> Array:
    return jnp.where(pre > p["threshold"], jax.nn.relu(pre), 0)


def _gated(dc: "DictConfig", p: Params, pre: Array, x: Array) -> Array:
    """`pre` is the gate's pre-activation x W + b_enc with b_enc = b_gate; the magnitude path reads
    x through W's columns rescaled by exp(r_mag) (as SAELens: x W computed again, not pre - b_gate,
    which would lose x W's low bits in bf16 when |b_gate| >> |x W|)."""
    xw = pre_acts(dc, {**p, "b_enc": jnp.zeros_like(p["b_enc"])}, x)
    mag = xw * jnp.exp(p["r_mag"]).astype(xw.dtype) + p["b_mag"].astype(xw.dtype)
    return jnp.where(pre > 0, jax.nn.relu(mag), 0)


class Kind(NamedTuple):
    """A row of `KINDS`: the activation fn(dc, params, pre [..., F], x) -> f [..., F] and the extra
    per-feature params [F] it reads."""

    fn: Callable
    extra: Tuple[str, ...] = ()


KINDS: Dict[str, Kind] = {
    "relu": Kind(_relu),
    "topk": Kind(_topk),
    "jumprelu": Kind(_jumprelu, ("threshold",)),
    "gated": Kind(_gated, ("r_mag", "b_mag")),
}


@dataclasses.dataclass(frozen=True)
class DictConfig:
    """Static shape and kind of one dictionary.

    kind: a key of `KINDS`; d_in, d_out: the widths it reads and writes (d_out None: = d_in, an SAE);
    width: F features; k: the active features of 'topk'; subtract_b_dec: encode x - b_dec (SAELens'
    apply_b_dec_to_input); skip: a transcoder's linear skip w_skip.
    """

    kind: str
    d_in: int
    width: int
    d_out: Optional[int] = None
    k: Optional[int] = None
    subtract_b_dec: bool = False
    skip: bool = False

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown dictionary kind {self.kind!r}; known: {sorted(KINDS)}")
        checks.count("d_in", self.d_in)
        checks.count("width", self.width)
        if self.d_out is not None:
            checks.count("d_out", self.d_out)
        if (self.kind == "topk") != (self.k is not None):
            raise ValueError(f"k is the number of active features of a 'topk' dictionary only; kind "
                             f"{self.kind!r} with k={self.k}")
        if self.k is not None:
            checks.count("k", self.k)
            if self.k > self.width:
                raise ValueError(f"k={self.k} active features exceed the width {self.width}")
        if self.subtract_b_dec and self.out_dim != self.d_in:
            raise ValueError(f"subtract_b_dec needs d_out == d_in (an SAE), got d_in={self.d_in}, d_out={self.out_dim}")

    @property
    def out_dim(self) -> int:
        return self.d_in if self.d_out is None else self.d_out

    def param_shapes(self) -> Dict[str, Tuple[int, ...]]:
        """{name: shape} of this dictionary's params."""
        F, di, do = self.width, self.d_in, self.out_dim
        shapes = {"w_enc": (di, F), "b_enc": (F,), "w_dec": (F, do), "b_dec": (do,)}
        shapes.update({name: (F,) for name in KINDS[self.kind].extra})
        if self.skip:
            shapes["w_skip"] = (di, do)
        return shapes

    def check_params(self, p: Params, what: str = "dictionary") -> None:
        """ValueError unless `p` holds exactly `param_shapes` (names and shapes)."""
        want = self.param_shapes()
        if set(p) != set(want):
            raise ValueError(f"{what} params {sorted(p)} differ from a {self.kind!r} dictionary's "
                             f"{sorted(want)} (missing {sorted(set(want) - set(p))}, "
                             f"unexpected {sorted(set(p) - set(want))})")
        for name, shape in want.items():
            if tuple(jnp.shape(p[name])) != shape:
                raise ValueError(f"{what} param {name!r} has shape {tuple(jnp.shape(p[name]))}, expected {shape} "
                                 f"(d_in={self.d_in}, width={self.width}, d_out={self.out_dim})")


def pre_acts(dc: DictConfig, p: Params, x: Array) -> Array:
    """Encoder pre-activations [..., F] of x [..., d_in] (linear in x: they split over parts of x)."""
    if dc.subtract_b_dec:
        x = x - p["b_dec"].astype(x.dtype)
    return jnp.einsum("...d,df->...f", x, p["w_enc"].astype(x.dtype)) + p["b_enc"].astype(x.dtype)


def encode(dc: DictConfig, p: Params, x: Array) -> Array:
    """Feature activations f [..., F] of x [..., d_in]."""
    return KINDS[dc.kind].fn(dc, p, pre_acts(dc, p, x), x)


def decode(dc: DictConfig, p: Params, f: Array, x: Optional[Array] = None) -> Array:
    """The dictionary's output [..., d_out] of features f [..., F]; a transcoder with skip also reads
    its input x [..., d_in]."""
    out = jnp.einsum("...f,fd->...d", f, p["w_dec"].astype(f.dtype)) + p["b_dec"].astype(f.dtype)
    if dc.skip:
        if x is None:
            raise ValueError("a transcoder with a skip connection decodes from its input x too")
        out = out + jnp.einsum("...d,de->...e", x, p["w_skip"].astype(x.dtype))
    return out


def reconstruct(dc: DictConfig, p: Params, x: Array) -> Array:
    """decode(encode(x)) [..., d_out]."""
    return decode(dc, p, encode(dc, p, x), x)


def init(dc: DictConfig, key: Array, dtype=jnp.float32) -> Params:
    """Fresh params: decoder rows random unit vectors, the encoder their transpose, zero biases,
    thresholds 1e-3 ('jumprelu'), r_mag = b_mag = 0 ('gated'), skip 0."""
    w_dec = jax.random.normal(key, (dc.width, dc.out_dim), dtype)
    w_dec = w_dec / jnp.linalg.norm(w_dec, axis=-1, keepdims=True)
    w_enc = w_dec.T if dc.out_dim == dc.d_in else jax.random.normal(jax.random.fold_in(key, 1), (dc.d_in, dc.width),
                                                                        dtype) / jnp.sqrt(dc.d_in)
    p = {"w_enc": w_enc, "b_enc": jnp.zeros(dc.width, dtype), "w_dec": w_dec, "b_dec": jnp.zeros(dc.out_dim, dtype)}
    extra = {"threshold": jnp.full(dc.width, 1e-3, dtype), "r_mag": jnp.zeros(dc.width, dtype),
             "b_mag": jnp.zeros(dc.width, dtype)}
    p.update({name: extra[name] for name in KINDS[dc.kind].extra})
    if dc.skip:
        p["w_skip"] = jnp.zeros((dc.d_in, dc.out_dim), dtype)
    return p


# Where a dictionary sits in the model: host -> (the site it reads, the site it writes), both
# `interventions.sites` names. An SAE reads and writes one site (head_out: the heads' z concatenated,
# [B, T, H * Dh], TransformerLens' hook_z); a transcoder reads the MLP's normed input 'mlp_in' and
# writes its output 'mlp_out'.
HOSTS: Dict[str, Tuple[str, str]] = {
    "resid_pre": ("resid_pre", "resid_pre"),
    "head_out": ("head_out", "head_out"),
    "attn_out": ("attn_out", "attn_out"),
    "mlp_out": ("mlp_out", "mlp_out"),
    "transcoder": ("mlp_in", "mlp_out"),
}


@dataclasses.dataclass(frozen=True)
class Dictionary:
    """One dictionary placed in a model: its `DictConfig`, params, host (a key of `HOSTS`) and layer."""

    config: DictConfig
    params: Params
    host: str
    layer: int

    def __post_init__(self):
        if self.host not in HOSTS:
            raise ValueError(f"unknown dictionary host {self.host!r}; known: {sorted(HOSTS)}")
        checks.count("layer", self.layer, minimum=0)
        self.config.check_params(self.params, f"{self.host} dictionary of layer {self.layer}")
