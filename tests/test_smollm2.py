"""Real weights: SmolLM2-135M-Instruct through jaxcircuits vs transformers loading the same GGUF."""

import numpy as np
import pytest
import torch

import jaxcircuits as jc
from jaxcircuits.tasks.formats import encode_prompt
from jaxcircuits.tasks.decimals import STUDY_PAIR

# fp32 at highest precision. Over 30 layers, summation-order differences between XLA and torch
# reach 1.7e-4 (worst seen) on logits of magnitude up to ~25; the tiny configs agree to ~1e-7.
ATOL, RTOL = 2.5e-4, 0


@pytest.fixture(scope="module")
def both(hf_smollm2):
    return jc.load(), hf_smollm2


def _prompts(model):
    tok = model.tokenizer
    return [encode_prompt(f, STUDY_PAIR.question, tok) for f in ("simple", "qa", "chat", "chat_raw")] + [
        tok.encode("The capital of France is")]


def test_logits_match_transformers_on_several_prompts(both):
    model, hf = both
    worst = 0.0
    for ids in _prompts(model):
        want = hf(torch.tensor([ids])).logits[0].detach().numpy()
        got = np.asarray(jc.forward(model.params, model.cfg, np.array([ids]))[0][0])
        worst = max(worst, float(np.abs(got - want).max()))
        np.testing.assert_allclose(got, want, atol=ATOL, rtol=RTOL)
    print(f"worst |logit difference| over prompts: {worst:.2e}")


def test_batched_left_padded_logits_match(both):
    model, hf = both
    ids, attn_mask = model.tokenizer.pad(_prompts(model)[:3], "left")
    got = np.asarray(jc.forward(model.params, model.cfg, ids, attn_mask)[0])
    for b, row in enumerate(ids):
        real = attn_mask[b].astype(bool)
        want = hf(torch.tensor(row[real][None])).logits[0].detach().numpy()
        np.testing.assert_allclose(got[b][real], want, atol=ATOL, rtol=RTOL)


def test_twenty_greedy_tokens_identical(both):
    model, hf = both
    for ids in _prompts(model)[1:3]:
        want = hf.generate(torch.tensor([ids]), max_new_tokens=20, do_sample=False, eos_token_id=None,
                           pad_token_id=model.tokenizer.pad_token_id).numpy()[0, len(ids):]
        got = np.asarray(jc.generate(model.params, model.cfg, np.array([ids]), max_new_tokens=20, eos_id=-1))[0]
        np.testing.assert_array_equal(got, want)
