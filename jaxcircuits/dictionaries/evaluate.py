"""Evaluating a dictionary: sparsity, reconstruction, dead features, CE loss recovered, top contexts.

  l0                  mean number of active features (f != 0) per token
  explained_variance  1 - sum ||y - y_hat||^2 / sum ||y - mean(y)||^2 over the tokens (mean over tokens)
  dead_fraction       the fraction of features that fire on none of the tokens
  CE loss recovered   (ablated - spliced) / (ablated - clean): the model's next-token loss with the
                      dictionary spliced in, between the clean run (1) and the run with the host's
                      write site zero-ablated at its layer (0)

Next-token losses are means over the predictions of real tokens that are not the separator (a
padding or separator position is never a target; the separator's own prediction of the next token
counts).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Dict, List, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from jaxcircuits import checks
from jaxcircuits.dictionaries import core, splice
from jaxcircuits.dictionaries.stream import ModelActivations, host_sites
from jaxcircuits.interventions import sites
from jaxcircuits.interventions.ablation import zeros_like_source
from jaxcircuits.models import transformer
from jaxcircuits.models.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class Metrics:
    """A dictionary on N tokens: l0, explained_variance, dead_fraction (see the module doc), mse
    (mean_token ||y - y_hat||^2)."""

    l0: float
    explained_variance: float
    dead_fraction: float
    mse: float


@functools.partial(jax.jit, static_argnames=("dc",))
def _sums(dc: core.DictConfig, p, x, y):
    f = core.encode(dc, p, x)
    err = jnp.sum((y - core.decode(dc, p, f, x)) ** 2)
    return (f != 0).sum(), err, jnp.sum((y - y.mean(0)) ** 2), (f != 0).any(0)


def metrics(dc: core.DictConfig, params, acts) -> Metrics:
    """`Metrics` of dictionary (dc, params) on activations acts [N, d_in + d_out] (a `stream`
    source's rows: an SAE's input, or a transcoder's input then target)."""
    dc.check_params(params)
    acts = np.asarray(acts, np.float32)
    width = dc.d_in + (dc.out_dim if dc.d_out is not None else 0)
    if acts.ndim != 2 or acts.shape[1] != width or not len(acts):
        raise ValueError(f"acts must be [N, {width}] with N > 0 (d_in={dc.d_in}"
                         f"{f' + d_out={dc.out_dim}' if dc.d_out is not None else ''}), got shape {acts.shape}")
    x = acts[:, :dc.d_in]
    y = acts[:, dc.d_in:] if dc.d_out is not None else x
    active, err, var, fired = (np.asarray(v) for v in _sums(dc, params, x, y))
    n = len(acts)
    return Metrics(float(active) / n, float(1 - err / var) if var > 0 else float("nan"),
                   float(1 - fired.mean()), float(err) / n)


def ce_loss_recovered(clean: float, spliced: float, ablated: float) -> float:
    """(ablated - spliced) / (ablated - clean): 1 when the splice keeps the clean loss, 0 when it is
    as bad as zero-ablating the site. ValueError for non-finite losses or ablated == clean."""
    clean, spliced, ablated = (float(checks.within(n, v)) for n, v in
                               (("clean", clean), ("spliced", spliced), ("ablated", ablated)))
    if ablated == clean:
        raise ValueError(f"ablated == clean == {clean}: zero-ablating the site does not change the loss, "
                         "so no recovery is defined")
    return (ablated - spliced) / (ablated - clean)


def next_token_loss(logits, tokens, attn_mask, separator: Optional[int] = None) -> float:
    """Mean cross-entropy of logits [B, T, V] predicting tokens[:, 1:] where the target is real
    (attn_mask) and not `separator`."""
    logp = jax.nn.log_softmax(jnp.asarray(logits, jnp.float32)[:, :-1], axis=-1)
    target = jnp.asarray(tokens)[:, 1:]
    nll = -jnp.take_along_axis(logp, target[..., None], axis=-1)[..., 0]
    keep = (jnp.asarray(attn_mask)[:, 1:] > 0) & (jnp.asarray(attn_mask)[:, :-1] > 0)
    if separator is not None:
        keep &= target != separator
    if not bool(keep.any()):
        raise ValueError("tokens: no real, non-separator token to predict")
    return float((nll * keep).sum() / keep.sum())


@dataclasses.dataclass(frozen=True)
class CELosses:
    """Next-token losses: clean, with the host's write site zero-ablated at the layer, with the
    dictionary spliced in, and `recovered` (`ce_loss_recovered`)."""

    clean: float
    ablated: float
    spliced: float
    recovered: float


def ablation_intervention(cfg: ModelConfig, site: str, layer: int, cache, attn_mask) -> sites.Intervention:
    """Zero-ablation of every unit of `site` at `layer`, at the real positions (attn_mask [B, T]):
    an `Intervention` with a zero source shaped like `cache` (which holds `site`)."""
    mask = np.zeros(sites.get(site).shape(cfg), np.float32)
    mask[layer] = 1
    return sites.Intervention(sites.Mask(**{site: jnp.asarray(mask)}), zeros_like_source({site: cache[site]}),
                              jnp.asarray(attn_mask, jnp.float32))


def ce_losses(params, cfg: ModelConfig, dictionary: core.Dictionary, tokens,
              spliced: Union[None, float, Callable[..., float]] = None, attn_mask=None,
              separator: Optional[int] = None) -> CELosses:
    """The clean, zero-ablated and spliced next-token losses of tokens [B, T] (attn_mask [B, T],
    default all real; targets equal to `separator` excluded) and the CE loss recovered.

    spliced: the loss with `dictionary` spliced in at its host and layer without its error
    (`splice.attach`, keep_error=False), or that loss given as a number or as a function
    spliced(tokens, attn_mask) -> loss. The ablated run zeroes the host's write site (`core.HOSTS`)
    at the dictionary's layer.
    """
    tokens, attn_mask, _ = transformer.check_inputs(cfg, tokens, attn_mask)
    _, write = host_sites(dictionary.host)
    if dictionary.layer >= cfg.n_layers:
        raise ValueError(f"dictionary.layer={dictionary.layer}: the model has {cfg.n_layers} layers")
    logits, cache = transformer.forward(params, cfg, tokens, attn_mask, collect=(write,))
    clean = next_token_loss(logits, tokens, attn_mask, separator)
    iv = ablation_intervention(cfg, write, dictionary.layer, cache, attn_mask)
    ablated = next_token_loss(transformer.forward(params, cfg, tokens, attn_mask, intervention=iv)[0],
                              tokens, attn_mask, separator)
    if spliced is None:
        sp, scfg = splice.attach(params, cfg, [dictionary], keep_error=False)
        spliced = next_token_loss(transformer.forward(sp, scfg, tokens, attn_mask)[0], tokens, attn_mask, separator)
    spliced = float(spliced(tokens, attn_mask) if callable(spliced) else spliced)
    return CELosses(clean, ablated, spliced, ce_loss_recovered(clean, spliced, ablated))


@dataclasses.dataclass(frozen=True)
class Context:
    """One top activation of a feature: its value at token `pos` of token row `row`; the window
    around it: token ids int [n] and the feature's activations float [n] there, `focus` = the
    index of pos in the window."""

    value: float
    row: int
    pos: int
    tokens: np.ndarray
    acts: np.ndarray
    focus: int


def top_contexts(source: ModelActivations, dictionary: core.Dictionary, features: Sequence[int], k: int = 8,
                 before: int = 12, after: int = 4) -> Dict[int, List[Context]]:
    """{feature: its k largest activations over every token row of `source` (its real,
    non-separator positions), largest first, each with a window of `before` tokens before and
    `after` after (ties: the earlier row and position first); dictionary: an SAE or transcoder at
    the source's host and layer."""
    if (dictionary.host, dictionary.layer) != (source.host, source.layer):
        raise ValueError(f"dictionary at {dictionary.host!r} of layer {dictionary.layer} does not read the "
                         f"source's {source.host!r} of layer {source.layer}")
    features = [int(f) for f in features]
    if not features or min(features) < 0 or max(features) >= dictionary.config.width:
        raise ValueError(f"features must be non-empty indices in [0, {dictionary.config.width}), got {features}")
    checks.count("k", k)
    checks.count("before", before, minimum=0)
    checks.count("after", after, minimum=0)
    dc, p = dictionary.config, dictionary.params
    encode = jax.jit(lambda x: core.encode(dc, p, x)[..., jnp.asarray(features)])
    parts = []
    for start in range(0, len(source.tokens), source.rows_per_chunk):
        acts, keep = source.run(np.arange(start, min(start + source.rows_per_chunk, len(source.tokens))))
        parts.append(np.where(keep[..., None], np.asarray(encode(acts[..., :dc.d_in])), -np.inf))
    f = np.concatenate(parts)                                   # [N, T, len(features)], -inf where not kept
    n_pos = f.shape[1]
    out = {}
    for j, feat in enumerate(features):
        vals = f[..., j].ravel()
        top = [i for i in np.argsort(-vals, kind="stable")[:k] if vals[i] > 0]
        out[feat] = []
        for i in top:
            row, pos = divmod(int(i), n_pos)
            lo, hi = max(0, pos - before), min(n_pos, pos + after + 1)
            out[feat].append(Context(float(vals[i]), row, pos, source.tokens[row, lo:hi].copy(),
                                     np.maximum(f[row, lo:hi, j], 0), pos - lo))
    return out
