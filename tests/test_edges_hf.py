"""The edge site against HF hooks (`hf_reference.patch_path`): Wang-style path patching (senders
patched, everything else frozen, only the receivers' inputs changed) on tiny GPT-2 and GQA Llama,
and on the embedded SmolLM2."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxcircuits as jc
from jaxcircuits.engine.patching import patched_hidden, patched_metric, run_masks
from jaxcircuits.interventions import edges, sites
from jaxcircuits.interventions.sites import Mask
from jaxcircuits.interventions.metrics import LogitDiff
from jaxcircuits.models.config import ModelConfig
from jaxcircuits.models.transformer import forward, logits_of, run_with_cache
from jaxcircuits.interventions.problem import PatchingProblem, target_run
from tests import hf_reference as ref
from tests.conftest import random_tokens
from tests.test_smollm2 import ATOL as SMOLLM2_ATOL

ATOL = 1e-4
B, T = 2, 8
GOOD, BAD = [5, 7], [9, 11]

# (senders, receivers) as g.path_mask takes them; labels valid in both tiny models (GPT-2: 4 heads =
# 4 KV heads; llama_gqa: 8 heads, 2 KV heads). One edge each:
SINGLE = {
    "embed->q": (["embed"], ["L1H2.q"]),
    "head->k later layer": (["L0H1"], ["L2K1.k"]),
    "head->v": (["L0H3"], ["L1K0.v"]),
    "head->own MLP": (["L1H2"], ["L1MLP"]),
    "MLP->q": (["L0MLP"], ["L2H3.q"]),
    "head->logits": (["L1H0"], ["logits"]),
    "MLP->logits": (["L2MLP"], ["logits"]),
}
# Wang et al.: senders in one layer into receivers of one later layer (a head label 'LlHh' as a
# receiver is its q input and its KV head's k and v inputs).
MULTI = {
    "2 heads->q,k,MLP": (["L0H0", "L0H2"], ["L2H1.q", "L2K1.k", "L2MLP"]),
    "head+MLP->head": (["L1H3", "L1MLP"], ["L2H3"]),
}
CASES = {**SINGLE, **MULTI}
# SmolLM2 (30 layers, 9 heads, 3 KV heads): edges whose effect on the logits is far above the
# XLA-vs-torch noise (>= 1e-2 on "The capital of France is" <- "... Italy is").
SMOLLM2_CASES = {
    "head->own MLP": (["L8H1"], ["L8MLP"]),
    "MLP->q": (["L5MLP"], ["L12H7.q"]),
    "embed->v": (["embed"], ["L3K2.v"]),
}


@dataclasses.dataclass(frozen=True)
class Setup:
    """One target/source pair on one model, in both implementations."""

    hf: object                  # the HF model (reference)
    cfg: ModelConfig
    params: dict
    tgt: np.ndarray             # target tokens [B, T]
    hf_source: dict             # ref.sites of the source run
    problem: PatchingProblem    # metric reads all T positions (LogitDiff at the last one)
    plain: np.ndarray           # our unpatched logits [B, T, V]
    hf_plain: np.ndarray        # HF's unpatched logits [B, T, V]
    pos_w: np.ndarray           # [B, T]


def _setup(hf, cfg, params, tgt, src, pos_w, good, bad) -> Setup:
    _, cache = run_with_cache(params, cfg, src, sites=sites.EDGE_SOURCE)
    metric = LogitDiff(jnp.asarray(good, jnp.int32)[:, None], jnp.asarray(bad, jnp.int32)[:, None],
                       n_positions=tgt.shape[1])
    problem = PatchingProblem.make(target_run(params, cfg, tgt), cache, pos_w, metric)
    plain = np.asarray(forward(params, cfg, jnp.asarray(tgt))[0])
    return Setup(hf, cfg, params, tgt, ref.sites(hf, src, pattern=False), problem, plain,
                 ref.run(hf, tgt).logits.numpy(), pos_w)


@functools.partial(jax.jit, static_argnames="cfg")
def _edge_logits(params, cfg, problem, mask):
    """Logits [B, T, V] of the edge-patched run (patched_hidden + the unembedding)."""
    return logits_of(params, patched_hidden(params, cfg, problem, Mask(edges=mask)))


def _ref_receivers(cfg, receivers):
    """HF-hook receiver labels: a head 'LlHh' -> its q and its KV head's k and v inputs."""
    out = []
    for r in receivers:
        if r.startswith("L") and "H" in r and "." not in r:
            l, h = r[1:].split("H")
            k = int(h) // (cfg.n_heads // cfg.n_kv_heads)
            out += [f"{r}.q", f"L{l}K{k}.k", f"L{l}K{k}.v"]
        else:
            out.append(r)
    return out


def _mask(s: Setup, senders, receivers):
    """The path mask, checked to hold exactly the named edges."""
    g = edges.EdgeGraph.of(s.cfg)
    mask = g.path_mask(senders, receivers)
    assert float(g.flat(mask).sum()) == len(senders) * len(_ref_receivers(s.cfg, receivers))
    return mask


def _hf_patched(s: Setup, senders, receivers):
    """HF logits [B, T, V] with the path senders -> receivers patched by hooks."""
    with ref.patch_path(s.hf, senders, _ref_receivers(s.cfg, receivers), s.hf_source, s.pos_w):
        return ref.run(s.hf, s.tgt).logits.numpy()


def _assert_path_patch_matches(s: Setup, senders, receivers):
    ours = np.asarray(_edge_logits(s.params, s.cfg, s.problem, _mask(s, senders, receivers)))
    np.testing.assert_allclose(ours, _hf_patched(s, senders, receivers), atol=ATOL, rtol=0)
    effect = float(np.abs(ours - s.plain).max())
    assert effect > 20 * ATOL, f"path {senders} -> {receivers} changes the logits by only {effect:.1e}"


@pytest.fixture(scope="module")
def setups(tiny):
    """setups(name, partial) -> Setup on tiny model `name` (pos_w all ones, or some 0 / 0.5)."""

    @functools.lru_cache(maxsize=None)
    def get(name, partial=False):
        hf, cfg, params = tiny(name)
        pos_w = np.ones((B, T), np.float32)
        if partial:
            pos_w[0, :3] = 0.0
            pos_w[1, 5:] = 0.5
        return _setup(hf, cfg, params, random_tokens(1, B, T), random_tokens(2, B, T), pos_w, GOOD, BAD)

    return get


@pytest.mark.parametrize("name", ["gpt2", "llama_gqa"])
@pytest.mark.parametrize("case", list(CASES))
def test_path_patch_matches_hf_hooks(setups, name, case):
    _assert_path_patch_matches(setups(name), *CASES[case])


@pytest.mark.parametrize("name", ["gpt2", "llama_gqa"])
def test_path_patch_with_position_weights_matches_hf_hooks(setups, name):
    """pos_w 0 on some positions and 0.5 on others scales each sender's delta per position."""
    for case in ("head->v", "2 heads->q,k,MLP"):
        _assert_path_patch_matches(setups(name, partial=True), *CASES[case])


def test_edge_metrics_match_hf_logit_diff(setups):
    """run_masks over every case at once, and patched_metric on one, give HF's patched logit
    difference good - bad at the last position (GQA model)."""
    s = setups("llama_gqa")
    masks = [_mask(s, *c) for c in CASES.values()]
    batch = jax.tree.map(lambda *a: jnp.stack(a), *masks)
    got = run_masks(s.params, s.cfg, s.problem, Mask(edges=batch), chunk_size=len(masks))
    rows = np.arange(B)
    want = np.stack([(lg[rows, -1, GOOD] - lg[rows, -1, BAD]) for lg in
                     (_hf_patched(s, *c) for c in CASES.values())])
    np.testing.assert_allclose(got, want, atol=ATOL, rtol=0)
    one = np.asarray(patched_metric(s.params, s.cfg, s.problem, Mask(edges=masks[-1])))
    np.testing.assert_allclose(one, want[-1], atol=ATOL, rtol=0)
    plain = s.plain[rows, -1, GOOD] - s.plain[rows, -1, BAD]
    assert np.abs(want - plain).max(-1).min() > 20 * ATOL      # every case moves the metric


@pytest.fixture(scope="module")
def smollm2(hf_smollm2):
    model = jc.load()
    tok = model.tokenizer
    tgt, src = (np.array([tok.encode(f"The capital of {c} is")], np.int32) for c in ("France", "Italy"))
    good, bad = tok.encode(" Paris"), tok.encode(" Rome")
    return _setup(hf_smollm2, model.cfg, model.params, tgt, src, np.ones(tgt.shape, np.float32), good, bad)


@pytest.mark.parametrize("case", list(SMOLLM2_CASES))
def test_smollm2_path_patch_matches_hf_hooks(smollm2, case):
    """Over 30 layers XLA and torch differ by ~1.3e-4 already unpatched (test_smollm2): the logits are
    compared at that tolerance, the patch's effect (patched - unpatched) at 1e-4."""
    s, (senders, receivers) = smollm2, SMOLLM2_CASES[case]
    ours = np.asarray(_edge_logits(s.params, s.cfg, s.problem, _mask(s, senders, receivers)))
    want = _hf_patched(s, senders, receivers)
    np.testing.assert_allclose(ours, want, atol=SMOLLM2_ATOL, rtol=0)
    np.testing.assert_allclose(ours - s.plain, want - s.hf_plain, atol=ATOL, rtol=0)
    assert np.abs(ours - s.plain).max() > 1e-2
