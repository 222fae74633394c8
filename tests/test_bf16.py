"""The bf16 path on real weights: SmolLM2 loaded in bfloat16 (params and activations; norms,
softmax and logits in float32) patches like float32 within a stated tolerance."""

import numpy as np
import pytest

import jaxcircuits as jc
from jaxcircuits.interventions import positions as P
from jaxcircuits.interventions.metrics import LogitDiff
from jaxcircuits.models.transformer import run_with_cache
from jaxcircuits.interventions.problem import PatchingProblem, target_run
from jaxcircuits.engine.patching import run_masks
from jaxcircuits.interventions.sites import Mask

# Tolerance of a bf16 logit difference against fp32: bf16 keeps 8 mantissa bits (relative step
# 2^-8 = 0.4%) in the residual stream over 30 layers. Here the metric is ~7.3 and the worst
# difference measured 0.08 (2026-11-27, CPU); the bound is 0.25 (3.4% of the metric).
ATOL = 0.25
LAYER = 15


@pytest.fixture(scope="module")
def both():
    return jc.load(), jc.load(dtype="bfloat16")


def _head_patching(model):
    """Metric [H + 1, 1]: each head of LAYER alone, then all of them, patched from the source prompt
    at every position; plus the unpatched target and source metrics."""
    tok, cfg = model.tokenizer, model.cfg
    tgt, src = tok.encode("The capital of France is"), tok.encode("The capital of Italy is")
    assert len(tgt) == len(src)
    good, bad = tok.encode(" Paris", add_special_tokens=False), tok.encode(" Rome", add_special_tokens=False)
    metric = LogitDiff(good=np.array([good[:1]]), bad=np.array([bad[:1]]))
    _, cache = run_with_cache(model.params, cfg, np.array([src]), sites=("head_out",))
    problem = PatchingProblem.make(target_run(model.params, cfg, np.array([tgt])), cache,
                                   P.select("all", np.ones((1, len(tgt)))), metric)
    m = np.zeros((cfg.n_heads + 1, cfg.n_layers, cfg.n_heads), np.float32)
    m[np.arange(cfg.n_heads), LAYER, np.arange(cfg.n_heads)] = 1.0
    m[-1, LAYER] = 1.0
    return run_masks(model.params, cfg, problem, Mask(head_out=m), chunk_size=cfg.n_heads + 1)


def test_bf16_params_and_activations(both):
    full, half = both
    assert full.params["layers"]["q"]["w"].dtype == np.float32
    assert half.params["layers"]["q"]["w"].dtype.name == "bfloat16"


def test_bf16_head_patching_matches_fp32(both):
    full, half = (np.asarray(_head_patching(m)) for m in both)
    assert half.dtype == np.float32                       # metrics come out in float32
    worst = float(np.abs(half - full).max())
    assert worst < ATOL, f"bf16 vs fp32 worst |metric difference| {worst:.3f} (fp32 values {full.ravel()})"
    assert np.abs(full).min() > 10 * ATOL                  # the tolerance is small against the metric
    print(f"bf16 vs fp32 worst |logit difference|: {worst:.3f} over {len(full)} patched runs")
