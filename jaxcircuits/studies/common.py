"""Plumbing the studies share: loading with dtype and checks, unpatched metrics, task batches."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, TypeVar

import jax.numpy as jnp
import numpy as np

import jaxcircuits as jc
from jaxcircuits.bundle import Model
from jaxcircuits.models.config import ModelConfig
from jaxcircuits.weights.registry import load_config

O = TypeVar("O")


@dataclasses.dataclass(frozen=True)
class TaskBatches:
    """A patching task as token batches: source (good) and target (bad) runs, left-padded
    ids/mask [B, T_src] and [B, T_tgt], the target's metric and a one-line description."""

    source_ids: np.ndarray
    source_mask: np.ndarray
    target_ids: np.ndarray
    target_mask: np.ndarray
    metric: Any
    description: str


def load_model(name: str, dtype: str) -> Model:
    """`jc.load(name, dtype)` for a study: the model must have a tokenizer."""
    model = jc.load(name, dtype)
    if model.tokenizer is None:
        raise ValueError(f"{name} has no tokenizer")
    return model


def final_hidden(model: Model, ids, mask, n: int):
    """Final-normed hidden states [B, n, D] of the last n positions of a plain run of ids, mask [B, T]."""
    _, c = jc.forward(model.params, model.cfg, jnp.asarray(ids), jnp.asarray(mask), collect=("final_norm",),
                      return_logits=False)
    return c["final_norm"][:, -n:]


def unpatched_metric(model: Model, ids, mask, metric) -> np.ndarray:
    """The metric [B] of a plain run of ids, mask [B, T]."""
    return np.asarray(metric(model.params, final_hidden(model, ids, mask, metric.n_positions)))


class OptionError(ValueError):
    """A study option (a binary's flag) that does not fit the model or the task."""


def checked(opts: O, check: Callable[[O, ModelConfig], None]) -> O:
    """Run a binary's `check(opts, cfg)` against the model's config, read before any weights are
    converted or anything compiles; a bad flag, path or config becomes absl's one-line UsageError."""
    from absl import app
    try:
        check(opts, load_config(opts.model)[0])
    except (ValueError, FileNotFoundError) as e:
        raise app.UsageError(str(e)) from None
    return opts


def run_reporting_usage(run: Callable[[O], str], opts: O) -> str:
    """`run(opts)`, with an `OptionError` found only once the prompts exist (e.g. a position past
    a prompt's end) reported as absl's one-line UsageError rather than a traceback."""
    from absl import app
    try:
        return run(opts)
    except OptionError as e:
        raise app.UsageError(str(e)) from None


def check_layers(flag: str, layers, cfg: ModelConfig) -> None:
    """ValueError unless every layer index lies in [0, n_layers)."""
    bad = [l for l in layers if not 0 <= l < cfg.n_layers]
    if bad:
        raise OptionError(f"--{flag}={','.join(map(str, layers))}: layer(s) {bad} out of range [0, {cfg.n_layers})")
