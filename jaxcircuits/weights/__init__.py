"""Checkpoint loading: HF safetensors directories, llama GGUF files, an on-disk params cache."""

from jaxcircuits.weights.cache import cached_load
from jaxcircuits.weights.gguf_file import load_gguf
from jaxcircuits.weights.hf import load_hf_dir
from jaxcircuits.weights.registry import EMBEDDED, ModelFiles, load_params, resolve

__all__ = ["EMBEDDED", "ModelFiles", "cached_load", "load_gguf", "load_hf_dir", "load_params", "resolve"]
