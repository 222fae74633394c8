"""Activations for training a dictionary: sources of activation chunks and the shuffled buffer.

A source is a deterministic sequence of chunks: `source.chunk(i)` -> float32 [n_i, d_in + d_out]
(an SAE's rows are its input, d_out = 0: the target is the input; a transcoder's rows are its input
then its target), with `d_in`, `d_out` and `fingerprint()` (what made the data, for resuming).

  ModelActivations  token rows run through the model's layers up to the host's (`prefix_cache`), the
                    host's read and write sites at one layer (`core.HOSTS`); rows of the corpus in
                    a fresh permutation each epoch; positions that are padding or the separator
                    token (BOS: every row's position 0, an attention sink with outlying norms, and
                    document boundaries) are dropped.
  ArraySource       activations already at hand [N, d_in + d_out], served in a fresh permutation
                    each epoch.

`Buffer` mixes chunks as SAE training does: it holds `size` activations in random order and serves
batches from its front half; when the next batch would reach past the middle, the served rows are
overwritten by new chunks (a chunk's rows beyond the space left are dropped) and the whole buffer is
shuffled again. Its state (`BufferState`: the rows, the read cursor, the next chunk index and the
number of shuffles, which seeds each shuffle) is plain numpy: saved with a training checkpoint, it
resumes the stream bit-identically.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional, Tuple

import jax
import numpy as np
from flax import struct

from jaxcircuits import checks, storage
from jaxcircuits.dictionaries import core
from jaxcircuits.interventions import sites
from jaxcircuits.models import transformer
from jaxcircuits.models.config import ModelConfig


def _epoch_order(n: int, seed: int, start: int, count: int) -> np.ndarray:
    """int [count]: items start .. start + count - 1 of the sequence that visits range(n) in a fresh
    permutation per epoch (epoch e's order from the seed and e)."""
    j = np.arange(start, start + count)
    epochs = j // n
    out = np.empty(count, np.int64)
    for e in np.unique(epochs):
        sel = epochs == e
        out[sel] = np.random.default_rng((seed, int(e))).permutation(n)[j[sel] % n]
    return out


@dataclasses.dataclass(frozen=True, eq=False)
class ArraySource:
    """Chunks of `rows` activations from data [N, d_in + d_out] (float32), each epoch in a fresh
    permutation from `seed`."""

    data: np.ndarray
    d_in: int
    rows: int = 1024
    seed: int = 0

    def __post_init__(self):
        data = np.asarray(self.data, np.float32)
        if data.ndim != 2 or not len(data) or not np.isfinite(data).all():
            raise ValueError(f"data must be a finite float array [N, d_in + d_out] with N > 0, got shape {data.shape}")
        checks.count("d_in", self.d_in)
        if self.d_in > data.shape[1]:
            raise ValueError(f"d_in={self.d_in} exceeds the data's width {data.shape[1]}")
        checks.count("rows", self.rows)
        object.__setattr__(self, "data", data)

    @property
    def d_out(self) -> int:
        return self.data.shape[1] - self.d_in

    def chunk(self, i: int) -> np.ndarray:
        return self.data[_epoch_order(len(self.data), self.seed, i * self.rows, self.rows)]

    def fingerprint(self) -> str:
        return storage.fingerprint("ArraySource", self.data, self.d_in, self.rows, self.seed)


def host_sites(host: str):
    """(read, write) cache entries of a `core.HOSTS` host; ValueError for an unknown host or one
    whose entries this model run does not record."""
    if host not in core.HOSTS:
        raise ValueError(f"unknown dictionary host {host!r}; known: {sorted(core.HOSTS)}")
    missing = [s for s in core.HOSTS[host] if s not in sites.CACHE_SITES]
    if missing:
        raise ValueError(f"host {host!r} reads cache entries {missing} that the model does not record "
                         f"(known entries: {sites.CACHE_SITES})")
    return core.HOSTS[host]


def flat(cache_entry, layer: int):
    """One layer's activations [B, T, d] of a cache entry [L, B, T, ...] (head_out's heads
    concatenated: [B, T, H * Dh], TransformerLens' hook_z)."""
    a = cache_entry[layer]
    return a.reshape(*a.shape[:2], -1)


@functools.partial(jax.jit, static_argnames=("cfg", "stop", "collect"))
def prefix_cache(params, cfg: ModelConfig, tokens, attn_mask, stop: int, collect: Tuple[str, ...]):
    """The cache entries `collect` [stop, B, T, ...] of a plain run of the model's first `stop` layers
    on tokens, attn_mask [B, T] (the layers above, the final norm and the unembedding are skipped)."""
    pos = transformer.default_positions(attn_mask)
    layers = jax.tree.map(lambda a: a[:stop], params["layers"])
    x = transformer.embed(params, cfg, tokens, pos)
    return transformer.run_layers(layers, cfg, x, transformer.Context(pos, attn_mask), collect=collect)[2]


@dataclasses.dataclass(frozen=True, eq=False)
class ModelActivations:
    """Chunks of a model's activations at `host` (a `core.HOSTS` key) of `layer`: chunk i runs
    `rows_per_chunk` token rows (`tokens` int [N, T], e.g. `corpus.token_rows`; `attn_mask` [N, T],
    default all real) and keeps the real, non-separator positions: [n_i, d_in + d_out] float32
    (d_out = 0 for an SAE: its read and write site are one)."""

    params: dict
    cfg: ModelConfig
    tokens: np.ndarray
    host: str
    layer: int
    separator: int
    rows_per_chunk: int = 8
    attn_mask: Optional[np.ndarray] = None
    seed: int = 0

    def __post_init__(self):
        host_sites(self.host)
        checks.count("layer", self.layer, minimum=0)
        if self.layer >= self.cfg.n_layers:
            raise ValueError(f"layer={self.layer}: the model has {self.cfg.n_layers} layers")
        checks.count("rows_per_chunk", self.rows_per_chunk)
        tokens, mask, _ = transformer.check_inputs(self.cfg, self.tokens, self.attn_mask)
        object.__setattr__(self, "tokens", np.asarray(tokens))
        object.__setattr__(self, "attn_mask", np.asarray(mask))
        if not ((self.attn_mask > 0) & (self.tokens != self.separator)).any():
            raise ValueError(f"tokens (shape {self.tokens.shape}) hold no real position other than the separator "
                             f"{self.separator}: the stream would yield no activations")
        widths = [self._width(s) for s in self.sites]
        object.__setattr__(self, "_widths", widths)

    @property
    def sites(self):
        read, write = host_sites(self.host)
        return (read,) if read == write else (read, write)

    def _width(self, site: str) -> int:
        """The width of one position of `site`'s cache entry [L, B, T, ...] (flattened, `flat`)."""
        run = lambda: transformer.forward_fn(self.params, self.cfg, self.tokens[:1, :2], collect=(site,),
                                             return_logits=False)[1][site]
        return int(np.prod(jax.eval_shape(run).shape[3:], dtype=int))

    @property
    def d_in(self) -> int:
        return self._widths[0]

    @property
    def d_out(self) -> int:
        return self._widths[1] if len(self._widths) > 1 else 0

    def run(self, rows: np.ndarray):
        """(activations float32 [len(rows), T, d_in + d_out], keep bool [len(rows), T]: the real,
        non-separator positions) of token rows `rows` (indices into `tokens`)."""
        tokens, mask = self.tokens[rows], self.attn_mask[rows]
        cache = prefix_cache(self.params, self.cfg, tokens, mask, self.layer + 1, self.sites)
        acts = np.concatenate([np.asarray(flat(cache[s], self.layer), np.float32) for s in self.sites], axis=-1)
        return acts, (mask > 0) & (tokens != self.separator)

    def chunk(self, i: int) -> np.ndarray:
        acts, keep = self.run(_epoch_order(len(self.tokens), self.seed, i * self.rows_per_chunk, self.rows_per_chunk))
        return acts[keep]

    def fingerprint(self) -> str:
        return storage.fingerprint("ModelActivations", self.params, repr(self.cfg), self.tokens, self.attn_mask,
                                   self.host, self.layer, self.separator, self.rows_per_chunk, self.seed)


@struct.dataclass
class BufferState:
    """rows float32 [size, d_in + d_out] in shuffled order; counters int64 [3]: the read cursor,
    the next chunk index, the number of shuffles so far."""

    rows: np.ndarray
    counters: np.ndarray


@dataclasses.dataclass(frozen=True)
class Buffer:
    """The shuffled buffer of `size` activations over `source` (see the module doc); batches of
    `batch` rows, at most size / 2."""

    source: object
    size: int
    batch: int
    seed: int = 0

    def __post_init__(self):
        checks.count("batch", self.batch)
        checks.count("size", self.size)
        if 2 * self.batch > self.size:
            raise ValueError(f"buffer size={self.size} must hold at least two batches of {self.batch}")

    def _fill(self, rows: np.ndarray, next_chunk: int) -> int:
        """Overwrite `rows` (a view) with chunks from `next_chunk` on; returns the next chunk index."""
        start = 0
        while start < len(rows):
            a = self.source.chunk(next_chunk)
            next_chunk += 1
            n = min(len(a), len(rows) - start)
            rows[start:start + n] = a[:n]
            start += n
        return next_chunk

    def _shuffled(self, rows: np.ndarray, next_chunk: int, shuffles: int) -> BufferState:
        perm = np.random.default_rng((self.seed, shuffles)).permutation(len(rows))
        return BufferState(rows[perm], np.asarray([0, next_chunk, shuffles + 1], np.int64))

    def init(self) -> BufferState:
        """A full buffer, shuffled."""
        rows = np.empty((self.size, self.source.d_in + self.source.d_out), np.float32)
        return self._shuffled(rows, self._fill(rows, 0), 0)

    def next(self, state: BufferState):
        """(batch float32 [batch, d_in + d_out], the next state); `state` itself is not changed."""
        cursor, next_chunk, shuffles = (int(c) for c in state.counters)
        if cursor + self.batch > self.size // 2:
            rows = state.rows.copy()
            state = self._shuffled(rows, self._fill(rows[:cursor], next_chunk), shuffles)
            cursor, next_chunk, shuffles = (int(c) for c in state.counters)
        return (state.rows[cursor:cursor + self.batch],
                BufferState(state.rows, np.asarray([cursor + self.batch, next_chunk, shuffles], np.int64)))
