"""`load`: a model's config, params and tokenizer in one bundle, from a name or a local path."""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np

from jaxcircuits.interventions import hooknames
from jaxcircuits.models.generate import generate
from jaxcircuits.models import transformer as M
from jaxcircuits.models.config import ModelConfig
from jaxcircuits.interventions.sites import Intervention, cache_entries
from jaxcircuits.weights.tokenize import Tokenizer, load_tokenizer
from jaxcircuits.models.params import param_dtype
from jaxcircuits.weights.registry import ModelFiles, load_config, load_params

DEFAULT_MODEL = "smollm2-135m-instruct"


@dataclasses.dataclass
class Model:
    """cfg: static config; params: the params pytree (jax arrays); tokenizer: `Tokenizer` or None
    when the checkpoint has none; files: what the name resolved to.

    TransformerLens-style entry points: `to_tokens`, `to_str_tokens`, `run_with_cache` (text in,
    cache out, optionally under TransformerLens hook names), `patched` (text in, patched logits out)."""

    cfg: ModelConfig
    params: dict
    tokenizer: Optional[Tokenizer]
    files: ModelFiles

    def _tokenizer(self) -> Tokenizer:
        if self.tokenizer is None:
            raise ValueError(f"{self.files.name} has no tokenizer")
        return self.tokenizer

    def to_tokens(self, text: Union[str, Sequence[str]], add_special_tokens: bool = True) -> np.ndarray:
        """ids int32 [B, T] of a string (B = 1) or a list of strings, left-padded (`Tokenizer.batch`:
        every prompt ends at the last column); the padding mask is `self.tokenizer.batch(...)[1]`."""
        return self._tokenizer().batch([text] if isinstance(text, str) else list(text), add_special_tokens)[0]

    def to_str_tokens(self, text, add_special_tokens: bool = True) -> list:
        """The text of each token: of a string or 1-D ids -> [str]; of a list of strings or 2-D ids
        (padding included) -> one list per row."""
        tok = self._tokenizer()
        if isinstance(text, str):
            return [tok.token_str(i) for i in tok.encode(text, add_special_tokens)]
        if isinstance(text, (list, tuple)) and all(isinstance(t, str) for t in text):
            return [self.to_str_tokens(t, add_special_tokens) for t in text]
        ids = np.asarray(text)
        return [tok.token_str(int(i)) for i in ids] if ids.ndim == 1 else [self.to_str_tokens(r) for r in ids]

    def run_with_cache(self, inputs, attn_mask=None, sites: Optional[Sequence[str]] = None,
                       hook_names: bool = False) -> Tuple[jax.Array, dict]:
        """(logits [B, T, V], cache) of a plain run (`jaxcircuits.run_with_cache`, inputs checked) of a
        string, a list of strings (left-padded, with their mask) or ids [B, T] (attn_mask defaults to
        all ones: padded ids from `to_tokens` of several prompts need theirs, `tokenizer.batch(...)[1]`).
        The cache holds `sites` (default: every entry the model records, `sites.cache_entries`) stacked
        [L, B, ...] under our names, or with hook_names=True one array
        per layer under TransformerLens hook names (`hooknames.to_hook_dict`; 'kv' left out)."""
        entries = cache_entries(self.cfg) if sites is None else tuple(sites)
        logits, cache = M.run_with_cache(self.params, self.cfg, *self._batch(inputs, attn_mask), sites=entries)
        return logits, hooknames.to_hook_dict(cache, self.cfg) if hook_names else cache

    def patched(self, inputs, intervention: Intervention, attn_mask=None,
                sites: Sequence[str] = ()) -> Tuple[jax.Array, dict]:
        """(logits [B, T, V], cache of `sites`) of `inputs` (as `run_with_cache` takes them) patched
        by `intervention` (`jc.Intervention`: a mask [L, ...], its source aligned to these inputs,
        position weights [B, T]), checked as `jc.forward` checks it."""
        return M.forward(self.params, self.cfg, *self._batch(inputs, attn_mask), intervention=intervention,
                         collect=tuple(sites))

    def _batch(self, inputs, attn_mask=None):
        """(tokens [B, T], attn_mask [B, T] or None) of a string, a list of strings (left-padded) or ids."""
        if isinstance(inputs, str) or (isinstance(inputs, (list, tuple)) and inputs and isinstance(inputs[0], str)):
            inputs, attn_mask = self._tokenizer().batch([inputs] if isinstance(inputs, str) else list(inputs))
        return jnp.atleast_2d(jnp.asarray(inputs)), None if attn_mask is None else jnp.asarray(attn_mask)

    def complete(self, prompts: Sequence[str], max_new_tokens: int = 20, **kw) -> list:
        """Greedy completions (text after each prompt, stopped at EOS) of raw prompt strings;
        kw go to `generate` (prefill / decode interventions)."""
        ids, attn_mask = self._tokenizer().batch(list(prompts))
        return self.complete_ids(ids, attn_mask, max_new_tokens, **kw)

    def complete_ids(self, ids, attn_mask, max_new_tokens: int = 20, **kw) -> list:
        """Greedy completions as text of left-padded token batches ids, attn_mask [B, T]."""
        out = np.asarray(generate(self.params, self.cfg, ids, attn_mask, max_new_tokens, **kw))
        eos = self.tokenizer.eos_token_id
        texts = []
        for row in out:
            stop = np.flatnonzero(row == eos)
            texts.append(self.tokenizer.decode(row[:stop[0]] if len(stop) else row))
        return texts


def load(name_or_path: str = DEFAULT_MODEL, dtype=jnp.float32, cache: bool = True) -> Model:
    """Load a model: the embedded default 'smollm2-135m-instruct', a local HF checkpoint directory,
    a .gguf file, an alias ('gpt2', 'llama-3.1-8b-instruct', ...: `weights.registry.ALIASES`) or an
    HF model id 'org/name', from the local HF hub cache or else downloaded (`weights.hub`; not with
    HF_HUB_OFFLINE=1).

    dtype: float32 (parity) or bfloat16 (speed on accelerators), or its name (`models.params.PARAM_DTYPES`); any other
    raises ValueError before anything is read. cache: keep converted params in the on-disk cache so
    the next load is fast. A tokenizer with more ids than the model's vocabulary is a ValueError
    naming both sizes (a model with more rows than the tokenizer has ids, padding, is fine).
    """
    param_dtype(dtype)                                       # before anything is read
    cfg, files = load_config(name_or_path)
    tokenizer = load_tokenizer(files.tokenizer_files[0] if files.format == "gguf" else files.path) \
        if files.tokenizer_files else None
    if tokenizer is not None and tokenizer.vocab_size > cfg.vocab_size:    # before the weights are converted
        raise ValueError(f"{files.path}: the tokenizer has {tokenizer.vocab_size} ids but the model's embedding "
                         f"only {cfg.vocab_size} rows: ids >= {cfg.vocab_size} have no embedding; use the "
                         "tokenizer the model was trained with")
    cfg, params, files = load_params(name_or_path, dtype, cache)
    return Model(cfg, jax.tree.map(jnp.asarray, params), tokenizer, files)
