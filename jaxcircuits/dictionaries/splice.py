"""Splicing sparse dictionaries into a model: a spliced model is a model.

`attach(params, cfg, dictionaries)` returns params and a config (`ModelConfig.splice`) with the
dictionaries inside: `models.block.spliced` runs each one right after its host's write site, so
every run (plain, cached, patched, vmapped, differentiated, swept, trained) sees its features as
the node site 'features' [L, F] (`interventions.sites`; cache entry [L, B, T, F], zeros on layers
without a dictionary) with no plumbing of its own:

  patch    `Mask(features=...)` with a source run's cache (`positions.align`)
  ablate   `interventions.ablation.zeros_like_source` / `mean_source` of that cache
  steer    `steer_source`: adds alpha to chosen features (alpha * W_dec[f] to the host activation)
  set      `set_source`: features set to a value where the mask patches
  levels   circuits and learned masks over the level 'feature' (`sites.LEVELS`, labels 'L3F17')

With the error kept (the default) the spliced model computes the plain model's logits bit for
bit while nothing patches the features; without it the host activation is the reconstruction.

Layout and cost: params['layers']['dict'] holds the dictionary params stacked over ALL L layers
({name: [L, *shape]}, `DictConfig.param_shapes`) and 'on' [L] (1.0 where a dictionary sits), in
the model's dtype, so the layer scan and the fast paths' layer slicing carry them unchanged. Layers
without a dictionary hold zeros: memory L / n_spliced times that of the dictionaries themselves
(about L (d_in + d_out) F numbers; e.g. one 16k-feature SAE on a 26-layer, D = 2304 model takes
26 x 2 x 2304 x 16384 x 2 bytes = 3.9 GB in bf16 instead of 150 MB), and every layer of a run
encodes (zeros where none sits), so compute grows the same way.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence, Tuple

import jax.numpy as jnp
import numpy as np

from jaxcircuits.dictionaries.core import Dictionary
from jaxcircuits.interventions.sites import Mask, Source, transform_key
from jaxcircuits.models.config import ModelConfig, SpliceConfig

Unit = Tuple[int, int]


def attach(params: dict, cfg: ModelConfig, dictionaries: Sequence[Dictionary], keep_error: bool = True):
    """(params, cfg) of the model with `dictionaries` spliced in (module doc): one per layer, all of one
    host and one `DictConfig`, widths fitting the host on this model (`SpliceConfig.check`: D for
    resid_pre, attn_out, mlp_out and transcoders, H * Dh for head_out). keep_error: the host keeps
    the dictionary's error (outputs unchanged while features are not patched), else it becomes the
    reconstruction. ValueError for a model that already has a splice."""
    if cfg.splice is not None:
        raise ValueError(f"this model already has {cfg.splice.host!r} dictionaries spliced at layers "
                         f"{cfg.splice.layers}; detach them first (detach)")
    dicts = list(dictionaries)
    if not dicts or not all(isinstance(d, Dictionary) for d in dicts):
        raise ValueError(f"dictionaries must be a non-empty sequence of Dictionary, got {dictionaries!r:.200}")
    for what, values in (("host", {d.host for d in dicts}), ("DictConfig", {d.config for d in dicts})):
        if len(values) > 1:
            raise ValueError(f"spliced dictionaries share one {what}; got {sorted(map(str, values))}")
    layers = [d.layer for d in dicts]
    if len(set(layers)) < len(layers):
        raise ValueError(f"one dictionary per layer: layers {sorted(layers)} repeat")
    splice = SpliceConfig(dicts[0].host, dicts[0].config, tuple(sorted(layers)), bool(keep_error))
    splice.check(cfg)
    dtype = params["embed"]["tokens"].dtype
    by_layer = {d.layer: d.params for d in dicts}
    stacked = {name: jnp.stack([jnp.asarray(by_layer[l][name], dtype) if l in by_layer else jnp.zeros(shape, dtype)
                                for l in range(cfg.n_layers)])
               for name, shape in splice.dictionary.param_shapes().items()}
    stacked["on"] = jnp.asarray([l in by_layer for l in range(cfg.n_layers)], dtype)
    return {**params, "layers": {**params["layers"], "dict": stacked}}, dataclasses.replace(cfg, splice=splice)


def detach(params: dict, cfg: ModelConfig):
    """(params, cfg) of the model without its spliced dictionaries (ValueError when it has none)."""
    cfg.dict_width                                           # raises without a splice
    layers = {k: v for k, v in params["layers"].items() if k != "dict"}
    return {**params, "layers": layers}, dataclasses.replace(cfg, splice=None)


def _units(cfg: ModelConfig, units: Sequence[Unit]) -> np.ndarray:
    """units as int [n, 2] of (spliced layer, feature < F); ValueError otherwise."""
    F, layers = cfg.dict_width, cfg.spliced_layers
    u = np.asarray(units, dtype=np.int64).reshape(-1, 2) if len(units) else np.zeros((0, 2), np.int64)
    bad = [tuple(int(c) for c in r) for r in u if r[0] not in layers or not 0 <= r[1] < F]
    if not len(u) or bad:
        raise ValueError(f"units must be (layer, feature) pairs with a spliced layer {layers} and a feature in "
                         f"[0, {F}); got {list(map(tuple, u.tolist()))[:8] if not bad else bad[:8]}")
    return u


def feature_mask(cfg: ModelConfig, units: Sequence[Unit], weight: float = 1.0) -> Mask:
    """Mask(features [L, F]) with `weight` at each (layer, feature) of `units`, 0 elsewhere."""
    u = _units(cfg, units)
    return Mask(features=jnp.zeros((cfg.n_layers, cfg.dict_width), jnp.float32).at[u[:, 0], u[:, 1]].set(weight))


def steer_source(cfg: ModelConfig, units: Sequence[Unit], alpha: float) -> Source:
    """{'steer:features': v [L, F]}, alpha at `units`: with `feature_mask(cfg, units)` and position
    weights w_pos, feature f becomes f + w_pos * alpha, so the host activation gains
    w_pos * alpha * W_dec[f] with the error kept (without it: decode of the steered features)."""
    u = _units(cfg, units)
    v = jnp.zeros((cfg.n_layers, cfg.dict_width), jnp.float32).at[u[:, 0], u[:, 1]].set(alpha)
    return {transform_key("steer", "features"): v}


def set_source(cfg: ModelConfig, batch: int, n_pos: int, value) -> Source:
    """{'features': value broadcast to [L, batch, n_pos, F]}: patched with a features mask of weight 1,
    the features it selects are set to `value` (a number, or any array broadcastable to that shape)."""
    return {"features": jnp.broadcast_to(jnp.asarray(value, jnp.float32), (cfg.n_layers, batch, n_pos, cfg.dict_width))}
