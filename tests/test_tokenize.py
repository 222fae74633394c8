"""jaxcircuits.weights.tokenize against HF transformers on real tokenizers (SmolLM2 GGUF, GPT-2, Llama 3.2)."""

import concurrent.futures
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

from jaxcircuits.weights import tokenize
from jaxcircuits.weights.tokenize import load_tokenizer
from tests import fixtures_tokenizers as F

STUDY = "Which is bigger: 9.8 or 9.11?\nAnswer:"
STRINGS = [
    STUDY,
    " 9.11",
    " 9.8",
    "9.11 > 9.8",
    "12345678901234",
    "  two leading spaces",
    "trailing space ",
    "\nnewline first\n\nthen a blank line\n",
    "tabs\tand\r\nCRLF",
    "naïve café — 你好, мир! 🙂",
    "<|im_start|>user\nhi<|im_end|>",
    "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nhi",
    "x",
    "",
]
CHATS = [
    [{"role": "user", "content": "Which is bigger: 9.8 or 9.11?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": " 9.8 or 9.11? "}],
    [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello! 🙂"},
        {"role": "user", "content": "Which is bigger: 9.8 or 9.11?"},
    ],
]


@pytest.fixture(params=F.NAMES)
def pair(request):
    """(ours, HF reference) for each real tokenizer."""
    return F.ours(request.param), F.hf(request.param)


def test_ids_match_hf(pair):
    ours, hf = pair
    for text in STRINGS:
        for specials in (True, False):
            assert ours.encode(text, specials) == hf(text, add_special_tokens=specials)["input_ids"], (text, specials)


def test_decode_matches_hf(pair):
    ours, hf = pair
    for text in STRINGS:
        ids = hf(text)["input_ids"]
        for skip in (True, False):
            assert ours.decode(np.array(ids, np.int32), skip) == hf.decode(ids, skip_special_tokens=skip)


def test_special_tokens_match_hf(pair):
    ours, hf = pair
    assert (ours.bos_token_id, ours.eos_token_id) == (hf.bos_token_id, hf.eos_token_id)
    assert ours.pad_token_id == (hf.eos_token_id if hf.pad_token_id is None else hf.pad_token_id)
    assert ours.vocab_size == len(hf)
    for token_id in (0, 1, 198, ours.eos_token_id, ours.vocab_size - 1):
        assert ours.token_str(token_id) == hf.decode([token_id])
        assert ours.token_to_id(hf.convert_ids_to_tokens(token_id)) == token_id
    assert ours.token_to_id("<|no such token|>") is None


# (bos, eos, pad, vocab_size, id of <|im_start|>, id of <|start_header_id|>); GPT-2 has no pad: eos is used
SPECIALS = {
    "smollm2": (1, 2, 2, 49152, 1, None),
    "gpt2": (50256, 50256, 50256, 50257, None, None),
    "llama3": (128000, 128001, 128004, 128257, None, 128006),
}


@pytest.mark.parametrize("name", F.NAMES)
def test_known_special_ids(name):
    tok = F.ours(name)
    got = (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.vocab_size)
    assert got + (tok.token_to_id("<|im_start|>"), tok.token_to_id("<|start_header_id|>")) == SPECIALS[name]


@pytest.mark.parametrize("name", ["smollm2", "llama3"])
def test_chat_template_matches_hf(name):
    ours, hf = F.ours(name), F.hf(name)
    for messages in CHATS:
        for gen in (True, False):
            expected = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
            assert ours.apply_chat_template(messages, add_generation_prompt=gen) == expected


def test_no_chat_template_is_a_clear_error():
    with pytest.raises(ValueError, match="no chat template"):
        F.ours("gpt2").apply_chat_template(CHATS[0])


GOLDEN = {  # name -> [(text, add_special_tokens, ids)], ids as HF gave them once
    "smollm2": [
        (STUDY, True, [14413, 314, 7882, 42, 216, 41, 30, 40, 355, 216, 41, 30, 33, 33, 47, 198, 21350, 42]),
        (" 9.8", True, [216, 41, 30, 40]),
        (" 9.11", True, [216, 41, 30, 33, 33]),
    ],
    "gpt2": [
        ("Hello world", True, [15496, 995]),
        (" Hello world", True, [18435, 995]),
        (STUDY, True, [13828, 318, 5749, 25, 860, 13, 23, 393, 860, 13, 1157, 30, 198, 33706, 25]),
    ],
    "llama3": [
        (STUDY, True, [128000, 23956, 374, 11493, 25, 220, 24, 13, 23, 477, 220, 24, 13, 806, 5380, 16533, 25]),
        (" 9.11", False, [220, 24, 13, 806]),
    ],
}


@pytest.mark.parametrize("name", F.NAMES)
def test_golden_ids(name):
    """Ids HF gave once for the study strings, so a change on either side shows."""
    tok = F.ours(name)
    for text, specials, ids in GOLDEN[name]:
        assert tok.encode(text, specials) == ids, text


@pytest.mark.parametrize("add_bos_token", [None, True, False])
def test_llama3_bos_as_hf(add_bos_token):
    """Llama 3 adds <|begin_of_text|> through tokenizer.json's post-processor; in transformers 5
    an explicit add_bos_token in tokenizer_config.json does not remove it. We follow HF either way."""
    from transformers import AutoTokenizer

    directory = F.llama3_dir(add_bos_token)
    ours, hf = load_tokenizer(directory), AutoTokenizer.from_pretrained(str(directory))
    for text in (STUDY, "x", ""):
        assert ours.encode(text) == hf(text)["input_ids"]
        assert ours.encode(text, add_special_tokens=False) == hf(text, add_special_tokens=False)["input_ids"]
    assert ours.encode("x")[0] == 128000 and 128000 not in ours.encode("x", add_special_tokens=False)


def test_no_bos_added_by_smollm2_and_gpt2():
    for name in ("smollm2", "gpt2"):
        ours = F.ours(name)
        assert ours.encode("x") == ours.encode("x", add_special_tokens=False) == F.hf(name)("x")["input_ids"]


@pytest.mark.parametrize("name", ["smollm2", "llama3"])
def test_batch_matches_hf_padding(name):
    ours, hf = F.ours(name), F.hf(name)
    texts = [STUDY, " 9.8", "naïve café — 你好"]
    ids, attn_mask = ours.batch(texts)
    ref = hf(texts, padding=True, padding_side="left", return_tensors="np")
    assert ids.dtype == attn_mask.dtype == np.int32
    np.testing.assert_array_equal(ids, ref["input_ids"])
    np.testing.assert_array_equal(attn_mask, ref["attention_mask"])


def test_left_padding_layout_with_eos_fallback():
    gpt2 = F.ours("gpt2")
    ids, attn_mask = gpt2.batch(["Hello world", " 9.8", "!"])
    assert ids.tolist() == [[50256, 15496, 995], [860, 13, 23], [50256, 50256, 0]]
    assert attn_mask.tolist() == [[0, 1, 1], [1, 1, 1], [0, 0, 1]]
    assert gpt2.batch([])[0].shape == (0, 0)
    for side in ("right", "middle"):    # the library reads every prompt's last token at the last column
        with pytest.raises(ValueError, match=f"pad_side='{side}' is not supported.*left-padded"):
            gpt2.batch(["x"], pad_side=side)


@pytest.mark.parametrize(
    "name,answer,ids",
    [("smollm2", " 9.8", [216, 41, 30, 40]), ("gpt2", " 9.8", [860, 13, 23]), ("llama3", " 9.11", [220, 24, 13, 806])],
)
def test_answer_token_ids(name, answer, ids):
    tok = F.ours(name)
    assert tok.answer_token_ids(answer, STUDY) == ids
    assert tok.encode(STUDY + answer)[-len(ids):] == ids
    assert tok.answer_token_ids(answer) == tok.encode(answer, add_special_tokens=False)


def test_answer_first_token_text():
    gpt2 = F.ours("gpt2")
    assert gpt2.token_str(gpt2.answer_token_ids(" 9.8", STUDY)[0]) == " 9"


@pytest.mark.parametrize("name", F.NAMES)
def test_answer_merge_boundary_is_detected(name):
    with pytest.raises(ValueError, match="merges with the end of the prompt"):
        F.ours(name).answer_token_ids("is", "The capital is Par")
    with pytest.raises(ValueError, match="non-empty"):
        F.ours(name).answer_token_ids("", STUDY)


def test_gpt2_space_then_digits_merges():
    """GPT-2 writes ' 9' as one token: a prompt ending in a space cannot be continued by '9.8'."""
    with pytest.raises(ValueError, match="merges"):
        F.ours("gpt2").answer_token_ids("9.8", "Answer: ")


def test_tokenizer_json_path_and_repr():
    directory = F.gpt2_dir()
    tok = load_tokenizer(directory / "tokenizer.json")
    assert tok.encode(STUDY) == F.ours("gpt2").encode(STUDY)
    assert "vocab_size=50257" in repr(tok)


def test_missing_or_wrong_sources(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_tokenizer(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        load_tokenizer(tmp_path)
    (tmp_path / "weights.bin").write_bytes(b"\0" * 8)
    with pytest.raises(ValueError, match="neither"):
        load_tokenizer(tmp_path / "weights.bin")
    (tmp_path / "fake.gguf").write_bytes(b"NOPE" + b"\0" * 8)
    with pytest.raises(ValueError, match="not a GGUF"):
        load_tokenizer(tmp_path / "fake.gguf", cache_dir=tmp_path / "cache")


def test_gguf_without_tokenizer(tmp_path):
    gguf = pytest.importorskip("gguf")
    path = tmp_path / "no-tokenizer.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tensor("token_embd.weight", np.zeros((4, 4), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match="could not read a tokenizer"):
        load_tokenizer(path, cache_dir=tmp_path / "cache")
    left = [p.name for p in (tmp_path / "cache" / "tokenizers").iterdir()]
    assert left == [tokenize._gguf_cache_key(path) + ".lock"]  # the temp dir is gone


def _fail_convert(path, out):
    raise AssertionError("converted again despite the cache")


def test_gguf_cache_hit(monkeypatch):
    first = F.ours("smollm2")  # converted into the session cache
    key = tokenize._gguf_cache_key(F.smollm2_gguf())
    names = sorted(e.name for e in (F.cache_dir() / "tokenizers").iterdir())
    assert names == [key, key + ".lock", key + ".sha256"]
    assert {"tokenizer.json", "tokenizer_config.json"} <= {p.name for p in (F.cache_dir() / "tokenizers" / key).iterdir()}
    monkeypatch.setattr(tokenize, "_convert_gguf", _fail_convert)
    monkeypatch.setenv("JAXCIRCUITS_CACHE", str(F.cache_dir()))
    start = time.perf_counter()
    again = load_tokenizer(F.smollm2_gguf())  # through $JAXCIRCUITS_CACHE
    assert time.perf_counter() - start < 5
    for text in STRINGS:
        assert again.encode(text) == first.encode(text)
    assert again.apply_chat_template(CHATS[0]) == first.apply_chat_template(CHATS[0])


def test_gguf_cache_concurrent_misses_convert_once(tmp_path, monkeypatch):
    """Two loads missing at once: the second waits on the entry's lock, then uses the first's result."""
    reference = F.ours("smollm2")  # converted into the session cache
    converted = F.cache_dir() / "tokenizers" / tokenize._gguf_cache_key(F.smollm2_gguf())
    calls = []

    def slow_convert(path, out):
        calls.append(path)
        time.sleep(0.5)  # both loads miss before the first one has written
        shutil.copytree(converted, out, dirs_exist_ok=True)

    monkeypatch.setattr(tokenize, "_convert_gguf", slow_convert)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        toks = list(pool.map(lambda _: load_tokenizer(F.smollm2_gguf(), cache_dir=tmp_path), range(2)))
    assert len(calls) == 1
    assert toks[0].encode(STUDY) == toks[1].encode(STUDY) == reference.encode(STUDY)


def test_cache_root(tmp_path, monkeypatch):
    monkeypatch.delenv("JAXCIRCUITS_CACHE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert tokenize._cache_root(None) == tmp_path / ".cache" / "jaxcircuits" / "tokenizers"
    monkeypatch.setenv("JAXCIRCUITS_CACHE", str(tmp_path / "env"))
    assert tokenize._cache_root(None) == tmp_path / "env" / "tokenizers"
    assert tokenize._cache_root(tmp_path / "arg") == tmp_path / "arg" / "tokenizers"


def test_cache_key_tracks_size_and_mtime(tmp_path):
    path = tmp_path / "m.gguf"
    path.write_bytes(b"GGUF1234")
    key = tokenize._gguf_cache_key(path)
    assert key.startswith("m-") and tokenize._gguf_cache_key(path) == key
    os.utime(path, ns=(0, 10**9))
    moved = tokenize._gguf_cache_key(path)
    path.write_bytes(b"GGUF12345")
    os.utime(path, ns=(0, 10**9))
    assert len({key, moved, tokenize._gguf_cache_key(path)}) == 3


def test_never_imports_torch():
    """Loading (GGUF from the cache, and an HF directory) and encoding leave torch unimported."""
    F.ours("smollm2")  # make sure the cache is filled
    code = (
        "import sys\n"
        "from jaxcircuits.weights.tokenize import load_tokenizer\n"
        "from jaxcircuits.tasks.formats import encode_prompt\n"
        f"for src in ({str(F.smollm2_gguf())!r}, {str(F.llama3_dir())!r}):\n"
        f"    t = load_tokenizer(src, cache_dir={str(F.cache_dir())!r})\n"
        "    encode_prompt('simple', 'Which is bigger: 9.8 or 9.11?', t)\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_gguf_conversion_needs_no_torch(tmp_path):
    """Our GGUF conversion (the gguf reader + public tokenizers/transformers classes) never imports
    torch, so a runtime install without torch reads the embedded model's tokenizer."""
    code = ("import sys\nfrom pathlib import Path\nfrom jaxcircuits.weights.tokenize import _convert_gguf\n"
            f"_convert_gguf(Path({str(F.smollm2_gguf())!r}), Path({str(tmp_path)!r}))\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    converted = tokenize.load_tokenizer(tmp_path)
    for text in STRINGS:
        assert converted.encode(text) == F.hf("smollm2")(text)["input_ids"], text


def _transformers_gguf(path):
    """transformers' own GGUF tokenizer conversion (it imports torch): the reference."""
    from transformers import PreTrainedTokenizerFast
    return PreTrainedTokenizerFast.from_pretrained(str(path.parent), gguf_file=path.name)


def _same_tokenizer(ours, theirs, texts):
    import json
    assert json.loads(ours.backend_tokenizer.to_str()) == json.loads(theirs.backend_tokenizer.to_str())
    assert ours.special_tokens_map == theirs.special_tokens_map and ours.chat_template == theirs.chat_template
    for text in texts:
        assert ours(text)["input_ids"] == theirs(text)["input_ids"], text


def test_gguf_conversion_equals_transformers_on_smollm2():
    _same_tokenizer(tokenize._gguf_hf_tokenizer(F.smollm2_gguf()), _transformers_gguf(F.smollm2_gguf()), STRINGS)


def _write_gguf(path, tokens, types, **kv):
    import gguf
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    for key, value in kv.items():
        getattr(writer, f"add_{key}")(value)
    writer.add_tensor("token_embd.weight", np.zeros((len(tokens), 4), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_gguf_conversion_equals_transformers_on_llama3_bpe(tmp_path):
    """A Llama 3 byte-level vocabulary with merges and the 'llama-bpe' split, written as a GGUF:
    ours equals transformers' conversion and encodes as Llama 3.2's own tokenizer.json."""
    import json
    spec = json.loads((F.llama3_dir() / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"] | {t["content"]: t["id"] for t in spec["added_tokens"]}
    tokens = sorted(vocab, key=vocab.get)
    types = [3 if t in {a["content"] for a in spec["added_tokens"]} else 1 for t in tokens]
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    path = _write_gguf(tmp_path / "llama3.gguf", tokens, types, tokenizer_model="gpt2", tokenizer_pre="llama-bpe",
                       token_merges=merges, bos_token_id=vocab["<|begin_of_text|>"],
                       eos_token_id=vocab["<|eot_id|>"], add_bos_token=True)
    ours = tokenize._gguf_hf_tokenizer(path)
    _same_tokenizer(ours, _transformers_gguf(path), STRINGS)
    for text in STRINGS:
        assert ours(text, add_special_tokens=False)["input_ids"] == F.hf("llama3")(text, add_special_tokens=False)["input_ids"]


def test_gguf_conversion_equals_transformers_on_sentencepiece(tmp_path):
    """A small sentencepiece ('llama') vocabulary with scores and no merges (as Llama 2 / TinyLlama
    GGUFs store it): merges come from the scores, BOS is added by default, as in transformers."""
    pieces = ["▁", "a", "b", "c", "▁a", "ab", "bc", "▁ab", "abc", "▁abc", "▁b", "ca"]
    tokens = ["<unk>", "<s>", "</s>", *(f"<0x{i:02X}>" for i in range(256)), *pieces]
    types = [2, 3, 3, *[6] * 256, *[1] * len(pieces)]
    scores = [0.0, 0.0, 0.0, *[0.0] * 256, *(-float(i) for i in range(len(pieces)))]
    path = _write_gguf(tmp_path / "spm.gguf", tokens, types, tokenizer_model="llama", token_scores=scores,
                       bos_token_id=1, eos_token_id=2, unk_token_id=0)
    _same_tokenizer(tokenize._gguf_hf_tokenizer(path), _transformers_gguf(path),
                    ["abc", " abc abca", "cab bc", "a\nb", "zzz", "", "  ab"])

