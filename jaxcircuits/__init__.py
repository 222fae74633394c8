"""jaxcircuits: mechanistic-interpretability sweeps over attention heads in JAX.

Entry points: `load` a model; `forward` / `run_with_cache` / `generate` run it; `Mask` +
`Intervention` patch it; `target_run` + `run_masks` evaluate batches of masks; `run_sweep`
evaluates whole subset families; `jaxcircuits.analysis` charts thresholds and redundancy.
"""

from jaxcircuits.bundle import DEFAULT_MODEL, Model, load
from jaxcircuits.generate import generate, source_at_position
from jaxcircuits.interventions import Intervention, Mask
from jaxcircuits.metrics import AnswerLogProb, AnswerProb, LogitDiff
from jaxcircuits.models.config import ModelConfig
from jaxcircuits.models.transformer import forward, run_with_cache
from jaxcircuits.patching import run_masks, target_run
from jaxcircuits.sweep import run_sweep

__all__ = ["DEFAULT_MODEL", "Model", "load", "generate", "source_at_position", "Intervention", "Mask",
           "AnswerLogProb", "AnswerProb", "LogitDiff", "ModelConfig", "forward", "run_with_cache",
           "run_masks", "target_run", "run_sweep"]
