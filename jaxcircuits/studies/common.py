"""Plumbing the studies share: loading with dtype and checks, unpatched metrics, task batches."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp
import numpy as np

import jaxcircuits as jc
from jaxcircuits.bundle import Model


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
