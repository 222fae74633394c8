"""jaxcircuits.tasks.formats: golden prompts of the "even heads" study, BOS rules, the JSON table."""

import dataclasses
import json
import re

import numpy as np
import pytest

from jaxcircuits.tasks.formats import (
    FORMATS,
    PromptFormat,
    batch_prompts,
    encode_prompt,
    get_format,
    load_formats,
    render,
    resolve,
    save_formats,
)
from tests import fixtures_tokenizers as F

Q = "Which is bigger: 9.8 or 9.11?"
SMOL_SYSTEM = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
CHATML = f"<|im_start|>user\n{Q}<|im_end|>\n<|im_start|>assistant\n"
LLAMA3 = f"<|start_header_id|>user<|end_header_id|>\n\n{Q}<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
GOLDEN_TEXT = {  # (format, tokenizer) -> the prompt text
    ("simple", None): f"{Q}\nAnswer:",
    ("qa", None): f"Q: {Q}\nA:",
    ("chat_raw_llama3", None): LLAMA3,
    ("chat_raw_chatml", None): CHATML,
    ("chat", "smollm2"): SMOL_SYSTEM + CHATML,
    ("chat_raw", "smollm2"): CHATML,
    ("chat", "llama3"): "<|begin_of_text|>" + LLAMA3,
    ("chat_raw", "llama3"): LLAMA3,
}
_Q_SMOL = [14413, 314, 7882, 42, 216, 41, 30, 40, 355, 216, 41, 30, 33, 33]  # the question, SmolLM2
_Q_LLAMA = [23956, 374, 11493, 25, 220, 24, 13, 23, 477, 220, 24, 13, 806]  # the question, Llama 3
_CHATML_IDS = [1, 4093, 198] + _Q_SMOL + [47, 2, 198, 1, 520, 9531, 198]
_LLAMA3_IDS = [128000, 128006, 882, 128007, 271] + _Q_LLAMA + [30, 128009, 128006, 78191, 128007, 271]
GOLDEN_IDS = {  # (format, tokenizer) -> ids, as HF gave them
    ("simple", "smollm2"): _Q_SMOL + [47, 198, 21350, 42],
    ("qa", "smollm2"): [65, 42, 10366] + _Q_SMOL[1:] + [47, 198, 49, 42],
    ("chat", "smollm2"): [1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28, 7018, 411,
                          407, 19712, 8182, 2, 198] + _CHATML_IDS,
    ("chat_raw", "smollm2"): _CHATML_IDS,
    ("simple", "gpt2"): [13828, 318, 5749, 25, 860, 13, 23, 393, 860, 13, 1157, 30, 198, 33706, 25],
    ("qa", "gpt2"): [48, 25, 9022, 318, 5749, 25, 860, 13, 23, 393, 860, 13, 1157, 30, 198, 32, 25],
    ("simple", "llama3"): [128000] + _Q_LLAMA + [5380, 16533, 25],
    ("qa", "llama3"): [128000, 48, 25, 16299] + _Q_LLAMA[1:] + [5380, 32, 25],
    ("chat", "llama3"): _LLAMA3_IDS,
    ("chat_raw", "llama3"): _LLAMA3_IDS,
}


@pytest.mark.parametrize("fmt,name", sorted(GOLDEN_TEXT, key=str))
def test_golden_text(fmt, name):
    assert render(fmt, Q, F.ours(name or "smollm2")) == GOLDEN_TEXT[fmt, name]


@pytest.mark.parametrize("fmt,name", sorted(GOLDEN_IDS))
def test_golden_ids(fmt, name):
    assert encode_prompt(fmt, Q, F.ours(name)) == GOLDEN_IDS[fmt, name]


def test_every_builtin_has_a_golden():
    assert set(FORMATS) == {fmt for fmt, _ in GOLDEN_TEXT}


@pytest.mark.parametrize("name", F.NAMES)
def test_encode_prompt_follows_hf(name):
    """plain/raw: HF tokenizer(prompt); chat: HF apply_chat_template(tokenize=True)."""
    ours, hf = F.ours(name), F.hf(name)
    for fmt in ("simple", "qa", "chat_raw_llama3", "chat_raw_chatml"):
        assert encode_prompt(fmt, Q, ours) == hf(render(fmt, Q, ours))["input_ids"]
    if hf.chat_template is not None:
        expected = hf.apply_chat_template([{"role": "user", "content": Q}], add_generation_prompt=True)
        assert encode_prompt("chat", Q, ours) == expected["input_ids"]


def test_bos_rules_on_llama3():
    """The chat template writes BOS itself: encoding it must not add a second one, while a raw
    chat string gets BOS from the tokenizer, as `tokenizer(prompt)` did in the original study."""
    llama = F.ours("llama3")
    chat, raw = encode_prompt("chat", Q, llama), encode_prompt("chat_raw", Q, llama)
    assert chat == raw and chat.count(128000) == 1 and chat[0] == 128000
    assert llama.encode(render("chat", Q, llama))[:2] == [128000, 128000]  # what the rule avoids
    assert encode_prompt("simple", Q, llama)[0] == 128000


def test_chat_raw_picks_by_vocab():
    assert resolve("chat_raw", F.ours("smollm2")).name == "chat_raw_chatml"
    assert resolve("chat_raw", F.ours("llama3")).name == "chat_raw_llama3"
    with pytest.raises(ValueError, match=re.escape("has none of the tokens <|im_start|>, <|start_header_id|>")):
        render("chat_raw", Q, F.ours("gpt2"))
    with pytest.raises(ValueError, match="no chat template"):
        render("chat", Q, F.ours("gpt2"))


def test_chat_with_system_and_user_template_matches_hf():
    fmt = PromptFormat("terse", "chat", template="Q: {question}", system="Be brief.", add_generation_prompt=False)
    for name in ("smollm2", "llama3"):
        messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"Q: {Q}"}]
        expected = F.hf(name).apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
        assert render(fmt, Q, F.ours(name)) == expected


def test_only_question_is_a_placeholder():
    fmt = PromptFormat("braces", "plain", '{"q": "{question}"} {x} {{')
    assert render(fmt, "a {b}", F.ours("smollm2")) == '{"q": "a {b}"} {x} {{'


def test_unknown_format_lists_known_ones():
    with pytest.raises(ValueError, match="unknown prompt format 'nope'; known formats: chat, chat_raw, "):
        get_format("nope")
    with pytest.raises(ValueError, match="known formats: simple$"):
        encode_prompt("qa", Q, F.ours("gpt2"), formats={"simple": FORMATS["simple"]})


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(name="x", kind="prose", template="{question}"), "kind must be one of"),
        (dict(name="x", kind="plain"), "needs a template"),
        (dict(name="x", kind="plain", template="no placeholder"), "no {question} placeholder"),
        (dict(name="x", kind="raw", template="{question}", system="s"), "only a chat format"),
        (dict(name="x", kind="plain", template="{question}", add_generation_prompt=False), "only a chat format"),
        (dict(name="x", kind="plain", select=(("<a>", "simple"),)), "only a raw format"),
        (dict(name="", kind="plain", template="{question}"), "needs a name"),
    ],
)
def test_invalid_formats(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PromptFormat(**kwargs)


def test_json_round_trip(tmp_path):
    path = tmp_path / "formats.json"
    save_formats(FORMATS.values(), path)
    assert load_formats(path, base={}) == dict(FORMATS)
    spec = json.loads(path.read_text())
    assert {"name": "simple", "kind": "plain", "template": "{question}\nAnswer:"} in spec
    assert {"name": "chat", "kind": "chat"} in spec
    chat_raw = next(s for s in spec if s["name"] == "chat_raw")
    assert chat_raw["select"] == {"<|im_start|>": "chat_raw_chatml", "<|start_header_id|>": "chat_raw_llama3"}


def test_load_formats_extends_and_overrides(tmp_path):
    path = tmp_path / "mine.json"
    path.write_text(json.dumps([
        {"name": "qa", "kind": "plain", "template": "Question: {question}\nAnswer:"},
        {"name": "chat_terse", "kind": "chat", "system": "Be brief."},
    ]))
    table = load_formats(path)
    assert set(table) == set(FORMATS) | {"chat_terse"}
    assert render("qa", Q, F.ours("smollm2"), table) == f"Question: {Q}\nAnswer:"
    assert table["chat_terse"] == PromptFormat("chat_terse", "chat", system="Be brief.")
    assert FORMATS["qa"].template == "Q: {question}\nA:"  # the built-in table is untouched
    assert render("chat_terse", Q, F.ours("smollm2"), table).startswith("<|im_start|>system\nBe brief.<|im_end|>")


@pytest.mark.parametrize(
    "specs,match",
    [
        ({"name": "x"}, "expected a JSON list"),
        ([{"name": "x", "kind": "plain", "template": "{question}", "colour": "red"}], "unknown prompt format fields"),
        ([{"name": "x", "kind": "plain", "template": "{question}"}] * 2, "defined twice"),
        ([{"name": "x", "kind": "raw", "select": {"<a>": "missing"}}], "selects 'missing'"),
        ([{"name": "x", "kind": "raw", "select": {"<a>": "chat_raw"}}], "selects 'chat_raw'"),
    ],
)
def test_load_formats_errors(tmp_path, specs, match):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(specs))
    with pytest.raises(ValueError, match=match):
        load_formats(path)


def test_formats_are_frozen_and_hashable():
    fmt = FORMATS["chat_raw"]
    with pytest.raises(dataclasses.FrozenInstanceError):
        fmt.name = "other"
    assert len({fmt, FORMATS["simple"], FORMATS["simple"]}) == 2


def test_batch_prompts_left_padded():
    smol = F.ours("smollm2")
    questions = [Q, "2+2?"]
    ids, attn_mask = batch_prompts("chat", questions, smol)
    rows = [encode_prompt("chat", q, smol) for q in questions]
    assert ids.shape == attn_mask.shape == (2, len(rows[0])) and ids.dtype == np.int32
    for row, expected in zip(range(2), rows):
        assert ids[row, -len(expected):].tolist() == expected
        assert attn_mask[row].sum() == len(expected) and attn_mask[row, -1] == 1
    assert (ids[1, : len(rows[0]) - len(rows[1])] == smol.pad_token_id).all()
