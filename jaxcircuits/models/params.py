"""The parameter pytree: one layout for GPT-2 and Llama, per-layer weights stacked on axis 0.

    params = {
      'embed':   {'tokens': [V, D], 'positions': [P, D] (learned position embeddings)},
      'layers':  {                                 # every leaf has a leading [L] axis
        'norm1': {'scale': [L, D], 'bias': [L, D] (layernorm)}        (norms: `norm_names`),
        'q':     {'w': [L, D, H, Dh],  'b': [L, H, Dh]   (if attn_bias)},
        'k':     {'w': [L, D, K, Dh],  'b': [L, K, Dh]   (if attn_bias)},
        'v':     {'w': [L, D, K, Dh],  'b': [L, K, Dh]   (if attn_bias)},
        'o':     {'w': [L, H, Dh, D],  'b': [L, D]       (if o_bias)},
        'q_norm': {'scale': [L, Dh] or [L, H, Dh]}, 'k_norm': {'scale': [L, Dh] or [L, K, Dh]}
                                                   (if qk_norm: per head or whole projection)
        'norm2': {'scale': [L, D], 'bias': [L, D] (layernorm)},
        'gate':  {'w': [L, D, F]} (gated MLPs),
        'up':    {'w': [L, D, F],  'b': [L, F]  (if mlp_bias)},
        'down':  {'w': [L, F, D],  'b': [L, D]  (if mlp_bias)},
        'dict':  {name: [L, *shape] of `DictConfig.param_shapes`, 'on': [L]}   (if cfg.splice:
                 the spliced dictionaries, zeros on layers without one, 'on' 1.0 on those with one)
      },
      'final_norm': {'scale': [D], 'bias': [D] (layernorm)},
      'unembed': {'w': [D, V]} (absent when embeddings are tied: logits use embed.tokens.T),
      'logit_softcap': [] (cfg.final_logit_softcap, set by the loader: `config_leaves`; in the
                       params' dtype: Gemma-2's 30 is exact in bfloat16),
    }

H query heads, K KV heads, Dh head dim; head h of `q.w` is HF's output rows
[h*Dh, (h+1)*Dh) of q_proj (so heads sit where HF has them).
"""

from __future__ import annotations

from typing import Any, Dict

import jax
import jax.numpy as jnp
import numpy as np

from jaxcircuits.models.config import ModelConfig
from jaxcircuits.models.layers import NORMS, QK_NORMS

Params = Dict[str, Any]
# Parameter dtypes by name: the ones the forward, the sweeps and the parity tests are built for.
PARAM_DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(jnp.bfloat16)}


def param_dtype(dtype) -> np.dtype:
    """`dtype` (a `PARAM_DTYPES` name, or a dtype such as jnp.bfloat16) as a numpy dtype; ValueError
    for any other, so an int8 or float16 load is refused before any work."""
    try:
        dt = PARAM_DTYPES[dtype] if isinstance(dtype, str) else np.dtype(dtype)
    except (KeyError, TypeError):
        dt = None
    if dt not in PARAM_DTYPES.values():
        raise ValueError(f"dtype {getattr(dt, 'name', dtype)!r} is not supported for params "
                         f"(supported: {', '.join(PARAM_DTYPES)})")
    return dt


def sublayer_norm(cfg: ModelConfig, name: str, after: bool):
    """The leaf of `params['layers']` of sublayer norm `name` ('norm1': attention's, 'norm2': the
    MLP's) before (after=False) or after its sublayer: name (cfg.pre_norms), 'post_' + name
    (cfg.post_norms), None where the config has no norm."""
    if after:
        return f"post_{name}" if cfg.post_norms else None
    return name if cfg.pre_norms else None


def norm_names(cfg: ModelConfig) -> tuple:
    """The norms of a layer, as leaves of `params['layers']` (`sublayer_norm`)."""
    names = (sublayer_norm(cfg, name, after) for after in (False, True) for name in ("norm1", "norm2"))
    return tuple(n for n in names if n)


def config_leaves(cfg: ModelConfig) -> dict:
    """{leaf: value} of the top-level leaves the config gives (not the checkpoint): 'logit_softcap',
    the final-logit soft cap (`transformer.logits_of` reads it from the params, as metrics do)."""
    return {} if cfg.final_logit_softcap is None else {"logit_softcap": cfg.final_logit_softcap}


def param_shapes(cfg: ModelConfig) -> Params:
    """The expected shape of every leaf, as a pytree of tuples in the layout above."""
    L, D, H, K, Dh, F, V = (cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.d_head,
                            cfg.d_mlp, cfg.vocab_size)
    norm_leaves = NORMS[cfg.norm].leaves

    def norm(*lead, shape=(D,)):
        return {leaf: (*lead, *shape) for leaf in norm_leaves}

    def proj(w, b, has_bias):
        return {"w": w, **({"b": b} if has_bias else {})}

    layers = {
        **{name: norm(L) for name in norm_names(cfg)},
        "q": proj((L, D, H, Dh), (L, H, Dh), cfg.attn_bias),
        "k": proj((L, D, K, Dh), (L, K, Dh), cfg.attn_bias),
        "v": proj((L, D, K, Dh), (L, K, Dh), cfg.attn_bias),
        "o": proj((L, H, Dh, D), (L, D), cfg.o_bias),
        "up": proj((L, D, F), (L, F), cfg.mlp_bias),
        "down": proj((L, F, D), (L, D), cfg.mlp_bias),
    }
    if cfg.qk_norm is not None:
        span = QK_NORMS[cfg.qk_norm]
        layers.update(q_norm=norm(L, shape=(H, Dh)[-span:]), k_norm=norm(L, shape=(K, Dh)[-span:]))
    if cfg.gated_mlp:
        layers["gate"] = proj((L, D, F), (L, F), cfg.mlp_bias)
    if cfg.splice is not None:
        layers["dict"] = {**{k: (L, *s) for k, s in cfg.splice.dictionary.param_shapes().items()}, "on": (L,)}
    shapes = {
        "embed": {"tokens": (V, D), **({"positions": (cfg.max_positions, D)}
                                      if cfg.position_embedding == "learned" else {})},
        "layers": layers,
        "final_norm": norm(),
    }
    if not cfg.tied_embeddings:
        shapes["unembed"] = {"w": (D, V)}
    return {**shapes, **{leaf: () for leaf in config_leaves(cfg)}}


def _is_shape(x) -> bool:
    return isinstance(x, tuple)


def check_params(params: Params, cfg: ModelConfig) -> None:
    """Raise ValueError naming every missing, extra or mis-shaped leaf."""
    expected = dict(jax.tree_util.tree_flatten_with_path(param_shapes(cfg), is_leaf=_is_shape)[0])
    got = dict(jax.tree_util.tree_flatten_with_path(params)[0])
    name = jax.tree_util.keystr
    errors = [f"missing parameter {name(p)} {s}" for p, s in expected.items() if p not in got]
    errors += [f"unexpected parameter {name(p)}" for p in got if p not in expected]
    errors += [f"parameter {name(p)} has shape {tuple(got[p].shape)}, expected {s}"
               for p, s in expected.items() if p in got and tuple(got[p].shape) != s]
    if errors:
        raise ValueError("params do not match the config:\n  " + "\n  ".join(errors))


def init_params(cfg: ModelConfig, key: jax.Array, dtype=jnp.float32, scale: float = 0.02) -> Params:
    """Random params (normal * scale; norm scales near 1) in the layout above, for tests/benchmarks."""
    shapes = param_shapes(cfg)
    flat, treedef = jax.tree_util.tree_flatten_with_path(shapes, is_leaf=_is_shape)
    keys = jax.random.split(key, len(flat))
    leaves = []
    for (path, shape), k in zip(flat, keys):
        name = jax.tree_util.keystr(path)
        if name.startswith("['layers']"):
            # Drawn a layer at a time, so the generator's temporaries stay one layer big (an
            # 8B model's stacked bf16 MLP leaf is 3.8 GB; drawn whole it would need ~30 GB).
            x = jax.lax.map(lambda k1, s=shape[1:]: jax.random.normal(k1, s, dtype),
                            jax.random.split(k, shape[0]))
        else:
            x = jax.random.normal(k, shape, dtype)
        x = scale * x
        if name.endswith("['scale']"):
            x = 1.0 + x
        leaves.append(x)
    params = jax.tree_util.tree_unflatten(treedef, leaves)
    return {**params, **{k: jnp.asarray(v, dtype) for k, v in config_leaves(cfg).items()}}


def cast_params(params: Params, dtype) -> Params:
    """Cast every floating leaf to `dtype`."""
    return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, params)


def num_params(params: Params) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))
