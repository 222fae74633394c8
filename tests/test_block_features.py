"""Every way of running the one block agrees with every other, for each model feature.

The same checks run over the block's features (`ModelConfig`): GPT-2 (LayerNorm, learned positions,
biases), Llama with GQA (RMSNorm, RoPE, gated MLP), and the parallel block of GPT-NeoX / GPT-J
(`parallel_residual`: attention and MLP both read the layer's input), which changes the block's
shape (its MLP no longer reads its own heads). That feature is a config field, one line of
`models.block.block` and its row of `block.same_layer_reads`; nothing else in the package knows it,
and these checks pass for it unchanged, as they do with Mistral's sliding window (3 of the 6
positions here), Qwen3's per-head q/k norm, GPT-NeoX's partial RoPE (half of each head's dims
rotate) and a layer without RoPE (SmolLM3's NoPE layers; the middle one, which the fast paths start
from) on the same model, and for OLMo-2 (norms after the
sublayers, `post_norms`; q/k norms over the whole projection) and Gemma-2 / Gemma-3 (norms before and
after both sublayers, times 1 + w; soft-capped scores and logits; the window on every other layer, with
its own RoPE base, `local_rope`, which fast paths from a global layer read by the layer's index), whose
edges, EAP and DLA are exact with the norms frozen on the target (`dla.freeze_norms`: the post-norm
after the heads' sum is then a linear map, so each head has its share) and refused, naming
`freeze_norms`, without (DLA of Gemma's soft-capped logits also names the cap; it is checked without it):

  edges: every edge out of a node = the node patch    patched runs: vmapped = looped, the fast
  suffix path (from the cached z, KV-cached prefix, last layer's queries only) = the full recompute
  DLA: the components sum to the logit difference     frozen norms: the plain run on the reference
  gradients (node and edge masks) = finite differences
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxcircuits as jc
from jaxcircuits.engine.patching import patched_metric, run_masks
from jaxcircuits.interventions import edges, sites
from jaxcircuits.interventions import positions as P
from jaxcircuits.interventions.metrics import LogitDiff
from jaxcircuits.interventions.problem import PatchingProblem, target_run
from jaxcircuits.interventions.sites import Intervention, Mask
from jaxcircuits.methods import attribution, dla
from jaxcircuits.models import transformer as M
from jaxcircuits.models.block import LayerIO, heads_of
from jaxcircuits.models.config import ModelConfig, RopeConfig
from jaxcircuits.models.params import init_params
from tests.conftest import random_tokens

GPT2 = dict(model_type="gpt2", n_embd=32, n_layer=3, n_head=4, n_positions=32, vocab_size=53)
LLAMA = dict(model_type="llama", hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=53, max_position_embeddings=64, tie_word_embeddings=False)
FEATURES = {
    "gpt2": (GPT2, {}),
    "llama_gqa": (LLAMA, {}),
    # GPT-NeoX's parallel block and partial RoPE, Mistral's window, Qwen3's q/k norm, a SmolLM3 NoPE layer
    "parallel_mix": (LLAMA, {"parallel_residual": True, "sliding_window": 3, "qk_norm": "head",
                             "rope": RopeConfig(partial=0.5), "rope_layers": (True, False, True)}),
    "olmo2_window": ({**LLAMA, "model_type": "olmo2"}, {"sliding_window": 3}),
    # Gemma-3 with Gemma-2's attention soft cap (which HF's Gemma-3 does not apply): norms before and after
    # both sublayers, times 1 + w; q/k norms; soft caps; the window and the local RoPE base on layers 0 and 2
    "gemma": ({**LLAMA, "model_type": "gemma3_text", "head_dim": 8, "sliding_window": 3, "sliding_window_pattern": 2,
               "final_logit_softcapping": 2.0}, {"attn_logit_softcap": 1.0}),
}
# models with post_norms: edges and DLA are exact with frozen norms (`frozen`) and refused without
POST_NORMS = ("olmo2_window", "gemma")
B, T = 2, 6
GOOD, BAD = np.array([[5], [6]]), np.array([[7], [9]])


@pytest.fixture(scope="module", params=list(FEATURES))
def model(request):
    """(name, cfg, params, problem): a random model with the feature, a target and a source run, a
    logit difference at the last position, every position patched."""
    hf, features = FEATURES[request.param]
    cfg = dataclasses.replace(ModelConfig.from_hf(hf), **features)
    params = init_params(cfg, jax.random.PRNGKey(0), scale=0.2)
    tgt, src = random_tokens(1, B, T, cfg.vocab_size), random_tokens(2, B, T, cfg.vocab_size)
    _, cache = jc.run_with_cache(params, cfg, src, sites=("resid_pre", "head_out", "mlp_out"))
    metric = LogitDiff(good=jnp.asarray(GOOD), bad=jnp.asarray(BAD))
    problem = PatchingProblem.make(target_run(params, cfg, tgt), cache, np.ones((B, T), np.float32), metric)
    return request.param, cfg, params, problem


def test_parallel_block_wiring_by_hand(model):
    """x_next = x + attn_out + mlp_out, with the MLP reading the layer's input (parallel) or x + attn_out."""
    name, cfg, params, problem = model
    _, c = jc.run_with_cache(params, cfg, problem.target.tokens, sites=("resid_pre", "attn_out", "mlp_out"))
    for l in range(cfg.n_layers - 1):
        x, a, m = (np.asarray(c[k][l]) for k in ("resid_pre", "attn_out", "mlp_out"))
        np.testing.assert_allclose(np.asarray(c["resid_pre"][l + 1]), x + a + m, atol=1e-5)
        p = jax.tree.map(lambda w: w[l], params["layers"])
        mlp_in = x if cfg.parallel_residual else x + a
        np.testing.assert_allclose(np.asarray(M.mlp(cfg, p, jnp.asarray(mlp_in), LayerIO())), m, atol=1e-5)
    assert EDGE_MLP_READS_HEADS[name] == edges.EdgeGraph.of(cfg).mlp_reads_heads


EDGE_MLP_READS_HEADS = {"gpt2": True, "llama_gqa": True, "parallel_mix": False, "olmo2_window": True, "gemma": True}


def frozen(name, cfg, params, problem, refused):
    """(params, problem) in which edges and DLA are exact: for a post_norms model, after checking that
    refused(params, problem) raises a ValueError naming post_norms and freeze_norms, its norms frozen
    on the target run (the source's activations stay its own); else as given."""
    if name not in POST_NORMS:
        return params, problem
    with pytest.raises(ValueError, match="post_norms.*freeze_norms"):
        refused(params, problem)
    params = dla.freeze_norms(params, cfg, problem.target.tokens)
    return params, problem.replace(target=target_run(params, cfg, problem.target.tokens))


def test_every_edge_out_of_a_node_is_the_node_patch(model):
    name, cfg, params, problem = model
    graph = edges.EdgeGraph.of(cfg)
    params, problem = frozen(name, cfg, params, problem, lambda params, problem: patched_metric(
        params, cfg, problem, Mask(edges=graph.path_mask(["L0H1"], ["L1MLP"]))))
    L, H = cfg.n_layers, cfg.n_heads
    nodes = {"L0H1": Mask(head_out=jnp.zeros((L, H)).at[0, 1].set(1.0)),
             "L1MLP": Mask(mlp_out=jnp.zeros(L).at[1].set(1.0)),
             "embed": Mask(resid_pre=jnp.zeros(L).at[0].set(1.0))}
    for sender, node in nodes.items():
        got = patched_metric(params, cfg, problem, Mask(edges=graph.path_mask([sender], list(graph.receiver_labels))))
        want = patched_metric(params, cfg, problem, node)
        np.testing.assert_allclose(got, want, atol=2e-5, err_msg=sender)
        assert np.abs(np.asarray(want) - np.asarray(_plain(params, cfg, problem))).max() > 1e-3, sender


def _plain(params, cfg, problem):
    _, c = jc.forward(params, cfg, problem.target.tokens, collect=("final_norm",), return_logits=False)
    return problem.metric(params, c["final_norm"][:, -1:])


def _full_recompute(params, cfg, problem, mask):
    """The metric of `mask` by the plain forward over every layer and position (no fast path)."""
    iv = Intervention(mask, problem.source, problem.pos_w)
    _, c = jc.forward(params, cfg, problem.target.tokens, intervention=iv, collect=("final_norm",), return_logits=False)
    return np.asarray(problem.metric(params, c["final_norm"][:, -problem.metric.n_positions:]))


def test_fast_paths_and_vmap_equal_the_full_recompute(model):
    """run_masks (vmapped; from layer 1's cached z (head outputs only) or its input, all positions or
    a KV-cached prefix, the last layer's queries at the metric's position only) = one full forward
    per mask."""
    _, cfg, params, problem = model
    rng = np.random.RandomState(0)
    L, H = cfg.n_layers, cfg.n_heads
    heads = np.zeros((4, L, H), np.float32)
    heads[:, 1] = rng.uniform(0, 1, (4, H)) * (rng.uniform(0, 1, (4, H)) < 0.7)
    for where, masks in (("all", Mask(head_out=heads)),
                         ("last:2", Mask(resid_pre=np.eye(L, dtype=np.float32)[[1, 2, 2, 1]], head_out=heads))):
        problem = problem.replace(pos_w=jnp.asarray(P.select(where, np.ones((B, T)))))
        got = run_masks(params, cfg, problem, masks, chunk_size=3, shard=False)
        for i in range(4):
            want = _full_recompute(params, cfg, problem, jax.tree.map(lambda a: a[i], masks))
            np.testing.assert_allclose(got[i], want, atol=2e-5)
        assert np.ptp(got, axis=0).max() > 1e-3


def test_dla_components_sum_to_the_logit_difference(model):
    name, cfg, params, problem = model
    toks = problem.target.tokens
    params, _ = frozen(name, cfg, params, problem, lambda params, _: dla.decompose(params, cfg, toks, positions=(-1,)))
    if "logit_softcap" in params:          # not linear in the final residual: refused, then checked without it
        with pytest.raises(ValueError, match="final-logit soft-capping"):
            dla.direct_logit_attribution(params, cfg, toks, direction=jnp.ones(cfg.d_model))
        params = {k: v for k, v in params.items() if k != "logit_softcap"}
    direction = dla.answer_direction(params, GOOD, BAD)
    out = dla.direct_logit_attribution(params, cfg, toks, direction=direction)
    logits = np.asarray(jc.forward(params, cfg, toks)[0])[:, -1]
    np.testing.assert_allclose(out["total"][:, 0], logits[[0, 1], GOOD[:, 0]] - logits[[0, 1], BAD[:, 0]], atol=1e-4)
    comps = dla.decompose(params, cfg, toks, positions=(-1,))
    np.testing.assert_allclose(comps.total(), comps.final, atol=1e-4)


def test_frozen_norms_equal_the_plain_run_on_the_reference(model):
    _, cfg, params, problem = model
    toks = problem.target.tokens
    frozen = dla.freeze_norms(params, cfg, toks)
    np.testing.assert_allclose(np.asarray(jc.forward(frozen, cfg, toks)[0]), np.asarray(jc.forward(params, cfg, toks)[0]),
                               atol=1e-4)
    other = random_tokens(3, B, T, cfg.vocab_size)
    assert np.abs(np.asarray(jc.forward(frozen, cfg, other)[0]) - np.asarray(jc.forward(params, cfg, other)[0])).max() > 1e-3


def test_qk_profile_unrotates_each_layer_as_it_rotated(model):
    """weight_space.qk_profile: q / k before RoPE; equal to after RoPE on a layer without RoPE only."""
    from jaxcircuits.methods import weight_space
    _, cfg, params, problem = model
    prof = weight_space.qk_profile(params, cfg, problem.target.tokens)
    _, c = jc.run_with_cache(params, cfg, problem.target.tokens, sites=("resid_pre",))
    for l in range(cfg.n_layers):
        p = jax.tree.map(lambda w: w[l], params["layers"])
        h = M.norm(cfg, p["norm1"], c["resid_pre"][l]) if cfg.pre_norms else c["resid_pre"][l]
        want = np.abs(np.asarray(heads_of(cfg, p, "q", h))).mean((0, 1))
        np.testing.assert_allclose(prof["q"][l], want, atol=1e-5)
        rotates = cfg.position_embedding == "rotary" and (cfg.rope_layers or [True] * cfg.n_layers)[l]
        assert bool(np.abs(prof["q"][l] - prof["q_rope"][l]).max() > 1e-4) == bool(rotates), l


def _finite_difference(f, f0, eps=1e-2):
    """Second-order one-sided difference of f(a) at 0, f0 = f(0)."""
    return (4 * (f(eps) - f0) - (f(2 * eps) - f0)) / (2 * eps)


def test_gradients_equal_finite_differences(model):
    """Attribution patching of head outputs and of edges (the custom VJP) = finite differences of the
    exact patched metric, for the two units / edges of largest gradient."""
    name, cfg, params, problem = model
    mean = lambda mask: float(np.asarray(patched_metric(params, cfg, problem, mask)).mean())
    plain = float(np.asarray(_plain(params, cfg, problem)).mean())
    heads = attribution.attribution_patching(params, cfg, problem, "head_out")
    for l, h in np.argwhere(np.abs(heads) >= np.sort(np.abs(heads).ravel())[-2]):
        unit = jnp.zeros(heads.shape).at[l, h].set(1.0)
        fd = _finite_difference(lambda a: mean(Mask(head_out=a * unit)), plain)
        np.testing.assert_allclose(heads[l, h], fd, rtol=3e-2, atol=2e-4)
    graph = edges.EdgeGraph.of(cfg)
    params, problem = frozen(name, cfg, params, problem,
                             lambda params, problem: attribution.attribution_patching(params, cfg, problem, sites.EDGES))
    eap = attribution.attribution_patching(params, cfg, problem, sites.EDGES)
    for e in np.argsort(-np.abs(eap))[:2]:
        one = np.zeros(graph.n_edges, np.float32)
        one[e] = 1.0
        fd = _finite_difference(lambda a: mean(Mask(edges=graph.unflat(a * one))), plain)
        np.testing.assert_allclose(eap[e], fd, rtol=3e-2, atol=2e-4, err_msg=str(graph.edges[e]))
    assert np.abs(eap).max() > 1e-2
