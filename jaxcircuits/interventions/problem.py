"""The patching problem: which run is patched, from what, where, and what is measured.

A `PatchingProblem` holds what every patched run of one experiment shares: the target run (computed
once, `TargetRun`), the source aligned to it (`positions.align`), the position weights and the
metric. `engine.patching` runs masks on it (one, differentiably, or a batch); the methods
(attribution, circuits, learned masks) and sweeps all take it.
"""

from __future__ import annotations

from typing import Any

import jax
from flax import struct

from jaxcircuits.interventions import sites
from jaxcircuits.interventions.metrics import check_metric
from jaxcircuits.interventions.sites import Mask, Source
from jaxcircuits.models import transformer as M
from jaxcircuits.models.config import ModelConfig

Array = jax.Array


@struct.dataclass
class TargetRun:
    """The unpatched target run's cached state.

    tokens, attn_mask, pos_ids: [B, T]; resid_pre: [L, B, T, D]; head_out: [L, B, T, H, Dh];
    kv: (k, v) each [L, B, T, K, Dh]; final: the final-normed hidden states [B, T, D] (what a
    mask that patches nothing gives, bit for bit).
    """

    tokens: Array
    attn_mask: Array
    pos_ids: Array
    resid_pre: Array
    head_out: Array
    kv: tuple
    final: Array


def target_run(params, cfg: ModelConfig, tokens, attn_mask=None, pos_ids=None) -> TargetRun:
    """Run the target once, keeping what every patched run shares (inputs: `M.check_inputs`)."""
    tokens, attn_mask, pos_ids = M.check_inputs(cfg, tokens, attn_mask, pos_ids)
    _, cache = M.forward(params, cfg, tokens, attn_mask, pos_ids, return_logits=False,
                         collect=("resid_pre", "head_out", "kv", "final_norm"))
    return TargetRun(tokens, attn_mask, pos_ids, cache["resid_pre"], cache["head_out"], cache["kv"],
                     cache["final_norm"])


@struct.dataclass
class PatchingProblem:
    """One patching experiment: which run is patched, from what, where, and what is measured.

    target: the `TargetRun` [B, T]; source: replacement activations aligned to the target
    (`positions.align`; entries [L, B, T, ...]); pos_w: float32 [B, T] position weights
    (1 = patch); metric: a metric (`interventions.metrics`) of the final hidden states -> [B].
    Build it with `PatchingProblem.make`, which checks the pieces against each other.
    """

    target: TargetRun
    source: Source
    pos_w: Array
    metric: Any

    @classmethod
    def make(cls, target: TargetRun, source: Source, pos_w, metric) -> "PatchingProblem":
        """Check shapes (source entries [L, B, ...] with the target's T positions: `sites.check_source`;
        pos_w [B, T], finite: `sites.check_pos_w`; metric batch B) and build. Source values are checked
        where the masks run can read them (`for_footprint`): NaN elsewhere is harmless."""
        L, (B, T) = target.resid_pre.shape[0], target.tokens.shape
        pos_w = sites.check_pos_w(pos_w, B, T)
        sites.check_source(source, L, B, T)
        for leaf in jax.tree.leaves(metric):
            if getattr(leaf, "ndim", 0) and leaf.shape[0] != B:
                raise ValueError(f"metric {type(metric).__name__} has batch {leaf.shape[0]} (a field of shape "
                                 f"{tuple(leaf.shape)}), expected the target's batch {B} on axis 0")
        return cls(target, dict(source), pos_w, metric)

    def for_footprint(self, cfg: ModelConfig, footprint: Mask) -> "PatchingProblem":
        """The problem with only the source entries the masks of `footprint` read (`sites.footprint`:
        node leaves [L, *units], edges [L, S, R] and [S], nonzero where the masks may patch), checked
        against `cfg` and zero outside the footprint, NaN or inf inside it a ValueError
        (`sites.select_source`). Call it once per batch, outside jit: `run_masks`, `patched_metric`
        and `run_sweep` do. Also checks the metric: token ids within the vocabulary, no padding-only
        rows, its own check (`metrics.check_metric`)."""
        check_metric(self.metric, cfg.vocab_size)
        return self.replace(source=sites.select_source(cfg, self.source, footprint, self.pos_w))
