"""Static model configuration, built from a Hugging Face ``config.json``.

`ModelConfig` is a frozen, hashable dataclass, so it can be a static argument of `jax.jit`.
Every field that changes the computed function is read explicitly; a field we do not implement
(or a value of it we do not implement) raises `UnsupportedConfigError` naming the field, so a
checkpoint never loads as a silently different model.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Mapping, Optional, Tuple

import numpy as np

from jaxcircuits.dictionaries.core import HOSTS, DictConfig
from jaxcircuits.models.layers import ACTIVATIONS, NORMS, POSITION_EMBEDDINGS, QK_NORMS


class UnsupportedConfigError(ValueError):
    """A config that does not describe a model jaxcircuits implements: a field or value it does not
    implement, or a required field that is missing or not of its type."""


def load_json(path: str) -> dict:
    """The JSON object in file `path`; ValueError naming the file when it is not valid JSON or not an object."""
    with open(path) as f:
        try:
            obj = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path} must hold a JSON object, not a {type(obj).__name__}")
    return obj


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding parameters (HF ``rope_theta`` + ``rope_scaling``/``rope_parameters``).

    kind: 'default', 'linear' or 'llama3' (the keys of `_ROPE_FIELDS`). partial: the fraction of each
    head's dims that rotate (HF ``partial_rotary_factor``; GPT-NeoX's ``rotary_pct``): the first
    `dims(head_dim)`, the rest pass through.
    """

    theta: float = 10000.0
    kind: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_positions: int = 8192
    partial: float = 1.0

    def dims(self, head_dim: int) -> int:
        """How many of a head's `head_dim` dims rotate (as HF: int(head_dim * partial))."""
        return int(head_dim * self.partial)

    def inv_freq(self, head_dim: int) -> np.ndarray:
        """Inverse frequencies [head_dim // 2], float64, exactly as HF computes them."""
        inv = 1.0 / (self.theta ** (np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / head_dim))
        inv = inv.astype(np.float32).astype(np.float64)
        if self.kind == "default":
            return inv
        if self.kind == "linear":
            return inv / self.factor
        # llama3 (Llama 3.1): low frequencies divided by factor, high kept, smooth in between.
        low_wavelen = self.original_max_positions / self.low_freq_factor
        high_wavelen = self.original_max_positions / self.high_freq_factor
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > low_wavelen, inv / self.factor, inv)
        smooth = (self.original_max_positions / wavelen - self.low_freq_factor) / (
            self.high_freq_factor - self.low_freq_factor)
        smoothed = (1 - smooth) * scaled / self.factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        return np.where(medium, smoothed, scaled)


def host_widths(host: str, cfg: "ModelConfig") -> Tuple[int, int]:
    """(d_in, d_out) a dictionary at `host` (a `dictionaries.core.HOSTS` key) reads and writes on model
    `cfg`: D (resid_pre, attn_out, mlp_out, transcoder), H * Dh (head_out: the heads' z concatenated)."""
    width = cfg.n_heads * cfg.d_head if host == "head_out" else cfg.d_model
    return width, width


@dataclasses.dataclass(frozen=True)
class SpliceConfig:
    """Sparse dictionaries spliced into the model (`dictionaries.splice.attach`): one per layer of
    `layers` (distinct, ascending), all at `host` (a key of `dictionaries.core.HOSTS`) and of one
    `dictionary` shape and kind. keep_error: the host keeps the dictionary's error, x + decode(f') -
    decode(f) (the plain model while nothing patches the features f), else x = decode(f')."""

    host: str
    dictionary: DictConfig
    layers: Tuple[int, ...]
    keep_error: bool = True

    def __post_init__(self):
        if self.host not in HOSTS:
            raise ValueError(f"unknown dictionary host {self.host!r}; known: {sorted(HOSTS)}")
        if not isinstance(self.dictionary, DictConfig):
            raise ValueError(f"dictionary must be a DictConfig, got {type(self.dictionary).__name__}")
        layers = tuple(self.layers)
        if not layers or any(not isinstance(l, (int, np.integer)) or isinstance(l, bool) or l < 0 for l in layers) \
                or list(layers) != sorted(set(layers)):
            raise ValueError(f"layers must be distinct layer indices in ascending order, got {self.layers}")
        object.__setattr__(self, "layers", tuple(int(l) for l in layers))

    def check(self, cfg: "ModelConfig") -> None:
        """ValueError unless the layers lie in [0, L) and the dictionary's widths fit the host of `cfg`."""
        if self.layers[-1] >= cfg.n_layers:
            raise ValueError(f"spliced layers {self.layers} out of range for {cfg.n_layers} layers")
        want = host_widths(self.host, cfg)
        got = (self.dictionary.d_in, self.dictionary.out_dim)
        if got != want:
            raise ValueError(f"a {self.host!r} dictionary on this model reads and writes (d_in, d_out) = {want}, "
                             f"got {got}")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture of a decoder-only transformer, as a set of features read once from a config.

    norm: a key of `layers.NORMS` ('layernorm' with bias, 'rmsnorm'); activation: a key of
    `layers.ACTIVATIONS`; gated_mlp: down(act(gate(h)) * up(h)) (SwiGLU) instead of down(act(up(h)));
    position_embedding: 'learned' (a [max_positions, D] table added to the token embeddings) or
    'rotary' (RoPE on queries and keys, parameters in `rope`); checkpoint: the HF ``model_type``
    whose tensor names the loaders read ('gpt2' | 'llama' | 'gpt_neox' | 'phi3'); the forward never reads it.
    n_kv_heads < n_heads is grouped-query attention: query head q reads KV head
    q // (n_heads // n_kv_heads), as in HF. parallel_residual: attention and MLP both read the
    layer's input, x + attn(norm1(x)) + mlp(norm2(x)) (GPT-NeoX, GPT-J), instead of the MLP reading
    x + attn(norm1(x)). sliding_window: a query reads only the keys of the last `sliding_window` slots
    (its own included; Mistral). qk_norm: a row of `layers.QK_NORMS`, the config's norm on queries
    and keys before RoPE, over each head (Qwen3) or over the whole projection (OLMo-2); None: none.
    pre_norms: norm1 and norm2 normalise the attention's and the MLP's inputs (off: OLMo-2);
    post_norms: post_norm1 and post_norm2 normalise their outputs before they are added to the
    residual (OLMo-2, Gemma-2: both). rope_layers: per layer, whether it applies RoPE (None: every
    layer; SmolLM3's NoPE layers do not). window_layers: per layer, whether its attention has the
    sliding window (None: every layer; Gemma-2 alternates, Qwen2/Qwen3 have it from max_window_layers
    on, SmolLM3 on its NoPE layers). local_rope: the RoPE of the layers with the sliding window, `rope`
    that of the others (None: `rope` on every layer; Gemma-3's local and global bases). query_pre_attn_scalar: scores are scaled by its -1/2 power
    (None: d_head's). attn_logit_softcap, final_logit_softcap: c * tanh(s / c) of the attention
    scores before the mask, of the logits (Gemma-2; the loader puts the logits' cap in the params,
    `params.config_leaves`). scaled_embeddings: token embeddings times sqrt(d_model) (in their
    dtype, as HF Gemma). splice: sparse dictionaries spliced into the model (`SpliceConfig`; set by
    `dictionaries.splice.attach`, never by a checkpoint reader).
    """

    checkpoint: str
    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    d_head: int
    d_mlp: int
    vocab_size: int
    max_positions: int
    norm_eps: float
    norm: str
    activation: str
    gated_mlp: bool
    position_embedding: str
    tied_embeddings: bool
    attn_bias: bool = False   # q/k/v biases
    o_bias: bool = False
    mlp_bias: bool = False
    parallel_residual: bool = False
    sliding_window: Optional[int] = None
    qk_norm: Optional[str] = None
    pre_norms: bool = True
    post_norms: bool = False
    rope_layers: Optional[Tuple[bool, ...]] = None
    window_layers: Optional[Tuple[bool, ...]] = None
    local_rope: Optional[RopeConfig] = None
    query_pre_attn_scalar: Optional[float] = None
    attn_logit_softcap: Optional[float] = None
    final_logit_softcap: Optional[float] = None
    scaled_embeddings: bool = False
    rope: Optional[RopeConfig] = None
    bos_token_id: Optional[int] = None
    eos_token_id: Optional[int] = None
    pad_token_id: Optional[int] = None
    splice: Optional[SpliceConfig] = None

    @property
    def dict_width(self) -> int:
        """F, the feature count of the spliced dictionaries (the 'features' site's units)."""
        if self.splice is None:
            raise ValueError("no dictionary is spliced into this model; use dictionaries.splice.attach")
        return self.splice.dictionary.width

    @property
    def spliced_layers(self) -> Tuple[int, ...]:
        """The layers holding a spliced dictionary (() without a splice)."""
        return () if self.splice is None else self.splice.layers

    @property
    def n_groups(self) -> int:
        """Query heads per KV head."""
        return self.n_heads // self.n_kv_heads

    def __post_init__(self):
        for field, table in (("norm", NORMS), ("activation", ACTIVATIONS),
                             ("position_embedding", POSITION_EMBEDDINGS), ("checkpoint", CHECKPOINTS)):
            if getattr(self, field) not in table:
                raise UnsupportedConfigError(
                    f"{field}={getattr(self, field)!r} is not supported (supported: {', '.join(table)})")
        if self.qk_norm is not None and self.qk_norm not in QK_NORMS:
            raise UnsupportedConfigError(
                f"qk_norm={self.qk_norm!r} is not supported (supported: None, {', '.join(QK_NORMS)})")
        if (self.position_embedding == "rotary") != (self.rope is not None):
            raise UnsupportedConfigError("rope parameters are required exactly when position_embedding='rotary'")
        if self.rope_layers is not None and (self.rope is None or len(self.rope_layers) != self.n_layers):
            raise UnsupportedConfigError(f"rope_layers needs RoPE and one entry per layer ({self.n_layers}), "
                                         f"got {self.rope_layers}")
        if self.window_layers is not None and (self.sliding_window is None or len(self.window_layers) != self.n_layers):
            raise UnsupportedConfigError(f"window_layers needs a sliding_window and one entry per layer "
                                         f"({self.n_layers}), got {self.window_layers}")
        if self.local_rope is not None and (self.rope is None or self.sliding_window is None or
                                            self.local_rope.dims(self.d_head) != self.rope.dims(self.d_head)):
            raise UnsupportedConfigError("local_rope needs RoPE rotating as many dims and a sliding_window, got "
                                         f"{self.local_rope} beside {self.rope}, window {self.sliding_window}")
        if not (self.pre_norms or self.post_norms):
            raise UnsupportedConfigError("a layer needs norms before (pre_norms) or after (post_norms) its sublayers")
        if self.rope is not None and (self.rope.dims(self.d_head) % 2 or not self.rope.dims(self.d_head)):
            raise UnsupportedConfigError(
                f"partial_rotary_factor={self.rope.partial} rotates {self.rope.dims(self.d_head)} of the "
                f"{self.d_head} head dims: expected a positive even number")
        if self.n_heads % self.n_kv_heads:
            raise UnsupportedConfigError(
                f"num_attention_heads={self.n_heads} is not a multiple of num_key_value_heads={self.n_kv_heads}")
        if self.splice is not None:
            self.splice.check(self)

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any], path: Optional[str] = None) -> "ModelConfig":
        """Build from a parsed HF config dict (``model_type`` a key of `CHECKPOINTS`); `path` (the file it
        came from) prefixes every `UnsupportedConfigError`."""
        try:
            model_type = hf.get("model_type")
            if model_type not in CHECKPOINTS:
                raise UnsupportedConfigError(
                    f"model_type {model_type!r} is not supported (supported: {', '.join(CHECKPOINTS)})")
            return CHECKPOINTS[model_type](dict(hf))
        except UnsupportedConfigError as e:
            if path is None:
                raise
            raise UnsupportedConfigError(f"{path}: {e}") from None

    @classmethod
    def from_json(cls, path: str) -> "ModelConfig":
        """Build from a ``config.json`` file (or a directory holding one)."""
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no config.json at {path}")
        return cls.from_hf(load_json(path), path)


# Keys that carry no information about the computed function (training, generation, metadata).
_BENIGN = {
    "architectures", "transformers_version", "torch_dtype", "dtype", "use_cache", "initializer_range",
    "model_type", "_name_or_path", "_model_name_or_path", "task_specific_params", "id2label",
    "label2id", "bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id", "sep_token_id",
    "return_dict", "output_hidden_states", "output_attentions", "tie_word_embeddings",
    "attention_dropout", "embd_pdrop", "attn_pdrop", "resid_pdrop", "summary_activation",
    "summary_first_dropout", "summary_proj_to_labels", "summary_type", "summary_use_proj",
    "pretraining_tp", "chunk_size_feed_forward", "is_encoder_decoder", "problem_type",
    "tokenizer_class", "prefix", "_attn_implementation_autoset",
    "max_length", "min_length", "do_sample", "num_beams", "temperature", "top_k", "top_p",
    "repetition_penalty", "n_ctx", "use_return_dict", "torchscript", "layer_types",
}


def _check_known(hf: dict, known: set) -> None:
    unknown = sorted(k for k in hf if k not in known and k not in _BENIGN)
    if unknown:
        raise UnsupportedConfigError(
            f"config field(s) {unknown} are not understood by jaxcircuits; refusing to guess their meaning")


def _require(hf: dict, field: str, ok, why: str) -> None:
    if field in hf and hf[field] is not None and not ok(hf[field]):
        raise UnsupportedConfigError(f"config field {field!r}={hf[field]!r} is not supported: {why}")


_REQUIRED = object()
# value type -> (test of a JSON value, what the error says is expected)
_TYPES = {
    int: (lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0, "a positive integer"),
    float: (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v), "a number"),
    bool: (lambda v: isinstance(v, bool), "true or false"),
}


def _get(hf: Mapping[str, Any], field: str, kind: type, default: Any = _REQUIRED, within: str = ""):
    """hf[field] as `kind` (int, float or bool; `_TYPES`), or `default` when absent or null.
    Raises UnsupportedConfigError naming the field (``within.field`` for a nested dict)."""
    name = f"{within}.{field}" if within else field
    value = hf.get(field)
    if value is None:
        if default is _REQUIRED:
            raise UnsupportedConfigError(f"required config field {name!r} is missing")
        return default
    ok, expected = _TYPES[kind]
    if not ok(value):
        raise UnsupportedConfigError(f"config field {name!r}={value!r} is invalid: expected {expected}")
    return kind(value)


def _token_id(hf: Mapping[str, Any], field: str) -> Optional[int]:
    """A special-token id (the first of a list), or None; raises naming the field if it is not an id."""
    v = hf.get(field)
    v = v[0] if isinstance(v, (list, tuple)) and v else v
    if v is not None and not (isinstance(v, int) and not isinstance(v, bool) and v >= 0):
        raise UnsupportedConfigError(f"config field {field!r}={hf[field]!r} is invalid: expected a token id")
    return v


def _token_ids(hf: Mapping[str, Any]) -> dict:
    return {f"{t}_token_id": _token_id(hf, f"{t}_token_id") for t in ("bos", "eos", "pad")}


# GPT-2 checkpoints with their layer norms fine-tuned away are published with this epsilon or more
# (1e12, scales 1e6: LayerNorm then computes (x - mean) * scale / sqrt(eps) + bias); they load with
# norm='ln_free', that linear map.
LN_FREE_EPS = 1e10


def _from_gpt2(hf: dict) -> ModelConfig:
    _check_known(hf, {
        "n_embd", "n_layer", "n_head", "n_positions", "vocab_size", "layer_norm_epsilon",
        "activation_function", "n_inner", "scale_attn_weights", "scale_attn_by_inverse_layer_idx",
        "reorder_and_upcast_attn", "add_cross_attention"})
    _require(hf, "scale_attn_weights", lambda v: v is True, "only scaled attention is implemented")
    _require(hf, "scale_attn_by_inverse_layer_idx", lambda v: v is False, "not implemented")
    _require(hf, "add_cross_attention", lambda v: v is False, "decoder-only models only")
    act = hf.get("activation_function", "gelu_new")
    _require(hf, "activation_function", lambda v: v in ("gelu_new", "gelu", "relu"), "use gelu_new/gelu/relu")
    d, n_heads = _get(hf, "n_embd", int, 768), _get(hf, "n_head", int, 12)
    if d % n_heads:
        raise UnsupportedConfigError(f"n_embd={d} is not a multiple of n_head={n_heads}")
    return ModelConfig(
        checkpoint="gpt2", n_layers=_get(hf, "n_layer", int, 12), d_model=d, n_heads=n_heads,
        n_kv_heads=n_heads, d_head=d // n_heads, d_mlp=_get(hf, "n_inner", int, 4 * d),
        vocab_size=_get(hf, "vocab_size", int, 50257), max_positions=_get(hf, "n_positions", int, 1024),
        norm_eps=_get(hf, "layer_norm_epsilon", float, 1e-5),
        norm="ln_free" if _get(hf, "layer_norm_epsilon", float, 1e-5) >= LN_FREE_EPS else "layernorm",
        activation=act, gated_mlp=False, position_embedding="learned",
        tied_embeddings=_get(hf, "tie_word_embeddings", bool, True), attn_bias=True, o_bias=True,
        mlp_bias=True, **_token_ids(hf))


# rope type -> the fields it reads besides rope_theta (each a float, or an int when named here)
_ROPE_FIELDS = {"default": (), "linear": ("factor",),
                "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}
_ROPE_INTS = {"original_max_position_embeddings"}


def _rope_from_hf(hf: dict, partial: Optional[float] = None, legacy: Optional[dict] = None) -> RopeConfig:
    """As transformers >= 5: the ``rope_scaling`` dict (< 5 writes rope_theta + rope_scaling) when it is
    set, else ``rope_parameters`` (>= 5); theta from that dict, else the top-level ``rope_theta``.
    partial: the family's default ``partial_rotary_factor`` (None: the family rotates whole heads,
    and a factor other than 1 is refused). legacy: top-level values of keys of that dict, filling
    what it lacks (as HF reads GPT-NeoX's rotary_pct, Phi-3's partial_rotary_factor)."""
    field = "rope_scaling" if hf.get("rope_scaling") else "rope_parameters"
    params = hf.get(field) or {}
    if not isinstance(params, dict):
        raise UnsupportedConfigError(f"config field {field!r}={params!r} is invalid: expected an object")
    params = {**{k: v for k, v in (legacy or {}).items() if v is not None}, **params}
    theta = _get(params, "rope_theta", float, _get(hf, "rope_theta", float, 10000.0), field)
    params.pop("rope_theta", None)
    kind = params.pop("rope_type", params.pop("type", "default"))
    if not isinstance(kind, str) or kind not in _ROPE_FIELDS:
        raise UnsupportedConfigError(
            f"config field {field!r} type {kind!r} is not supported (supported: {', '.join(_ROPE_FIELDS)})")
    fraction = _get(params, "partial_rotary_factor", float, 1.0 if partial is None else partial, field)
    params.pop("partial_rotary_factor", None)
    if partial is None and fraction != 1.0:
        raise UnsupportedConfigError("config field 'partial_rotary_factor' != 1 is not supported for this model_type")
    if not 0 < fraction <= 1:
        raise UnsupportedConfigError(f"config field 'partial_rotary_factor'={fraction} is invalid: expected (0, 1]")
    extra = sorted(set(params) - set(_ROPE_FIELDS[kind]))
    if extra:
        raise UnsupportedConfigError(f"{field} field(s) {extra} are not supported for type {kind!r}")
    values = {k: _get(params, k, int if k in _ROPE_INTS else float, within=field) for k in _ROPE_FIELDS[kind]}
    return RopeConfig(
        theta=theta, kind=kind, factor=values.get("factor", 1.0),
        low_freq_factor=values.get("low_freq_factor", 1.0), high_freq_factor=values.get("high_freq_factor", 4.0),
        original_max_positions=values.get("original_max_position_embeddings", 8192), partial=fraction)


def _qkvo_bias(hf: dict) -> dict:
    bias = _get(hf, "attention_bias", bool, False)
    return {"attn_bias": bias, "o_bias": bias}


def _no_bias(hf: dict) -> dict:
    _require(hf, "attention_bias", lambda v: v is False, "this family's attention has no biases")
    return {}


_QWEN_WINDOW = {"use_sliding_window", "sliding_window", "max_window_layers", "layer_types"}


def _optional(hf: dict, field: str, kind: type, default):
    """`_get`, but None when the config sets the field to null (a feature switched off)."""
    return None if field in hf and hf[field] is None else _get(hf, field, kind, default)


def _window(hf: dict) -> dict:
    """One sliding window on every layer: ``sliding_window`` (none when null or absent; a family's HF
    default, `HF_DEFAULTS`, fills it when absent)."""
    return {"sliding_window": _get(hf, "sliding_window", int, None)}


def _windows(hf: dict, window: Optional[int], default) -> dict:
    """sliding_window and window_layers: `window` (None: no window) on the layers ``layer_types``
    names 'sliding_attention' (the others 'full_attention'), else on those where default(i), as HF
    fills it; window_layers None when every layer has the window, no window when none has it."""
    n = _get(hf, "num_hidden_layers", int)
    kinds = hf.get("layer_types") or ["sliding_attention" if default(i) else "full_attention" for i in range(n)]
    if not (isinstance(kinds, list) and len(kinds) == n and set(kinds) <= {"sliding_attention", "full_attention"}):
        raise UnsupportedConfigError(f"config field 'layer_types'={kinds!r} is invalid: expected {n} of "
                                     "'sliding_attention' / 'full_attention'")
    sliding = tuple(k == "sliding_attention" for k in kinds)
    if window is None or not any(sliding):
        return {"sliding_window": None, "window_layers": None}
    return {"sliding_window": window, "window_layers": None if all(sliding) else sliding}


def _qwen_windows(hf: dict) -> dict:
    """Qwen2/Qwen3: with use_sliding_window, the window on layers max_window_layers.. (HF's layer_types)."""
    window = _optional(hf, "sliding_window", int, 4096) if _get(hf, "use_sliding_window", bool, False) else None
    first = _get(hf, "max_window_layers", int, 28)
    return _windows(hf, window, lambda i: i >= first)


def _nope_layers(hf: dict) -> dict:
    """SmolLM3: ``no_rope_layers`` [>= L] (1: the layer applies RoPE, 0: NoPE), as HF fills it when
    absent (every ``no_rope_layer_interval``-th layer NoPE); with use_sliding_window, its window on
    the layers layer_types names, by default the NoPE ones."""
    n, every = _get(hf, "num_hidden_layers", int), _get(hf, "no_rope_layer_interval", int, 4)
    flags = hf.get("no_rope_layers")
    if flags is None:
        flags = [int((i + 1) % every != 0) for i in range(n)]
    if not (isinstance(flags, list) and len(flags) >= n and all(f in (0, 1) for f in flags)):
        raise UnsupportedConfigError(f"config field 'no_rope_layers'={flags!r} is invalid: expected {n} or more 0/1 flags")
    rotates = tuple(bool(f) for f in flags[:n])
    window = _optional(hf, "sliding_window", int, None) if _get(hf, "use_sliding_window", bool, False) else None
    return {"rope_layers": None if all(rotates) else rotates,
            **_windows(hf, window, lambda i: not rotates[i])}          # HF: the window on the NoPE layers


# HF model_type of a Llama-like family -> (config fields it reads besides the Llama core, hf -> its features)
# HF's defaults of fields a family's config.json may leave out, where they differ from the Llama
# reader's: read as if config.json held them (a null there still switches the feature off).
HF_DEFAULTS = {
    "mistral": {"sliding_window": 4096},
    "smollm3": {"rope_theta": 2e6},
    "gemma2": {"head_dim": 256, "num_key_value_heads": 4, "tie_word_embeddings": True, "query_pre_attn_scalar": 256.0,
               "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0, "sliding_window": 4096},
    "gemma3_text": {"head_dim": 256, "num_key_value_heads": 4, "tie_word_embeddings": True, "query_pre_attn_scalar": 256.0,
                    "sliding_window": 4096, "rope_theta": 1e6, "rope_local_base_freq": 1e4,
                    "max_position_embeddings": 131072},
}

LLAMA_FAMILIES = {
    "llama": ({"attention_bias", "mlp_bias"},
              lambda hf: {**_qkvo_bias(hf), "mlp_bias": _get(hf, "mlp_bias", bool, False)}),
    "qwen2": (_QWEN_WINDOW, lambda hf: {**_qwen_windows(hf), "attn_bias": True}),
    "mistral": ({"sliding_window"}, _window),
    "qwen3": ({"attention_bias", *_QWEN_WINDOW}, lambda hf: {**_qwen_windows(hf), **_qkvo_bias(hf), "qk_norm": "head"}),
    "olmo2": ({"attention_bias"}, lambda hf: {**_qkvo_bias(hf), "qk_norm": "proj", "pre_norms": False,
                                              "post_norms": True}),
    # fused qkv_proj / gate_up_proj (its own tensor names); original_max_position_embeddings is read
    # by longrope only (refused: a rope type not in _ROPE_FIELDS); auto_map names remote code HF replaces
    "phi3": ({"sliding_window", "partial_rotary_factor", "attention_bias", "original_max_position_embeddings",
              "auto_map"},
             lambda hf: {**_no_bias(hf), "checkpoint": "phi3", **_window(hf)}),
    "smollm3": ({"attention_bias", "mlp_bias", "no_rope_layers", "no_rope_layer_interval", *_QWEN_WINDOW},
                lambda hf: {**_qkvo_bias(hf), "mlp_bias": _get(hf, "mlp_bias", bool, False), **_nope_layers(hf)}),
    # cache_implementation ('hybrid', in Google's config.json) only chooses HF's generation cache
    "gemma2": ({"attention_bias", "hidden_activation", "query_pre_attn_scalar", "attn_logit_softcapping",
                "final_logit_softcapping", "sliding_window", "layer_types", "use_bidirectional_attention",
                "cache_implementation"},
               lambda hf: {**_qkvo_bias(hf), **_gemma(hf, lambda i: (i + 1) % 2)}),
    # HF reads sliding_window_pattern only where layer_types is absent, and never _sliding_window_pattern
    "gemma3_text": ({"attention_bias", "hidden_activation", "query_pre_attn_scalar", "attn_logit_softcapping",
                     "final_logit_softcapping", "sliding_window", "layer_types", "use_bidirectional_attention",
                     "cache_implementation", "rope_local_base_freq", "sliding_window_pattern", "_sliding_window_pattern"},
                    lambda hf: {**_qkvo_bias(hf), **_gemma3(hf)}),
}


def _gemma(hf: dict, sliding) -> dict:
    """Gemma-2 and Gemma-3: RMSNorm times (1 + w) before and after attention and the MLP, GeGLU (tanh
    GELU), embeddings times sqrt(d_model), attention scaled by query_pre_attn_scalar and soft-capped,
    soft-capped logits, the sliding window on the layers layer_types names, else where sliding(i) (Gemma-2:
    the even ones); HF's defaults in `HF_DEFAULTS`."""
    _require(hf, "use_bidirectional_attention", lambda v: v is False, "only causal attention is implemented")
    act = hf.get("hidden_activation", "gelu_pytorch_tanh")
    _require(hf, "hidden_activation", lambda v: v in ACTIVATIONS, f"use one of {', '.join(ACTIVATIONS)}")
    return {"norm": "rmsnorm_unit_offset", "activation": act, "post_norms": True, "scaled_embeddings": True,
            "query_pre_attn_scalar": _get(hf, "query_pre_attn_scalar", float),
            "attn_logit_softcap": _get(hf, "attn_logit_softcapping", float, None),
            "final_logit_softcap": _get(hf, "final_logit_softcapping", float, None),
            **_windows(hf, _window(hf)["sliding_window"], sliding)}


def _gemma3(hf: dict) -> dict:
    """Gemma-3 (text): Gemma-2's block (`_gemma`) with a per-head q/k norm, the window on all but every
    ``sliding_window_pattern``-th layer (HF's default 6; HF needs a window), its own RoPE on the windowed
    layers (`local_rope`, `_gemma3_ropes`); no attention soft cap (HF's Gemma-3 does not apply one)."""
    if hf.get("sliding_window") is None:
        raise UnsupportedConfigError("config field 'sliding_window'=None is not supported: HF's Gemma-3 needs a window")
    _require(hf, "attn_logit_softcapping", lambda v: False, "HF's Gemma-3 attention does not apply it")
    every = _get(hf, "sliding_window_pattern", int, 6)
    features = _gemma(hf, lambda i: (i + 1) % every != 0)
    rope, local = _gemma3_ropes(hf)
    return {**features, "qk_norm": "head", "rope": rope,
            "local_rope": None if features["sliding_window"] is None or local == rope else local}


def _gemma3_ropes(hf: dict) -> Tuple[RopeConfig, RopeConfig]:
    """Gemma-3's RoPE of its full-attention layers and of its sliding ones, as HF fills them:
    ``rope_parameters`` by layer type ('full_attention', 'sliding_attention'; transformers >= 5), the
    first updated by ``rope_scaling`` (< 5); where a type's dict has no rope_theta, ``rope_theta`` (the
    global base) and ``rope_local_base_freq`` (the local one)."""
    by_type = hf.get("rope_parameters") or {}
    if not (isinstance(by_type, dict) and set(by_type) <= {"full_attention", "sliding_attention"}):
        raise UnsupportedConfigError(f"config field 'rope_parameters'={by_type!r} is invalid: expected an object "
                                     "per layer type ('full_attention', 'sliding_attention')")
    full = {**(by_type.get("full_attention") or {}), **(hf.get("rope_scaling") or {})}
    return tuple(_rope_from_hf({"rope_parameters": params, "rope_theta": hf.get(theta)})
                 for params, theta in ((full, "rope_theta"), (by_type.get("sliding_attention") or {}, "rope_local_base_freq")))


def _from_llama(hf: dict) -> ModelConfig:
    """A Llama-like family (`LLAMA_FAMILIES`): RMSNorm, RoPE, SwiGLU, Llama's tensor names, and the
    features of its model_type (which may name other tensors, `checkpoint`, or set `rope`). A family that lists
    ``partial_rotary_factor`` among its fields rotates that fraction of each head (default 1)."""
    fields, features = LLAMA_FAMILIES[hf["model_type"]]
    hf = {**HF_DEFAULTS.get(hf["model_type"], {}), **hf}
    _check_known(hf, {
        "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
        "intermediate_size", "vocab_size", "rms_norm_eps", "hidden_act",
        "max_position_embeddings", "rope_theta", "rope_scaling", "rope_parameters", *fields})
    if "hidden_activation" not in fields:            # Gemma-2's MLP reads it (HF ignores its hidden_act)
        _require(hf, "hidden_act", lambda v: v == "silu", "Llama-like MLPs must use silu")
    n_heads, d = _get(hf, "num_attention_heads", int), _get(hf, "hidden_size", int)
    partial = 1.0 if "partial_rotary_factor" in fields else None
    family = features(hf)                                              # Gemma-3 reads its own RoPEs
    rope = family.pop("rope") if "rope" in family else _rope_from_hf(
        hf, partial, {"partial_rotary_factor": hf.get("partial_rotary_factor")})
    return ModelConfig(**{
        "checkpoint": "llama", "n_layers": _get(hf, "num_hidden_layers", int), "d_model": d, "n_heads": n_heads,
        "n_kv_heads": _get(hf, "num_key_value_heads", int, n_heads), "d_head": _get(hf, "head_dim", int, d // n_heads),
        "d_mlp": _get(hf, "intermediate_size", int), "vocab_size": _get(hf, "vocab_size", int),
        "max_positions": _get(hf, "max_position_embeddings", int, 2048),
        "norm_eps": _get(hf, "rms_norm_eps", float, 1e-6), "norm": "rmsnorm", "activation": "silu", "gated_mlp": True,
        "position_embedding": "rotary", "tied_embeddings": _get(hf, "tie_word_embeddings", bool, False),
        "rope": rope, **family, **_token_ids(hf)})


def _from_gpt_neox(hf: dict) -> ModelConfig:
    """GPT-NeoX / Pythia: LayerNorm with biases, attention and MLP in parallel (use_parallel_residual),
    RoPE on the first ``rotary_pct`` of each head's dims, q/k/v/dense biases (attention_bias), a GELU
    MLP with biases, untied ``embed_out``. Dropout fields are training-only."""
    _check_known(hf, {
        "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size",
        "layer_norm_eps", "hidden_act", "max_position_embeddings", "use_parallel_residual", "attention_bias",
        "rotary_pct", "rotary_emb_base", "rope_scaling", "rope_parameters", "rope_theta", "hidden_dropout",
        "classifier_dropout", "is_decoder"})
    _require(hf, "hidden_act", lambda v: v in ACTIVATIONS, f"use one of {', '.join(ACTIVATIONS)}")
    n_heads, d = _get(hf, "num_attention_heads", int), _get(hf, "hidden_size", int)
    if d % n_heads:
        raise UnsupportedConfigError(f"hidden_size={d} is not a multiple of num_attention_heads={n_heads}")
    bias = _get(hf, "attention_bias", bool, True)
    return ModelConfig(
        checkpoint="gpt_neox", n_layers=_get(hf, "num_hidden_layers", int), d_model=d, n_heads=n_heads,
        n_kv_heads=n_heads, d_head=d // n_heads, d_mlp=_get(hf, "intermediate_size", int),
        vocab_size=_get(hf, "vocab_size", int), max_positions=_get(hf, "max_position_embeddings", int, 2048),
        norm_eps=_get(hf, "layer_norm_eps", float, 1e-5), norm="layernorm", activation=hf.get("hidden_act", "gelu"),
        gated_mlp=False, position_embedding="rotary", tied_embeddings=_get(hf, "tie_word_embeddings", bool, False),
        attn_bias=bias, o_bias=bias, mlp_bias=True,
        parallel_residual=_get(hf, "use_parallel_residual", bool, True),
        rope=_rope_from_hf(hf, partial=0.25, legacy={"rope_theta": hf.get("rotary_emb_base"),
                                                     "partial_rotary_factor": hf.get("rotary_pct")}),
        **_token_ids(hf))


# HF model_type -> reader of its config.json (the loaders map its tensor names).
CHECKPOINTS = {"gpt2": _from_gpt2, "gpt_neox": _from_gpt_neox, **{family: _from_llama for family in LLAMA_FAMILIES}}
