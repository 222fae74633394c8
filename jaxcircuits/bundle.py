"""`load`: a model's config, params and tokenizer in one bundle, from a name or a local path."""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxcircuits.generate import generate
from jaxcircuits.models.config import ModelConfig
from jaxcircuits.tokenize import Tokenizer, load_tokenizer
from jaxcircuits.weights.registry import ModelSource, load_params

DEFAULT_MODEL = "smollm2-135m-instruct"


@dataclasses.dataclass
class Model:
    """cfg: static config; params: the params pytree (jax arrays); tokenizer: `Tokenizer` or None
    when the checkpoint has none; source: what the name resolved to."""

    cfg: ModelConfig
    params: dict
    tokenizer: Optional[Tokenizer]
    source: ModelSource

    def complete(self, prompts: Sequence[str], max_new_tokens: int = 20, **kw) -> list:
        """Greedy completions (text after each prompt, stopped at EOS) of raw prompt strings;
        kw go to `generate` (prefill / decode interventions)."""
        if self.tokenizer is None:
            raise ValueError(f"{self.source.name} has no tokenizer")
        ids, mask = self.tokenizer.batch(list(prompts))
        return self.complete_ids(ids, mask, max_new_tokens, **kw)

    def complete_ids(self, ids, mask, max_new_tokens: int = 20, **kw) -> list:
        """Greedy completions as text of left-padded token batches ids, mask [B, T]."""
        out = np.asarray(generate(self.params, self.cfg, ids, mask, max_new_tokens, **kw))
        eos = self.tokenizer.eos_token_id
        texts = []
        for row in out:
            stop = np.flatnonzero(row == eos)
            texts.append(self.tokenizer.decode(row[:stop[0]] if len(stop) else row))
        return texts


def load(name_or_path: str = DEFAULT_MODEL, dtype=jnp.float32, cache: bool = True) -> Model:
    """Load a model: the embedded default 'smollm2-135m-instruct', a local HF checkpoint directory,
    a .gguf file, or an HF model id already in the local HF hub cache (never downloaded).

    dtype: float32 (parity) or bfloat16 (speed on accelerators), or its name (`models.params.PARAM_DTYPES`); any other
    raises ValueError before anything is read. cache: keep converted params in the on-disk cache so
    the next load is fast.
    """
    cfg, params, source = load_params(name_or_path, dtype, cache)
    tokenizer = load_tokenizer(source.tokenizer_files[0] if source.format == "gguf" else source.path) \
        if source.tokenizer_files else None
    return Model(cfg, jax.tree.map(jnp.asarray, params), tokenizer, source)
