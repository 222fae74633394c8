"""Load a llama-architecture GGUF file (llama.cpp format, any quantisation `gguf` can dequantise).

The config comes from GGUF metadata through `ModelConfig.from_hf` (so the same validation applies);
metadata keys that could change the computed function and that we do not read raise
`UnsupportedConfigError`. Tensors are dequantised one at a time, renamed to HF Llama names, and
written with the HF Llama tensor map. llama.cpp's converter permutes the rows of each Q and K head
(HF rotate-half order -> interleaved pairs); we undo it, as transformers' GGUF loader does.
"""

from __future__ import annotations

import os
import re
from typing import Any, Dict, Tuple

import gguf
import jax.numpy as jnp
import numpy as np

from jaxcircuits.models.config import ModelConfig, RopeConfig, UnsupportedConfigError
from jaxcircuits.models.params import Params, check_params, param_dtype
from jaxcircuits.weights.hf import TensorMap, check_tensors, empty_params, fill, llama_tensors

_GLOBAL = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
           "output.weight": "lm_head.weight"}
_LAYER = {
    "attn_norm.weight": "input_layernorm.weight", "ffn_norm.weight": "post_attention_layernorm.weight",
    **{f"attn_{g}.{t}": f"self_attn.{h}_proj.{t}" for g, h in
       (("q", "q"), ("k", "k"), ("v", "v"), ("output", "o")) for t in ("weight", "bias")},
    **{f"ffn_{m}.{t}": f"mlp.{m}_proj.{t}" for m in ("gate", "up", "down") for t in ("weight", "bias")},
}
_GLOBAL_TO_GGUF = {v: k for k, v in _GLOBAL.items()}
_LAYER_TO_GGUF = {v: k for k, v in _LAYER.items()}
_ROPE_FREQS = "rope_freqs.weight"

# llama.* metadata keys read here (or known not to change the function); any other llama.* key raises.
_KNOWN_KEYS = {
    "block_count", "embedding_length", "feed_forward_length", "context_length", "vocab_size",
    "attention.head_count", "attention.head_count_kv", "attention.key_length", "attention.value_length",
    "attention.layer_norm_rms_epsilon", "rope.dimension_count", "rope.freq_base", "rope.scaling.type",
    "rope.scaling.factor", "rope.scaling.original_context_length", "rope.scaling.finetuned",
    "expert_count", "expert_used_count",
}


def gguf_name(hf_name: str) -> str:
    """HF Llama name ('model.layers.3.self_attn.q_proj.weight') -> llama.cpp name ('blk.3.attn_q.weight')."""
    if hf_name in _GLOBAL_TO_GGUF:
        return _GLOBAL_TO_GGUF[hf_name]
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", hf_name)
    return f"blk.{m.group(1)}.{_LAYER_TO_GGUF[m.group(2)]}"


def unpermute_heads(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's Q/K permutation: rows [n*Dh, ...] interleaved pairs -> HF rotate-half halves."""
    return w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _value(field) -> Any:
    v = field.contents()
    return v.tolist() if isinstance(v, np.ndarray) else v


def _f32(x: float) -> float:
    """A float32 metadata value as the shortest decimal that round-trips (9.9999997e-06 -> 1e-05)."""
    return float(str(np.float32(x)))


def _rope_scaling(meta: Dict[str, Any], tensors: Dict[str, Any], theta: float, head_dim: int):
    """HF ``rope_scaling`` dict (or None) from ``llama.rope.scaling.*`` or a ``rope_freqs`` tensor.

    llama.cpp stores Llama-3.1 scaling only as per-frequency divisors ``rope_freqs`` [Dh/2]; we accept
    them when they equal the llama3 schedule (low 1, high 4, original 8192, factor = max divisor)
    exactly as llama.cpp computes it, and refuse anything else.
    """
    kind = meta.get("rope.scaling.type", "none")
    if _ROPE_FREQS in tensors:
        if kind != "none":
            raise UnsupportedConfigError(f"GGUF has both rope.scaling.type={kind!r} and {_ROPE_FREQS}")
        freqs = _dequantize(tensors[_ROPE_FREQS])
        scaling = {"rope_type": "llama3", "factor": _f32(freqs.max()), "low_freq_factor": 1.0,
                   "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
        rope = RopeConfig(theta=theta, kind="llama3", factor=scaling["factor"])
        implied = RopeConfig(theta=theta).inv_freq(head_dim) / rope.inv_freq(head_dim)
        if freqs.shape != implied.shape or not np.allclose(freqs, implied, rtol=1e-5, atol=0):
            raise UnsupportedConfigError(
                f"GGUF tensor {_ROPE_FREQS} is not the Llama-3.1 rope schedule (the only one supported)")
        return scaling
    if kind == "none":
        return None
    # 'linear' needs a factor; any other type is refused by ModelConfig.from_hf.
    factor = meta.get("rope.scaling.factor")
    return {"rope_type": kind, **({} if factor is None else {"factor": _f32(factor)})}


def _metadata(reader: gguf.GGUFReader) -> Dict[str, Any]:
    """The ``llama.*`` metadata (prefix stripped); raises on split files and on keys we do not read."""
    arch = _value(reader.fields["general.architecture"]) if "general.architecture" in reader.fields else None
    if arch != "llama":
        raise UnsupportedConfigError(f"GGUF architecture {arch!r} is not supported (supported: 'llama')")
    if "split.count" in reader.fields and int(_value(reader.fields["split.count"])) > 1:
        raise UnsupportedConfigError("split GGUF files are not supported; merge them with llama-gguf-split")
    meta = {k[len("llama."):]: _value(f) for k, f in reader.fields.items() if k.startswith("llama.")}
    unknown = sorted(k for k in meta if k not in _KNOWN_KEYS)
    unknown += [k for k in ("expert_count", "expert_used_count") if meta.get(k)]
    if unknown:
        raise UnsupportedConfigError(
            f"GGUF metadata {['llama.' + k for k in unknown]} is not understood by jaxcircuits; "
            "refusing to guess its meaning")
    missing = [k for k in ("block_count", "embedding_length", "feed_forward_length", "attention.head_count")
               if k not in meta]
    if missing:
        raise ValueError(f"GGUF metadata lacks {['llama.' + k for k in missing]}")
    return meta


def hf_config(reader: gguf.GGUFReader) -> Dict[str, Any]:
    """An HF-style Llama config dict from the metadata and tensor list of a GGUF file."""
    meta = _metadata(reader)
    tensors = {t.name: t for t in reader.tensors}
    if "token_embd.weight" not in tensors:
        raise ValueError("GGUF file lacks tensor 'token_embd.weight'")
    n_heads = int(meta["attention.head_count"])
    n_kv = meta.get("attention.head_count_kv", n_heads)
    if isinstance(n_kv, list):
        if len(set(n_kv)) != 1:
            raise UnsupportedConfigError(f"per-layer llama.attention.head_count_kv {n_kv} is not supported")
        n_kv = n_kv[0]
    d = int(meta["embedding_length"])
    head_dim = int(meta.get("attention.key_length", d // n_heads))
    if int(meta.get("attention.value_length", head_dim)) != head_dim:
        raise UnsupportedConfigError("GGUF llama.attention.value_length != key_length is not supported")
    if int(meta.get("rope.dimension_count", head_dim)) != head_dim:
        raise UnsupportedConfigError("GGUF llama.rope.dimension_count != head dim (partial rotary)")
    theta = _f32(meta.get("rope.freq_base", 10000.0))
    hf = {
        "model_type": "llama", "hidden_act": "silu",
        "num_hidden_layers": int(meta["block_count"]), "hidden_size": d,
        "intermediate_size": int(meta["feed_forward_length"]), "num_attention_heads": n_heads,
        "num_key_value_heads": int(n_kv), "head_dim": head_dim,
        "vocab_size": int(tensors["token_embd.weight"].shape[-1]),
        "max_position_embeddings": int(meta.get("context_length", 2048)),
        "rms_norm_eps": _f32(meta.get("attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": theta,
        "tie_word_embeddings": "output.weight" not in tensors,
        "attention_bias": "blk.0.attn_q.bias" in tensors,
        "mlp_bias": "blk.0.ffn_gate.bias" in tensors,
    }
    scaling = _rope_scaling(meta, tensors, theta, head_dim)
    if scaling:
        hf["rope_scaling"] = scaling
    for ours, theirs in (("bos", "bos"), ("eos", "eos"), ("pad", "padding")):
        key = f"tokenizer.ggml.{theirs}_token_id"
        if key in reader.fields:
            hf[f"{ours}_token_id"] = int(_value(reader.fields[key]))
    return hf


def _dequantize(t, rows: int = 4096) -> np.ndarray:
    """Tensor `t` as float32 in numpy (= HF) dim order, dequantised `rows` rows at a time so the
    temporaries of `gguf.quants.dequantize` stay small next to the result."""
    shape = tuple(int(x) for x in t.shape[::-1])
    out = np.empty(shape, np.float32)
    flat = out.reshape(-1, shape[-1])
    data = t.data.reshape(flat.shape[0], -1)
    for i in range(0, flat.shape[0], rows):
        flat[i:i + rows] = gguf.quants.dequantize(data[i:i + rows], t.tensor_type)
    return out


def _open(path: str) -> gguf.GGUFReader:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"GGUF file {path} does not exist")
    try:
        return gguf.GGUFReader(path)
    except (ValueError, IndexError, KeyError) as e:
        raise ValueError(f"{path} is not a valid GGUF file (corrupt or truncated?): {e!r}") from e


def gguf_config(path: str) -> ModelConfig:
    """The config of GGUF file `path`, from its metadata only."""
    path = os.fspath(path)
    return ModelConfig.from_hf(hf_config(_open(path)), f"GGUF file {path}")


def load_gguf(path: str, dtype=jnp.float32) -> Tuple[ModelConfig, Params]:
    """Load llama-architecture GGUF file `path` -> (config, numpy params of `dtype`), dequantised."""
    dtype = param_dtype(dtype)
    path = os.fspath(path)
    reader = _open(path)
    cfg = ModelConfig.from_hf(hf_config(reader), f"GGUF file {path}")
    expected: TensorMap = {gguf_name(n): s for n, s in llama_tensors(cfg).items()}
    tensors = {t.name: t for t in reader.tensors if t.name != _ROPE_FREQS}
    # GGUF lists dims fastest-first; numpy (and HF) order is the reverse.
    shapes = {n: tuple(int(x) for x in t.shape[::-1]) for n, t in tensors.items()}
    check_tensors(expected, shapes, f"GGUF file {path}")
    params = empty_params(cfg, dtype)
    for name, spec in expected.items():
        w = _dequantize(tensors[name])
        if re.search(r"\.attn_[qk]\.", name):
            w = unpermute_heads(w, cfg.n_heads if ".attn_q." in name else cfg.n_kv_heads)
        fill(params, spec, w, f"tensor {name!r} in {path}")
    check_params(params, cfg)
    return cfg, params
