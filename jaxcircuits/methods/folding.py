"""Weight folding: rewrite params so a norm's affine part no longer sits between the components.

Direct logit attribution reads each component's write to the residual stream through the final
norm and the unembedding. With the norms' learned scale (and LayerNorm bias) in place, every
reader of the residual applies x_hat -> x_hat * s + b before its linear map, so a component's
effect is smeared across the affine part. Folding moves that affine part into the linear maps
that read the norm's output (as TransformerLens' ``fold_ln``), and, for LayerNorm models, centring
makes every write to the residual mean-zero over d_model (``center_writing_weights``), so what a
component writes is what the next LayerNorm sees. Every function returns params in the same layout
(`models/params.py`) and a config they match, so the unchanged forward computes the same logits.

What is folded (`fold_norms`):
  norm1 -> q, k, v;  norm2 -> up (and gate);  the final RMSNorm's scale -> the unembedding.
  The final *LayerNorm* stays as it is: its bias would fold into a logit bias b W_U, and the layout
  has no logit bias, so folding it would change the logits.
Folding into the unembedding of a tied model would change the input embedding as well, so such a
model is untied first (`untie_embeddings`: an explicit 'unembed' leaf, cfg.tied_embeddings=False);
that is why every function here returns (params, cfg).

Each function is pure jnp and traceable; cfg is static, so jit it as
``jax.jit(lambda p: fold_norms(p, cfg)[0])`` (the returned cfg depends on cfg alone).
Shapes as in `models/params.py`: L layers, D model width, V vocab.
"""

from __future__ import annotations

import dataclasses
from typing import Tuple

import jax
import jax.numpy as jnp

from jaxcircuits.models.config import ModelConfig
from jaxcircuits.models.layers import NORMS, norm_weight
from jaxcircuits.models.params import Params

Array = jax.Array


def untie_embeddings(params: Params, cfg: ModelConfig) -> Tuple[Params, ModelConfig]:
    """(params with an explicit 'unembed' {'w': embed.tokens.T [D, V]}, cfg with
    tied_embeddings=False) for a tied model; (params, cfg) unchanged for an untied one. Same logits;
    afterwards the unembedding can change without changing the input embedding."""
    if not cfg.tied_embeddings:
        return params, cfg
    return ({**params, "unembed": {"w": params["embed"]["tokens"].T}},
            dataclasses.replace(cfg, tied_embeddings=False))


def _check_unspliced(cfg: ModelConfig, what: str) -> None:
    """ValueError for a model with a spliced dictionary: `what` changes activations dictionaries read
    (the MLP's normed input, the writes to the residual stream)."""
    if cfg.splice is not None:
        raise ValueError(f"{what} changes activations that the spliced {cfg.splice.host!r} dictionaries read; "
                         "detach them first (dictionaries.splice.detach)")


def _fold(kind: str, norm: dict, proj: dict, center: bool) -> dict:
    """One norm of `kind` (weight s = `layers.norm_weight`, bias b [L, D]) folded into one projection
    reading it (w [L, D, ...], optional b [L, ...]): y = (x_hat s + b) W + c = x_hat (diag(s) W) + (b W + c).
    center: also subtract the mean over D of diag(s) W (exact when x_hat is mean-zero: LayerNorm)."""
    w = proj["w"].astype(jnp.float32)
    s = norm_weight(kind, norm)
    folded = w * s.reshape(s.shape + (1,) * (w.ndim - s.ndim))
    if center:
        folded = folded - folded.mean(axis=1, keepdims=True)
    out = {"w": folded.astype(proj["w"].dtype)}
    if "b" in proj:
        b = proj["b"].astype(jnp.float32)
        if "bias" in norm:
            b = b + jnp.einsum("ld,ld...->l...", norm["bias"].astype(jnp.float32), w)
        out["b"] = b.astype(proj["b"].dtype)
    return out


def _identity_norm(kind: str, norm: dict) -> dict:
    """The leaves of a norm of `kind` with weight 1 and bias 0 (the affine part removed)."""
    return {"scale": jnp.ones_like(norm["scale"]) - NORMS[kind].offset,
            **({"bias": jnp.zeros_like(norm["bias"])} if "bias" in norm else {})}


def fold_norms(params: Params, cfg: ModelConfig, *, center_reading: bool = True
               ) -> Tuple[Params, ModelConfig]:
    """Fold each norm's affine part into the linear maps reading it: (params, cfg), same logits.

    Per layer, with x_hat the normalised residual, s the norm's scale and b its bias (LayerNorm):
      q = norm1(x) W_q + b_q = x_hat (diag(s1) W_q) + (b1 W_q + b_q)          (and k, v: [D, H|K, Dh])
      up = norm2(x) W_up + b_up = x_hat (diag(s2) W_up) + (b2 W_up + b_up)   (and gate: [D, F])
    then norm1 and norm2 get scale 1 (and bias 0). For RMSNorm the final norm's scale folds into
    the unembedding, W_U' = diag(s_f) W_U [D, V] (a tied model is untied first; the returned cfg
    says so); the final LayerNorm is left in place (its bias would need a logit bias; see module).

    center_reading (LayerNorm only, as TransformerLens' ``fold_ln``): also subtract from each folded
    reading weight its mean over D, which changes nothing as x_hat has mean 0 over D.

    A LayerNorm bias needs a bias on the projections it folds into: ValueError when the config has
    no attn_bias (norm1 -> q, k, v) or no mlp_bias (norm2 -> up, gate); ValueError for post_norms
    (norms after the sublayers, OLMo-2).
    """
    _check_unspliced(cfg, "fold_norms")
    if cfg.post_norms:
        raise ValueError("cannot fold the norms of a post_norms model (OLMo-2, Gemma-2): post_norm1 and post_norm2 "
                         "scale the sublayers' outputs, which no linear map reads before they join the residual")
    has_bias = "bias" in NORMS[cfg.norm].leaves
    if has_bias:
        for flag, norm_name, readers in (("attn_bias", "norm1", "q/k/v"), ("mlp_bias", "norm2", "up/gate")):
            if not getattr(cfg, flag):
                raise ValueError(f"cannot fold the {cfg.norm} {norm_name} bias: the config has {flag}=False, "
                                 f"so {readers} have no bias leaf to take it")
    layers = dict(params["layers"])
    center = center_reading and cfg.norm == "layernorm"
    for norm_name, readers in (("norm1", ("q", "k", "v")), ("norm2", ("gate", "up"))):
        for r in readers:
            if r in layers:
                layers[r] = _fold(cfg.norm, layers[norm_name], layers[r], center)
        layers[norm_name] = _identity_norm(cfg.norm, layers[norm_name])
    params = {**params, "layers": layers}
    if has_bias:                      # the final LayerNorm stays: its bias b W_U would be a logit bias
        return params, cfg
    params, cfg = untie_embeddings(params, cfg)
    w_u, s = params["unembed"]["w"], norm_weight(cfg.norm, params["final_norm"])
    unembed = (s[:, None] * w_u.astype(jnp.float32)).astype(w_u.dtype)
    return {**params, "unembed": {"w": unembed},
            "final_norm": _identity_norm(cfg.norm, params["final_norm"])}, cfg


def _centered(x: Array) -> Array:
    """x minus its mean over the last axis (d_model), computed in float32."""
    x32 = x.astype(jnp.float32)
    return (x32 - x32.mean(-1, keepdims=True)).astype(x.dtype)


def center_writing_weights(params: Params, cfg: ModelConfig) -> Tuple[Params, ModelConfig]:
    """Make every write to the residual stream mean-zero over d_model: (params, cfg), same logits.

    LayerNorm models only: every reader of the residual (norm1, norm2, the final norm) is a
    LayerNorm, and LN(x) = LN(x - mean_D(x) 1), so subtracting from each writing weight its mean
    over D changes nothing downstream: W' = W - mean_D(W) for embed.tokens [V, D],
    embed.positions [P, D], o.w [L, H, Dh, D], o.b [L, D], down.w [L, F, D], down.b [L, D].
    A tied model is untied first (the unembedding keeps the uncentred tokens.T).
    ValueError for an RMSNorm model (RMSNorm does not remove the mean: outputs would change).
    """
    _check_unspliced(cfg, "center_writing_weights")
    if cfg.norm != "layernorm":
        raise ValueError(f"center_writing_weights needs LayerNorm (it removes the mean it relies on); "
                         f"this config's norm is {cfg.norm!r}, whose outputs centring would change")
    params, cfg = untie_embeddings(params, cfg)
    layers = dict(params["layers"])
    for name in ("o", "down"):
        layers[name] = {k: _centered(v) for k, v in layers[name].items()}
    embed = {k: _centered(v) for k, v in params["embed"].items()}
    return {**params, "embed": embed, "layers": layers}, cfg


def center_unembed(params: Params, cfg: ModelConfig) -> Tuple[Params, ModelConfig]:
    """Subtract from each row of the unembedding W_U [D, V] its mean over the vocabulary:
    (params, cfg). logits' = h W_U - (h . mean_V(W_U)) 1, a per-position constant shift, so
    softmax, log-probs and logit differences are unchanged (TransformerLens' ``center_unembed``).
    A tied model is untied first (the input embedding is kept)."""
    params, cfg = untie_embeddings(params, cfg)
    w = params["unembed"]["w"].astype(jnp.float32)
    return {**params, "unembed": {"w": (w - w.mean(-1, keepdims=True)).astype(params["unembed"]["w"].dtype)}}, cfg
