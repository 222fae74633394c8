"""Dictionary files (`dictionaries/files.py`): SAELens round trips, SAELens formulas by hand, Gemma
Scope npz, circuit-tracer transcoder directories, every bad-file error, and sae-lens's own
encode/decode (skipped without the bench extra)."""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml
from safetensors.numpy import save_file

from jaxcircuits.dictionaries import core, files
from jaxcircuits.dictionaries.core import DictConfig, Dictionary
from jaxcircuits.models.config import ModelConfig

D, H, DH, F, L = 8, 2, 3, 10, 3    # d_model, heads, head size (H * DH = 6 != D), features, layers
CFG = ModelConfig(checkpoint="gpt2", n_layers=L, d_model=D, n_heads=H, n_kv_heads=H, d_head=DH, d_mlp=16,
                  vocab_size=11, max_positions=16, norm_eps=1e-5, norm="layernorm", activation="gelu_new",
                  gated_mlp=False, position_embedding="learned", tied_embeddings=True)


def _random(dc, seed, dtype=jnp.float32):
    """Params of `dc` with every leaf random (nonzero biases, positive thresholds)."""
    key = jax.random.PRNGKey(seed)
    p = {n: (0.5 * jax.random.normal(jax.random.fold_in(key, i), s)).astype(dtype)
         for i, (n, s) in enumerate(sorted(dc.param_shapes().items()))}
    return {**p, "threshold": jnp.abs(p["threshold"])} if "threshold" in p else p


def _x(d_in, seed=1):
    return np.asarray(jax.random.normal(jax.random.PRNGKey(seed), (5, d_in)), np.float32)


def _write_saelens(path, cfg, tensors):
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "cfg.json"), "w") as f:
        json.dump(cfg, f)
    save_file({n: np.ascontiguousarray(a) for n, a in tensors.items()}, os.path.join(path, "sae_weights.safetensors"))
    return str(path)


def _v6(arch, hook, d_in=D, d_sae=F, **fields):
    """A sae-lens 6 cfg.json."""
    meta = {"hook_name": hook, "model_name": "m", "sae_lens_version": "6.54.12"}
    meta.update(fields.pop("metadata", {}))
    return {"architecture": arch, "d_in": d_in, "d_sae": d_sae, "dtype": "float32", "device": "cpu",
            "apply_b_dec_to_input": True, "normalize_activations": "none", "reshape_activations": "none",
            "metadata": meta, **fields}


def _sae_tensors(rng, d_in=D, d_sae=F, d_out=None, extra=()):
    d_out = d_in if d_out is None else d_out
    shapes = {"W_enc": (d_in, d_sae), "b_enc": (d_sae,), "W_dec": (d_sae, d_out), "b_dec": (d_out,),
              "threshold": (d_sae,), "b_gate": (d_sae,), "r_mag": (d_sae,), "b_mag": (d_sae,), "W_skip": (d_out, d_in)}
    names = ("W_enc", "b_enc", "W_dec", "b_dec") + tuple(extra)
    return {n: rng.normal(size=shapes[n]).astype(np.float32) * 0.5 for n in names}


# ---- round trip -----------------------------------------------------------------------------------

ROUND_TRIPS = [
    (DictConfig("relu", D, F, subtract_b_dec=True), "resid_pre", 0, jnp.float32),
    (DictConfig("topk", H * DH, F, k=3), "head_out", 1, jnp.float32),
    (DictConfig("jumprelu", D, F), "attn_out", 2, jnp.bfloat16),
    (DictConfig("gated", D, F, subtract_b_dec=True), "mlp_out", 1, jnp.float32),
    (DictConfig("relu", D, F, d_out=D), "transcoder", 0, jnp.float16),
    (DictConfig("jumprelu", D, F, d_out=D, skip=True), "transcoder", 2, jnp.float32),
]


@pytest.mark.parametrize("dc,host,layer,dtype", ROUND_TRIPS, ids=lambda v: getattr(v, "kind", None))
def test_save_load_round_trip_is_bit_exact(tmp_path, dc, host, layer, dtype):
    d = Dictionary(dc, _random(dc, 0, dtype), host, layer)
    files.save(str(tmp_path), d, model_name="tiny")
    back = files.load(str(tmp_path), CFG)
    assert (back.config, back.host, back.layer) == (dc, host, layer)
    for name, a in d.params.items():
        b = back.params[name]
        assert b.dtype == a.dtype, name
        np.testing.assert_array_equal(np.asarray(b).view(np.uint8), np.asarray(a).view(np.uint8), err_msg=name)
    with open(tmp_path / "cfg.json") as f:
        meta = json.load(f)["metadata"]
    assert meta["model_name"] == "tiny" and ("hook_name_out" in meta) == (host == "transcoder")


def test_save_refuses_what_saelens_cannot_hold(tmp_path):
    gated_tc = DictConfig("gated", D, F, d_out=D)
    with pytest.raises(ValueError, match="no 'gated' transcoder"):
        files.save(str(tmp_path), Dictionary(gated_tc, _random(gated_tc, 0), "transcoder", 0))
    dc = DictConfig("relu", D, F)
    mixed = {**_random(dc, 0), "b_dec": jnp.zeros(D, jnp.bfloat16)}
    with pytest.raises(ValueError, match="share one dtype"):
        files.save(str(tmp_path), Dictionary(dc, mixed, "resid_pre", 0))
    assert not os.listdir(tmp_path)


def test_negative_thresholds_round_trip_and_act_as_zero(tmp_path):
    """relu(pre) * (pre > t), as SAELens: a threshold below 0 is saved as it is and acts as 0."""
    jump = DictConfig("jumprelu", D, F)
    negative = {**_random(jump, 0), "threshold": -jnp.ones(F)}
    files.save(str(tmp_path), Dictionary(jump, negative, "resid_pre", 0))
    back = files.load(str(tmp_path))
    np.testing.assert_array_equal(back.params["threshold"], negative["threshold"])
    x = jax.random.normal(jax.random.PRNGKey(1), (5, D))
    zero = {**negative, "threshold": jnp.zeros(F)}
    np.testing.assert_array_equal(core.encode(jump, back.params, x), core.encode(jump, zero, x))


# ---- SAELens formulas by hand ---------------------------------------------------------------------


def _relu(a):
    return np.maximum(a, 0)


def _topk(a, k):
    out = np.zeros_like(a)
    idx = np.argsort(-a, axis=-1)[:, :k]
    np.put_along_axis(out, idx, np.take_along_axis(a, idx, -1), -1)
    return _relu(out)


def _hand(arch, t, x, k=None):
    """SAELens's encode and forward (decode of encode, plus the skip) in numpy, from its tensors `t`."""
    sae_in = x - t["b_dec"] if arch in ("standard", "topk", "jumprelu", "gated") else x
    pre = sae_in @ t["W_enc"] + t.get("b_enc", 0)
    if arch == "gated":
        f = (sae_in @ t["W_enc"] + t["b_gate"] > 0) * _relu(sae_in @ (t["W_enc"] * np.exp(t["r_mag"])) + t["b_mag"])
    elif arch == "topk":
        f = _topk(pre, k)
    elif "jumprelu" in arch:
        f = _relu(pre) * (pre > t["threshold"])
    else:
        f = _relu(pre)
    out = f @ t["W_dec"] + t["b_dec"]
    return f, out + (x @ t["W_skip"].T if "W_skip" in t else 0)


HAND = [("standard", "blocks.1.hook_resid_pre", (), {}),
        ("topk", "blocks.0.hook_mlp_out", (), {"k": 3}),
        ("jumprelu", "blocks.2.hook_attn_out", ("threshold",), {}),
        ("gated", "blocks.1.hook_resid_pre", ("b_gate", "r_mag", "b_mag"), {}),
        ("skip_transcoder", "blocks.1.mlp.hook_in", ("W_skip",), {"d_out": D}),
        ("jumprelu_transcoder", "blocks.0.mlp.hook_in", ("threshold",), {"d_out": D})]


@pytest.mark.parametrize("arch,hook,extra,fields", HAND, ids=[h[0] for h in HAND])
def test_loaded_encode_decode_equal_saelens_formulas(tmp_path, arch, hook, extra, fields):
    rng = np.random.default_rng(0)
    t = _sae_tensors(rng, extra=extra)
    if arch == "gated":
        del t["b_enc"]
    if "threshold" in t:
        t["threshold"][:3] = -0.2                         # relu(pre) * (pre > t): a negative t acts as 0
    transcoder = "transcoder" in arch
    meta = {"hook_name_out": f"blocks.{hook.split('.')[1]}.hook_mlp_out"} if transcoder else {}
    cfg = _v6(arch, hook, apply_b_dec_to_input=not transcoder, metadata=meta, **fields)
    d = files.load(_write_saelens(tmp_path, cfg, t), CFG)
    x = _x(D)
    f_want, out_want = _hand(arch, t, x, fields.get("k"))
    f = core.encode(d.config, d.params, jnp.asarray(x))
    np.testing.assert_allclose(f, f_want, atol=1e-5)
    np.testing.assert_allclose(core.decode(d.config, d.params, f, jnp.asarray(x)), out_want, atol=1e-5)
    assert np.count_nonzero(f_want) and (d.host == "transcoder") == transcoder


def test_topk_rescaled_by_decoder_norm_is_folded(tmp_path):
    rng = np.random.default_rng(1)
    t = _sae_tensors(rng)
    t["W_dec"] *= rng.uniform(0.2, 3.0, size=(F, 1)).astype(np.float32)
    d = files.load(_write_saelens(tmp_path, _v6("topk", "blocks.0.hook_resid_pre", k=3,
                                                rescale_acts_by_decoder_norm=True), t))
    x = _x(D)
    n = np.linalg.norm(t["W_dec"], axis=-1)
    pre = (x - t["b_dec"]) @ t["W_enc"] + t["b_enc"]
    f_want = _topk(pre * n, 3)                            # sae-lens: topk of pre * |W_dec row|
    out_want = (f_want / n) @ t["W_dec"] + t["b_dec"]
    f = core.encode(d.config, d.params, jnp.asarray(x))
    np.testing.assert_allclose(f, f_want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(core.decode(d.config, d.params, f), out_want, rtol=1e-5, atol=1e-5)


def test_pre6_layout_loads(tmp_path):
    rng = np.random.default_rng(2)
    t = {**_sae_tensors(rng), "scaling_factor": np.ones(F, np.float32)}
    cfg = {"d_in": D, "d_sae": F, "hook_point": "blocks.0.hook_resid_post", "hook_point_layer": 0,
           "hook_point_head_index": None, "activation_fn_str": "topk", "activation_fn_kwargs": {"k": 2},
           "normalize_activations": False, "apply_b_dec_to_input": False, "dtype": "torch.float32"}
    d = files.load(_write_saelens(tmp_path, cfg, t), CFG)
    assert (d.config.kind, d.config.k, d.config.subtract_b_dec, d.host, d.layer) == ("topk", 2, False, "resid_pre", 1)


# ---- sites and model fit --------------------------------------------------------------------------


def test_hooks_place_saes(tmp_path):
    rng = np.random.default_rng(3)
    for i, (hook, host, layer, d_in) in enumerate([("blocks.0.hook_resid_post", "resid_pre", 1, D),
                                                   ("blocks.2.attn.hook_z", "head_out", 2, H * DH),
                                                   ("blocks.1.hook_attn_out", "attn_out", 1, D),
                                                   ("blocks.2.hook_mlp_out", "mlp_out", 2, D)]):
        path = _write_saelens(tmp_path / str(i), _v6("standard", hook, d_in=d_in), _sae_tensors(rng, d_in))
        d = files.load(path, CFG)
        assert (d.host, d.layer, d.config.d_in) == (host, layer, d_in)
        assert files.load(path, host=host, layer=layer).host == host     # an agreeing placement is accepted
    with pytest.raises(ValueError, match="not host=mlp_out"):
        files.load(path, host="mlp_out", layer=0)


@pytest.mark.parametrize("hook,d_in,match", [
    (f"blocks.{L - 1}.hook_resid_post", D, "resid_final"),
    ("blocks.0.attn.hook_q", D, "not a site an SAE"),
    ("blocks.0.attn.hook_z", D, r"d_in=8 .* 6 -> 6 wide"),              # hook_z is H * Dh wide
    ("blocks.1.hook_resid_pre", D + 1, "d_in=9"),
    (f"blocks.{L}.hook_mlp_out", D, "layer out of range"),
])
def test_saes_that_do_not_fit_the_model(tmp_path, hook, d_in, match):
    path = _write_saelens(tmp_path, _v6("standard", hook, d_in=d_in), _sae_tensors(np.random.default_rng(4), d_in))
    with pytest.raises(ValueError, match=match):
        files.load(path, CFG)


@pytest.mark.parametrize("hook_in,hook_out,match", [
    ("blocks.1.hook_resid_mid", "blocks.1.hook_mlp_out", "un-normed residual"),
    ("blocks.1.hook_resid_pre", "blocks.1.hook_mlp_out", "reads the MLP's normed input"),
    ("blocks.1.mlp.hook_in", "blocks.2.hook_mlp_out", "writes that layer's MLP output"),
    ("blocks.1.ln2.hook_normalized", "blocks.1.hook_mlp_out", "before its weight and bias"),
    ("blocks.1.mlp.hook_in", "blocks.1.mlp.hook_out", "before the norm that follows this model's MLP"),
])
def test_transcoder_hooks(tmp_path, hook_in, hook_out, match):
    t = _sae_tensors(np.random.default_rng(5))
    cfg = _v6("transcoder", hook_in, d_out=D, apply_b_dec_to_input=False, metadata={"hook_name_out": hook_out})
    with pytest.raises(ValueError, match=match):
        files.load(_write_saelens(tmp_path, cfg, t), dataclasses.replace(CFG, post_norms=True))


def test_transcoders_ignore_apply_b_dec_to_input(tmp_path):
    """SAELens' transcoders encode x itself whatever apply_b_dec_to_input says (its default is true)."""
    t = _sae_tensors(np.random.default_rng(5))
    cfg = _v6("transcoder", "blocks.1.mlp.hook_in", d_out=D, apply_b_dec_to_input=True,
              metadata={"hook_name_out": "blocks.1.hook_mlp_out"})
    assert not files.load(_write_saelens(tmp_path, cfg, t)).config.subtract_b_dec


# ---- bad files ------------------------------------------------------------------------------------


def _bad(cfg_change=None, tensor_change=None):
    def make(path):
        t = _sae_tensors(np.random.default_rng(6))
        cfg = _v6("standard", "blocks.0.hook_resid_pre")
        (cfg_change or (lambda c: None))(cfg)
        (tensor_change or (lambda t: None))(t)
        return _write_saelens(path, cfg, t)
    return make


def _nan(t):
    t["W_dec"][1, 2] = np.nan


def _corrupt(path):
    p = _bad()(path)
    with open(os.path.join(p, "sae_weights.safetensors"), "r+b") as f:
        f.truncate(40)
    return p


BAD = {
    "normalize": (_bad(lambda c: c.update(normalize_activations="expected_average_only_in")), "'normalize_activations'"),
    "head_index": (_bad(lambda c: c["metadata"].update(hook_head_index=1)), "'hook_head_index'"),
    "architecture": (_bad(lambda c: c.update(architecture="matryoshka_batchtopk")), "'architecture'"),
    "dtype": (_bad(lambda c: c.update(dtype="int8")), "'dtype'"),
    "d_sae": (_bad(lambda c: c.update(d_sae=F + 1)), r"tensor 'W_enc' has shape \(8, 10\), expected \(8, 11\)"),
    "missing_tensor": (_bad(tensor_change=lambda t: t.pop("b_enc")), "missing tensor 'b_enc'"),
    "extra_tensor": (_bad(tensor_change=lambda t: t.update(threshold=np.ones(F, np.float32))), "unexpected tensor 'threshold'"),
    "nan": (_bad(tensor_change=_nan), "'W_dec' has 1 NaN"),
    "int_tensor": (_bad(tensor_change=lambda t: t.update(b_dec=np.ones(D, np.int32))), "not floating point"),
    "no_hook": (_bad(lambda c: c["metadata"].pop("hook_name")), "'hook_name'"),
    "topk_k": (_bad(lambda c: c.update(architecture="topk")), "'k'"),
    "activation_fn": (_bad(lambda c: (c.pop("metadata"), c.update(activation_fn_str="tanh"))), "activation_fn 'tanh'"),
    "corrupt": (_corrupt, "sae_weights.safetensors is not a valid safetensors"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_saelens_files_are_clear_errors(tmp_path, case):
    make, match = BAD[case]
    with pytest.raises(ValueError, match=match):
        files.load(make(tmp_path))


def test_missing_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere does not exist"):
        files.load(str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="cfg.json \\(SAELens\\), params.npz"):
        files.load(str(tmp_path))
    with open(tmp_path / "cfg.json", "w") as f:
        json.dump(_v6("standard", "blocks.0.hook_resid_pre"), f)
    with pytest.raises(FileNotFoundError, match="sae_weights.safetensors does not exist"):
        files.load(str(tmp_path / "cfg.json"))
    with open(tmp_path / "cfg.json", "w") as f:
        f.write("{not json")
    save_file(_sae_tensors(np.random.default_rng(0)), str(tmp_path / "sae_weights.safetensors"))
    with pytest.raises(ValueError, match="cfg.json is not valid JSON"):
        files.load(str(tmp_path))


# ---- Gemma Scope ----------------------------------------------------------------------------------


def test_gemma_scope_npz(tmp_path):
    rng = np.random.default_rng(7)
    t = {n: a for n, a in _sae_tensors(rng, extra=("threshold",)).items()}
    t["threshold"] = np.abs(t["threshold"])
    np.savez(tmp_path / "params.npz", **t)
    with pytest.raises(ValueError, match="pass host= .* and layer="):
        files.load(str(tmp_path))
    d = files.load(str(tmp_path / "params.npz"), CFG, host="resid_pre", layer=2)
    assert (d.config, d.host, d.layer) == (DictConfig("jumprelu", D, F), "resid_pre", 2)
    x = _x(D)
    pre = x @ t["W_enc"] + t["b_enc"]                     # Gemma Scope: no b_dec subtracted first
    f_want = _relu(pre) * (pre > t["threshold"])
    np.testing.assert_allclose(core.encode(d.config, d.params, jnp.asarray(x)), f_want, atol=1e-5)
    np.testing.assert_allclose(core.reconstruct(d.config, d.params, jnp.asarray(x)),
                               f_want @ t["W_dec"] + t["b_dec"], atol=1e-5)
    tc = files.load(str(tmp_path), host="transcoder", layer=0)
    assert tc.config.d_out == D and tc.host == "transcoder"
    with pytest.raises(ValueError, match="d_in=8 and writes d_out=8, but the model's head_out is 6 -> 6"):
        files.load(str(tmp_path), CFG, host="head_out", layer=0)
    np.savez(tmp_path / "params.npz", **{**t, "threshold": np.full(F, np.inf, np.float32)})
    with pytest.raises(ValueError, match="'threshold' has 10 NaN or infinite"):
        files.load(str(tmp_path), host="resid_pre", layer=0)


# ---- circuit-tracer -------------------------------------------------------------------------------


def _ct_layer(rng, dec_transposed=False, skip=True):
    t = {"W_enc": rng.normal(size=(F, D)), "b_enc": rng.normal(size=F), "b_dec": rng.normal(size=D),
         "W_dec": rng.normal(size=(D, F) if dec_transposed else (F, D))}
    if skip:
        t["W_skip"] = rng.normal(size=(D, D))
    return {n: (0.5 * a).astype(np.float32) for n, a in t.items()}


def _write_ct(path, config, layers):
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.yaml"), "w") as f:
        yaml.safe_dump(config, f)
    for name, t in layers.items():
        save_file(t, os.path.join(path, name))
    return str(path)


def test_circuit_tracer_transcoders(tmp_path):
    rng = np.random.default_rng(8)
    layers = {"layer_0.safetensors": _ct_layer(rng), "layer_1.safetensors": _ct_layer(rng, dec_transposed=True)}
    config = {"model_kind": "transcoder_set", "model_name": "m", "feature_input_hook": "mlp.hook_in",
              "feature_output_hook": "hook_mlp_out",
              "transcoders": ["hf://owner/repo/layer_0.safetensors", "layer_1.safetensors"]}
    dicts = files.load(_write_ct(tmp_path / "new", config, layers), CFG)
    assert [(d.host, d.layer, d.config.skip) for d in dicts] == [("transcoder", 0, True), ("transcoder", 1, True)]
    x = _x(D)
    for d, t in zip(dicts, layers.values()):
        w_dec = t["W_dec"] if t["W_dec"].shape == (F, D) else t["W_dec"].T
        want = _relu(x @ t["W_enc"].T + t["b_enc"]) @ w_dec + t["b_dec"] + x @ t["W_skip"].T
        np.testing.assert_allclose(core.reconstruct(d.config, d.params, jnp.asarray(x)), want, atol=1e-4)
    # the older config (id, layer, filepath entries) and a directory of layer files without a list
    old = {**config, "feature_input_hook": "mlp.hook_in", "feature_output_hook": "mlp.hook_out",
           "transcoders": [{"id": "b", "layer": 1, "filepath": "layer_1.safetensors"},
                           {"id": "a", "layer": 0, "filepath": "layer_0.safetensors"}]}
    assert [d.layer for d in files.load(_write_ct(tmp_path / "old", old, layers))] == [0, 1]
    listed = {k: v for k, v in config.items() if k != "transcoders"}
    assert len(files.load(_write_ct(tmp_path / "glob", listed, layers))) == 2


def test_circuit_tracer_jumprelu_transcoders(tmp_path):
    """A layer file holding activation_function.threshold is circuit-tracer's JumpReLU, pre * (pre >
    threshold) (the same as ours for thresholds >= 0); a negative threshold, or config.yaml's
    activation saying otherwise, is refused."""
    rng = np.random.default_rng(10)
    t = {**_ct_layer(rng), files.CT_THRESHOLD: np.abs(rng.normal(size=F)).astype(np.float32) * 0.5}
    config = {"model_kind": "transcoder_set", "feature_input_hook": "mlp.hook_in",
              "feature_output_hook": "hook_mlp_out", "transcoders": ["layer_0.safetensors"]}
    d = files.load(_write_ct(tmp_path / "ok", {**config, "activation": "jumprelu"}, {"layer_0.safetensors": t}), CFG)
    assert d.config.kind == "jumprelu" and d.config.skip
    x = _x(D)
    pre = x @ t["W_enc"].T + t["b_enc"]
    f_want = pre * (pre > t[files.CT_THRESHOLD])
    assert 0 < (f_want != 0).sum() < f_want.size and (_relu(pre) != 0).sum() > (f_want != 0).sum()
    np.testing.assert_allclose(core.encode(d.config, d.params, jnp.asarray(x)), f_want, atol=1e-5)
    np.testing.assert_allclose(core.reconstruct(d.config, d.params, jnp.asarray(x)),
                               f_want @ t["W_dec"] + t["b_dec"] + x @ t["W_skip"].T, atol=1e-4)
    with pytest.raises(ValueError, match="holds a 'jumprelu' transcoder.*activation 'relu'"):
        files.load(_write_ct(tmp_path / "says_relu", {**config, "activation": "relu"}, {"layer_0.safetensors": t}))
    t[files.CT_THRESHOLD][3] = -0.1
    with pytest.raises(ValueError, match="1 threshold.s. below 0"):
        files.load(_write_ct(tmp_path / "negative", config, {"layer_0.safetensors": t}))


@pytest.mark.parametrize("change,match", [
    ({"feature_input_hook": "hook_resid_mid"}, "un-normed residual"),
    ({"activation": "jumprelu"}, "holds a 'relu' transcoder"),
    ({"model_kind": "cross_layer_transcoder"}, "'model_kind'"),
    ({"activation": "topk"}, "'activation'"),
    ({"transcoders": ["hf://owner/repo/layer_9.safetensors"]}, "layer_9.safetensors does not exist"),
    ({"transcoders": [{"layer": 1, "filepath": "layer_1.safetensors"}]}, "not 0..0"),
])
def test_bad_circuit_tracer_dirs(tmp_path, change, match):
    rng = np.random.default_rng(9)
    config = {"feature_input_hook": "mlp.hook_in", "feature_output_hook": "hook_mlp_out", **change}
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        files.load(_write_ct(tmp_path, config, {"layer_0.safetensors": _ct_layer(rng),
                                                "layer_1.safetensors": _ct_layer(rng)}))


# ---- sae-lens itself ------------------------------------------------------------------------------

SAELENS = {"standard": {}, "topk": {"k": 3}, "jumprelu": {}, "gated": {},
           "skip_transcoder": {"d_out": D, "apply_b_dec_to_input": False},
           "jumprelu_transcoder": {"d_out": D, "apply_b_dec_to_input": False}}


@pytest.mark.parametrize("arch", sorted(SAELENS))
def test_agrees_with_sae_lens(tmp_path, arch):
    """Files sae-lens saves load here with its encode/decode; files saved here load in sae-lens."""
    pytest.importorskip("sae_lens")
    import torch
    from sae_lens import SAE
    hook = "blocks.1.mlp.hook_in" if "transcoder" in arch else "blocks.1.hook_resid_pre"
    meta = {"hook_name": hook, "model_name": "m"}
    if "transcoder" in arch:
        meta["hook_name_out"] = "blocks.1.hook_mlp_out"
    sae = SAE.from_dict({"architecture": arch, "d_in": D, "d_sae": F, "metadata": meta, **SAELENS[arch]})
    torch.manual_seed(0)
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(0.5 * torch.randn_like(p))
        if arch.startswith("jumprelu"):
            sae.threshold.abs_()
    sae.save_model(str(tmp_path / "theirs"))
    x = _x(D)
    ours = files.load(str(tmp_path / "theirs"), CFG)
    files.save(str(tmp_path / "ours"), ours)
    for their in (sae, SAE.load_from_disk(str(tmp_path / "ours"))):
        with torch.no_grad():
            f_want = their.encode(torch.from_numpy(x)).numpy()
            out_want = their(torch.from_numpy(x)).numpy()
        f = core.encode(ours.config, ours.params, jnp.asarray(x))
        np.testing.assert_allclose(f, f_want, atol=1e-5)
        np.testing.assert_allclose(core.decode(ours.config, ours.params, f, jnp.asarray(x)), out_want, atol=1e-5)


@pytest.mark.parametrize("variant", ["gpt2", "llama_gqa"])
def test_transcoder_on_hook_normalized_is_folded_to_read_mlp_in(tiny, tmp_path, variant):
    """A skip transcoder reading TL's ln2.hook_normalized u (the norm's output before its weight and
    bias, computed here by hand from the mid-layer residual) gives, folded, the same features and
    output from our mlp_in h = u * w + b."""
    from jaxcircuits.models import transformer
    _, cfg, params = tiny(variant)
    d = cfg.d_model
    t = _sae_tensors(np.random.default_rng(7), d_in=d, d_out=d, extra=("W_skip",))
    c = _v6("skip_transcoder", "blocks.1.ln2.hook_normalized", d_in=d, d_out=d,
            metadata={"hook_name_out": "blocks.1.hook_mlp_out"})
    path = _write_saelens(tmp_path, c, t)
    with pytest.raises(ValueError, match="pass the model's cfg and params"):
        files.load(path, cfg)
    folded = files.load(path, cfg, params=params)
    raw = Dictionary(folded.config, {"w_enc": jnp.asarray(t["W_enc"]), "b_enc": jnp.asarray(t["b_enc"]),
                                     "w_dec": jnp.asarray(t["W_dec"]), "b_dec": jnp.asarray(t["b_dec"]),
                                     "w_skip": jnp.asarray(t["W_skip"].T)}, "transcoder", 1)
    tokens = np.arange(3, 11)[None]
    _, cache = transformer.forward(params, cfg, tokens, collect=("resid_pre", "attn_out", "mlp_in"))
    mid = np.asarray(cache["resid_pre"][1] + cache["attn_out"][1], np.float64)
    if cfg.norm == "layernorm":
        mid = mid - mid.mean(-1, keepdims=True)
    u = mid / np.sqrt((mid * mid).mean(-1, keepdims=True) + cfg.norm_eps)
    h = cache["mlp_in"][1]
    np.testing.assert_allclose(core.encode(folded.config, folded.params, h),
                               core.encode(raw.config, raw.params, jnp.asarray(u, jnp.float32)), atol=2e-4)
    np.testing.assert_allclose(core.reconstruct(folded.config, folded.params, h),
                               core.reconstruct(raw.config, raw.params, jnp.asarray(u, jnp.float32)), atol=2e-4)
