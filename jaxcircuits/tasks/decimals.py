"""Decimal comparison ("Which is bigger: 9.8 or 9.11?") as data: pairs, answer tokens, batches,
and the study's generation classifier.

A pair is a `trap` when the number with more decimal digits is the smaller one (9.11 < 9.8): a
model that compares the digits after the point as integers (11 > 8) answers wrongly.

Answers are scored at the first token where the good and bad answer texts differ: for SmolLM2
" 9.8" / " 9.11" are [" ", "9", ".", "8"] / [" ", "9", ".", "1", "1"], so the shared prefix
" 9." is appended to the prompt and the last position compares "8" with "1" (Llama 3: "8" with
"11"). Answer texts get a leading space unless the prompt ends in whitespace: "...\\nAnswer:" ->
" 9.8", a chat prompt ending "<|im_start|>assistant\\n" -> "9.8".
"""

from __future__ import annotations

import dataclasses
import random
import re
from decimal import Decimal
from typing import TYPE_CHECKING, Mapping, NamedTuple, Sequence

import jax.numpy as jnp
import numpy as np

from jaxcircuits.tasks.formats import PromptFormat, encode_prompt
from jaxcircuits.interventions.metrics import AnswerLogProb, LogitDiff, answer_log_prob, first_distinguishing, pad_ids

if TYPE_CHECKING:
    from jaxcircuits.weights.tokenize import Tokenizer

_NUMBER = re.compile(r"\d+(\.\d+)?")
VERBS = ("bigger", "larger", "greater")  # the study's "{n} is <verb>" phrases


def _decimals(number: str) -> int:
    return len(number.partition(".")[2])


@dataclasses.dataclass(frozen=True)
class DecimalPair:
    """Two unequal non-negative decimals as written ("9.8", "9.11"), in question order."""

    a: str
    b: str

    def __post_init__(self):
        for x in (self.a, self.b):
            if not _NUMBER.fullmatch(x):
                raise ValueError(f"{x!r} is not a decimal number like '9.8'")
        if Decimal(self.a) == Decimal(self.b):
            raise ValueError(f"{self.a} and {self.b} are equal")

    @property
    def bigger(self) -> str:
        return max(self.a, self.b, key=Decimal)

    @property
    def smaller(self) -> str:
        return min(self.a, self.b, key=Decimal)

    @property
    def question(self) -> str:
        """The study's wording: "Which is bigger: {a} or {b}?" (`swapped` for the other order)."""
        return f"Which is bigger: {self.a} or {self.b}?"

    @property
    def trap(self) -> bool:
        """True when the smaller number has more decimal digits (9.11 vs 9.8)."""
        return _decimals(self.smaller) > _decimals(self.bigger)

    def swapped(self) -> DecimalPair:
        """The same pair asked in the other order ("Which is bigger: 9.11 or 9.8?")."""
        return DecimalPair(self.b, self.a)


STUDY_PAIR = DecimalPair("9.8", "9.11")
INTEGER_PARTS = range(1, 20)


def _family(trap_only: bool) -> list[DecimalPair]:
    """All pairs "i.d" vs "i.ee" (i in INTEGER_PARTS, d in 1..9, ee in 10..99 not ending in 0),
    1-digit number first; only the traps (0.ee < 0.d) when `trap_only`."""
    return [
        DecimalPair(f"{i}.{d}", f"{i}.{e}")
        for i in INTEGER_PARTS
        for d in range(1, 10)
        for e in range(10, 100)
        if e % 10 and (e < 10 * d or not trap_only)
    ]


def generate_pairs(n: int, seed: int, trap_only: bool = True) -> list[DecimalPair]:
    """`n` distinct pairs like 9.8/9.11, 3.7/3.12, 12.4/12.31, drawn without replacement by `seed`
    (same integer part, 1 vs 2 decimal digits, the 1-digit number first). With `trap_only=False`
    non-trap pairs (3.7/3.75) are drawn too."""
    family = _family(trap_only)
    if not 0 <= n <= len(family):
        raise ValueError(f"n must be in [0, {len(family)}] (distinct pairs), got {n}")
    return random.Random(seed).sample(family, n)


@dataclasses.dataclass(frozen=True)
class AnswerTokens:
    """Token ids of the good (bigger) and bad answers as continuations of one prompt, split at
    their first difference: ``good_ids == prefix + [good, ...]``, ``bad_ids == prefix + [bad, ...]``."""

    prefix: list[int]
    good: int
    bad: int
    good_ids: list[int]
    bad_ids: list[int]


def answer_text(number: str, prompt: str) -> str:
    """`number` as the model would write it after `prompt`: with a leading space unless the prompt
    ends in whitespace ("Answer:" -> " 9.8"; a chat prompt ending in a newline -> "9.8")."""
    return number if prompt[-1:].isspace() else " " + number


def answers(pair: DecimalPair, tokenizer: Tokenizer, prompt_ids: Sequence[int]) -> AnswerTokens:
    """The answers' ids after the prompt `prompt_ids` (merge boundaries respected: each answer is
    the tail of encoding prompt text + answer text)."""
    prompt = tokenizer.decode(prompt_ids)
    if tokenizer.encode(prompt, add_special_tokens=False) != list(prompt_ids):
        raise ValueError(f"the prompt ids do not survive decode/encode: {prompt[-40:]!r}")
    good_ids = tokenizer.answer_token_ids(answer_text(pair.bigger, prompt), prompt=prompt)
    bad_ids = tokenizer.answer_token_ids(answer_text(pair.smaller, prompt), prompt=prompt)
    prefix, good, bad = first_distinguishing(good_ids, bad_ids)
    return AnswerTokens(prefix, good, bad, good_ids, bad_ids)


class DecimalBatch(NamedTuple):
    """ids, attn_mask int32 [B, T] (left-padded prompt + shared answer prefix); metric: `LogitDiff`
    good - bad at the last position (> 0: prefers the bigger number); answers: per prompt."""

    ids: np.ndarray
    attn_mask: np.ndarray
    metric: LogitDiff
    answers: list[AnswerTokens]


def build_batch(
    pairs: Sequence[DecimalPair],
    fmt: PromptFormat | str,
    tokenizer: Tokenizer,
    formats: Mapping[str, PromptFormat] | None = None,
) -> DecimalBatch:
    """Each pair's question in format `fmt`, with its answers' shared prefix appended so the last
    position predicts the first distinguishing token."""
    prompts = [encode_prompt(fmt, p.question, tokenizer, formats) for p in pairs]
    toks = [answers(p, tokenizer, ids) for p, ids in zip(pairs, prompts)]
    ids, attn_mask = tokenizer.pad([ids + t.prefix for ids, t in zip(prompts, toks)], "left")
    metric = LogitDiff(good=jnp.asarray(pad_ids([[t.good] for t in toks])),
                       bad=jnp.asarray(pad_ids([[t.bad] for t in toks])))
    return DecimalBatch(ids, attn_mask, metric, toks)


class TeacherForced(NamedTuple):
    """ids, attn_mask int32 [2, B, T]: row 0 = prompt + full good answer, row 1 = prompt + full bad
    answer, both left-padded to one T. good / bad: `AnswerLogProb` of the answers, to apply to the
    hidden states of ids[0] / ids[1]; log p(good) - log p(bad) = good(..) - bad(..) (the shared
    prefix's terms cancel)."""

    ids: np.ndarray
    attn_mask: np.ndarray
    good: AnswerLogProb
    bad: AnswerLogProb


def build_teacher_forced(
    pairs: Sequence[DecimalPair],
    fmt: PromptFormat | str,
    tokenizer: Tokenizer,
    formats: Mapping[str, PromptFormat] | None = None,
) -> TeacherForced:
    """Each pair's question in format `fmt` followed by its whole good / bad answer."""
    prompts = [encode_prompt(fmt, p.question, tokenizer, formats) for p in pairs]
    toks = [answers(p, tokenizer, ids) for p, ids in zip(pairs, prompts)]
    good = [ids + t.good_ids for ids, t in zip(prompts, toks)]
    bad = [ids + t.bad_ids for ids, t in zip(prompts, toks)]
    ids, attn_mask = tokenizer.pad(good + bad, "left")
    shape = (2, len(pairs), ids.shape[1])
    return TeacherForced(ids.reshape(shape), attn_mask.reshape(shape),
                         answer_log_prob([t.good_ids for t in toks]), answer_log_prob([t.bad_ids for t in toks]))


def _says_bigger(text: str, number: str) -> bool:
    return any(f"{number} is {verb}" in text for verb in VERBS)


def classify_generation_original(text: str, pair: DecimalPair) -> str:
    """The original study's success test, for any pair: on the lower-cased text, "correct" if it
    contains "{bigger} is bigger|larger|greater" and no "{smaller} is ..." phrase, "wrong" if the
    reverse, else "unclear" (both or neither). Plain substring tests, as in the study (so
    "19.8 is bigger" also counts for 9.8); a bare answer (" 9.8\\nB: 9.11") is "unclear"."""
    text = text.lower()
    good, bad = _says_bigger(text, pair.bigger), _says_bigger(text, pair.smaller)
    if good != bad:
        return "correct" if good else "wrong"
    return "unclear"


def _leading_answer(pair: DecimalPair) -> re.Pattern:
    """A text that opens with one of the numbers (after an optional "the answer is" / "answer:"
    and markdown bold), followed by the end, a newline or punctuation, not by more words."""
    numbers = "|".join(re.escape(x) for x in (pair.bigger, pair.smaller))
    return re.compile(
        r"\s*(?:(?:the\s+)?answer(?:\s+is|\s*:)\s*)?\**"
        rf"({numbers})(?=[ \t]*(?:$|\n)|[.,;:!?)*])"
    )


def classify_generation(text: str, pair: DecimalPair) -> str:
    """The verdict on a generated answer: `classify_generation_original`'s phrases first; where
    they leave it "unclear", the answer the text opens with counts. A text opening with the bigger
    number (" 9.8", "9.8.", "The answer is 9.8\\n...", and " 9.8\\nB: 9.11": the answer line, then
    the model's next line of a Q&A list) is "correct", with the smaller one "wrong"."""
    verdict = classify_generation_original(text, pair)
    if verdict != "unclear":
        return verdict
    match = _leading_answer(pair).match(text.lower())
    if match is None:
        return "unclear"
    return "correct" if match.group(1) == pair.bigger else "wrong"
