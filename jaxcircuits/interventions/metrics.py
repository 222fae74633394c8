"""Metrics: pure functions of the final-normed hidden states at the last few positions.

A metric is a `flax.struct` dataclass holding its per-prompt targets (token ids, padded with -1)
and a static `n_positions`: how many final positions it reads. Calling it on
h [B, n_positions, D] returns a score per prompt [B]. Metrics unembed only the vocabulary columns
they need, except where a normaliser over the whole vocabulary is required.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxcircuits.models.transformer import logits_of, unembed_matrix

Array = jax.Array


def check_metric(metric, vocab_size: int) -> None:
    """Raise ValueError unless the metric can mean something: every integer field (token ids, -1 =
    padding, rows on axis 0) lies in [-1, vocab_size) (an id past the vocabulary would be clamped
    silently by the gather) with an id in every row, and the metric's own `check()` passes where it
    has one. Fields that are tracers are skipped (checked where concrete, outside jit)."""
    if not dataclasses.is_dataclass(metric):
        return
    name = type(metric).__name__
    for f in dataclasses.fields(metric):
        a = getattr(metric, f.name)
        if isinstance(a, jax.core.Tracer) or not jnp.issubdtype(jnp.result_type(a), jnp.integer):
            continue
        a = np.asarray(a)
        if a.size and (a.min() < -1 or a.max() >= vocab_size):
            raise ValueError(f"metric {name}.{f.name} holds token ids in [{a.min()}, {a.max()}]; "
                             f"expected [0, {vocab_size}) or -1 for padding")
        empty = np.flatnonzero((a.reshape(len(a), -1) < 0).all(-1)) if a.ndim else []
        if len(empty):
            raise ValueError(f"metric {name}.{f.name} row(s) {empty.tolist()[:10]} hold only padding (-1): "
                             "every prompt needs its token ids")
    if hasattr(metric, "check") and not any(isinstance(a, jax.core.Tracer) for a in jax.tree.leaves(metric)):
        metric.check()


def pad_ids(rows: Sequence[Sequence[int]]) -> np.ndarray:
    """Ragged token-id lists -> int32 [B, G] padded with -1."""
    g = max(len(r) for r in rows)
    out = np.full((len(rows), g), -1, np.int32)
    for i, r in enumerate(rows):
        if not len(r):
            raise ValueError(f"prompt {i}: empty token set")
        out[i, :len(r)] = r
    return out


def _set_logsumexp(params, h: Array, ids: Array) -> Array:
    """log sum_{v in ids} exp(logit_v) for h [B, D], ids [B, G] (-1 = padding) -> [B]."""
    lg = logits_of(params, h[:, None, :], jnp.maximum(ids, 0)[:, None, :])[:, 0]
    return jax.nn.logsumexp(jnp.where(ids >= 0, lg, -jnp.inf), axis=-1)


@struct.dataclass
class LogitDiff:
    """log P(good set) - log P(bad set) at the last position (plain logit difference for single
    tokens): good, bad int32 [B, G]."""

    good: Array
    bad: Array
    n_positions: int = struct.field(pytree_node=False, default=1)

    def __call__(self, params, h: Array) -> Array:
        h = h[:, -1]
        return _set_logsumexp(params, h, self.good) - _set_logsumexp(params, h, self.bad)

    def check(self) -> None:
        """ValueError where a row's good and bad token sets are equal (the metric is identically 0)."""
        same = [b for b, (g, w) in enumerate(zip(np.asarray(self.good), np.asarray(self.bad)))
                if set(g[g >= 0].tolist()) == set(w[w >= 0].tolist())]
        if same:
            raise ValueError(f"metric LogitDiff: the good and bad token sets are equal on row(s) {same[:10]} "
                             f"(row {same[0]}: {sorted(set(np.asarray(self.good)[same[0]].tolist()) - {-1})}), so "
                             "the logit difference is identically 0: the answers must differ in their first token")


@struct.dataclass
class AnswerProb:
    """Total probability of a token set at the last position: ids int32 [B, G]."""

    ids: Array
    n_positions: int = struct.field(pytree_node=False, default=1)

    def __call__(self, params, h: Array) -> Array:
        h = h[:, -1]
        full = jax.nn.logsumexp(logits_of(params, h), axis=-1)
        return jnp.exp(_set_logsumexp(params, h, self.ids) - full)


@struct.dataclass
class DemeanedLogit:
    """The logit of a token minus the mean logit over the vocabulary, at the last position: ids int32
    [B, 1] (an attribution graph's logit node, `methods.graphs`; before any final soft-cap)."""

    ids: Array
    n_positions: int = struct.field(pytree_node=False, default=1)

    def __call__(self, params, h: Array) -> Array:
        w = unembed_matrix(params)
        h = h[:, -1].astype(jnp.float32)
        cols = jnp.take(w, self.ids[:, 0], axis=1).T.astype(jnp.float32)          # [B, D]
        return jnp.einsum("bd,bd->b", h, cols) - h @ w.astype(jnp.float32).mean(1)


@struct.dataclass
class AnswerLogProb:
    """Teacher-forced log-probability of an answer continuation already appended to the prompt.

    answer int32 [B, A]: the final A tokens of each row (left-padded with -1 when shorter); the
    metric reads the A + 1 final positions and sums log p(answer_i | prefix).
    """

    answer: Array
    n_positions: int = struct.field(pytree_node=False, default=2)

    def __call__(self, params, h: Array) -> Array:
        logp = jax.nn.log_softmax(logits_of(params, h[:, :-1]), axis=-1)      # [B, A, V]
        tok = jnp.take_along_axis(logp, jnp.maximum(self.answer, 0)[..., None], axis=-1)[..., 0]
        return jnp.where(self.answer >= 0, tok, 0.0).sum(-1)


def answer_log_prob(answers: Sequence[Sequence[int]]) -> AnswerLogProb:
    """Build `AnswerLogProb` from per-prompt answer token lists (left-padded to equal length)."""
    a = max(len(r) for r in answers)
    ids = np.full((len(answers), a), -1, np.int32)
    for i, r in enumerate(answers):
        ids[i, a - len(r):] = r
    return AnswerLogProb(answer=jnp.asarray(ids), n_positions=a + 1)


def first_distinguishing(good: Sequence[int], bad: Sequence[int]):
    """Split two answers' token ids at their first differing token.

    Returns (shared_prefix, good_token, bad_token): append the prefix to the prompt and compare
    the two tokens with `LogitDiff`. Raises if one answer is a prefix of the other.
    """
    n = 0
    while n < min(len(good), len(bad)) and good[n] == bad[n]:
        n += 1
    if n == len(good) or n == len(bad):
        raise ValueError(f"answers {list(good)} and {list(bad)} do not differ at a shared position")
    return list(good[:n]), good[n], bad[n]
