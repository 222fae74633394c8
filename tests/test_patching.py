"""Interventions: hand-computed and HF-hook references; every fast path against its plain one."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jaxcircuits.interventions import positions as P
from jaxcircuits.interventions import sites
from jaxcircuits.interventions.positions import decode_intervention, source_at_position
from jaxcircuits.models.generate import generate
from jaxcircuits.interventions.metrics import LogitDiff
from jaxcircuits.models.transformer import forward, run_with_cache
from jaxcircuits.interventions.problem import PatchingProblem, target_run
from jaxcircuits.engine.patching import NOTHING, Plan, make_plan, masks_metric, patched_metric, run_masks
from jaxcircuits.interventions.sites import Intervention, Mask
from tests import hf_reference as ref
from tests.conftest import random_tokens



def _setup(tiny, name, batch=2, length=8, seed=0):
    model, cfg, params = tiny(name)
    tgt = random_tokens(seed, batch, length)
    src = random_tokens(seed + 100, batch, length)
    _, cache = run_with_cache(params, cfg, src, sites=sites.cache_entries(cfg)[:-len(sites.EXTRA_CACHE)])
    return model, cfg, params, tgt, src, cache


def _head_mask(cfg, layer_heads):
    m = np.zeros((cfg.n_layers, cfg.n_heads), np.float32)
    for l, hs in layer_heads.items():
        m[l, hs] = 1.0
    return Mask(head_out=jnp.asarray(m))


def _problem(params, cfg, tgt, cache, pos_w, metric):
    return PatchingProblem.make(target_run(params, cfg, tgt), cache, pos_w, metric)


def _logits(params, cfg, tokens, mask, source, pos_w):
    iv = Intervention(mask=mask, source=source, pos_w=jnp.asarray(pos_w, jnp.float32))
    return np.asarray(forward(params, cfg, jnp.asarray(tokens), intervention=iv)[0])


def test_zero_mask_is_bitwise_identity(tiny):
    _, cfg, params, tgt, _, cache = _setup(tiny, "llama_gqa")
    zero = Mask(**{s.name: jnp.zeros(s.shape(cfg, 4)) for s in sites.present(cfg)})
    got = _logits(params, cfg, tgt, zero, cache, np.ones(tgt.shape))
    want = np.asarray(forward(params, cfg, jnp.asarray(tgt))[0])
    np.testing.assert_array_equal(got, want)


def test_resid_pre_ones_at_layer0_reproduces_source_run(tiny):
    _, cfg, params, tgt, src, cache = _setup(tiny, "gpt2")
    m = Mask(resid_pre=jnp.zeros(cfg.n_layers).at[0].set(1.0))
    got = _logits(params, cfg, tgt, m, cache, np.ones(tgt.shape))
    want = np.asarray(forward(params, cfg, jnp.asarray(src))[0])
    # gpt2 adds position embeddings before layer 0; same positions, so the runs coincide.
    np.testing.assert_allclose(got, want, atol=1e-5)


@pytest.mark.parametrize("name", ["gpt2", "llama_gqa"])
def test_attn_out_ones_replaces_whole_attention_output(tiny, name):
    model, cfg, params, tgt, _, cache = _setup(tiny, name)
    m = Mask(attn_out=jnp.zeros(cfg.n_layers).at[1].set(1.0))
    got = _logits(params, cfg, tgt, m, cache, np.ones(tgt.shape))
    src_out = np.asarray(cache["attn_out"][1])
    with ref.patch_attn_output(model, 1, [0], 1, src_out, range(tgt.shape[1])):
        want = ref.run(model, tgt).logits.numpy()
    np.testing.assert_allclose(got, want, atol=1e-4)
    assert np.abs(got - np.asarray(forward(params, cfg, jnp.asarray(tgt))[0])).max() > 1e-2


@pytest.mark.parametrize("name", ["gpt2", "llama_gqa"])
@pytest.mark.parametrize("where", ["all", "last"])
def test_head_out_matches_hf_pre_hook_on_o_proj(tiny, name, where):
    model, cfg, params, tgt, _, cache = _setup(tiny, name)
    rng = np.random.RandomState(7)
    T = tgt.shape[1]
    pos_w = P.select(where, np.ones(tgt.shape))
    slots = list(range(T)) if where == "all" else [T - 1]
    for _ in range(3):
        subset = {l: sorted(rng.choice(cfg.n_heads, rng.randint(1, cfg.n_heads), replace=False).tolist())
                  for l in (0, 2)}
        got = _logits(params, cfg, tgt, _head_mask(cfg, subset), cache, pos_w)
        with ref.patch_heads(model, subset, np.asarray(cache["head_out"]), slots):
            want = ref.run(model, tgt).logits.numpy()
        np.testing.assert_allclose(got, want, atol=1e-4)


def test_attn_block_matches_hf_hook_with_left_alignment(tiny):
    """The original protocol's site: blocks of the o_proj output, positions aligned from the start."""
    model, cfg, params = tiny("llama_gqa")
    tgt, src = random_tokens(1, 1, 9), random_tokens(2, 1, 6)
    _, cache = run_with_cache(params, cfg, src, sites=("attn_out",))
    pos_map = P.left_aligned(np.ones(tgt.shape), np.ones(src.shape))
    np.testing.assert_array_equal(pos_map[0], [0, 1, 2, 3, 4, 5, -1, -1, -1])
    blocks = [0, 2, 3]
    m = np.zeros((cfg.n_layers, 4), np.float32)
    m[1, blocks] = 1.0
    got = _logits(params, cfg, tgt, Mask(attn_block=jnp.asarray(m)), P.align(cache, pos_map),
                  P.weights("all", pos_map))
    with ref.patch_attn_output(model, 1, blocks, 4, np.asarray(cache["attn_out"][1]), range(6)):
        want = ref.run(model, tgt).logits.numpy()
    np.testing.assert_allclose(got, want, atol=1e-4)


def test_decode_phase_patching_matches_hf_hook(tiny):
    """Original protocol: prefill patched left-aligned, each decoded token overwritten with the
    source's position-0 blocks."""
    model, cfg, params = tiny("llama_gqa")
    tgt, src = random_tokens(3, 1, 7), random_tokens(4, 1, 5)
    _, cache = run_with_cache(params, cfg, src, sites=("attn_out",))
    pos_map = P.left_aligned(np.ones(tgt.shape), np.ones(src.shape))
    m = np.zeros((cfg.n_layers, 4), np.float32)
    m[1, [1, 3]] = 1.0
    mask = Mask(attn_block=jnp.asarray(m))
    prefill = Intervention(mask, P.align(cache, pos_map), jnp.asarray(P.weights("all", pos_map)))
    got = np.asarray(generate(params, cfg, tgt, max_new_tokens=6, prefill=prefill,
                              decode=decode_intervention(mask, source_at_position(cache, 0)), eos_id=-1))
    src_out = np.asarray(cache["attn_out"][1])
    with ref.patch_attn_output(model, 1, [1, 3], 4, src_out, range(5), decode_source=src_out[:, 0]):
        with torch.no_grad():
            want = model.generate(torch.tensor(tgt), max_new_tokens=6, do_sample=False,
                                  eos_token_id=None, pad_token_id=0).numpy()[:, 7:]
    np.testing.assert_array_equal(got, want)
    plain = np.asarray(generate(params, cfg, tgt, max_new_tokens=6, eos_id=-1))
    prefill_only = np.asarray(generate(params, cfg, tgt, max_new_tokens=6, prefill=prefill, eos_id=-1))
    assert not (np.array_equal(got, plain) and np.array_equal(prefill_only, plain))


# ---- fast paths against the plain full forward ------------------------------------------------

def _random_head_masks(cfg, n, layers, seed=0):
    rng = np.random.RandomState(seed)
    m = np.zeros((n, cfg.n_layers, cfg.n_heads), np.float32)
    for i in range(n):
        for l in layers:
            m[i, l] = rng.rand(cfg.n_heads) < 0.5
    return Mask(head_out=jnp.asarray(m))


def _looped(params, cfg, tgt, masks, cache, pos_w, metric):
    out = []
    n = getattr(masks, masks.sites()[0]).shape[0]
    for i in range(n):
        iv = Intervention(jax.tree.map(lambda a: a[i], masks), cache, jnp.asarray(pos_w, jnp.float32))
        _, c = forward(params, cfg, jnp.asarray(tgt), intervention=iv, collect=("final_norm",),
                       return_logits=False)
        out.append(np.asarray(metric(params, c["final_norm"][:, -metric.n_positions:])))
    return np.stack(out)


@pytest.mark.parametrize("name,where", [("llama_gqa", "last"), ("llama_gqa", "all"), ("gpt2", "last:3")])
def test_vmapped_prefix_shared_suffix_path_equals_looped_full_forward(tiny, name, where):
    _, cfg, params, tgt, _, cache = _setup(tiny, name)
    masks = _random_head_masks(cfg, 7, layers=(1, 2))
    pos_w = P.select(where, np.ones(tgt.shape))
    metric = LogitDiff(good=jnp.array([[5], [6]]), bad=jnp.array([[7, 8], [9, -1]]))
    problem = _problem(params, cfg, tgt, cache, pos_w, metric)
    plan = make_plan({"head_out": [1, 2]}, pos_w)
    assert plan == Plan(1, {"last": 1, "all": 8, "last:3": 3}[where], from_z=True)
    got = run_masks(params, cfg, problem, masks, chunk_size=7, shard=False)
    want = _looped(params, cfg, tgt, masks, cache, pos_w, metric)
    chex.assert_shape(got, (7, 2))
    np.testing.assert_allclose(got, want, atol=2e-5)
    full = run_masks(params, cfg, problem, masks, plan=Plan(0, 8), shard=False)
    np.testing.assert_allclose(full, want, atol=2e-5)


def _random_site_masks(cfg, names, n, first, seed):
    """Blend weights in (0, 1) at `names` in layers >= first: leaves [n, L, *units]."""
    rng = np.random.RandomState(seed)
    live = (np.arange(cfg.n_layers) >= first).astype(np.float32)
    def leaf(name):
        shape = sites.get(name).shape(cfg, 4)
        return jnp.asarray(rng.rand(n, *shape).astype(np.float32) * live.reshape(1, -1, *([1] * (len(shape) - 1))))
    return Mask(**{name: leaf(name) for name in names})


@pytest.mark.parametrize("where", ["last", "all", "last:3"])
@pytest.mark.parametrize("first", [0, 1, 2])
def test_every_site_fast_path_equals_looped_full_forward(tiny, where, first):
    """Blend weights in (0, 1) at every site of layers >= first (the last layer included)."""
    _, cfg, params, tgt, _, cache = _setup(tiny, "llama_gqa")
    masks = _random_site_masks(cfg, [s.name for s in sites.present(cfg)], 4, first, seed=first)
    pos_w = P.select(where, np.ones(tgt.shape))
    metric = LogitDiff(good=jnp.array([[5], [6]]), bad=jnp.array([[7], [9]]))
    got = run_masks(params, cfg, _problem(params, cfg, tgt, cache, pos_w, metric), masks, shard=False)
    np.testing.assert_allclose(got, _looped(params, cfg, tgt, masks, cache, pos_w, metric), atol=2e-5)


@pytest.mark.parametrize("name", ["gpt2", "llama_gqa"])
@pytest.mark.parametrize("site", ["head_q", "head_k", "head_v", "mlp_neuron"])
@pytest.mark.parametrize("where", ["last:3", "all"])
def test_new_site_vmapped_equals_looped(tiny, name, site, where):
    """Each q/k/v/neuron site alone, vmapped over masks on the fast paths, against the looped forward."""
    _, cfg, params, tgt, _, cache = _setup(tiny, name)
    masks = _random_site_masks(cfg, (site,), 5, first=1, seed=3)
    pos_w = P.select(where, np.ones(tgt.shape))
    metric = LogitDiff(good=jnp.array([[5], [6]]), bad=jnp.array([[7], [9]]))
    got = run_masks(params, cfg, _problem(params, cfg, tgt, cache, pos_w, metric), masks, chunk_size=3, shard=False)
    want = _looped(params, cfg, tgt, masks, cache, pos_w, metric)
    np.testing.assert_allclose(got, want, atol=2e-5)
    assert np.abs(want - want[:1]).max() > 1e-4          # the masks make a difference


def test_chunked_and_sharded_equal_one_batch(tiny):
    _, cfg, params, tgt, _, cache = _setup(tiny, "llama_mqa")
    assert jax.device_count() == 4
    masks = _random_head_masks(cfg, 10, layers=(1,), seed=3)
    pos_w = P.select("last", np.ones(tgt.shape))
    metric = LogitDiff(good=jnp.array([[5], [6]]), bad=jnp.array([[7], [9]]))
    problem = _problem(params, cfg, tgt, cache, pos_w, metric)
    one = run_masks(params, cfg, problem, masks, chunk_size=10, shard=False)
    seen = []
    chunked = run_masks(params, cfg, problem, masks, chunk_size=3, shard=False,
                        on_chunk=lambda s, v: seen.append((s, len(v))))
    assert seen == [(0, 3), (3, 3), (6, 3), (9, 1)]
    sharded = run_masks(params, cfg, problem, masks, chunk_size=4, shard=True)
    np.testing.assert_allclose(chunked, one, atol=1e-6)
    np.testing.assert_allclose(sharded, one, atol=1e-6)


def test_grad_through_mask_matches_finite_differences(tiny):
    _, cfg, params, tgt, _, cache = _setup(tiny, "llama_gqa", batch=1)
    pos_w = jnp.asarray(P.select("all", np.ones(tgt.shape)))
    problem = _problem(params, cfg, tgt, cache, pos_w, LogitDiff(good=jnp.array([[5]]), bad=jnp.array([[7]])))

    @jax.jit
    def f(m):
        return patched_metric(params, cfg, problem, Mask(head_out=m))[0]

    m0 = jnp.full((cfg.n_layers, cfg.n_heads), 0.3)
    g = np.asarray(jax.grad(f)(m0))
    eps = 1e-2
    for l, h in [(0, 1), (1, 5), (2, 7)]:
        e = jnp.zeros_like(m0).at[l, h].set(eps)
        fd = (f(m0 + e) - f(m0 - e)) / (2 * eps)
        np.testing.assert_allclose(g[l, h], fd, rtol=2e-2, atol=2e-4)
    assert np.abs(g).max() > 1e-3


# ---- bad input --------------------------------------------------------------------------------

def test_bad_masks_and_sources(tiny):
    _, cfg, params, tgt, _, cache = _setup(tiny, "llama_gqa")
    pos_w = P.select("last", np.ones(tgt.shape))
    metric = LogitDiff(good=jnp.array([[5], [6]]), bad=jnp.array([[7], [9]]))
    L, H = cfg.n_layers, cfg.n_heads
    run = lambda m, src=cache: run_masks(params, cfg, _problem(params, cfg, tgt, src, pos_w, metric), m, shard=False)
    with pytest.raises(ValueError, match=r"'head_out' has shape \(3, 7\)"):
        run(Mask(head_out=jnp.zeros((2, L, H - 1))))
    with pytest.raises(ValueError, match="outside \\[0, 1\\]"):
        run(Mask(head_out=jnp.full((2, L, H), 2.0)))
    with pytest.raises(ValueError, match="n_blocks dividing"):
        run(Mask(attn_block=jnp.ones((2, L, 5))))
    with pytest.raises(ValueError, match="source lacks \\['mlp_out'\\]"):
        run(Mask(mlp_out=jnp.ones((2, L))), {"head_out": cache["head_out"]})
    with pytest.raises(ValueError, match="touches no site"):
        run(Mask())
    with pytest.raises(ValueError, match=r"'head_k' has shape \(3, 8\) after the batch axis, expected \(3, 2\)"):
        run(Mask(head_k=jnp.zeros((2, L, H))))
    bad = dict(cache, head_out=cache["head_out"].at[1, 0, 7, 0, 0].set(jnp.nan))
    with pytest.raises(ValueError, match=r"source 'head_out' \(shape \(3, 2, 8, 8, 8\)\) holds nan at \(1, 0, 7, 0, 0\)"):
        run(Mask(head_out=jnp.ones((2, L, H))), bad)
    with pytest.raises(ValueError, match=r"'head_out' has shape \(2, 2, 8, 8, 8\), expected \(3, 2, 8, n_heads, d_head\)"):
        _problem(params, cfg, tgt, {"head_out": cache["head_out"][:2]}, pos_w, metric)
    with pytest.raises(ValueError, match=r"has shape \(3, 1, 8, 8, 8\), expected \(3, 2, 8, n_heads"):
        _problem(params, cfg, tgt, {"head_out": cache["head_out"][:, :1]}, pos_w, metric)
    with pytest.raises(ValueError, match=r"'head_out' has shape \(3, 2, 8, 8, 4\), expected \(3, 2, 8, 8, 8\)"):
        run(Mask(head_out=jnp.ones((2, L, H))), {"head_out": cache["head_out"][..., :4]})
    with pytest.raises(ValueError, match="pos_w has shape"):
        _problem(params, cfg, tgt, cache, pos_w[:1], metric)
    with pytest.raises(ValueError, match="metric LogitDiff has batch 1"):
        _problem(params, cfg, tgt, cache, pos_w, LogitDiff(good=jnp.array([[5]]), bad=jnp.array([[7]])))
    # a batch that patches nothing (no position, no layer) is the plan that reads the target's own states
    assert make_plan({"head_out": [1]}, np.zeros(tgt.shape)) == make_plan({"head_out": []}, pos_w) == NOTHING


def test_mask_batch_compiles_once(tiny):
    _, cfg, params, tgt, _, cache = _setup(tiny, "gpt2")
    pos_w = P.select("last", np.ones(tgt.shape))
    problem = _problem(params, cfg, tgt, cache, pos_w, LogitDiff(good=jnp.array([[5], [6]]), bad=jnp.array([[7], [9]])))
    masks = _random_head_masks(cfg, 9, layers=(2,))
    before = masks_metric._cache_size()
    run_masks(params, cfg, problem, masks, chunk_size=4, shard=False)
    assert masks_metric._cache_size() == before + 1
