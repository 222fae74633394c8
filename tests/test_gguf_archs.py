"""GGUF files of the families llama.cpp defines (`gguf_file.ARCHS`): a tiny random HF model written as
llama.cpp's converter writes it (F32 tensors under the `gguf` package's names for the architecture,
its metadata keys, Gemma's norm weights stored as 1 + w), loaded by `load_gguf` and by transformers'
own GGUF reader (`from_pretrained(..., gguf_file=...)`, the independent reference): logits match both
it and the HF model written. The configs are ones HF's reader reads back whole (it ignores Qwen3's
key_length and Gemma's query scale, taking its defaults: head dims 128 and 256 here).

Architectures transformers cannot read (olmo2, gptneox, smollm3): the file is written by llama.cpp's
own converter (`tests/fixtures_llama_cpp.py`, from the llama-cpp-python sdist; the tests skip, saying
so, when it cannot be fetched) from the saved HF model, whose logits ours must match.
"""

import dataclasses
import json

import gguf
import numpy as np
import pytest
import torch

import jaxcircuits as jc
from jaxcircuits.models.config import ModelConfig, UnsupportedConfigError
from jaxcircuits.models.transformer import forward
from jaxcircuits.weights.gguf_file import load_gguf
from tests import fixtures_llama_cpp as llama_cpp
from tests import hf_reference as ref
from tests.conftest import left_padded_mask, random_tokens

ATOL = 1e-4
COMMON = dict(hidden_size=32, intermediate_size=48, vocab_size=128, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=0, num_hidden_layers=2)
# llama.cpp architecture -> (HF config class, its arguments)
ARCHS = {
    "qwen2": ("Qwen2Config", {}),
    "qwen3": ("Qwen3Config", dict(head_dim=128)),
    "phi3": ("Phi3Config", {}),
    "gemma2": ("Gemma2Config", dict(head_dim=256, sliding_window=4)),
    # layer 5 of 6 is the global one (llama.cpp's pattern 6)
    "gemma3": ("Gemma3TextConfig", dict(head_dim=256, sliding_window=4, num_hidden_layers=6)),
}
B, T, PADS = 2, 12, [0, 3]


def _as_pythia(config: dict) -> dict:
    """config.json as Pythia's checkpoints have it (transformers 4's keys rotary_pct, rotary_emb_base,
    which llama.cpp's converter reads), from transformers 5's rope_parameters."""
    rope = config.pop("rope_parameters")
    return {**config, "rotary_pct": rope["partial_rotary_factor"], "rotary_emb_base": rope["rope_theta"]}


# llama.cpp architecture -> (HF config class, its arguments (None: left out), config.json as the family's
# checkpoints write it): files written by llama.cpp's converter
CONVERTED = {
    "olmo2": ("Olmo2Config", {}, None),
    # Pythia's RoPE base, 1e4: llama.cpp's converter stores none (llama.cpp's default is 1e4)
    "gptneox": ("GPTNeoXConfig", dict(num_key_value_heads=None, rotary_pct=0.5), _as_pythia),
    # layer 3 of 4 without RoPE: HF's default interval, which llama.cpp fixes (GGUF stores no flags)
    "smollm3": ("SmolLM3Config", dict(num_hidden_layers=4), None),
}


def write_gguf(path, model, arch: str, tokenizer: bool = False, extra=None) -> None:
    """`model` as llama.cpp's convert_hf_to_gguf writes it: F32, its tensor names, Gemma's norms + 1;
    with a byte-level `tokenizer`; `extra` metadata {key: float | int}."""
    c = model.config
    rope = c.rope_parameters.get("full_attention", c.rope_parameters)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(c.num_hidden_layers)
    w.add_vocab_size(c.vocab_size)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_freq_base(rope["rope_theta"])
    if arch.startswith("gemma"):
        w.add_sliding_window(c.sliding_window)
    if arch == "gemma2":
        w.add_attn_logit_softcapping(c.attn_logit_softcapping)
        w.add_final_logit_softcapping(c.final_logit_softcapping)
    w.add_bos_token_id(c.bos_token_id)
    w.add_eos_token_id(c.eos_token_id)
    w.add_pad_token_id(c.pad_token_id)
    for key, value in (extra or {}).items():
        w.add_float32(key, value) if isinstance(value, float) else w.add_uint32(key, value)
    if tokenizer:                         # byte-level: printable ASCII, 'Ġ' (space) and the merge 'a b'
        w.add_tokenizer_model("gpt2")
        w.add_token_list([chr(i) for i in range(33, 127)] + ["Ġ", "ab"])
        w.add_token_merges(["a b"])
        w.add_token_types([1] * 96)
    table = gguf.get_tensor_name_map(next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch), c.num_hidden_layers)
    for name, x in model.state_dict().items():
        if name == "lm_head.weight" and c.tie_word_embeddings:
            continue
        module, suffix = name.rsplit(".", 1)
        x = x.numpy() + (1.0 if arch.startswith("gemma") and name.endswith("norm.weight") else 0.0)
        w.add_tensor(f"{table.get_name(module)}.{suffix}", np.ascontiguousarray(x, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _random_model(cls: str, kwargs: dict):
    import transformers
    torch.manual_seed(0)
    fields = {k: v for k, v in {**COMMON, **kwargs}.items() if v is not None}
    model = transformers.AutoModelForCausalLM.from_config(getattr(transformers, cls)(**fields),
                                                          attn_implementation="eager").eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(0.1 * torch.randn_like(p) + float("gemma" not in cls.lower())) if "norm.weight" in n else p.normal_(0, 0.15)
    return model


@pytest.mark.parametrize("arch", list(ARCHS))
def test_gguf_logits_match_hf_reading_the_same_file(arch, tmp_path):
    import transformers
    model = _random_model(*ARCHS[arch])
    write_gguf(tmp_path / "m.gguf", model, arch)
    cfg, params = load_gguf(tmp_path / "m.gguf")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="m.gguf",
                                                               attn_implementation="eager").eval()
    toks, attn_mask = random_tokens(1, B, T), left_padded_mask(B, T, PADS)
    got = np.asarray(forward(params, cfg, toks, attn_mask)[0])
    real = attn_mask.astype(bool)
    for name, reference in (("HF's GGUF reader", theirs), ("the HF model written", model)):
        want = ref.run(reference, toks, attn_mask).logits.numpy()
        print(f"{arch}: max |logit - logit of {name}| = {np.abs(got[real] - want[real]).max():.1e}")  # README table
        np.testing.assert_allclose(got[real], want[real], atol=ATOL, rtol=0)
    assert cfg == dataclasses.replace(ModelConfig.from_hf(model.config.to_dict()), max_positions=cfg.max_positions)


@pytest.mark.parametrize("arch", list(CONVERTED))
def test_gguf_written_by_llama_cpps_converter_matches_the_hf_model(arch, tmp_path):
    cls, kwargs, as_written = CONVERTED[arch]
    model, hf_dir = _random_model(cls, kwargs), tmp_path / "hf"
    model.save_pretrained(hf_dir)
    if as_written:
        (hf_dir / "config.json").write_text(json.dumps(as_written(json.loads((hf_dir / "config.json").read_text()))))
    llama_cpp.tiny_tokenizer(hf_dir)
    llama_cpp.convert(hf_dir, tmp_path / "m.gguf")
    assert gguf.GGUFReader(tmp_path / "m.gguf").fields["general.architecture"].contents() == arch
    cfg, params = load_gguf(tmp_path / "m.gguf")
    toks, attn_mask = random_tokens(1, B, T), left_padded_mask(B, T, PADS)
    got = np.asarray(forward(params, cfg, toks, attn_mask)[0])
    want = ref.run(model, toks, attn_mask).logits.numpy()
    real = attn_mask.astype(bool)
    print(f"{arch}: max |logit - logit of the HF model converted| = {np.abs(got[real] - want[real]).max():.1e}")
    np.testing.assert_allclose(got[real], want[real], atol=ATOL, rtol=0)
    assert cfg == dataclasses.replace(ModelConfig.from_hf(model.config.to_dict()), max_positions=cfg.max_positions)


def test_gguf_tokenizer_loads_with_the_model(tmp_path):
    """`jc.load` of a GGUF holding a byte-level vocabulary: the model and its tokenizer."""
    write_gguf(tmp_path / "m.gguf", _random_model(*ARCHS["qwen2"]), "qwen2", tokenizer=True)
    m = jc.load(str(tmp_path / "m.gguf"), cache=False)
    assert m.cfg.checkpoint == "llama" and m.tokenizer.encode("ab a", add_special_tokens=False) == [95, 94, 64]  # ab, Ġ, a


@pytest.mark.parametrize("arch, key, value", [
    ("gemma3", "gemma3.final_logit_softcapping", 30.0),           # llama.cpp's converter asserts Gemma-3 has none
    ("qwen2", "qwen2.attention.sliding_window", 8),               # llama.cpp's qwen2 has no window
])
def test_gguf_keys_an_architecture_does_not_read_are_refused(arch, key, value, tmp_path):
    write_gguf(tmp_path / "m.gguf", _random_model(*ARCHS[arch]), arch, extra={key: value})
    with pytest.raises(UnsupportedConfigError, match=key):
        load_gguf(tmp_path / "m.gguf")
