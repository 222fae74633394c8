"""Load a GGUF file (llama.cpp format, any quantisation `gguf` can dequantise) of an architecture in
`ARCHS`: llama (Llama, Mistral, SmolLM2), qwen2, qwen3, phi3, gemma2, gemma3, olmo2, gptneox (GPT-NeoX,
Pythia), smollm3.

The config comes from GGUF metadata, as an HF config of the architecture's model_type (its `Arch`
row), through `ModelConfig.from_hf` (so the same validation applies); metadata keys that could change
the computed function and that we do not read raise `UnsupportedConfigError`. Tensors are dequantised
one at a time and written with the HF tensor map of the config's checkpoint (`hf.TENSOR_MAPS`), under
llama.cpp's names (`gguf_names`, the `gguf` package's own table). What llama.cpp's converter changed
is undone, as transformers' GGUF loader does: Q and K head rows permuted (HF rotate-half order ->
interleaved pairs) for llama and smollm3, 1 added to Gemma's norm weights, GPT-NeoX's per-head fused
q|k|v rows [H, 3, Dh] regrouped by part [3, H, Dh].
"""

from __future__ import annotations

import os
import re
from typing import Any, Callable, Dict, NamedTuple, Tuple

import gguf
import jax.numpy as jnp
import numpy as np

from jaxcircuits.models.config import ModelConfig, RopeConfig, UnsupportedConfigError
from jaxcircuits.models.params import Params, check_params, param_dtype
from jaxcircuits.weights.hf import TENSOR_MAPS, TensorMap, check_tensors, empty_params, fill

# metadata keys ('<arch>.' stripped) read for every architecture (or known not to change the function);
# any other '<arch>.' key raises, but those of its `Arch.keys`.
_KNOWN_KEYS = {
    "block_count", "embedding_length", "feed_forward_length", "context_length", "vocab_size",
    "attention.head_count", "attention.head_count_kv", "attention.key_length", "attention.value_length",
    "attention.layer_norm_rms_epsilon", "rope.dimension_count", "rope.freq_base", "rope.scaling.type",
    "rope.scaling.factor", "rope.scaling.original_context_length", "rope.scaling.finetuned",
    "expert_count", "expert_used_count",
}
_ROPE_FREQS = "rope_freqs.weight"


class Arch(NamedTuple):
    """How llama.cpp stores one architecture (``general.architecture``): the HF model_type its config
    reads as; config(meta, tensors), the HF config fields its metadata (keys without '<arch>.') and
    tensor names give beyond the common ones (`hf_config`); its metadata keys beyond `_KNOWN_KEYS`;
    whether llama.cpp's converter permuted the Q/K rows (its 'norm' RoPE: pairs, not halves); what
    the converter added to every norm weight (Gemma: 1, so llama.cpp multiplies by the stored weight);
    whether it regrouped a per-head fused q|k|v (`regroup_qkv`); `drop`: the common fields of
    `hf_config` its model_type's config does not have."""

    model_type: str
    config: Callable[[Dict[str, Any], Dict[str, Any]], Dict[str, Any]]
    keys: Tuple[str, ...] = ()
    permuted_qk: bool = False
    norm_shift: float = 0.0
    qkv_by_part: bool = False
    drop: Tuple[str, ...] = ()


def _bias(tensors: Dict[str, Any]) -> Dict[str, Any]:
    return {"attention_bias": "blk.0.attn_q.bias" in tensors}


def _attention_scale(meta: Dict[str, Any], big: int) -> float:
    """Gemma's query_pre_attn_scalar as llama.cpp sets it: d_model / n_heads for the 27B model (`big`
    layers), else the head dim (GGUF stores none)."""
    d, heads = int(meta["embedding_length"]), int(meta["attention.head_count"])
    if int(meta["block_count"]) == big:
        return float(d // heads)
    return float(meta.get("attention.key_length", d // heads))


def _gemma(meta: Dict[str, Any], tensors: Dict[str, Any], big: int) -> Dict[str, Any]:
    return {"hidden_activation": "gelu_pytorch_tanh", "query_pre_attn_scalar": _attention_scale(meta, big),
            **_bias(tensors)}


def _gemma2(meta: Dict[str, Any], tensors: Dict[str, Any]) -> Dict[str, Any]:
    """llama.cpp's Gemma-2: window (default 4096) on the even layers, soft caps (default 50 and 30)."""
    return {**_gemma(meta, tensors, big=46), "sliding_window": int(meta.get("attention.sliding_window", 4096)),
            "attn_logit_softcapping": _f32(meta.get("attn_logit_softcapping", 50.0)),
            "final_logit_softcapping": _f32(meta.get("final_logit_softcapping", 30.0))}


def _gemma3(meta: Dict[str, Any], tensors: Dict[str, Any]) -> Dict[str, Any]:
    """llama.cpp's Gemma-3: the window on all but every 6th layer (or the layers
    ``attention.sliding_window_pattern`` flags), their RoPE base ``rope.freq_base_swa`` (default 1e4)."""
    pattern = meta.get("attention.sliding_window_pattern", 6)
    layers = ({"layer_types": ["sliding_attention" if f else "full_attention" for f in pattern]}
              if isinstance(pattern, list) else {"sliding_window_pattern": int(pattern)})
    if "attention.sliding_window" not in meta:
        raise ValueError("GGUF metadata lacks ['gemma3.attention.sliding_window']")
    return {**_gemma(meta, tensors, big=62), "sliding_window": int(meta["attention.sliding_window"]),
            "rope_local_base_freq": _f32(meta.get("rope.freq_base_swa", 1e4)), **layers}


def _gptneox(meta: Dict[str, Any], tensors: Dict[str, Any]) -> Dict[str, Any]:
    """llama.cpp's GPT-NeoX (Pythia): LayerNorm, parallel residual (its flag), RoPE on rope.dimension_count
    of each head's dims, biases everywhere; GELU as HF's Pythia (erf; llama.cpp computes its tanh
    approximation); no KV heads or head dim of its own."""
    head_dim = int(meta["embedding_length"]) // int(meta["attention.head_count"])
    return {"hidden_act": "gelu", "layer_norm_eps": _f32(meta.get("attention.layer_norm_epsilon", 1e-5)),
            "use_parallel_residual": bool(meta.get("use_parallel_residual", True)),
            "rotary_pct": int(meta.get("rope.dimension_count", head_dim)) / head_dim,
            "attention_bias": "blk.0.attn_qkv.bias" in tensors}


# general.architecture -> how llama.cpp stores it
ARCHS = {
    "llama": Arch("llama", lambda meta, tensors: {"hidden_act": "silu", **_bias(tensors),
                                                  "mlp_bias": "blk.0.ffn_gate.bias" in tensors}, permuted_qk=True),
    "qwen2": Arch("qwen2", lambda meta, tensors: {"hidden_act": "silu"}),
    "qwen3": Arch("qwen3", lambda meta, tensors: {"hidden_act": "silu", **_bias(tensors)}),
    # Phi-3's window: llama.cpp disables it (with a warning), HF's model applies it, as we do
    "phi3": Arch("phi3", lambda meta, tensors: {"hidden_act": "silu", **_bias(tensors),
                                                "sliding_window": meta.get("attention.sliding_window")},
                 keys=("attention.sliding_window",)),
    "gemma2": Arch("gemma2", _gemma2, keys=("attention.sliding_window", "attn_logit_softcapping",
                                            "final_logit_softcapping"), norm_shift=1.0),
    "gemma3": Arch("gemma3_text", _gemma3, keys=("attention.sliding_window", "attention.sliding_window_pattern",
                                                 "rope.freq_base_swa"), norm_shift=1.0),
    # no window (llama.cpp's olmo2 reads one for OLMo-3 only; its key is refused)
    "olmo2": Arch("olmo2", lambda meta, tensors: {"hidden_act": "silu", **_bias(tensors)}),
    "gptneox": Arch("gpt_neox", _gptneox, keys=("attention.layer_norm_epsilon", "use_parallel_residual"),
                    qkv_by_part=True, drop=("num_key_value_heads", "head_dim", "rms_norm_eps", "partial_rotary_factor")),
    # NoPE on every 4th layer, as llama.cpp fixes it (SmolLM3's default; GGUF stores no flags), no window
    "smollm3": Arch("smollm3", lambda meta, tensors: {"hidden_act": "silu", **_bias(tensors), "no_rope_layer_interval": 4,
                                                      "mlp_bias": "blk.0.ffn_up.bias" in tensors},
                    permuted_qk=True),
}


def gguf_names(cfg: ModelConfig, arch: str) -> Dict[str, str]:
    """HF tensor name of the config's checkpoint (`hf.TENSOR_MAPS`) -> llama.cpp's name for `arch`
    ('model.layers.3.self_attn.q_proj.weight' -> 'blk.3.attn_q.weight'), by the `gguf` package's
    own table (what llama.cpp's converter reads)."""
    tensor_map, prefix = TENSOR_MAPS[cfg.checkpoint]
    table = gguf.get_tensor_name_map(next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch), cfg.n_layers)
    names = {}
    for name in tensor_map(cfg, prefix):
        module, suffix = name.rsplit(".", 1)
        if table.get_name(module) is None:
            raise UnsupportedConfigError(f"llama.cpp's {arch!r} architecture has no tensor for {name!r}")
        names[name] = f"{table.get_name(module)}.{suffix}"
    return names


def unpermute_heads(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's Q/K permutation: rows [n*Dh, ...] interleaved pairs -> HF rotate-half halves."""
    return w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def regroup_qkv(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's GPT-NeoX q|k|v regrouping: rows [3, H, Dh, ...] (by part) -> [H, 3, Dh, ...] (per head, HF)."""
    return w.reshape(3, n_heads, w.shape[0] // 3 // n_heads, *w.shape[1:]).swapaxes(0, 1).reshape(w.shape)


def _value(field) -> Any:
    v = field.contents()
    return v.tolist() if isinstance(v, np.ndarray) else v


def _f32(x: float) -> float:
    """A float32 metadata value as the shortest decimal that round-trips (9.9999997e-06 -> 1e-05)."""
    return float(str(np.float32(x)))


def _rope_scaling(meta: Dict[str, Any], tensors: Dict[str, Any], theta: float, head_dim: int):
    """HF ``rope_scaling`` dict (or None) from ``<arch>.rope.scaling.*`` or a ``rope_freqs`` tensor.

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


def _metadata(reader: gguf.GGUFReader) -> Tuple[str, Dict[str, Any]]:
    """(architecture, its '<arch>.*' metadata with the prefix stripped); raises on an architecture
    without a row of `ARCHS`, on split files and on keys we do not read."""
    arch = _value(reader.fields["general.architecture"]) if "general.architecture" in reader.fields else None
    if arch not in ARCHS:
        raise UnsupportedConfigError(f"GGUF architecture {arch!r} is not supported (supported: {', '.join(ARCHS)})")
    if "split.count" in reader.fields and int(_value(reader.fields["split.count"])) > 1:
        raise UnsupportedConfigError("split GGUF files are not supported; merge them with llama-gguf-split")
    meta = {k[len(arch) + 1:]: _value(f) for k, f in reader.fields.items() if k.startswith(arch + ".")}
    unknown = sorted(k for k in meta if k not in _KNOWN_KEYS and k not in ARCHS[arch].keys)
    unknown += [k for k in ("expert_count", "expert_used_count") if meta.get(k)]
    if unknown:
        raise UnsupportedConfigError(
            f"GGUF metadata {[f'{arch}.{k}' for k in unknown]} is not understood by jaxcircuits; "
            "refusing to guess its meaning")
    missing = [k for k in ("block_count", "embedding_length", "feed_forward_length", "attention.head_count")
               if k not in meta]
    if missing:
        raise ValueError(f"GGUF metadata lacks {[f'{arch}.{k}' for k in missing]}")
    return arch, meta


def hf_config(reader: gguf.GGUFReader) -> Dict[str, Any]:
    """An HF-style config dict (its architecture's `ARCHS` row's model_type) from the metadata and
    tensor list of a GGUF file."""
    arch, meta = _metadata(reader)
    tensors = {t.name: t for t in reader.tensors}
    if "token_embd.weight" not in tensors:
        raise ValueError("GGUF file lacks tensor 'token_embd.weight'")
    n_heads = int(meta["attention.head_count"])
    n_kv = meta.get("attention.head_count_kv", n_heads)
    if isinstance(n_kv, list):
        if len(set(n_kv)) != 1:
            raise UnsupportedConfigError(f"per-layer {arch}.attention.head_count_kv {n_kv} is not supported")
        n_kv = n_kv[0]
    d = int(meta["embedding_length"])
    head_dim = int(meta.get("attention.key_length", d // n_heads))
    if int(meta.get("attention.value_length", head_dim)) != head_dim:
        raise UnsupportedConfigError(f"GGUF {arch}.attention.value_length != key_length is not supported")
    theta = _f32(meta.get("rope.freq_base", 10000.0))
    hf = {
        "model_type": ARCHS[arch].model_type,
        "num_hidden_layers": int(meta["block_count"]), "hidden_size": d,
        "intermediate_size": int(meta["feed_forward_length"]), "num_attention_heads": n_heads,
        "num_key_value_heads": int(n_kv), "head_dim": head_dim,
        "vocab_size": int(tensors["token_embd.weight"].shape[-1]),
        "max_position_embeddings": int(meta.get("context_length", 2048)),
        "rms_norm_eps": _f32(meta.get("attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": theta,
        "tie_word_embeddings": "output.weight" not in tensors,
        **ARCHS[arch].config(meta, tensors),
    }
    rotary = int(meta.get("rope.dimension_count", head_dim))
    if rotary != head_dim:                  # refused by the families that rotate whole heads, naming it
        hf["partial_rotary_factor"] = rotary / head_dim
    scaling = _rope_scaling(meta, tensors, theta, head_dim)
    if scaling:
        hf["rope_scaling"] = scaling
    for field in ARCHS[arch].drop:
        hf.pop(field, None)
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
    """Load GGUF file `path` (an architecture of `ARCHS`) -> (config, numpy params of `dtype`), dequantised."""
    dtype = param_dtype(dtype)
    path = os.fspath(path)
    reader = _open(path)
    cfg = ModelConfig.from_hf(hf_config(reader), f"GGUF file {path}")
    name = _value(reader.fields["general.architecture"])             # a key of ARCHS (hf_config checked)
    arch, names = ARCHS[name], gguf_names(cfg, name)
    tensor_map, prefix = TENSOR_MAPS[cfg.checkpoint]
    expected: TensorMap = {names[n]: s for n, s in tensor_map(cfg, prefix).items()}
    tensors = {t.name: t for t in reader.tensors if t.name != _ROPE_FREQS}
    # GGUF lists dims fastest-first; numpy (and HF) order is the reverse.
    shapes = {n: tuple(int(x) for x in t.shape[::-1]) for n, t in tensors.items()}
    check_tensors(expected, shapes, f"GGUF file {path}")
    params = empty_params(cfg, dtype)
    for name, spec in expected.items():
        w = _dequantize(tensors[name])
        if arch.permuted_qk and re.search(r"\.attn_[qk]\.", name):
            w = unpermute_heads(w, cfg.n_heads if ".attn_q." in name else cfg.n_kv_heads)
        if arch.qkv_by_part and ".attn_qkv." in name:
            w = regroup_qkv(w, cfg.n_heads)
        if name.endswith("norm.weight"):
            w = w - np.float32(arch.norm_shift)
        fill(params, spec, w, f"tensor {name!r} in {path}")
    check_params(params, cfg)
    return cfg, params
