"""Load a local Hugging Face checkpoint directory (``config.json`` + safetensors) into the params layout.

Tensors are read one at a time and written straight into preallocated stacked numpy arrays
(`empty_params`), so peak host memory stays near one copy of the model plus its largest tensor.
A *tensor map* maps each checkpoint tensor name to its expected shape and to the leaves it fills; the
GGUF loader reuses the Llama tensor map under llama.cpp names.
"""

from __future__ import annotations

import dataclasses
import functools
import operator
import os
import re
from typing import Callable, Dict, List, Mapping, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import SafetensorError, safe_open

from jaxcircuits.models.config import ModelConfig, load_json
from jaxcircuits.models.params import Params, check_params, config_leaves, param_dtype, param_shapes

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")

# (leaf path in params, layer index or None, checkpoint array -> leaf slice)
Write = Tuple[Tuple[str, ...], Optional[int], Callable[[np.ndarray], np.ndarray]]


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """One checkpoint tensor: its expected shape (checkpoint layout) and the leaves it fills."""

    shape: Tuple[int, ...]
    writes: Tuple[Write, ...]


TensorMap = Dict[str, TensorSpec]


def _same(a: np.ndarray) -> np.ndarray:
    return a


def _linear(a: np.ndarray) -> np.ndarray:
    """torch Linear weight [out, in] -> [in, out]."""
    return a.T


def _reshape(*shape: int) -> Callable[[np.ndarray], np.ndarray]:
    return lambda a: a.reshape(shape)


def _heads_in(n: int, dh: int) -> Callable[[np.ndarray], np.ndarray]:
    """Linear weight [n*dh, D] -> [D, n, dh] (head h = output rows h*dh:(h+1)*dh)."""
    return lambda a: a.T.reshape(a.shape[1], n, dh)


def _heads_out(n: int, dh: int) -> Callable[[np.ndarray], np.ndarray]:
    """Linear weight [D, n*dh] -> [n, dh, D]."""
    return lambda a: a.T.reshape(n, dh, a.shape[0])


def _cols(lo: int, hi: int, fn: Callable[[np.ndarray], np.ndarray]) -> Callable[[np.ndarray], np.ndarray]:
    """Apply `fn` to the slice [..., lo:hi] of the last axis."""
    return lambda a: fn(a[..., lo:hi])


# (cfg.pre_norms, cfg.post_norms) -> (HF layer norm tensor, our norm) of the Llama-like families (OLMo-2
# normalises the sublayers' outputs, Gemma-2 their inputs and outputs)
LLAMA_NORMS = {(True, False): (("input_layernorm", "norm1"), ("post_attention_layernorm", "norm2")),
               (False, True): (("post_attention_layernorm", "post_norm1"),
                               ("post_feedforward_layernorm", "post_norm2")),
               (True, True): (("input_layernorm", "norm1"), ("post_attention_layernorm", "post_norm1"),
                              ("pre_feedforward_layernorm", "norm2"), ("post_feedforward_layernorm", "post_norm2"))}


def llama_tensors(cfg: ModelConfig, prefix: str = "model.") -> TensorMap:
    """HF Llama tensor names (``prefix`` = 'model.' for *ForCausalLM, '' for a bare model) -> specs;
    also Qwen2, Mistral, Qwen3 (q_norm, k_norm over Dh), OLMo-2 (q_norm, k_norm over the whole
    projection; norms after the sublayers, `LLAMA_NORMS`) and Gemma-2 (norms before and after)."""
    D, H, K, Dh, F, V = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.d_head, cfg.d_mlp, cfg.vocab_size
    shapes = param_shapes(cfg)["layers"]
    tensors = {
        f"{prefix}embed_tokens.weight": TensorSpec((V, D), ((("embed", "tokens"), None, _same),)),
        f"{prefix}norm.weight": TensorSpec((D,), ((("final_norm", "scale"), None, _same),)),
    }
    if not cfg.tied_embeddings:
        tensors["lm_head.weight"] = TensorSpec((V, D), ((("unembed", "w"), None, _linear),))
    for i in range(cfg.n_layers):
        p = f"{prefix}layers.{i}."

        def add(name, shape, leaf, fn):
            tensors[p + name] = TensorSpec(shape, ((("layers", *leaf), i, fn),))

        for name, norm in LLAMA_NORMS[cfg.pre_norms, cfg.post_norms]:
            add(f"{name}.weight", (D,), (norm, "scale"), _same)
        if cfg.qk_norm is not None:
            for proj in ("q", "k"):
                shape = shapes[f"{proj}_norm"]["scale"][1:]
                add(f"self_attn.{proj}_norm.weight", (int(np.prod(shape)),), (f"{proj}_norm", "scale"), _reshape(*shape))
        for proj, n in (("q", H), ("k", K), ("v", K)):
            add(f"self_attn.{proj}_proj.weight", (n * Dh, D), (proj, "w"), _heads_in(n, Dh))
            if cfg.attn_bias:
                add(f"self_attn.{proj}_proj.bias", (n * Dh,), (proj, "b"), _reshape(n, Dh))
        add("self_attn.o_proj.weight", (D, H * Dh), ("o", "w"), _heads_out(H, Dh))
        if cfg.o_bias:
            add("self_attn.o_proj.bias", (D,), ("o", "b"), _same)
        for proj, shape in (("gate", (F, D)), ("up", (F, D)), ("down", (D, F))):
            add(f"mlp.{proj}_proj.weight", shape, (proj, "w"), _linear)
            if cfg.mlp_bias:
                add(f"mlp.{proj}_proj.bias", shape[:1], (proj, "b"), _same)
    return tensors


def _rows(lo: int, hi: int, fn: Callable[[np.ndarray], np.ndarray]) -> Callable[[np.ndarray], np.ndarray]:
    """Apply `fn` to the slice [lo:hi] of the first axis."""
    return lambda a: fn(a[lo:hi])


def _fuse(tensors: TensorMap, parts: Tuple[str, ...], name: str) -> None:
    """Replace tensors `parts` of `tensors` by one tensor `name` that stacks them on axis 0, in order."""
    specs = [tensors.pop(n) for n in parts]
    bounds = np.cumsum([0] + [s.shape[0] for s in specs])
    writes = tuple((leaf, layer, _rows(lo, hi, fn))
                   for s, lo, hi in zip(specs, bounds, bounds[1:]) for leaf, layer, fn in s.writes)
    tensors[name] = TensorSpec((int(bounds[-1]), *specs[0].shape[1:]), writes)


def phi3_tensors(cfg: ModelConfig, prefix: str = "model.") -> TensorMap:
    """HF Phi-3 tensor names: Llama's, with q|k|v fused as ``self_attn.qkv_proj`` and gate|up as
    ``mlp.gate_up_proj`` (stacked on the output axis), split at load."""
    tensors = llama_tensors(cfg, prefix)
    for i in range(cfg.n_layers):
        p = f"{prefix}layers.{i}."
        _fuse(tensors, tuple(f"{p}self_attn.{n}_proj.weight" for n in "qkv"), f"{p}self_attn.qkv_proj.weight")
        _fuse(tensors, (f"{p}mlp.gate_proj.weight", f"{p}mlp.up_proj.weight"), f"{p}mlp.gate_up_proj.weight")
    return tensors


def _adder(tensors: TensorMap, p: str, i: int) -> Callable:
    """add(name, shape, *(leaf, fn)): tensor `p + name` of `shape` filling leaves ('layers', *leaf)
    of layer i with fn(tensor)."""
    def add(name, shape, *writes):
        tensors[p + name] = TensorSpec(shape, tuple((("layers", *leaf), i, fn) for leaf, fn in writes))
    return add


def _layer_norms(add: Callable, names, d: int) -> None:
    """A layer's LayerNorm weight and bias tensors [d]: names ((checkpoint name, our norm), ...)."""
    for ln, norm in names:
        add(f"{ln}.weight", (d,), ((norm, "scale"), _same))
        add(f"{ln}.bias", (d,), ((norm, "bias"), _same))


def gpt2_tensors(cfg: ModelConfig, prefix: str = "transformer.") -> TensorMap:
    """HF GPT-2 tensor names (``prefix`` = 'transformer.' for GPT2LMHeadModel, '' for GPT2Model) -> specs.

    Conv1D weights are [in, out] (already x @ W); c_attn is [D, 3D] with q|k|v on the out axis.
    """
    D, H, Dh, F, V, P = cfg.d_model, cfg.n_heads, cfg.d_head, cfg.d_mlp, cfg.vocab_size, cfg.max_positions
    tensors = {
        f"{prefix}wte.weight": TensorSpec((V, D), ((("embed", "tokens"), None, _same),)),
        f"{prefix}wpe.weight": TensorSpec((P, D), ((("embed", "positions"), None, _same),)),
        f"{prefix}ln_f.weight": TensorSpec((D,), ((("final_norm", "scale"), None, _same),)),
        f"{prefix}ln_f.bias": TensorSpec((D,), ((("final_norm", "bias"), None, _same),)),
    }
    if not cfg.tied_embeddings:
        tensors["lm_head.weight"] = TensorSpec((V, D), ((("unembed", "w"), None, _linear),))
    qkv = tuple(zip(("q", "k", "v"), range(0, 3 * D, D)))
    for i in range(cfg.n_layers):
        add = _adder(tensors, f"{prefix}h.{i}.", i)
        _layer_norms(add, (("ln_1", "norm1"), ("ln_2", "norm2")), D)
        add("attn.c_attn.weight", (D, 3 * D),
            *(((n, "w"), _cols(lo, lo + D, _reshape(D, H, Dh))) for n, lo in qkv))
        add("attn.c_attn.bias", (3 * D,), *(((n, "b"), _cols(lo, lo + D, _reshape(H, Dh))) for n, lo in qkv))
        add("attn.c_proj.weight", (D, D), (("o", "w"), _reshape(H, Dh, D)))
        add("attn.c_proj.bias", (D,), (("o", "b"), _same))
        add("mlp.c_fc.weight", (D, F), (("up", "w"), _same))
        add("mlp.c_fc.bias", (F,), (("up", "b"), _same))
        add("mlp.c_proj.weight", (F, D), (("down", "w"), _same))
        add("mlp.c_proj.bias", (D,), (("down", "b"), _same))
    return tensors


def _fused_heads(n: int, j: int, dh: int) -> Callable[[np.ndarray], np.ndarray]:
    """Part j of a per-head fused projection [n*3*dh, ...] (GPT-NeoX: rows [n, 3 (q|k|v), dh]):
    weight [n*3*dh, D] -> [D, n, dh], bias [n*3*dh] -> [n, dh]."""
    def part(a):
        p = a.reshape(n, 3, dh, *a.shape[1:])[:, j]
        return np.moveaxis(p, -1, 0) if a.ndim == 2 else p
    return part


def gpt_neox_tensors(cfg: ModelConfig, prefix: str = "gpt_neox.") -> TensorMap:
    """HF GPT-NeoX / Pythia tensor names (``prefix`` = 'gpt_neox.' for GPTNeoXForCausalLM, '' for a
    bare model) -> specs. query_key_value is fused per head: its output rows are [H, 3, Dh]."""
    D, H, Dh, F, V = cfg.d_model, cfg.n_heads, cfg.d_head, cfg.d_mlp, cfg.vocab_size
    tensors = {
        f"{prefix}embed_in.weight": TensorSpec((V, D), ((("embed", "tokens"), None, _same),)),
        f"{prefix}final_layer_norm.weight": TensorSpec((D,), ((("final_norm", "scale"), None, _same),)),
        f"{prefix}final_layer_norm.bias": TensorSpec((D,), ((("final_norm", "bias"), None, _same),)),
    }
    if not cfg.tied_embeddings:
        tensors["embed_out.weight"] = TensorSpec((V, D), ((("unembed", "w"), None, _linear),))
    for i in range(cfg.n_layers):
        add = _adder(tensors, f"{prefix}layers.{i}.", i)
        _layer_norms(add, (("input_layernorm", "norm1"), ("post_attention_layernorm", "norm2")), D)
        add("attention.query_key_value.weight", (3 * D, D), *(((n, "w"), _fused_heads(H, j, Dh)) for j, n in enumerate("qkv")))
        add("attention.dense.weight", (D, D), (("o", "w"), _heads_out(H, Dh)))
        if cfg.attn_bias:
            add("attention.query_key_value.bias", (3 * D,), *(((n, "b"), _fused_heads(H, j, Dh)) for j, n in enumerate("qkv")))
            add("attention.dense.bias", (D,), (("o", "b"), _same))
        for name, leaf, shape in (("dense_h_to_4h", "up", (F, D)), ("dense_4h_to_h", "down", (D, F))):
            add(f"mlp.{name}.weight", shape, ((leaf, "w"), _linear))
            add(f"mlp.{name}.bias", shape[:1], ((leaf, "b"), _same))
    return tensors


# checkpoint type -> (tensor map, name prefix of its *ForCausalLM checkpoints)
TENSOR_MAPS = {"llama": (llama_tensors, "model."), "gpt2": (gpt2_tensors, "transformer."),
               "gpt_neox": (gpt_neox_tensors, "gpt_neox."), "phi3": (phi3_tensors, "model.")}
# checkpoint type -> non-parameter buffers some of its checkpoints hold (causal masks, RoPE tables)
BUFFERS = {"gpt2": r"(^|\.)h\.\d+\.attn\.(masked_)?bias$",
           "gpt_neox": r"(^|\.)layers\.\d+\.attention\.((masked_)?bias|rotary_emb\.inv_freq)$"}


def empty_params(cfg: ModelConfig, dtype) -> Params:
    """Uninitialised numpy arrays of `dtype` (see `param_dtype`) in the layout of `param_shapes(cfg)`,
    but the leaves the config gives (`params.config_leaves`) set."""
    dt = param_dtype(dtype)
    params = jax.tree.map(lambda s: np.empty(s, dt), param_shapes(cfg), is_leaf=lambda x: isinstance(x, tuple))
    return {**params, **{leaf: np.asarray(value, dt) for leaf, value in config_leaves(cfg).items()}}


def _count_nonfinite(a: np.ndarray, chunk: int = 1 << 24) -> int:
    """Number of NaN/inf values of contiguous `a`, counted `chunk` values at a time (small temporaries)."""
    flat = a.reshape(-1)
    return sum(int(np.count_nonzero(~np.isfinite(flat[i:i + chunk]))) for i in range(0, flat.size, chunk))


def fill(params: Params, spec: TensorSpec, array: np.ndarray, where: str) -> None:
    """Write checkpoint `array` (shape `spec.shape`) into its leaves of `params`, casting in place.

    Raises ValueError naming `where` (the tensor and its file) if any written value is NaN or
    infinite: damaged bytes in the file, never weights to compute with.
    """
    bad = 0
    for path, layer, fn in spec.writes:
        leaf = functools.reduce(operator.getitem, path, params)
        dest = leaf if layer is None else leaf[layer]
        dest[...] = fn(array)
        bad += _count_nonfinite(dest)
    if bad:
        raise ValueError(f"{where} has {bad} NaN or infinite value(s) of {array.size} (as {dest.dtype}): "
                         "the file is damaged; download or convert it again")


def check_tensors(tensors: TensorMap, found: Mapping[str, Tuple[int, ...]], where: str) -> None:
    """Raise ValueError naming every missing, unexpected or mis-shaped tensor of `found` vs `tensors`."""
    errors = [f"missing tensor {n!r} {s.shape}" for n, s in tensors.items() if n not in found]
    errors += [f"unexpected tensor {n!r} {shape}" for n, shape in found.items() if n not in tensors]
    errors += [f"tensor {n!r} has shape {found[n]}, expected {s.shape}"
               for n, s in tensors.items() if n in found and tuple(found[n]) != s.shape]
    if errors:
        raise ValueError(f"{where} does not match its config:\n  " + "\n  ".join(errors))


def index_shards(path: str) -> List[str]:
    """The shard file names listed in the safetensors index of checkpoint directory `path` ([] without one)."""
    index = os.path.join(path, INDEX_FILE)
    if not os.path.isfile(index):
        return []
    weight_map = load_json(index).get("weight_map")
    if not isinstance(weight_map, dict):
        raise ValueError(f"{index} has no 'weight_map'")
    return sorted(set(weight_map.values()))


def weight_files(path: str) -> List[str]:
    """The safetensors files of HF checkpoint directory `path` (single file, or the shards of its index)."""
    single, index = os.path.join(path, SINGLE_FILE), os.path.join(path, INDEX_FILE)
    if os.path.isfile(index):
        files = [os.path.join(path, s) for s in index_shards(path)]
        for fn in files:
            if not os.path.isfile(fn):
                raise FileNotFoundError(f"{fn} (listed in {index}) does not exist")
        return files
    if os.path.isfile(single):
        return [single]
    raise FileNotFoundError(
        f"no {SINGLE_FILE} or {INDEX_FILE} in {path} (only safetensors checkpoints are supported)")


def _open(fn: str):
    """safe_open (numpy); a corrupt or truncated file raises ValueError naming it."""
    try:
        return safe_open(fn, framework="numpy")
    except SafetensorError as e:
        raise ValueError(f"{fn} is not a valid safetensors file (corrupt or truncated?): {e}") from e


def _header(fn: str) -> Dict[str, Tuple[Tuple[int, ...], str]]:
    """name -> (shape, safetensors dtype) of every tensor in file `fn`."""
    with _open(fn) as f:
        return {n: (tuple(f.get_slice(n).get_shape()), f.get_slice(n).get_dtype()) for n in f.keys()}


def _read(fn: str, name: str) -> np.ndarray:
    """One tensor as a numpy array. The file is mapped only while reading it, so pages of tensors
    already converted do not stay in this process's RSS."""
    with _open(fn) as f:
        return f.get_tensor(name)


def _own_head(cfg: ModelConfig, where: Mapping[str, str]) -> bool:
    """Whether tied `cfg`'s checkpoint (tensor name -> file) has an ``lm_head.weight`` that differs
    from its token embeddings: transformers then keeps that head (it does not tie), and so do we."""
    if not (cfg.tied_embeddings and "lm_head.weight" in where):
        return False
    embed = next(n for n, s in _tensors_for(cfg, where).items() if s.writes[0][0] == ("embed", "tokens"))
    return embed in where and not np.array_equal(_read(where["lm_head.weight"], "lm_head.weight"),
                                                  _read(where[embed], embed))


def _ignored(name: str, cfg: ModelConfig) -> bool:
    """Non-parameter buffers (`BUFFERS`) and a tied lm_head copy."""
    return (cfg.tied_embeddings and name == "lm_head.weight") or (
        cfg.checkpoint in BUFFERS and re.search(BUFFERS[cfg.checkpoint], name) is not None)


def _tensors_for(cfg: ModelConfig, names) -> TensorMap:
    """The tensor map of cfg's checkpoint type, with the name prefix `names` use ('' for a bare model)."""
    fn, prefix = TENSOR_MAPS[cfg.checkpoint]
    return fn(cfg, prefix if any(n.startswith(prefix) for n in names) else "")


def load_hf_dir(path: str, dtype=jnp.float32) -> Tuple[ModelConfig, Params]:
    """Load HF checkpoint directory `path` -> (config, numpy params of `dtype` in the params layout).

    A config with ``tie_word_embeddings`` whose checkpoint has its own, different ``lm_head.weight``
    loads untied (`tied_embeddings=False`), as transformers loads it.
    """
    dtype = param_dtype(dtype)
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint directory {path} does not exist")
    cfg = ModelConfig.from_json(os.path.join(path, "config.json"))
    where, found, stype = {}, {}, {}
    for fn in weight_files(path):
        for name, (shape, kind) in _header(fn).items():
            if name in where:
                raise ValueError(f"tensor {name!r} is in both {where[name]} and {fn}")
            where[name], found[name], stype[name] = fn, shape, kind
    if _own_head(cfg, where):
        cfg = dataclasses.replace(cfg, tied_embeddings=False)
    found = {n: s for n, s in found.items() if not _ignored(n, cfg)}
    tensors = _tensors_for(cfg, found)
    check_tensors(tensors, found, f"checkpoint {path}")
    for name in tensors:
        if stype[name] not in _FLOAT_DTYPES:
            raise ValueError(f"tensor {name!r} in {where[name]} has dtype {stype[name]}, expected a float")
    params = empty_params(cfg, dtype)
    for name, spec in tensors.items():
        fill(params, spec, _read(where[name], name), f"tensor {name!r} in {where[name]}")
    check_params(params, cfg)
    return cfg, params
