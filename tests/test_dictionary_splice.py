"""Spliced dictionaries (`dictionaries.splice`): a spliced model is a model, its features a site.

References: the plain run (error kept: bit for bit), HF torch forward hooks applying the same
dictionary with a torch encoder written here (feature patching), looped single forwards (vmapped
batches, sweeps), finite differences (attribution), the mlp_out site (zero ablation by hand).
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import jaxcircuits as jc
from jaxcircuits.dictionaries import splice
from jaxcircuits.dictionaries.core import HOSTS, KINDS, DictConfig, Dictionary
from jaxcircuits.engine.patching import run_masks
from jaxcircuits.engine.subsets import Pool, all_subsets, unrank_np
from jaxcircuits.engine.sweep import run_sweep
from jaxcircuits.interventions import ablation, hooknames, sites
from jaxcircuits.interventions import positions as P
from jaxcircuits.interventions.metrics import LogitDiff
from jaxcircuits.interventions.problem import PatchingProblem, target_run
from jaxcircuits.interventions.sites import Intervention, Mask
from jaxcircuits.methods import attribution, circuits, dla, folding, learned
from jaxcircuits.models.config import SpliceConfig
from jaxcircuits.models.transformer import forward, logits_of, run_with_cache
from tests import hf_reference as ref
from tests.conftest import random_tokens

F = 12


def _dictionaries(cfg, host, kind, layers, seed=0):
    """Random dictionaries of `kind` at `host` on `layers` (relu SAEs subtract b_dec; transcoders skip)."""
    d = cfg.n_heads * cfg.d_head if host == "head_out" else cfg.d_model
    dc = DictConfig(kind, d, F, k=3 if kind == "topk" else None, subtract_b_dec=kind == "relu" and host != "transcoder",
                    skip=host == "transcoder")
    scale = {"w_enc": 1 / np.sqrt(d), "w_dec": 0.5 / np.sqrt(F), "w_skip": 0.3 / np.sqrt(d)}
    out = []
    for l in layers:
        rng = np.random.RandomState(100 * seed + l)
        p = {n: (rng.randn(*s) * scale.get(n, 0.1)).astype(np.float32) for n, s in dc.param_shapes().items()}
        if "threshold" in p:
            p["threshold"] = np.abs(p["threshold"])
        out.append(Dictionary(dc, {n: jnp.asarray(v) for n, v in p.items()}, host, l))
    return out


def _spliced(tiny, name, host, kind, layers, keep_error=True):
    _, cfg, params = tiny(name)
    return splice.attach(params, cfg, _dictionaries(cfg, host, kind, layers), keep_error)


# ---- the error kept: the plain model ----------------------------------------------------------------

# Every host and every kind (a compile each: pairs, not the product; the HF tests add four more).
PAIRS = (("resid_pre", "jumprelu"), ("head_out", "relu"), ("attn_out", "topk"), ("mlp_out", "gated"),
         ("transcoder", "topk"))


def test_pairs_cover_every_host_and_kind():
    assert {h for h, _ in PAIRS} == set(HOSTS) and {k for _, k in PAIRS} == set(KINDS)


@pytest.mark.parametrize("host,kind", PAIRS)
def test_splice_with_error_kept_is_the_plain_model_bit_for_bit(tiny, host, kind):
    """The logits are bit-identical (x + (f - f) W_dec = x + 0); features are recorded on the spliced
    layers, zeros elsewhere; dropping the error changes the logits; detach restores the model."""
    _, cfg, params = tiny("gpt2")
    tokens = random_tokens(0, 2, 6)
    plain = np.asarray(forward(params, cfg, tokens)[0])
    dicts = _dictionaries(cfg, host, kind, (0, 2))
    p2, c2 = splice.attach(params, cfg, dicts)
    logits, cache = run_with_cache(p2, c2, tokens, sites=("features",))
    np.testing.assert_array_equal(np.asarray(logits), plain)
    f = np.asarray(cache["features"])
    assert f.shape == (cfg.n_layers, 2, 6, F) and not f[1].any() and f[0].any() and f[2].any()
    back_p, back_c = splice.detach(p2, c2)
    assert back_c == cfg and jax.tree.structure(back_p) == jax.tree.structure(params)
    if host == "attn_out":
        p3, c3 = splice.attach(params, cfg, dicts, keep_error=False)
        assert np.abs(np.asarray(forward(p3, c3, tokens)[0]) - plain).max() > 1e-2
    if host == "transcoder":                       # a Model's default cache: every entry the model records
        _, every = jc.Model(c2, p2, None, None).run_with_cache(tokens, hook_names=True)
        assert "blocks.2.ln2.hook_normalized.hook_sae_acts_post" in every and "blocks.0.ln2.hook_normalized" in every
        assert "features" not in sites.cache_entries(cfg) and "features" in sites.cache_entries(c2)


# ---- feature patching against HF forward hooks --------------------------------------------------

def _torch_encode(dc, p, x):
    """SAELens-style encoders in torch (p: torch tensors), written apart from `dictionaries.core`."""
    x_in = x - p["b_dec"] if dc.subtract_b_dec else x
    pre = x_in @ p["w_enc"] + p["b_enc"]
    if dc.kind == "relu":
        return torch.relu(pre)
    if dc.kind == "topk":
        vals, idx = torch.relu(pre).topk(dc.k, dim=-1)
        return torch.zeros_like(pre).scatter(-1, idx, vals)
    if dc.kind == "jumprelu":
        return pre * (pre > p["threshold"])
    mag = x_in @ (p["w_enc"] * torch.exp(p["r_mag"])) + p["b_mag"]         # gated
    return (pre > 0) * torch.relu(mag)


def _hf_spliced(model, dicts, patch=None):
    """Hooks applying `dicts` to the HF model: x + (f' - f) W_dec at the host, f' = f except features
    patch = (source {layer: f [B, T, F]}, positions, feature ids); returns {layer: (f, the input r
    it encodes [B, T, d_in])} recorded."""
    layers, attn_name, o_name, _ = ref.blocks_of(model)
    recorded, handles = {}, []
    for d in dicts:
        p = {k: torch.tensor(np.asarray(v)) for k, v in d.params.items()}

        def apply(x, r, l=d.layer, p=p, dc=d.config):
            flat = x.reshape(*x.shape[:2], -1)
            r = r.reshape(*r.shape[:2], -1)
            f = _torch_encode(dc, p, r)
            recorded[l] = f.numpy().copy(), r.numpy().copy()
            f2 = f.clone()
            if patch is not None:
                src, positions, ids = patch
                for t in positions:
                    f2[:, t, ids] = torch.tensor(src[l])[:, t, ids]
            return (flat + (f2 - f) @ p["w_dec"]).reshape(x.shape)

        layer, host = layers[d.layer], d.host
        if host == "resid_pre":
            def pre(mod, args, kwargs, apply=apply):
                if args:
                    return (apply(args[0], args[0]), *args[1:]), kwargs
                return args, {**kwargs, "hidden_states": apply(kwargs["hidden_states"], kwargs["hidden_states"])}
            handles.append(layer.register_forward_pre_hook(pre, with_kwargs=True))
        elif host == "head_out":
            o_proj = getattr(getattr(layer, attn_name), o_name)
            handles.append(o_proj.register_forward_pre_hook(lambda m, a, apply=apply: (apply(a[0], a[0]), *a[1:])))
        else:
            module = getattr(layer, attn_name) if host == "attn_out" else layer.mlp

            def post(m, args, out, apply=apply, host=host):
                first = out[0] if isinstance(out, tuple) else out
                new = apply(first, args[0] if host == "transcoder" else first)
                return (new, *out[1:]) if isinstance(out, tuple) else new
            handles.append(module.register_forward_hook(post))
    return recorded, handles


def _hf_logits(model, tokens, dicts, patch=None):
    recorded, handles = _hf_spliced(model, dicts, patch)
    try:
        return ref.run(model, tokens).logits.numpy(), recorded
    finally:
        for h in handles:
            h.remove()


@pytest.mark.parametrize("name,host,kind,layers", [("gpt2", "head_out", "topk", (0, 2)),
                                                   ("llama_gqa", "transcoder", "gated", (1,)),
                                                   ("llama_gqa", "resid_pre", "jumprelu", (0, 2)),
                                                   ("gpt2", "attn_out", "relu", (1,))])
def test_feature_patching_equals_hf_forward_hooks(tiny, name, host, kind, layers):
    """Features patched from a source prompt at chosen positions and ids = the same dictionary applied
    and patched by torch hooks in the HF model (what it reads, e.g. 'mlp_in' for the transcoder, the
    source features and the logits, fp32)."""
    model, cfg, params = tiny(name)
    dicts = _dictionaries(cfg, host, kind, layers, seed=1)
    p2, c2 = splice.attach(params, cfg, dicts)
    tgt, src = random_tokens(1, 2, 7), random_tokens(2, 2, 7)
    read = HOSTS[host][0]
    _, cache = run_with_cache(p2, c2, src, sites=("features", read))
    _, recorded = _hf_logits(model, src, dicts)
    hf_src = {l: f for l, (f, _) in recorded.items()}
    for l in layers:
        np.testing.assert_allclose(np.asarray(cache[read][l]).reshape(recorded[l][1].shape), recorded[l][1], atol=1e-4)
        np.testing.assert_allclose(np.asarray(cache["features"][l]), hf_src[l], atol=1e-4)
    positions, ids = [2, 5, 6], [0, 3, 4, 7, 9, 11]
    m = np.zeros((cfg.n_layers, F), np.float32)
    m[np.ix_(layers, ids)] = 1
    pos_w = np.zeros(tgt.shape, np.float32)
    pos_w[:, positions] = 1
    got = np.asarray(forward(p2, c2, tgt, intervention=Intervention(Mask(features=jnp.asarray(m)), cache,
                                                                     jnp.asarray(pos_w)))[0])
    want, _ = _hf_logits(model, tgt, dicts, (hf_src, positions, ids))
    np.testing.assert_allclose(got, want, atol=1e-4)
    assert np.abs(want - _hf_logits(model, tgt, dicts)[0]).max() > 1e-3             # the patch does something


# ---- batches, sweeps, gradients, levels -----------------------------------------------------------

@pytest.fixture(scope="module")
def problem(tiny):
    """A spliced llama_gqa (mlp_out relu SAEs on layers 1, 2), a source cache with features, the
    problem on the last 3 positions."""
    p2, c2 = _spliced(tiny, "llama_gqa", "mlp_out", "relu", (1, 2))
    tgt, src = random_tokens(3, 2, 7), random_tokens(4, 2, 7)
    _, cache = run_with_cache(p2, c2, src, sites=("features", "mlp_out"))
    pos_w = P.select("last:3", np.ones(tgt.shape))
    metric = LogitDiff(good=jnp.array([[5], [6]]), bad=jnp.array([[7], [9]]))
    return p2, c2, tgt, cache, pos_w, metric, PatchingProblem.make(target_run(p2, c2, tgt), cache, pos_w, metric)


def _looped(p2, c2, tgt, masks, cache, pos_w, metric):
    """Metric [N, B] of each mask by a full forward (one compiled call for every test's masks)."""
    out = []
    for i in range(masks.size()):
        iv = Intervention(jax.tree.map(lambda a: jnp.asarray(a[i]), masks), cache, jnp.asarray(pos_w))
        _, c = forward(p2, c2, tgt, intervention=iv, collect=("final_norm",), return_logits=False)
        out.append(np.asarray(metric(p2, c["final_norm"][:, -1:])))
    return np.stack(out)


def test_feature_masks_vmapped_equal_looped_forwards(problem):
    p2, c2, tgt, cache, pos_w, metric, prob = problem
    rng = np.random.RandomState(0)
    m = rng.rand(4, c2.n_layers, F).astype(np.float32) * np.isin(np.arange(c2.n_layers), (1, 2))[None, :, None]
    masks = Mask(features=jnp.asarray(m))
    got = run_masks(p2, c2, prob, masks, shard=False)
    want = _looped(p2, c2, tgt, masks, cache, pos_w, metric)
    np.testing.assert_allclose(got, want, atol=2e-5)
    assert np.abs(got - got[:1]).max() > 1e-3


@pytest.mark.parametrize("values", ["source", "zeros"])
def test_last_position_feature_masks_take_the_fast_path(tiny, values):
    """Features of a resid_pre SAE at layer 1 patched from a source (or zero-ablated) at the last
    position only: run_masks plans one recomputed position from layer 1 (the prefix's keys and values
    from the target's cache) and equals looped full forwards."""
    from jaxcircuits.engine.patching import Plan, masks_call
    p2, c2 = _spliced(tiny, "gpt2", "resid_pre", "relu", (1,))
    tgt, src = random_tokens(5, 2, 7), random_tokens(6, 2, 7)
    cache = run_with_cache(p2, c2, src, sites=("features",))[1]
    if values == "zeros":
        cache = ablation.zeros_like_source(cache)
    pos_w = P.select("last", np.ones(tgt.shape))
    metric = LogitDiff(good=jnp.array([[5], [6]]), bad=jnp.array([[7], [9]]))
    prob = PatchingProblem.make(target_run(p2, c2, tgt), cache, pos_w, metric)
    m = np.zeros((4, c2.n_layers, F), np.float32)
    m[:, 1] = np.random.RandomState(1).rand(4, F) < 0.5
    masks = Mask(features=jnp.asarray(m))
    assert masks_call(p2, c2, prob, masks)[0].static["plan"] == Plan(1, 1)
    got = run_masks(p2, c2, prob, masks, shard=False)
    np.testing.assert_allclose(got, _looped(p2, c2, tgt, masks, cache, pos_w, metric), atol=2e-5)
    assert np.abs(got - got[:1]).max() > 1e-3


def test_sweep_over_feature_subsets(problem, tmp_path):
    """`run_sweep` over a pool of features = run_masks of the same subsets; labels 'L1F0'."""
    p2, c2, tgt, cache, pos_w, metric, prob = problem
    pool = Pool("features", ((1, 0), (1, 5), (2, 3)))
    assert pool.labels() == ("L1F0", "L1F5", "L2F3")
    family = all_subsets(3)
    res = run_sweep(p2, c2, prob, pool, family, str(tmp_path / "s"), chunk_size=8, shard=False)
    masks = Mask(features=pool.scatter(unrank_np(family, res.ranks), pool.site_shape(c2)))
    np.testing.assert_allclose(res.metric, _looped(p2, c2, tgt, masks, cache, pos_w, metric), atol=2e-5)


def test_attribution_wrt_features_equals_finite_differences(problem):
    p2, c2, tgt, cache, pos_w, metric, prob = problem
    grad = attribution.attribution_patching(p2, c2, prob, "features")
    assert grad.shape == (c2.n_layers, F) and not grad[0].any() and np.abs(grad[1:]).max() > 1e-4
    eps, units = 1e-3, [(1, int(np.argmax(np.abs(grad[1])))), (2, int(np.argmax(np.abs(grad[2])))), (2, 4)]
    v = np.random.RandomState(1).rand(c2.n_layers, F).astype(np.float32) * np.isin(np.arange(3), (1, 2))[:, None]
    steps = np.zeros((2 + len(units), c2.n_layers, F), np.float32)
    steps[1] = eps * v
    for i, (l, f) in enumerate(units):
        steps[2 + i, l, f] = eps
    vals = _looped(p2, c2, tgt, Mask(features=steps), cache, pos_w, metric).mean(1).astype(np.float64)
    fd = (vals[1:] - vals[0]) / eps
    want = np.array([(grad * v).sum(), *(grad[l, f] for l, f in units)])
    np.testing.assert_allclose(fd, want, rtol=2e-2, atol=2e-3)


def test_feature_level_of_circuits_and_learned_masks(problem):
    """Level 'feature': labels of the spliced layers only; circuits.evaluate (run_masks) and a learned
    mask's exact circuit metric agree; keeping every feature is the unpatched run."""
    p2, c2, _, _, _, _, prob = problem
    labels = sites.level("feature").labels(c2)
    assert len(labels) == 2 * F and labels[0] == "L1F0" and labels[-1] == f"L2F{F - 1}"
    kept = np.random.RandomState(2).rand(3, len(labels)) < 0.5
    metric, full, none = circuits.evaluate(p2, c2, prob, "feature", kept)
    obj = learned.objective(p2, c2, prob, "feature")
    assert obj.labels == labels
    np.testing.assert_allclose(learned.circuit_metric(obj, kept), metric, atol=1e-5)
    np.testing.assert_allclose(full, np.asarray(prob.metric(p2, prob.target.final[:, -1:])), atol=1e-5)
    assert np.abs(full - none).max() > 1e-3


def test_zero_ablation_of_every_feature_is_error_plus_b_dec_by_hand(problem):
    """Every feature of layer 1 set to 0 (`set_source`, = `zeros_like_source`) with the error kept =
    the unspliced model with that layer's mlp_out replaced by mlp_out - f W_dec (the error + b_dec)."""
    p2, c2, _, own, _, _, _ = problem                            # target: the problem's source prompt
    tgt = random_tokens(4, 2, 7)
    B, T = tgt.shape
    zero = splice.set_source(c2, B, T, 0.0)
    np.testing.assert_array_equal(ablation.zeros_like_source({"features": own["features"]})["features"],
                                  zero["features"])
    mask = splice.feature_mask(c2, [(1, f) for f in range(F)])
    got = np.asarray(forward(p2, c2, tgt, intervention=Intervention(mask, zero, jnp.ones((B, T))))[0])
    params, cfg = splice.detach(p2, c2)
    hand = own["mlp_out"].at[1].add(-own["features"][1] @ p2["layers"]["dict"]["w_dec"][1])
    want = forward(params, cfg, tgt, intervention=Intervention(Mask(mlp_out=jnp.eye(3)[1]), {"mlp_out": hand},
                                                                jnp.ones((B, T))))[0]
    np.testing.assert_allclose(got, np.asarray(want), atol=1e-5)
    mean = ablation.mean_source({"features": own["features"]})
    assert mean["features"].shape == own["features"].shape


def test_steering_a_feature_adds_its_decoder_row(problem):
    """steer_source + feature_mask: feature f of layer l gains alpha at the selected positions = the
    mlp_out steering transform by alpha * W_dec[f] there (an SAE at mlp_out, error kept)."""
    p2, c2, tgt, _, _, _, prob = problem
    pos_w = jnp.asarray(P.select("last:2", np.ones(tgt.shape)))
    units, alpha = [(1, 4)], 3.0
    got = forward(p2, c2, tgt, intervention=Intervention(splice.feature_mask(c2, units),
                                                         splice.steer_source(c2, units, alpha), pos_w))[0]
    v = jnp.zeros((c2.n_layers, c2.d_model)).at[1].set(alpha * p2["layers"]["dict"]["w_dec"][1, 4])
    want = forward(p2, c2, tgt, intervention=Intervention(Mask(mlp_out=jnp.eye(3)[1]),
                                                          {sites.transform_key("steer", "mlp_out"): v}, pos_w))[0]
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)
    assert np.abs(np.asarray(got) - np.asarray(logits_of(p2, prob.target.final))).max() > 1e-3


def test_head_out_splice_without_error_keeps_dla_exact(tiny):
    """A head_out dictionary without its error rewrites z; each head's write is still z_h W_O, so the
    components of DLA sum to the final residual."""
    p2, c2 = _spliced(tiny, "gpt2", "head_out", "relu", (0, 1), keep_error=False)
    comps = dla.decompose(p2, c2, random_tokens(6, 2, 6), positions=(-1, -3))
    np.testing.assert_allclose(np.asarray(comps.total()), np.asarray(comps.final), atol=1e-4)


def test_feature_hook_names(tiny):
    """'features' maps to HookedSAETransformer's hook_sae_acts_post at the host's read hook, both ways."""
    _, cfg, _ = tiny("gpt2")
    for host, hook in (("resid_pre", "blocks.1.hook_resid_pre"), ("transcoder", "blocks.1.ln2.hook_normalized"),
                       ("head_out", "blocks.1.attn.hook_z")):
        width = cfg.d_model if host != "head_out" else cfg.n_heads * cfg.d_head
        c2 = dataclasses.replace(cfg, splice=SpliceConfig(host, DictConfig("relu", width, F), (1,)))
        name = hooknames.hook_name("features", 1, c2)
        assert name == hook + ".hook_sae_acts_post" and hooknames.parse_hook_name(name, c2) == ("features", 1)
    with pytest.raises(ValueError, match="no TransformerLens hook"):
        hooknames.hook_name("features", 1, cfg)


# ---- bad input ----------------------------------------------------------------------------------

def test_bad_splices_and_feature_masks_are_refused(tiny):
    _, cfg, params = tiny("gpt2")
    dicts = _dictionaries(cfg, "mlp_out", "relu", (0, 1))
    wide = _dictionaries(dataclasses.replace(cfg, d_model=cfg.d_model + 1), "mlp_out", "relu", (0,))
    with pytest.raises(ValueError, match=r"reads and writes \(d_in, d_out\) = \(48, 48\), got \(49, 49\)"):
        splice.attach(params, cfg, wide)
    with pytest.raises(ValueError, match="share one host"):
        splice.attach(params, cfg, [dicts[0], dataclasses.replace(dicts[1], host="attn_out")])
    with pytest.raises(ValueError, match="share one DictConfig"):
        splice.attach(params, cfg, [dicts[0], _dictionaries(cfg, "mlp_out", "jumprelu", (2,))[0]])
    with pytest.raises(ValueError, match="one dictionary per layer"):
        splice.attach(params, cfg, [dicts[0], dicts[0]])
    with pytest.raises(ValueError, match="out of range for 3 layers"):
        splice.attach(params, cfg, [dataclasses.replace(dicts[0], layer=3)])
    with pytest.raises(ValueError, match="non-empty sequence of Dictionary"):
        splice.attach(params, cfg, [])
    p2, c2 = splice.attach(params, cfg, dicts)
    with pytest.raises(ValueError, match="already has 'mlp_out' dictionaries spliced at layers"):
        splice.attach(p2, c2, dicts)
    # features on a model without a splice, or on a layer without a dictionary
    no_splice = "no dictionary is spliced into this model; use dictionaries.splice.attach"
    for call in (lambda: sites.check_mask(Mask(features=jnp.zeros((3, F))), cfg),
                 lambda: sites.level("feature").labels(cfg), lambda: splice.detach(params, cfg),
                 lambda: sites.every_unit(cfg, "features")):
        with pytest.raises(ValueError, match=no_splice):
            call()
    with pytest.raises(ValueError, match=r"'features' is nonzero on layer\(s\) \[2\], which lack it"):
        sites.check_mask(Mask(features=jnp.zeros((3, 3, F)).at[1, 2, 0].set(1.0)), c2, batched=True)
    with pytest.raises(ValueError, match="units must be"):
        splice.steer_source(c2, [(2, 0)], 1.0)
    with pytest.raises(ValueError, match="units must be"):
        splice.feature_mask(c2, [(0, F)])
    # methods that would not be exact are refused
    with pytest.raises(ValueError, match="detach them first"):
        folding.fold_norms(p2, c2)
    p3, c3 = splice.attach(params, cfg, _dictionaries(cfg, "resid_pre", "relu", (1,)), keep_error=False)
    edges = sites.every_unit(c3, sites.EDGES)
    with pytest.raises(ValueError, match="resid_pre dictionary spliced without its error"):
        sites.check_mask(edges, c3)
    with pytest.raises(ValueError, match="resid_pre dictionary spliced without its error"):
        dla.decompose(p3, c3, random_tokens(0, 1, 4))
    p4, c4 = splice.attach(params, cfg, _dictionaries(cfg, "attn_out", "relu", (1,)), keep_error=False)
    with pytest.raises(ValueError, match="attn_out dictionary spliced without its error"):
        dla.decompose(p4, c4, random_tokens(0, 1, 4))
    # without its error a dictionary writes its reconstruction: edges (whose sources hold the raw write)
    # and a transcoder layer's MLP patches (thrown away) are refused
    for host in ("head_out", "mlp_out", "transcoder"):
        _, c5 = splice.attach(params, cfg, _dictionaries(cfg, host, "relu", (1,)), keep_error=False)
        with pytest.raises(ValueError, match=f"edges: a '{host}' dictionary spliced without its error"):
            sites.check_mask(sites.every_unit(c5, sites.EDGES), c5)
    for site in ("mlp_out", "mlp_neuron"):
        leaf = jnp.zeros(sites.get(site).shape(c5))
        sites.check_mask(Mask(**{site: leaf.at[0].set(1.0)}), c5)                  # layer 0 has no transcoder
        with pytest.raises(ValueError, match=rf"'{site}' is nonzero on layer\(s\) \[1\], where a 'transcoder'"):
            sites.check_mask(Mask(**{site: leaf.at[1].set(1.0)}), c5)
