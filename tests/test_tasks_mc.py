"""Choice tasks: multiple choice with shuffled letters, Colored Objects, list recall; their metric."""

import collections
import functools

import numpy as np
import pytest

import jaxcircuits as jc
from jaxcircuits.tasks import multiple_choice as mc
from jaxcircuits.weights.tokenize import load_tokenizer
from tests.conftest import SMOLLM2_GGUF


@functools.cache
def smol():
    return load_tokenizer(SMOLLM2_GGUF)


FAMILIES = {"mc": mc.multiple_choice, "colors": mc.colored_objects, "recall": mc.recall_list}


@pytest.mark.parametrize("family", FAMILIES)
def test_prompts_are_deterministic_and_answers_listed(family):
    a, b = FAMILIES[family](12, 3), FAMILIES[family](12, 3)
    assert a == b and a != FAMILIES[family](12, 4)
    for p in a:
        assert 0 <= p.answer < len(p.options) and len(set(p.options)) == len(p.options)
    if family == "mc":
        assert all(f"{p.options[p.answer]}. " in p.text for p in a)
        assert len(collections.Counter(p.answer for p in mc.multiple_choice(40, 0))) == 4   # letters vary
    if family == "colors":
        for p in a:
            obj = p.text.split("What color is the ")[1].split("?")[0]
            assert f" {p.answer_text} {obj}" in p.text
    if family == "recall":
        for p in a:
            listed, again = p.text.split("Shopping list: ")[1].split(". Again: ")
            items = listed.split(", ")
            assert again.rstrip(",").split(", ") == items[:p.answer] and items[p.answer] == p.answer_text


@pytest.mark.parametrize("family", FAMILIES)
def test_batch_metric_matches_logits(family):
    tok = smol()
    prompts = FAMILIES[family](6, 0)
    batch = mc.choice_batch(prompts, tok)
    assert batch.ids.shape == batch.attn_mask.shape and batch.ids.shape[0] == 6
    for i, p in enumerate(prompts):
        want = tok.encode(p.text + " " + p.answer_text, add_special_tokens=False)
        assert int(batch.metric.good[i, 0]) == want[len(tok.encode(p.text, add_special_tokens=False))]
        assert int(batch.option_ids[i, p.answer]) == int(batch.metric.good[i, 0])
        assert sorted(np.asarray(batch.metric.bad[i])[np.asarray(batch.metric.bad[i]) >= 0]) == \
            sorted(o for j, o in enumerate(batch.option_ids[i]) if j != p.answer and o >= 0)
    # log P(good) - log P(bad set) is shift-invariant: log-probs and raw logits agree
    logits = np.random.RandomState(0).randn(6, tok.vocab_size)
    logp = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    for i in range(6):
        bad = [o for o in np.asarray(batch.metric.bad[i]) if o >= 0]
        good = logp[i, batch.metric.good[i, 0]]
        assert good - np.log(np.exp(logp[i, bad]).sum()) == pytest.approx(
            logits[i, batch.metric.good[i, 0]] - np.log(np.exp(logits[i, bad]).sum()), rel=1e-6)
    right = np.zeros((6, tok.vocab_size)); right[np.arange(6), np.asarray(batch.metric.good[:, 0])] = 1
    assert mc.accuracy(right, batch).all() and not mc.accuracy(-right, batch).any()


def test_metric_runs_on_the_model():
    model = jc.load()
    batch = mc.choice_batch(mc.colored_objects(4, 0), model.tokenizer)
    logits, cache = jc.forward(model.params, model.cfg, batch.ids, batch.attn_mask, collect=("final_norm",))
    got = np.asarray(batch.metric(model.params, cache["final_norm"][:, -1:]))
    lg = np.asarray(logits[:, -1], np.float64)
    for i in range(4):
        bad = [o for o in np.asarray(batch.metric.bad[i]) if o >= 0]
        want = lg[i, batch.metric.good[i, 0]] - np.log(np.exp(lg[i, bad]).sum())
        assert got[i] == pytest.approx(want, abs=1e-3)


def test_shared_first_token_is_refused():
    with pytest.raises(ValueError, match="share a first token"):
        mc.option_tokens(smol(), mc.ChoicePrompt("Pick:", ("cat", "cat"), 0))
