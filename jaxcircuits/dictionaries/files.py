"""Dictionary files: load SAELens, Gemma Scope and circuit-tracer files; save SAELens's.

`load(path)` tells the format by the file that marks it (`FORMATS`):

  SAELens        cfg.json + sae_weights.safetensors     one SAE or transcoder; its hook names place it
  Gemma Scope    params.npz                             one JumpReLU dictionary; the caller places it
  circuit-tracer config.yaml + a file per layer         a transcoder per layer (a list)

SAELens tensors (`W_enc` [d_in, d_sae], `b_enc`, `W_dec` [d_sae, d_out], `b_dec`, `threshold`,
`b_gate`/`r_mag`/`b_mag`, `W_skip` [d_out, d_in]) become `core` params (`b_gate` is our gated
`b_enc`; `w_skip` is `W_skip` transposed). Both cfg.json layouts are read: sae-lens 6's (hook name,
head index and output hook under `metadata`) and the older flat one (`hook_point`,
`activation_fn_str` 'topk' with `activation_fn_kwargs.k`). A TopK file trained with
`rescale_acts_by_decoder_norm` is folded into plain TopK (same features and outputs). JumpReLU is
relu(pre) * (pre > threshold), as in SAELens, Gemma Scope and `core`; circuit-tracer's JumpReLU
(a layer file holding `activation_function.threshold`) is pre * (pre > threshold), the same for
thresholds >= 0: its files with a negative threshold are refused.

Hooks map to hosts (`core.HOSTS`) through `hooknames` (hook_resid_pre, hook_resid_post = resid_pre
of the next layer, attn.hook_z = head_out with d_in = H * Dh, hook_attn_out, hook_mlp_out); a
transcoder reads the MLP's input (`MLP_INPUTS`, after the norm's weight: our 'mlp_in') and writes
hook_mlp_out (or mlp.hook_out, the same where no norm follows the MLP) of the same layer. A transcoder
reading TransformerLens' ln2.hook_normalized (the norm's output before its weight and bias) is
rewritten to read 'mlp_in' given the model's params (`fold_norm_input`); one reading the un-normed
residual is refused: no site of ours holds that input. Given the model's config, `check_fit` refuses a layer or width that does not fit.

`save(directory, dictionary)` writes SAELens 6 files (cfg.json + sae_weights.safetensors, through
`storage`'s atomic writes, each with its checksum sidecar) that `load` reads back bit-exactly and
sae-lens's `SAE.load_from_disk` reads too.
"""

from __future__ import annotations

import glob
import os
import re
import zipfile
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Tuple, Union
from urllib.parse import urlparse

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import yaml
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from jaxcircuits import storage
from jaxcircuits.dictionaries.core import HOSTS, DictConfig, Dictionary
from jaxcircuits.interventions import hooknames
from jaxcircuits.models.config import host_widths, load_json
from jaxcircuits.models.layers import norm_weight
from jaxcircuits.models.params import sublayer_norm

SAELENS_CFG, SAELENS_WEIGHTS = "cfg.json", "sae_weights.safetensors"
# The cfg.json layout `save` writes: sae-lens reads files without a version as pre-6 ones.
SAELENS_LAYOUT = "6.0.0"

# SAELens architecture -> (our kind, transcoder, skip).
ARCHITECTURES: Dict[str, Tuple[str, bool, bool]] = {
    "standard": ("relu", False, False),
    "topk": ("topk", False, False),
    "jumprelu": ("jumprelu", False, False),
    "gated": ("gated", False, False),
    "transcoder": ("relu", True, False),
    "skip_transcoder": ("relu", True, True),
    "jumprelu_transcoder": ("jumprelu", True, False),
    "jumprelu_skip_transcoder": ("jumprelu", True, True),
}
# cfg.json dtype names -> numpy dtypes (sae-lens casts the weights to it on load).
DTYPES = {name: dt for base, dt in (("float32", np.float32), ("float64", np.float64), ("float16", np.float16),
                                    ("bfloat16", ml_dtypes.bfloat16)) for name in (base, f"torch.{base}")}

# Hooks (in a layer) of the MLP's input, after the norm and its weight, which a transcoder host reads
# ('mlp_in'; circuit-tracer's mlp.hook_in). `PRE_WEIGHT` hooks hold the norm's output before its weight
# and bias (TransformerLens' hook_normalized): folded (`fold_norm_input`). `RESID_MID` hooks hold the
# un-normed residual stream before the MLP, which no site of ours holds: transcoders reading it are refused.
MLP_INPUTS = ("blocks.{layer}.mlp.hook_in",)
PRE_WEIGHT = ("blocks.{layer}.ln2.hook_normalized",)
MLP_OUTPUTS = ("blocks.{layer}.hook_mlp_out", "blocks.{layer}.mlp.hook_out")
RESID_MID = ("blocks.{layer}.hook_resid_mid", "blocks.{layer}.hook_mlp_in")

# circuit-tracer's JumpReLU threshold tensor (its activation function's parameter).
CT_THRESHOLD = "activation_function.threshold"

Loaded = Union[Dictionary, List[Dictionary]]


class _Placed(NamedTuple):
    """Where a file puts its dictionary: host (a key of `HOSTS`) and layer; pre_weight: a transcoder
    reading the MLP's norm output before its weight (`PRE_WEIGHT`), folded into the encoder on load."""

    host: str
    layer: int
    pre_weight: bool = False


class _Model(NamedTuple):
    """The model a file is loaded for: its `ModelConfig` and params, each None when not at hand."""

    cfg: Any
    params: Any


def _hook(template: str, layer: int) -> str:
    return template.format(layer=layer)


def _sae_host(hook: str, cfg, where: str) -> _Placed:
    """Host and layer of an SAE reading and writing TransformerLens hook `hook`."""
    try:
        entry, layer = hooknames.parse_hook_name(hook, cfg)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    if entry == "resid_final":
        raise ValueError(f"{where}: hook {hook!r} is the last layer's residual output (resid_final), which "
                         f"no dictionary host reads; hosts read a layer's resid_pre (a hook_resid_post before the last layer)")
    hosts = {read: host for host, (read, write) in HOSTS.items() if read == write}
    if entry not in hosts:
        raise ValueError(f"{where}: hook {hook!r} (our {entry!r}) is not a site an SAE is placed at; SAE hosts: "
                         f"{sorted(hosts)}")
    return _Placed(hosts[entry], layer)


def _transcoder_host(hook_in: str, hook_out: str, where: str, model: _Model) -> _Placed:
    """The transcoder host's layer, for a transcoder reading `hook_in` and writing `hook_out` (on
    `model`, where known: mlp.hook_out is before a norm that follows the MLP, cfg.post_norms)."""
    cfg = model.cfg
    template, layer = hooknames.split_layer(hook_in)
    if template in PRE_WEIGHT and (cfg is None or model.params is None):
        raise ValueError(f"{where}: input hook {hook_in!r} is the MLP's norm output before its weight and bias "
                         f"(TransformerLens' hook_normalized), while our 'mlp_in' (what a transcoder host reads) "
                         "is after them: pass the model's cfg and params to load() to fold the norm's weight and "
                         "bias into the transcoder")
    if template in RESID_MID:
        raise ValueError(f"{where}: input hook {hook_in!r} is the un-normed residual stream before the MLP, which "
                         f"no site of ours holds (transcoders read the MLP's normed input: {MLP_INPUTS})")
    if template not in MLP_INPUTS + PRE_WEIGHT:
        raise ValueError(f"{where}: a transcoder reads the MLP's normed input {MLP_INPUTS}, not {hook_in!r}")
    if hook_out not in [_hook(t, layer) for t in MLP_OUTPUTS]:
        raise ValueError(f"{where}: a transcoder reading {hook_in!r} writes that layer's MLP output "
                         f"{[_hook(t, layer) for t in MLP_OUTPUTS]}, not {hook_out!r}")
    if cfg is not None and cfg.post_norms and hook_out == _hook(MLP_OUTPUTS[1], layer):
        raise ValueError(f"{where}: output hook {hook_out!r} is before the norm that follows this model's MLP "
                         "(post_norms), while our 'mlp_out' (what a transcoder host writes) is after it; refused")
    return _Placed("transcoder", layer, template in PRE_WEIGHT)


def fold_norm_input(dictionary: Dictionary, params, cfg) -> Dictionary:
    """A transcoder reading u, the MLP's norm output before its weight w and bias b (TransformerLens'
    ln2.hook_normalized), rewritten to read our 'mlp_in' h = u * w + b of model (`params`, `cfg`):
    u = (h - b) / w, so w_enc' = w_enc / w[:, None], b_enc' = b_enc - (b / w) @ w_enc, and a skip
    w_skip' = w_skip / w[:, None] with b_dec' = b_dec - (b / w) @ w_skip (float64, cast back). Exact
    where no weight is 0 (ValueError otherwise, or for a model without a norm before its MLP)."""
    d, dc = dictionary, dictionary.config
    leaf = sublayer_norm(cfg, "norm2", after=False)
    if d.host != "transcoder" or leaf is None:
        raise ValueError(f"folding a norm's weight needs a transcoder on a model with a norm before its MLP "
                         f"(host {d.host!r}, pre_norms={cfg.pre_norms})")
    norm = jax.tree.map(lambda a: np.asarray(a[d.layer], np.float64), params["layers"][leaf])
    w = np.asarray(norm_weight(cfg.norm, norm), np.float64)
    if np.any(w == 0):
        raise ValueError(f"layer {d.layer}'s MLP norm has {int((w == 0).sum())} zero weight(s): its normalised "
                         "input cannot be recovered from the MLP's input, so the transcoder cannot be folded")
    shift = norm.get("bias", np.zeros_like(w)) / w
    p = {n: np.asarray(a, np.float64) for n, a in d.params.items()}
    p["b_enc"] = p["b_enc"] - shift @ p["w_enc"]
    p["w_enc"] = p["w_enc"] / w[:, None]
    if dc.skip:
        p["b_dec"] = p["b_dec"] - shift @ p["w_skip"]
        p["w_skip"] = p["w_skip"] / w[:, None]
    dtype = d.params["w_enc"].dtype
    return Dictionary(dc, {n: jnp.asarray(a, dtype) for n, a in p.items()}, d.host, d.layer)


def _placed(dc: DictConfig, params: Dict, placed: _Placed, model: _Model) -> Dictionary:
    """The dictionary of `dc` and `params` at `placed`, its norm input folded when it reads before the
    norm's weight (`fold_norm_input`)."""
    d = Dictionary(dc, params, placed.host, placed.layer)
    return fold_norm_input(d, model.params, model.cfg) if placed.pre_weight else d


def check_fit(dictionary: Dictionary, cfg, where: str = "dictionary") -> None:
    """ValueError (naming `where`) unless `dictionary`'s layer and widths fit model `cfg`."""
    d, dc = dictionary, dictionary.config
    if d.layer >= cfg.n_layers:
        raise ValueError(f"{where}: layer {d.layer} is out of range for a model of {cfg.n_layers} layers")
    d_in, d_out = host_widths(d.host, cfg)
    if (dc.d_in, dc.out_dim) != (d_in, d_out):
        raise ValueError(f"{where}: a {d.host} dictionary reads d_in={dc.d_in} and writes d_out={dc.out_dim}, but "
                         f"the model's {'/'.join(dict.fromkeys(HOSTS[d.host]))} is {d_in} -> {d_out} wide")


# ---- tensors -------------------------------------------------------------------------------------

# Our param name -> (its tensor's name in a file, stored transposed).
Names = Dict[str, Tuple[str, bool]]


def _saelens_names(dc: DictConfig) -> Names:
    return {"w_enc": ("W_enc", False), "b_enc": ("b_gate" if dc.kind == "gated" else "b_enc", False),
            "w_dec": ("W_dec", False), "b_dec": ("b_dec", False), "threshold": ("threshold", False),
            "r_mag": ("r_mag", False), "b_mag": ("b_mag", False), "w_skip": ("W_skip", True)}


def _params(tensors: Dict[str, np.ndarray], dc: DictConfig, names: Names, where: str, dtype=None) -> Dict:
    """`core` params from a file's `tensors` (ValueError naming `where` and the tensors: missing,
    unexpected or mis-shaped ones, NaN or inf), cast to `dtype` (None: kept)."""
    want = {names[n][0]: shape[::-1] if names[n][1] else shape for n, shape in dc.param_shapes().items()}
    errors = [f"missing tensor {n!r} {s}" for n, s in want.items() if n not in tensors]
    errors += [f"unexpected tensor {n!r} {tensors[n].shape}" for n in tensors if n not in want]
    errors += [f"tensor {n!r} has shape {tensors[n].shape}, expected {s}"
               for n, s in want.items() if n in tensors and tensors[n].shape != s]
    errors += [f"tensor {n!r} is {tensors[n].dtype}, not floating point" for n in want
               if n in tensors and not np.issubdtype(tensors[n].dtype, np.floating)
               and tensors[n].dtype != ml_dtypes.bfloat16]
    if errors:
        raise ValueError(f"{where} does not hold a {dc.kind!r} dictionary of d_in={dc.d_in}, width={dc.width}, "
                         f"d_out={dc.out_dim}:\n  " + "\n  ".join(errors))
    out = {}
    for ours in dc.param_shapes():
        theirs, transposed = names[ours]
        a = tensors[theirs].T if transposed else tensors[theirs]
        a = a if dtype is None else a.astype(dtype)
        bad = int(np.count_nonzero(~np.isfinite(a)))
        if bad:
            raise ValueError(f"{where}: tensor {theirs!r} has {bad} NaN or infinite value(s): the file is damaged")
        out[ours] = jnp.asarray(a)
    return out


def _safetensors(path: str) -> Dict[str, np.ndarray]:
    try:
        with safe_open(path, framework="numpy") as f:
            return {n: f.get_tensor(n) for n in f.keys()}
    except SafetensorError as e:
        raise ValueError(f"{path} is not a valid safetensors file (corrupt or truncated?): {e}") from None


def _npz(path: str) -> Dict[str, np.ndarray]:
    try:
        with np.load(path) as f:
            return {n: f[n] for n in f.files}
    except (ValueError, OSError, zipfile.BadZipFile) as e:
        raise ValueError(f"{path} is not a valid .npz file of arrays (corrupt or truncated?): {e}") from None


def _need(path: str) -> str:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} does not exist")
    return path


# ---- SAELens -------------------------------------------------------------------------------------


def _saelens_fields(raw: dict, where: str) -> dict:
    """cfg.json as one flat dict in sae-lens 6 names (`metadata` merged in; the pre-6 layout renamed)."""
    if isinstance(raw.get("metadata"), dict):
        return {**raw, **raw["metadata"]}
    renames = {"hook_point": "hook_name", "hook_point_head_index": "hook_head_index",
               "activation_fn_str": "activation_fn"}
    c = {renames.get(k, k): v for k, v in raw.items()}
    c.setdefault("architecture", "standard")
    if c.get("activation_fn") == "topk":
        kwargs = c.get("activation_fn_kwargs")
        if not isinstance(kwargs, dict) or "k" not in kwargs:
            raise ValueError(f"{where}: activation_fn 'topk' needs activation_fn_kwargs {{'k': ...}}, got {kwargs!r}")
        c.update(architecture="topk", k=kwargs["k"])
    elif c.get("activation_fn", "relu") != "relu":
        raise ValueError(f"{where}: activation_fn {c['activation_fn']!r} is not supported (relu or topk)")
    if c.get("normalize_activations") is False:
        c["normalize_activations"] = "none"
    return c


def _field(c: dict, name: str, where: str, ok: Callable[[object], bool], expected: str, default=None):
    value = c.get(name, default)
    if not ok(value):
        raise ValueError(f"{where}: field {name!r} is {value!r}; expected {expected}")
    return value


def _positive(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


def _saelens_config(c: dict, where: str) -> Tuple[DictConfig, str, bool]:
    """(DictConfig, weights dtype name, rescale_acts_by_decoder_norm) of flat cfg.json fields `c`."""
    arch = _field(c, "architecture", where, ARCHITECTURES.__contains__, f"one of {sorted(ARCHITECTURES)}")
    kind, transcoder, skip = ARCHITECTURES[arch]
    _field(c, "normalize_activations", where, lambda v: v in (None, "none"),
           "'none' (fold any normalisation into the weights first)")
    _field(c, "hook_head_index", where, lambda v: v is None, "null (SAEs of one head are not supported)")
    _field(c, "reshape_activations", where, lambda v: v in (None, "none", "hook_z"), "'none' or 'hook_z'")
    _field(c, "finetuning_scaling_factor", where, lambda v: not v, "false (no finetuning scaling factor)")
    dtype = _field(c, "dtype", where, DTYPES.__contains__, f"one of {sorted(DTYPES)}", "float32")
    b_dec_in = _field(c, "apply_b_dec_to_input", where, lambda v: isinstance(v, bool), "true or false", True)
    b_dec_in = b_dec_in and not transcoder                # SAELens' transcoders ignore it: they encode x itself
    d_in = _field(c, "d_in", where, _positive, "a positive integer")
    width = _field(c, "d_sae", where, _positive, "a positive integer")
    d_out = _field(c, "d_out", where, _positive, "a positive integer") if transcoder else None
    k = _field(c, "k", where, _positive, "a positive integer") if kind == "topk" else None
    rescale = _field(c, "rescale_acts_by_decoder_norm", where, lambda v: isinstance(v, bool), "true or false",
                     False) if kind == "topk" else False
    try:
        dc = DictConfig(kind, d_in, width, d_out=d_out, k=k, subtract_b_dec=b_dec_in, skip=skip)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    return dc, dtype, rescale


def _fold_decoder_norm(p: Dict) -> Dict:
    """TopK with pre-activations scaled by the decoder rows' norms n, as plain TopK: w_enc * n,
    b_enc * n, w_dec / n (sae-lens's fold for rescale_acts_by_decoder_norm)."""
    n = jnp.linalg.norm(p["w_dec"], axis=-1)
    return {**p, "w_enc": p["w_enc"] * n, "b_enc": p["b_enc"] * n, "w_dec": p["w_dec"] / n[:, None]}


def _read_saelens(directory: str, placed: Optional[_Placed], model: _Model) -> List[Dictionary]:
    cfg_path = os.path.join(directory, SAELENS_CFG)
    weights = _need(os.path.join(directory, SAELENS_WEIGHTS))
    c = _saelens_fields(load_json(cfg_path), cfg_path)
    dc, dtype, rescale = _saelens_config(c, cfg_path)
    hook = _field(c, "hook_name", cfg_path, lambda v: isinstance(v, str) or (v is None and placed is not None),
                  "a TransformerLens hook name (or pass host= and layer=)")
    if hook is not None:
        found = (_transcoder_host(hook, _field(c, "hook_name_out", cfg_path, lambda v: isinstance(v, str),
                                               "the transcoder's output hook name"), cfg_path, model)
                 if dc.d_out is not None else _sae_host(hook, model.cfg, cfg_path))
        if placed is not None and placed[:2] != found[:2]:
            raise ValueError(f"{cfg_path} places its dictionary at {found}, not host={placed.host}, layer={placed.layer}")
        placed = found
    tensors = _safetensors(weights)
    if "scaling_factor" in tensors and np.all(tensors["scaling_factor"] == 1):
        del tensors["scaling_factor"]                     # an all-ones leftover of older SAELens files
    params = _params(tensors, dc, _saelens_names(dc), weights, DTYPES[dtype])
    if rescale:
        params = _fold_decoder_norm(params)
    return [_placed(dc, params, placed, model)]


# ---- Gemma Scope ---------------------------------------------------------------------------------

_GEMMA_SCOPE: Names = {"w_enc": ("W_enc", False), "b_enc": ("b_enc", False), "w_dec": ("W_dec", False),
                       "b_dec": ("b_dec", False), "threshold": ("threshold", False)}


def _gemma_scope(path: str, placed: _Placed) -> Dictionary:
    """One Gemma Scope JumpReLU dictionary (W_enc [d_in, F], W_dec [F, d_out]) placed at `placed`."""
    tensors = _npz(_need(path))
    for name in ("W_enc", "W_dec"):
        if name not in tensors or tensors[name].ndim != 2:
            raise ValueError(f"{path}: needs a 2-d tensor {name!r}; found {sorted(tensors)}")
    (d_in, width), d_out = tensors["W_enc"].shape, tensors["W_dec"].shape[1]
    dc = DictConfig("jumprelu", d_in, width, d_out=d_out if placed.host == "transcoder" else None)
    return Dictionary(dc, _params(tensors, dc, _GEMMA_SCOPE, path), placed.host, placed.layer)


def _read_gemma_scope(directory: str, placed: Optional[_Placed], model: _Model) -> List[Dictionary]:
    path = os.path.join(directory, "params.npz")
    if placed is None:
        raise ValueError(f"{path} names no site: pass host= (one of {sorted(HOSTS)}) and layer= to load it")
    return [_gemma_scope(path, placed)]


# ---- circuit-tracer ------------------------------------------------------------------------------


def _layer_file(directory: str, entry, where: str) -> str:
    """The local file of a `transcoders` entry of config.yaml: a path (relative to `directory`) or an
    hf:// URI, read from the same path inside `directory` (a local copy of the repository)."""
    if not isinstance(entry, str):
        raise ValueError(f"{where}: a transcoder's file is a path or hf:// URI, not {entry!r}")
    if entry.startswith("hf://"):
        parts = urlparse(entry).path.lstrip("/").split("/", 1)
        if len(parts) != 2:
            raise ValueError(f"{where}: {entry!r} is not an hf://owner/repo/file URI")
        local = os.path.join(directory, parts[1])
        if not os.path.isfile(local):
            raise FileNotFoundError(f"{local} does not exist ({entry} in {where}; no download is made: put the "
                                    "repository's files beside config.yaml)")
        return local
    return _need(os.path.join(directory, entry))


def _layer_files(directory: str, config: dict, where: str) -> Dict[int, str]:
    """layer -> file of each transcoder: config.yaml's `transcoders` (paths in layer order, or the
    older {layer, filepath} entries), else the directory's layer_{l}.safetensors."""
    listed = config.get("transcoders")
    if listed is None:
        found = {int(m.group(1)): f for f in glob.glob(os.path.join(directory, "layer_*.safetensors"))
                 if (m := re.fullmatch(r"layer_(\d+)\.safetensors", os.path.basename(f)))}
        if not found:
            raise FileNotFoundError(f"{where} lists no transcoders and {directory} has no layer_<l>.safetensors")
        if sorted(found) != list(range(len(found))):
            raise ValueError(f"{directory}: layer files {sorted(found)} are not layers 0..{len(found) - 1}")
        return found
    if not isinstance(listed, list) or not listed:
        raise ValueError(f"{where}: field 'transcoders' is {listed!r}; expected a non-empty list")
    if all(isinstance(e, dict) for e in listed):
        layers = [e.get("layer") for e in listed]
        if sorted(layers) != list(range(len(listed))):
            raise ValueError(f"{where}: transcoder layers {layers} are not 0..{len(listed) - 1}, each once")
        return {e["layer"]: _layer_file(directory, e.get("filepath"), where) for e in listed}
    return {layer: _layer_file(directory, e, where) for layer, e in enumerate(listed)}


def _circuit_tracer_layer(path: str, placed: _Placed, activation: Optional[str], model: _Model) -> Dictionary:
    """One circuit-tracer transcoder (W_enc [F, D], W_dec [F, D] or [D, F], W_skip [D, D] used as
    x @ W_skip.T; JumpReLU where it holds activation_function.threshold [F], as circuit-tracer
    decides), or a Gemma Scope .npz (JumpReLU), at `placed`. config.yaml's `activation`, where given,
    must agree. circuit-tracer's JumpReLU is pre * (pre > threshold), ours relu(pre) where pre >
    threshold: the same for thresholds >= 0, so a negative one is refused."""
    if path.endswith(".npz"):
        d = _gemma_scope(path, placed)
    else:
        tensors = _safetensors(path)
        for name in ("b_enc", "b_dec"):
            if name not in tensors or tensors[name].ndim != 1:
                raise ValueError(f"{path}: needs a 1-d tensor {name!r}; found {sorted(tensors)}")
        width, dm = tensors["b_enc"].shape[0], tensors["b_dec"].shape[0]
        dec_t = "W_dec" in tensors and tensors["W_dec"].shape == (dm, width) != (width, dm)
        names = {"w_enc": ("W_enc", True), "b_enc": ("b_enc", False), "w_dec": ("W_dec", dec_t),
                 "b_dec": ("b_dec", False), "w_skip": ("W_skip", True), "threshold": (CT_THRESHOLD, False)}
        kind = "jumprelu" if CT_THRESHOLD in tensors else "relu"
        dc = DictConfig(kind, dm, width, d_out=dm, skip="W_skip" in tensors)
        d = Dictionary(dc, _params(tensors, dc, names, path), placed.host, placed.layer)
    if activation is not None and activation != d.config.kind:
        raise ValueError(f"{path} holds a {d.config.kind!r} transcoder (by its tensors), but config.yaml says "
                         f"activation {activation!r}")
    if d.config.kind == "jumprelu" and bool((d.params["threshold"] < 0).any()):
        raise ValueError(f"{path}: {int((d.params['threshold'] < 0).sum())} threshold(s) below 0; circuit-tracer's "
                         "JumpReLU pre * (pre > threshold) passes negative pre-activations there, ours "
                         "(relu(pre) where pre > threshold) does not: refused")
    return _placed(d.config, d.params, placed, model)


def _read_circuit_tracer(directory: str, placed: Optional[_Placed], model: _Model) -> List[Dictionary]:
    where = os.path.join(directory, "config.yaml")
    try:
        with open(where) as f:
            config = yaml.safe_load(f)
    except yaml.YAMLError as e:
        raise ValueError(f"{where} is not valid YAML: {e}") from None
    if not isinstance(config, dict):
        raise ValueError(f"{where} must hold a mapping, not {type(config).__name__}")
    if placed is not None:
        raise ValueError(f"{where} places its transcoders itself (feature_input_hook); do not pass host or layer")
    _field(config, "model_kind", where, lambda v: v in (None, "transcoder_set"),
           "'transcoder_set' (per-layer transcoders; cross-layer transcoders are not supported)")
    activation = _field(config, "activation", where, lambda v: v in (None, "relu", "jumprelu"),
                        "'relu' or 'jumprelu' (or absent: the tensors tell)")
    hooks = [_field(config, f"feature_{io}_hook", where, lambda v: isinstance(v, str),
                    "a TransformerLens hook name inside a block") for io in ("input", "output")]
    out = []
    for layer, path in sorted(_layer_files(directory, config, where).items()):
        out.append(_circuit_tracer_layer(path, _transcoder_host(*(f"blocks.{layer}.{h}" for h in hooks), where, model),
                                         activation, model))
    return out


class Format(NamedTuple):
    """A row of `FORMATS`: the file that marks a directory as this format, and its reader
    (directory, placement given by the caller or None, the `_Model`) -> dictionaries."""

    marker: str
    read: Callable[[str, Optional[_Placed], object], List[Dictionary]]


FORMATS: Dict[str, Format] = {
    "SAELens": Format(SAELENS_CFG, _read_saelens),
    "Gemma Scope": Format("params.npz", _read_gemma_scope),
    "circuit-tracer": Format("config.yaml", _read_circuit_tracer),
}


def load(path: str, cfg=None, host: Optional[str] = None, layer: Optional[int] = None, params=None) -> Loaded:
    """The dictionary in `path` (a directory, or the file marking its format: `FORMATS`); a list
    for files holding one per layer (circuit-tracer).

    cfg: the model's `ModelConfig`, when at hand: layers and widths must fit it (`check_fit`).
    params: the model's params, needed (with cfg) by transcoders reading TransformerLens'
    ln2.hook_normalized, before the norm's weight: it is folded in (`fold_norm_input`).
    host, layer: where a file that names no hook (Gemma Scope's params.npz) sits; for a file that
    names its hook they must agree with it.
    """
    if (host is None) != (layer is None):
        raise ValueError(f"pass host and layer together (got host={host!r}, layer={layer!r})")
    placed = None if host is None else _Placed(host, layer)
    if placed is not None and host not in HOSTS:
        raise ValueError(f"unknown host {host!r}; known: {sorted(HOSTS)}")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} does not exist")
    markers = {fmt.marker: name for name, fmt in FORMATS.items()}
    if os.path.isfile(path):
        if os.path.basename(path) not in markers:
            raise ValueError(f"{path}: a dictionary file is one of {sorted(markers)} (or their directory)")
        path, found = os.path.dirname(path) or ".", [markers[os.path.basename(path)]]
    else:
        found = [name for name, fmt in FORMATS.items() if os.path.isfile(os.path.join(path, fmt.marker))]
    if len(found) != 1:
        raise (FileNotFoundError if not found else ValueError)(
            f"{path} holds {'no' if not found else 'more than one'} dictionary format's files "
            f"({found or ''}); expected one of " + ", ".join(f"{f.marker} ({n})" for n, f in FORMATS.items()))
    dicts = FORMATS[found[0]].read(path, placed, _Model(cfg, params))
    if cfg is not None:
        for d in dicts:
            check_fit(d, cfg, f"{path} (layer {d.layer})")
    return dicts[0] if len(dicts) == 1 else dicts


# ---- save ----------------------------------------------------------------------------------------


def save(directory: str, dictionary: Dictionary, model_name: str = "") -> None:
    """Write `dictionary` to `directory` as SAELens files (cfg.json, sae_weights.safetensors) in the
    dtype of its params, which must all share one."""
    d, dc = dictionary, dictionary.config
    transcoder = d.host == "transcoder"
    arch = {v: k for k, v in ARCHITECTURES.items()}.get((dc.kind, transcoder, dc.skip))
    if arch is None:
        raise ValueError(f"SAELens has no {dc.kind!r} {'transcoder' if transcoder else 'SAE'}"
                         f"{' with skip' if dc.skip else ''}; saveable: {sorted(ARCHITECTURES)}")
    if transcoder and dc.subtract_b_dec:
        raise ValueError("a transcoder with subtract_b_dec has no SAELens form (apply_b_dec_to_input is SAE-only)")
    arrays = {n: np.asarray(a) for n, a in d.params.items()}
    dtypes = {a.dtype for a in arrays.values()}
    names = [n for n, dt in DTYPES.items() if not n.startswith("torch.") and dtypes == {np.dtype(dt)}]
    if not names:
        raise ValueError(f"params must share one dtype of {sorted(n for n in DTYPES if '.' not in n)}; got "
                         f"{ {n: str(a.dtype) for n, a in arrays.items()} }")
    theirs = _saelens_names(dc)
    tensors = {theirs[n][0]: np.ascontiguousarray(a.T if theirs[n][1] else a) for n, a in arrays.items()}
    hook_in = _hook(MLP_INPUTS[0], d.layer) if transcoder else hooknames.hook_name(HOSTS[d.host][0], d.layer)
    metadata = {"hook_name": hook_in, "hook_head_index": None, "model_name": model_name,
                "sae_lens_version": SAELENS_LAYOUT, "sae_lens_training_version": SAELENS_LAYOUT}
    config = {"architecture": arch, "d_in": dc.d_in, "d_sae": dc.width, "dtype": names[0], "device": "cpu",
              "apply_b_dec_to_input": dc.subtract_b_dec, "normalize_activations": "none",
              "reshape_activations": "hook_z" if d.host == "head_out" else "none", "metadata": metadata}
    if transcoder:
        metadata["hook_name_out"] = _hook(MLP_OUTPUTS[0], d.layer)
        config["d_out"] = dc.out_dim
    if dc.kind == "topk":
        config.update(k=dc.k, rescale_acts_by_decoder_norm=False)
    storage.check_dir(directory)
    os.makedirs(directory, exist_ok=True)
    storage.write_atomic(os.path.join(directory, SAELENS_WEIGHTS), lambda tmp: save_file(tensors, tmp))
    storage.write_json(os.path.join(directory, SAELENS_CFG), config)
