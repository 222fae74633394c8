"""Direct logit attribution (DLA): the final residual stream as a sum of components, read through
the final norm onto a direction (an answer token, a logit difference, any vector).

At chosen positions the residual after the last layer is exactly the sum of what every sender
group of the block (`models.block`) writes to it, split by unit:

    final = embed + sum_{l,h} z[l,h] @ W_O[l,h] + sum_l b_O[l] + sum_l mlp_out[l]

(`decompose` records the writes, `block.Parts`, through its own `LayerIO`; GQA needs nothing
special: z and W_O are per query head). A norm after the heads' sum (post_norms: OLMo-2, Gemma-2/3)
splits this way only with frozen scales (each head's and the bias's write through its linear map);
unfrozen, decomposing refuses, naming `freeze_norms`. A component c's direct
effect on the logit along d is d . scale * N(c) / s, where N centres c for LayerNorm-family norms
(a linear map), scale is the final norm's weight and 1/s its input scale; the final norm's bias
adds d . bias. What 1/s is decides the mode, chosen by the params and the config:

  run       1/s of the run itself (`layers.norm_input_scale` of `final`): standard practice, exact
            for that run (the contributions sum to the logit difference it computes).
  frozen    params from `freeze_norms`: every norm's 1/s fixed from a reference run, so the whole
            network is linear in the residual stream between its nonlinearities (attention
            softmax, MLP activation) and runs as such in every forward, patched run and sweep;
            the frozen forward equals the plain one on the reference run.
  ln_free   a config with norm 'ln_free' (GPT-2 checkpoints with their norms fine-tuned away):
            1/s is a constant, so DLA is exact for every run.

`logit_lens` reads the accumulated residual after each layer through the real final norm.
"""

from __future__ import annotations

import functools
from typing import Dict, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
from flax import struct

from jaxcircuits import checks
from jaxcircuits.interventions.metrics import AnswerProb, LogitDiff, check_metric
from jaxcircuits.models import transformer as M
from jaxcircuits.models.block import LayerIO, Parts, check_writes_sum
from jaxcircuits.models.config import ModelConfig
from jaxcircuits.models.layers import norm_input_scale, norm_linear
from jaxcircuits.models.params import norm_names

Array = jax.Array


@struct.dataclass
class Components:
    """The final residual at P chosen positions, split into its parts (B prompts, D model width).

    embed [B, P, D] (token + learned position embeddings); heads [L, H, B, P, D] (each head's
    output in model space, through a frozen post-norm where the block has one); attn_bias
    [L, B, P, D] (the attention write no head owns: o_proj biases, through a frozen post-norm, and
    its bias; zeros without); mlp [L, B, P, D]
    (MLP outputs, biases included); final [B, P, D] (the residual after the last layer, their sum);
    positions: the slots read (negative counts from the end).
    """

    embed: Array
    heads: Array
    attn_bias: Array
    mlp: Array
    final: Array
    positions: Tuple[int, ...] = struct.field(pytree_node=False)

    def total(self) -> Array:
        """The sum of the components [B, P, D] (equals `final` up to float rounding)."""
        return self.embed + self.heads.sum((0, 1)) + self.attn_bias.sum(0) + self.mlp.sum(0)

    def accumulated(self) -> Array:
        """The residual before layer 0 and after each layer [L + 1, B, P, D] (the last is `final`)."""
        per_layer = self.heads.sum(1) + self.attn_bias + self.mlp
        return jnp.concatenate([self.embed[None], self.embed[None] + jnp.cumsum(per_layer, 0)])


class _WritesIO(LayerIO):
    """Records each sender group's write at the chosen positions: 'write:<group>' [U, B, P, D] (each
    unit's share) and 'const:<group>' [B, P, D] (the part no unit owns), when the group has one."""

    def __init__(self, positions: Tuple[int, ...], collect, carry=None):
        super().__init__(collect, carry)
        self.positions = positions

    def write(self, group: str, parts: Parts) -> Array:
        at = jnp.asarray(self.positions)
        self.cache[f"write:{group}"] = parts.of(parts.act)[:, :, at]      # `of` may read each position's frozen scale
        if parts.const is not None:
            self.cache[f"const:{group}"] = jnp.broadcast_to(parts.const, parts.total.shape)[:, at]
        return parts.total


@struct.dataclass
class _Writes(M.Tap):
    """The plain run, recording every sender's write at `positions` (`_WritesIO`)."""

    positions: Tuple[int, ...] = struct.field(pytree_node=False)

    def io(self, layer, carry, collect):
        return _WritesIO(self.positions, collect, carry)


def decompose_fn(params, cfg: ModelConfig, tokens: Array, attn_mask: Array, positions: Tuple[int, ...]) -> Components:
    """`Components` of a plain run of tokens, attn_mask [B, T] at slots `positions` (traceable);
    ValueError where the residual stream is not the sum of the writes (`block.check_writes_sum`)."""
    check_writes_sum(cfg, "direct logit attribution")
    ctx = M.Context(M.default_positions(attn_mask), attn_mask)
    _, c, _ = M.run(params, cfg, tokens, ctx, _Writes(tuple(positions)), collect=("resid_final",))
    zeros = jnp.zeros((cfg.n_layers, *c["write:heads"].shape[2:]), c["write:heads"].dtype)
    return Components(
        embed=c["write:embed"][0], heads=c["write:heads"], attn_bias=c.get("const:heads", zeros),
        mlp=c["write:mlp"][:, 0], final=c["resid_final"][:, jnp.asarray(positions)], positions=tuple(positions))


def final_norm_map(params, cfg: ModelConfig, comps: Components):
    """(read, bias): read(c [..., B, P, D]) = scale * N(c) / s, the final norm's linear part in the
    mode the params and config give (module doc); bias [D] its constant part (zeros for RMSNorm).
    ValueError for soft-capped logits (a 'logit_softcap' leaf: Gemma-2), which are not linear in it."""
    if "logit_softcap" in params:
        raise ValueError("direct logit attribution is refused for final-logit soft-capping (final_logit_softcap "
                         "c, Gemma-2): the logits c * tanh(l / c) are not linear in the final residual")
    p = params["final_norm"]
    if "inv_scale" in p:                                                  # frozen
        inv = p["inv_scale"][:, jnp.asarray(comps.positions)].astype(jnp.float32)
    else:                                                                 # run / ln_free
        inv = norm_input_scale(cfg.norm, comps.final, cfg.norm_eps)
    read = lambda c: norm_linear(cfg.norm, p, c, inv)
    bias = p["bias"].astype(jnp.float32) if "bias" in p else jnp.zeros((cfg.d_model,), jnp.float32)
    return read, bias


def attribute(params, cfg: ModelConfig, comps: Components, direction: Array) -> Dict[str, Array]:
    """Direct effects along `direction` ([D], or [B, D] per prompt) of every component at once:
    embed [B, P], heads [L, H, B, P], attn_bias [L, B, P], mlp [L, B, P], norm_bias [B, P] and their
    sum 'total' [B, P] (in 'run' mode: the run's own d . final_norm(final))."""
    read, bias = final_norm_map(params, cfg, comps)
    d = jnp.broadcast_to(check_direction(direction, comps.final.shape[0], cfg.d_model), (comps.final.shape[0], cfg.d_model))
    along = lambda c: jnp.einsum("...bpd,bd->...bp", read(c), d)
    B, P = comps.final.shape[:2]
    out = {"embed": along(comps.embed), "heads": along(comps.heads),
           "attn_bias": along(comps.attn_bias),
           "mlp": along(comps.mlp), "norm_bias": jnp.broadcast_to((d @ bias)[:, None], (B, P))}
    out["total"] = (out["embed"] + out["heads"].sum((0, 1)) + out["attn_bias"].sum(0) + out["mlp"].sum(0)
                    + out["norm_bias"])
    return out


def check_direction(direction, batch: int, d_model: int) -> Array:
    """direction as float32 [D] or [B, D]; ValueError naming it when missing, of another shape, or
    (where concrete) not finite."""
    if direction is None:
        raise ValueError("direction is required: [D] or [B, D], e.g. answer_direction(params, good, bad)")
    d = jnp.asarray(direction, jnp.float32)
    if d.shape not in ((d_model,), (batch, d_model)):
        raise ValueError(f"direction has shape {d.shape}, expected [D] ({d_model},) or [B, D] ({batch}, {d_model})")
    if not isinstance(d, jax.core.Tracer):
        checks.within("direction", d)
    return d


def answer_direction(params, good: Array, bad: Optional[Array] = None) -> Array:
    """[B, D]: the mean unembedding column of each prompt's `good` token ids [B, G] (-1 = padding),
    minus that of its `bad` ids: the direction of a logit difference (exact for single tokens). The
    ids are checked as a metric's (`metrics.check_metric`: in the vocabulary, no padding-only row,
    good and bad sets different)."""
    check_metric(AnswerProb(jnp.asarray(good)) if bad is None else LogitDiff(jnp.asarray(good), jnp.asarray(bad)),
                 jax.eval_shape(M.unembed_matrix, params).shape[1])

    def mean_col(ids):
        ids = jnp.asarray(ids)
        valid = (ids >= 0).astype(jnp.float32)
        cols = M.unembed_columns(params, jnp.maximum(ids, 0)).astype(jnp.float32)     # [B, G, D]
        return jnp.einsum("bgd,bg->bd", cols, valid) / valid.sum(-1, keepdims=True)
    return mean_col(good) - (0.0 if bad is None else mean_col(bad))


@functools.partial(jax.jit, static_argnames=("cfg", "positions"))
def _dla(params, cfg, tokens, attn_mask, direction, positions):
    comps = decompose_fn(params, cfg, tokens, attn_mask, positions)
    return attribute(params, cfg, comps, direction)


def direct_logit_attribution(params, cfg: ModelConfig, tokens, attn_mask=None, direction=None,
                             positions: Sequence[int] = (-1,)) -> Dict[str, Array]:
    """`attribute` of a plain run in one compiled call: every head of every layer, every prompt.

    tokens, attn_mask [B, T] (checked, `transformer.check_inputs`); direction [D] or [B, D] (e.g.
    `answer_direction`); positions: slots read (default the last). Returns `attribute`'s dict.
    """
    tokens, attn_mask, _ = M.check_inputs(cfg, tokens, attn_mask)
    M.check_frozen_norms(params, tokens.shape)
    return _dla(params, cfg, tokens, attn_mask, check_direction(direction, tokens.shape[0], cfg.d_model),
                tuple(positions))


_decompose = jax.jit(decompose_fn, static_argnames=("cfg", "positions"))


def decompose(params, cfg: ModelConfig, tokens, attn_mask=None, positions: Sequence[int] = (-1,)) -> Components:
    """`decompose_fn` of tokens, attn_mask [B, T] (checked as `forward`'s), compiled."""
    tokens, attn_mask, _ = M.check_inputs(cfg, tokens, attn_mask)
    M.check_frozen_norms(params, tokens.shape)
    return _decompose(params, cfg, tokens, attn_mask, tuple(positions))


def logit_lens(params, cfg: ModelConfig, comps: Components) -> Array:
    """float32 logits [L + 1, B, P, V] of the accumulated residual before layer 0 and after each
    layer (`Components.accumulated`), each through the run's own final norm."""
    p = {k: v for k, v in params["final_norm"].items() if k != "inv_scale"}
    return M.logits_of(params, M.norm(cfg, p, comps.accumulated()))


def freeze_norms(params, cfg: ModelConfig, tokens, attn_mask=None) -> dict:
    """The frozen-LN model of a reference run: params whose norms (each of `params.norm_names(cfg)` per
    layer, and the final norm) carry `inv_scale` [L, B, T, 1] / [B, T, 1], their input scales on
    tokens, attn_mask [B, T], as the block records them ('scale:<norm>').

    Every norm then applies that fixed scale (`layers._inv_scale`), so the network is linear in
    the residual stream between nonlinearities. Use the result for runs over the reference's
    tokens (or the last positions of them: the patched suffix paths), with its batch.
    """
    tokens, attn_mask, _ = M.check_inputs(cfg, tokens, attn_mask)
    return _freeze_norms(params, cfg, tokens, attn_mask)


def freeze_norms_fn(params, cfg: ModelConfig, tokens: Array, attn_mask: Array) -> dict:
    """`freeze_norms` of checked int32 tokens, attn_mask [B, T] (traceable)."""
    _, c = M.forward_fn(params, cfg, tokens, attn_mask, collect=norm_scales(cfg), return_logits=False)
    return frozen_norms(params, cfg, c)


def norm_scales(cfg: ModelConfig) -> Tuple[str, ...]:
    """The cache entries a run records of every norm's input scale ('scale:<norm>'), what `frozen_norms`
    reads."""
    return tuple(f"scale:{n}" for n in (*norm_names(cfg), "final_norm"))


def frozen_norms(params, cfg: ModelConfig, cache: Dict[str, Array]) -> dict:
    """params with every norm's scale fixed to a run's, from its cache of `norm_scales(cfg)`."""
    frozen = lambda p, n: {**p[n], "inv_scale": cache[f"scale:{n}"]}                      # noqa: E731
    layers = {**params["layers"], **{n: frozen(params["layers"], n) for n in norm_names(cfg)}}
    return {**params, "layers": layers, "final_norm": frozen(params, "final_norm")}


_freeze_norms = jax.jit(freeze_norms_fn, static_argnames=("cfg",))
