"""jaxcircuits: mechanistic-interpretability sweeps over attention heads in JAX.

Entry points: `load` a model; `forward` / `run_with_cache` / `generate` run it; `Mask` +
`Intervention` patch it (sites: `jaxcircuits.interventions.sites`); `target_run` + `PatchingProblem` state an
experiment, `patched_metric` evaluates one mask (differentiably), `run_masks` a batch of masks and
`run_sweep` whole subset families; `jaxcircuits.stats` charts thresholds and redundancy
(`stats.summary.summarize`).
Where each concept lives (to add a site, model feature, metric or subset family): README.md here.
"""

from jaxcircuits.bundle import DEFAULT_MODEL, Model, load
from jaxcircuits.engine.patching import patched_metric, run_masks
from jaxcircuits.engine.runner import RunOptions
from jaxcircuits.engine.sweep import run_sweep
from jaxcircuits.interventions.metrics import AnswerLogProb, AnswerProb, LogitDiff
from jaxcircuits.interventions.positions import decode_intervention, source_at_position
from jaxcircuits.interventions.problem import PatchingProblem, target_run
from jaxcircuits.interventions.sites import Intervention, Mask
from jaxcircuits.models.config import ModelConfig
from jaxcircuits.models.generate import generate
from jaxcircuits.models.transformer import forward, run_with_cache

__all__ = ["DEFAULT_MODEL", "Model", "load", "generate", "decode_intervention", "source_at_position",
           "Intervention", "Mask", "AnswerLogProb", "AnswerProb", "LogitDiff", "ModelConfig", "forward",
           "run_with_cache", "PatchingProblem", "patched_metric", "run_masks", "target_run", "run_sweep", "RunOptions"]
