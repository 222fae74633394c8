"""Bad input and damaged files: a clear error before any work, damaged caches rebuilt, no silent wrong numbers."""

import json
import logging
import os
import re
import shutil
import struct

import chex
import gguf
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import jaxcircuits as jc
from jaxcircuits.weights import tokenize
from jaxcircuits.models.config import ModelConfig, UnsupportedConfigError
from jaxcircuits.models.transformer import forward
from jaxcircuits.weights.tokenize import load_tokenizer
from jaxcircuits.weights import cached_load, load_gguf, load_hf_dir, load_params
from tests import fixtures_tokenizers as F
from tests import hf_reference as ref
from tests.conftest import make_hf_model, random_tokens
from tests.test_weights import LLAMA3, CountingLoader, _entries, _llama, _llama3_rope_freqs, _write_gguf

NAN32 = struct.pack("<f", float("nan"))


def _overwrite(path, offset, data: bytes):
    """Same-size edit: `data` over the bytes of `path` at `offset`."""
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def _flip_bit(path, offset):
    """Same-size edit: the lowest bit of the byte of `path` at `offset` flipped."""
    with open(path, "rb") as f:
        f.seek(offset)
        byte = f.read(1)[0]
    _overwrite(path, offset, bytes([byte ^ 1]))


# ---------------------------------------------------------------- damaged caches


@pytest.mark.parametrize("damage", ["params-chunk", "config", "no-checksum"])
def test_params_cache_edit_is_detected_and_rebuilt(tmp_path, monkeypatch, caplog, damage):
    """A same-size edit of a cached entry (a flipped weight byte, a config digit) is never served."""
    monkeypatch.setenv("JAXCIRCUITS_CACHE", str(tmp_path / "cache"))
    _llama(tmp_path / "ckpt")
    load = CountingLoader()
    _, params = cached_load(str(tmp_path / "ckpt"), jnp.float32, load)
    entry = tmp_path / "cache" / "params" / _entries(tmp_path / "cache")[0]
    if damage == "params-chunk":   # uncompressed zarr: the byte is a weight, restored without a word
        chunk = max((p for p in (entry / "params").rglob("*") if p.is_file()), key=os.path.getsize)
        _flip_bit(chunk, os.path.getsize(chunk) // 2)
    elif damage == "config":       # rms_norm eps 1e-06 -> 9e-06: a valid, different model
        config = next(p for p in (entry / "config").rglob("*") if p.is_file() and b"1e-06" in p.read_bytes())
        config.write_bytes(config.read_bytes().replace(b"1e-06", b"9e-06"))
    else:
        os.remove(f"{entry}.sha256")
    def warned():
        return [r.getMessage() for r in caplog.records if r.name == "jaxcircuits.weights.cache"]

    with caplog.at_level(logging.WARNING, logger="jaxcircuits.weights.cache"):
        cfg, rebuilt = cached_load(str(tmp_path / "ckpt"), jnp.float32, load)
        assert load.calls == 2 and len(warned()) == 1 and f"{entry} is damaged" in warned()[0]
        assert cfg.norm_eps == 1e-6
        chex.assert_trees_all_equal(rebuilt, params)
        _, again = cached_load(str(tmp_path / "ckpt"), jnp.float32, load)   # the rebuilt entry is a hit
        assert load.calls == 2 and len(warned()) == 1
        chex.assert_trees_all_equal(again, params)


def test_tokenizer_cache_edit_is_detected_and_rebuilt(tmp_path, monkeypatch, caplog):
    """A same-size edit of a converted GGUF tokenizer (one vocabulary letter) is converted again."""
    reference = F.ours("smollm2")
    converted = F.cache_dir() / "tokenizers" / tokenize._gguf_cache_key(F.smollm2_gguf())
    calls = []
    monkeypatch.setattr(tokenize, "_convert_gguf", lambda path, out: (
        calls.append(path), shutil.copytree(converted, out, dirs_exist_ok=True)))
    load_tokenizer(F.smollm2_gguf(), cache_dir=tmp_path)
    tok_json = tmp_path / "tokenizers" / converted.name / "tokenizer.json"
    text = tok_json.read_bytes()
    tok_json.write_bytes(text.replace('"Ġbigger"'.encode(), '"Ġbiggar"'.encode(), 1))
    assert tok_json.read_bytes() != text and len(tok_json.read_bytes()) == len(text)
    with caplog.at_level(logging.WARNING, logger="jaxcircuits.weights.tokenize"):
        tok = load_tokenizer(F.smollm2_gguf(), cache_dir=tmp_path)
    assert len(calls) == 2 and "is damaged" in caplog.text and "converting the tokenizer" in caplog.text
    prompt = "Which is bigger: 9.8 or 9.11?"
    assert tok.encode(prompt) == reference.encode(prompt)
    assert tok_json.read_bytes() == text


# ---------------------------------------------------------------- damaged weight files


def test_safetensors_nan_bytes_name_tensor_and_file(tmp_path):
    _llama(tmp_path)
    path = tmp_path / "model.safetensors"
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
    name = "model.layers.1.mlp.up_proj.weight"
    _overwrite(path, 8 + n + header[name]["data_offsets"][0] + 4 * 5, NAN32 * 3)   # values 5, 6, 7
    with pytest.raises(ValueError, match=rf"tensor '{name}' in {re.escape(str(path))} has 3 NaN or infinite "
                                         r"value\(s\) of 1536 \(as float32\): the file is damaged"):
        load_hf_dir(tmp_path)


def test_gguf_nan_bytes_name_tensor_and_file(tmp_path):
    sd = _llama(tmp_path, **LLAMA3)
    path = tmp_path / "m.gguf"
    _write_gguf(path, sd, json.loads((tmp_path / "config.json").read_text()),
                rope_freqs=_llama3_rope_freqs(500000.0, 16, 8.0))
    tensor = next(t for t in gguf.GGUFReader(str(path)).tensors if t.name == "blk.0.attn_v.weight")
    _overwrite(path, tensor.data_offset, NAN32)
    with pytest.raises(ValueError, match=rf"tensor 'blk.0.attn_v.weight' in {re.escape(str(path))} has 1 NaN"):
        load_gguf(path)


# ---------------------------------------------------------------- configs


@pytest.mark.parametrize("name", ["gpt2", "llama_gqa"])
def test_tied_config_with_own_lm_head_matches_hf(tmp_path, name):
    """tie_word_embeddings: true, but the checkpoint has a different lm_head.weight: transformers keeps
    that head (it does not tie), so we do too; an lm_head equal to the embeddings stays tied."""
    model = make_hf_model(name)
    assert model.config.tie_word_embeddings
    model.save_pretrained(tmp_path)
    sd = load_file(tmp_path / "model.safetensors")
    assert "lm_head.weight" not in sd
    embed = next(k for k in sd if k.endswith(("embed_tokens.weight", "wte.weight")))
    toks = random_tokens(4, 2, 9)
    for head, tied in ((sd[embed].clone(), True), (0.15 * torch.randn_like(sd[embed]), False)):
        save_file({**sd, "lm_head.weight": head}, tmp_path / "model.safetensors", metadata={"format": "pt"})
        hf = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
        cfg, params = load_hf_dir(tmp_path)
        assert cfg.tied_embeddings == tied and ("unembed" in params) != tied
        got = np.asarray(forward(params, cfg, jnp.asarray(toks))[0])
        np.testing.assert_allclose(got, ref.run(hf, toks).logits.numpy(), atol=1e-4, rtol=0)


_LLAMA_CFG = {"model_type": "llama", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2, "intermediate_size": 48, "vocab_size": 64, "tie_word_embeddings": False}


def _config_error(path, message, kind=ValueError):
    """pytest.raises for a `kind` error whose message starts with the file's path."""
    return pytest.raises(kind, match=f"^{re.escape(str(path))}:? {message}")


MISSING = object()


@pytest.mark.parametrize("edit, match", [
    ({"hidden_size": MISSING}, "required config field 'hidden_size' is missing"),
    ({"num_hidden_layers": "two"}, "config field 'num_hidden_layers'='two' is invalid: expected a positive integer"),
    ({"rms_norm_eps": "1e-6"}, "config field 'rms_norm_eps'='1e-6' is invalid: expected a number"),
    ({"tie_word_embeddings": "no"}, "config field 'tie_word_embeddings'='no' is invalid: expected true or false"),
    ({"rope_scaling": {"rope_type": "linear"}}, "required config field 'rope_scaling.factor' is missing"),
    ({"eos_token_id": "</s>"}, "config field 'eos_token_id'='</s>' is invalid: expected a token id"),
    ({"model_type": "gpt2", "n_embd": "48"}, "config field 'n_embd'='48' is invalid: expected a positive integer"),
    ({"model_type": "gpt2", "n_embd": 48, "n_head": 5}, "n_embd=48 is not a multiple of n_head=5"),
], ids=["missing", "non-numeric-int", "non-numeric-float", "non-bool", "rope-missing", "token-id", "gpt2",
        "gpt2-heads"])
def test_bad_config_values_name_file_and_field(tmp_path, edit, match):
    base = {"model_type": "gpt2"} if edit.get("model_type") == "gpt2" else _LLAMA_CFG
    config = {k: v for k, v in {**base, **edit}.items() if v is not MISSING}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with _config_error(tmp_path / "config.json", match, UnsupportedConfigError):
        load_hf_dir(tmp_path)


@pytest.mark.parametrize("text, match", [
    ('{"model_type": "llama", "hidden_size": 32,',
     r"is not valid JSON \(Expecting property name enclosed in double quotes at line 1 column 43\)"),
    ("[1, 2]", "must hold a JSON object, not a list"),
], ids=["malformed", "not-an-object"])
def test_bad_json_names_the_file(tmp_path, text, match):
    _llama(tmp_path)
    for name in ("model.safetensors.index.json", "config.json"):
        (tmp_path / name).write_text(text)
        with _config_error(tmp_path / name, match):
            load_hf_dir(tmp_path)


def test_yarn_beside_rope_parameters_names_yarn(tmp_path):
    """As transformers >= 5, a set rope_scaling wins over rope_parameters: the error names what it asks for."""
    hf = {**_LLAMA_CFG, "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
          "rope_scaling": {"type": "yarn", "factor": 4.0}}
    (tmp_path / "config.json").write_text(json.dumps(hf))
    with _config_error(tmp_path / "config.json", r"config field 'rope_scaling' type 'yarn' is not supported "
                       r"\(supported: default, linear, llama3\)", UnsupportedConfigError):
        ModelConfig.from_json(tmp_path)


def test_rope_scaling_beside_rope_parameters_as_hf():
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    hf = {**_LLAMA_CFG, "rope_theta": 500000.0, "rope_scaling": {"type": "linear", "factor": 2.0},
          "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}}
    want, _ = ROPE_INIT_FUNCTIONS["linear"](LlamaConfig(**hf), "cpu")
    cfg = ModelConfig.from_hf(hf)
    assert (cfg.rope.kind, cfg.rope.theta, cfg.rope.factor) == ("linear", 500000.0, 2.0)
    np.testing.assert_allclose(cfg.rope.inv_freq(cfg.d_head), want.numpy(), rtol=1e-6)


def test_max_positions_is_the_context_length(tiny):
    """The context length the forward checks prompts against: n_positions (GPT-2), max_position_embeddings (Llama)."""
    for name, field in (("gpt2", "n_positions"), ("llama_mha", "max_position_embeddings")):
        model, cfg, _ = tiny(name)
        assert cfg.max_positions == getattr(model.config, field) not in (1024, 2048)   # not the defaults
    _, cfg, params = tiny("gpt2")
    assert params["embed"]["positions"].shape[0] == cfg.max_positions


# ---------------------------------------------------------------- arguments


@pytest.mark.parametrize("dtype", ["int8", jnp.int8, jnp.float16, "fp32"])
def test_non_float_dtype_is_refused_before_any_work(tmp_path, dtype):
    msg = r"is not supported for params \(supported: float32, bfloat16\)"
    with pytest.raises(ValueError, match=msg):          # before the name is even resolved
        jc.load(str(tmp_path / "no-such-model"), dtype=dtype)
    with pytest.raises(ValueError, match=msg):
        load_params(str(tmp_path / "no-such-model"), dtype)
    with pytest.raises(ValueError, match=msg):
        load_hf_dir(tmp_path / "no-such-model", dtype)


def test_empty_prompt_names_its_index(tiny_dir):
    tok = load_tokenizer(tiny_dir)
    assert tok.encode("") == []
    for build in (lambda: tok.batch(["a prompt", "", "another", ""]), lambda: tok.pad([[5, 6], [], [7], []])):
        with pytest.raises(ValueError, match=r"prompt\(s\) at index \[1, 3\] have no tokens"):
            build()


@pytest.mark.parametrize("extra_rows", [-49088, 64])
def test_a_tokenizer_larger_than_the_model_vocabulary_is_refused_at_load(tmp_path, monkeypatch, extra_rows):
    """Tokenizer ids past the embedding are an error naming both sizes; more embedding rows than
    tokenizer ids (padding, as many real checkpoints have) load."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from tests.conftest import SMOLLM2_GGUF
    monkeypatch.setenv("JAXCIRCUITS_CACHE", str(tmp_path / "cache"))
    tok = load_tokenizer(SMOLLM2_GGUF)
    vocab = tok.vocab_size + extra_rows
    LlamaForCausalLM(LlamaConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                                 intermediate_size=16, vocab_size=vocab, tie_word_embeddings=True)
                     ).save_pretrained(tmp_path / "m")
    tok.hf.save_pretrained(tmp_path / "m")
    if extra_rows < 0:
        with pytest.raises(ValueError, match=f"the tokenizer has {tok.vocab_size} ids but the model's embedding only "
                                             f"{vocab} rows"):
            jc.load(str(tmp_path / "m"))
        assert not (tmp_path / "cache" / "params").exists()          # refused before the weights are converted
    else:
        assert jc.load(str(tmp_path / "m")).cfg.vocab_size == vocab
