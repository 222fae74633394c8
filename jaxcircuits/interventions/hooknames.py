"""Our cache and site names <-> TransformerLens hook names (which SAELens SAEs and most notebooks use).

Our per-layer cache entries (`sites.CACHE_SITES`) are stacked over layers, [L, B, ...]; a
TransformerLens cache holds one array per layer and hook. Entry by entry, with the same layout:

  resid_pre    blocks.{l}.hook_resid_pre      [B, T, D]   (also blocks.{l-1}.hook_resid_post, l >= 1)
  resid_final  blocks.{L-1}.hook_resid_post   [B, T, D]   (the residual stream after the last layer)
  head_q       blocks.{l}.attn.hook_q         [B, T, H, Dh]  rotary models: hook_rot_q (after RoPE)
  head_k       blocks.{l}.attn.hook_k         [B, T, K, Dh]  rotary models: hook_rot_k (after RoPE)
  head_v       blocks.{l}.attn.hook_v         [B, T, K, Dh]
  pattern      blocks.{l}.attn.hook_pattern   [B, H, T, S]
  head_out     blocks.{l}.attn.hook_z         [B, T, H, Dh]
  attn_out     blocks.{l}.hook_attn_out       [B, T, D]   (the `attn_block` site patches blocks of it)
  mlp_in       blocks.{l}.ln2.hook_normalized [B, T, D]   (the MLP's normed input; see final_norm)
  mlp_neuron   blocks.{l}.mlp.hook_post       [B, T, F]   (gated MLPs: act(gate) * up, as TL's)
  mlp_out      blocks.{l}.hook_mlp_out        [B, T, D]
  final_norm   ln_final.hook_normalized       [B, T, D]

`kv` (keys after RoPE and values, for KV caching) has no hook of its own: `head_k`/`head_v` are
its parts. `features` (a spliced dictionary's, [B, T, F]; on a model with a splice only) is
HookedSAETransformer's `FEATURES_HOOK` at the hook of the host's read site, e.g.
blocks.{l}.hook_resid_pre.hook_sae_acts_post for a resid_pre SAE.

Values agree with a TransformerLens model loaded without weight processing
(`HookedTransformer.from_pretrained_no_processing`); its default `from_pretrained` processes the
weights (folds the norms' weights into the next layer, centres what writes to the residual
stream, folds value biases into the output bias), which changes some activations: the residual
stream, attn_out and mlp_out, and v and z where there are value biases. `final_norm` and
`mlp_in` are the norm's output after its weight (and bias), while TransformerLens'
`hook_normalized` is before them.
"""

from __future__ import annotations

import re
from typing import Dict, Optional, Tuple

import jax.numpy as jnp

from jaxcircuits.dictionaries.core import HOSTS
from jaxcircuits.interventions import sites

# TransformerLens hook name templates -> our cache entry ({layer}: a layer, {last}: the last layer).
HOOKS: Dict[str, str] = {
    "blocks.{layer}.hook_resid_pre": "resid_pre",
    "blocks.{last}.hook_resid_post": "resid_final",
    "blocks.{layer}.attn.hook_q": "head_q",
    "blocks.{layer}.attn.hook_k": "head_k",
    "blocks.{layer}.attn.hook_v": "head_v",
    "blocks.{layer}.attn.hook_pattern": "pattern",
    "blocks.{layer}.attn.hook_z": "head_out",
    "blocks.{layer}.hook_attn_out": "attn_out",
    "blocks.{layer}.ln2.hook_normalized": "mlp_in",
    "blocks.{layer}.mlp.hook_post": "mlp_neuron",
    "blocks.{layer}.hook_mlp_out": "mlp_out",
    "ln_final.hook_normalized": "final_norm",
}
# Rotary models: queries and keys after RoPE (what ours hold), replacing hook_q / hook_k.
ROTARY_HOOKS: Dict[str, str] = {"blocks.{layer}.attn.hook_rot_q": "blocks.{layer}.attn.hook_q",
                                "blocks.{layer}.attn.hook_rot_k": "blocks.{layer}.attn.hook_k"}
RESID_POST = "blocks.{layer}.hook_resid_post"
# A spliced dictionary's features: under the hook of its host's read site (HookedSAETransformer's name).
FEATURES_HOOK = "{read}.hook_sae_acts_post"
# Entries of a whole run, without a layer axis.
WHOLE_RUN = ("resid_final", "final_norm")


def _templates(cfg) -> Dict[str, str]:
    """Our entry -> hook name template on model `cfg` (whole-run entries fully formatted); cfg None
    (no model at hand): the per-layer entries only, under their plain (non-rotary) names."""
    if cfg is None:
        return {e: t for t, e in HOOKS.items() if e not in WHOLE_RUN}
    replaced = {plain: rot for rot, plain in ROTARY_HOOKS.items()} if cfg.position_embedding == "rotary" else {}
    out = {e: replaced.get(t, t).format(last=cfg.n_layers - 1) if e in WHOLE_RUN else replaced.get(t, t)
           for t, e in HOOKS.items()}
    if cfg.splice is not None:
        out["features"] = FEATURES_HOOK.format(read=out[HOSTS[cfg.splice.host][0]])
    return out


def split_layer(hook: str) -> Tuple[str, Optional[int]]:
    """(template, layer) of TransformerLens hook name `hook`: 'blocks.3.attn.hook_z' ->
    ('blocks.{layer}.attn.hook_z', 3); a hook outside the blocks -> (hook, None)."""
    m = re.fullmatch(r"blocks\.(\d+)\.(.+)", hook)
    return (f"blocks.{{layer}}.{m.group(2)}", int(m.group(1))) if m else (hook, None)


def hook_name(name: str, layer: Optional[int], cfg=None) -> str:
    """The TransformerLens hook name of our cache entry or site `name` at `layer` (None for the
    whole-run entries `WHOLE_RUN`) on model `cfg`; a site that reads another entry (attn_block)
    maps to that entry's. cfg None: per-layer entries only, plain names, the layer unchecked."""
    entry = sites.get(name).cache if name in sites.NAMES else name
    templates = _templates(cfg)
    if entry not in templates:
        raise ValueError(f"{name!r} has no TransformerLens hook; mapped: {sorted(templates)}")
    if (layer is None) != (entry in WHOLE_RUN):
        raise ValueError(f"{name!r}: pass a layer for a per-layer entry and None for {WHOLE_RUN}, got {layer}")
    if layer is not None and cfg is not None and not 0 <= layer < cfg.n_layers:
        raise ValueError(f"layer {layer} out of range [0, {cfg.n_layers})")
    return templates[entry].format(layer=layer)


def parse_hook_name(hook: str, cfg=None) -> Tuple[str, Optional[int]]:
    """(our cache entry, layer or None) holding TransformerLens hook `hook` on model `cfg`;
    blocks.{l}.hook_resid_post is resid_pre of layer l + 1 (resid_final after the last layer).
    ValueError for a hook we do not cache. cfg None (no model at hand): per-layer hooks only, their
    layers unchecked (the last layer's hook_resid_post reads as resid_pre of layer L)."""
    templates = {t: e for e, t in _templates(cfg).items()}
    if hook in templates:                                  # a whole-run entry
        return templates[hook], None
    templates[RESID_POST] = "resid_pre"
    template, layer = split_layer(hook)
    if template not in templates:
        pre_rope = {plain: rot for rot, plain in ROTARY_HOOKS.items()}.get(template)
        why = f" (the queries/keys before RoPE; ours are after it: {pre_rope})" if pre_rope else ""
        raise ValueError(f"hook {hook!r} is not cached by jaxcircuits{why}; mapped: {sorted(templates)}")
    layer += template == RESID_POST
    if cfg is not None and not 0 <= layer < cfg.n_layers:
        raise ValueError(f"hook {hook!r}: layer out of range for {cfg.n_layers} layers")
    return templates[template], layer


def to_hook_dict(cache: dict, cfg) -> dict:
    """Our cache (entries [L, B, ...]; `WHOLE_RUN` ones [B, T, D]) -> {TransformerLens hook name: array},
    one array per layer; 'kv' is left out."""
    out = {}
    for entry, value in cache.items():
        if entry in WHOLE_RUN:
            out[hook_name(entry, None, cfg)] = value
        elif entry != "kv":
            out.update({hook_name(entry, l, cfg): value[l] for l in range(value.shape[0])})
    return out


def from_hook_dict(hooks: dict, cfg) -> dict:
    """{TransformerLens hook name: array} -> our cache, each entry stacked [L, B, ...]. An entry needs
    its hook at every layer; hook_resid_post counts as the next layer's resid_pre."""
    layers: Dict[str, Dict[int, object]] = {}
    out = {}
    for hook, value in hooks.items():
        entry, layer = parse_hook_name(hook, cfg)
        if layer is None:
            out[entry] = value
        else:
            layers.setdefault(entry, {})[layer] = value
    for entry, per_layer in layers.items():
        missing = sorted(set(range(cfg.n_layers)) - set(per_layer))
        if missing:
            raise ValueError(f"{entry!r} ({_templates(cfg)[entry]}) lacks layers {missing}")
        out[entry] = jnp.stack([per_layer[l] for l in range(cfg.n_layers)])
    return out
