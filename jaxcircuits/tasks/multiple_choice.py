"""Choice tasks as data: the prompt ends where the model must name one of a few listed options.

Three families, each a generator of `ChoicePrompt`s (text, the answer, the options it competes with):

  multiple_choice   lettered questions with the options in a random order per prompt, so the correct
                    letter varies (the Chinchilla multiple-choice setup): "... C. Paris ... Answer:" -> " C"
  colored_objects   "On the table, I see a red pen, a blue cup and a green book. What color is the
                    cup? Answer:" -> " blue" (the circuit-reuse Colored Objects task)
  recall_list       a list, then its repetition cut before one item: "Shopping list: eggs, milk, tea,
                    rice. Again: eggs, milk," -> " tea" (a Laundry-List style recall task)

`choice_batch` encodes any of them: ids and mask left-padded, and a `metrics.LogitDiff` of the
answer's first token over the other options' first tokens (log P(answer) - log P(any other
option), > 0 when the answer wins); `answer_index` [B] says which option is right, for accuracy.
`rotated_options` is a prompt's contrast: the same text with the answer moved to the next option.
"""

from __future__ import annotations

import dataclasses
import random
import re
from typing import TYPE_CHECKING, NamedTuple, Sequence, Tuple

import jax.numpy as jnp
import numpy as np

from jaxcircuits.interventions.metrics import LogitDiff, pad_ids

if TYPE_CHECKING:
    from jaxcircuits.weights.tokenize import Tokenizer

LETTERS = "ABCD"
# (question, correct answer, three distractors)
QUESTIONS = (
    ("What is the capital of France?", "Paris", ("London", "Berlin", "Madrid")),
    ("How many legs does a spider have?", "eight", ("six", "four", "ten")),
    ("Which planet is closest to the Sun?", "Mercury", ("Venus", "Mars", "Jupiter")),
    ("What do bees make?", "honey", ("milk", "silk", "wax")),
    ("What is frozen water called?", "ice", ("steam", "salt", "sand")),
    ("Which animal barks?", "dog", ("cat", "cow", "fish")),
    ("What color is the sky on a clear day?", "blue", ("green", "red", "yellow")),
    ("How many days are in a week?", "seven", ("five", "ten", "twelve")),
    ("What is the largest ocean on Earth?", "Pacific", ("Atlantic", "Indian", "Arctic")),
    ("Which gas do plants take in from the air?", "carbon dioxide", ("oxygen", "helium", "neon")),
    ("What is the opposite of hot?", "cold", ("warm", "big", "fast")),
    ("Which month comes after March?", "April", ("May", "June", "February")),
)
COLORS = ("red", "blue", "green", "yellow", "black", "white", "brown", "orange", "purple", "pink")
OBJECTS = ("pen", "cup", "book", "ball", "hat", "key", "lamp", "phone", "shoe", "plate", "clock", "bag")
SURFACES = ("table", "floor", "desk", "shelf", "bed")
ITEMS = ("eggs", "milk", "bread", "rice", "tea", "apples", "cheese", "butter", "salt", "sugar", "coffee",
         "soap", "beans", "honey", "jam", "fish")


@dataclasses.dataclass(frozen=True)
class ChoicePrompt:
    """One prompt: its text, the options the answer competes with (in prompt order; what the model
    must produce, e.g. a letter or a colour) and the index of the right one."""

    text: str
    options: Tuple[str, ...]
    answer: int

    @property
    def answer_text(self) -> str:
        return self.options[self.answer]


def multiple_choice(n: int, seed: int, letters: str = LETTERS) -> list[ChoicePrompt]:
    """`n` lettered questions from QUESTIONS, options shuffled per prompt; options are the letters."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        q, right, wrong = QUESTIONS[i % len(QUESTIONS)]
        opts = [right, *wrong][:len(letters)]
        rng.shuffle(opts)
        lines = "\n".join(f"{l}. {o}" for l, o in zip(letters, opts))
        out.append(ChoicePrompt(f"Question: {q}\n{lines}\nAnswer:", tuple(letters[:len(opts)]), opts.index(right)))
    return out


def colored_objects(n: int, seed: int, n_objects: int = 3) -> list[ChoicePrompt]:
    """`n` prompts listing `n_objects` objects of distinct colours and asking one object's colour;
    options are the listed colours."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        cols, objs = rng.sample(COLORS, n_objects), rng.sample(OBJECTS, n_objects)
        listed = ", ".join(f"a {c} {o}" for c, o in zip(cols[:-1], objs[:-1])) + f" and a {cols[-1]} {objs[-1]}"
        k = rng.randrange(n_objects)
        text = f"On the {rng.choice(SURFACES)}, I see {listed}. What color is the {objs[k]}? Answer:"
        out.append(ChoicePrompt(text, tuple(cols), k))
    return out


def recall_list(n: int, seed: int, length: int = 5) -> list[ChoicePrompt]:
    """`n` lists of `length` items, repeated up to a random item (not the first) that must be
    recalled; options are the list's items."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        items = rng.sample(ITEMS, length)
        k = rng.randrange(1, length)
        text = f"Shopping list: {', '.join(items)}. Again: {', '.join(items[:k])},"
        out.append(ChoicePrompt(text, tuple(items), k))
    return out


def rotated_options(prompt: ChoicePrompt) -> ChoicePrompt:
    """The contrast of a prompt: every whole-word occurrence of option i in the text becomes
    option i + 1 (cyclically), so the template, the option set and (for single-token options) the
    token positions stay, but the right answer moves to the next option. Multiple choice: the line
    labels rotate ('A. Paris' -> 'B. Paris'), a different answer letter; Colored Objects: the colours
    move to the next object; list recall: every item becomes the next one in both lists."""
    n = len(prompt.options)
    nxt = {o: prompt.options[(i + 1) % n] for i, o in enumerate(prompt.options)}
    text = re.sub(r"\b(" + "|".join(map(re.escape, prompt.options)) + r")\b", lambda m: nxt[m.group(0)], prompt.text)
    if text == prompt.text:
        raise ValueError(f"no option of {prompt.options} stands as a word in {prompt.text!r}: nothing to rotate")
    return ChoicePrompt(text, tuple(nxt[o] for o in prompt.options), prompt.answer)


class ChoiceBatch(NamedTuple):
    """ids, attn_mask int32 [B, T] (left-padded); metric: `LogitDiff` of the answer's first token over the
    other options' first tokens; answer_index int32 [B]; option_ids int32 [B, O] (first tokens)."""

    ids: np.ndarray
    attn_mask: np.ndarray
    metric: LogitDiff
    answer_index: np.ndarray
    option_ids: np.ndarray


def option_tokens(tokenizer: Tokenizer, prompt: ChoicePrompt) -> list[int]:
    """First token of " option" after the prompt, per option; ValueError if two options share it
    (the metric could not tell them apart)."""
    ids = [tokenizer.answer_token_ids(" " + o, prompt=prompt.text)[0] for o in prompt.options]
    if len(set(ids)) != len(ids):
        raise ValueError(f"options {prompt.options} of {prompt.text!r} share a first token: {ids}")
    return ids


def choice_batch(prompts: Sequence[ChoicePrompt], tokenizer: Tokenizer) -> ChoiceBatch:
    """The prompts encoded (``tokenizer.batch``) with their answer metric (see `ChoiceBatch`)."""
    ids, attn_mask = tokenizer.batch([p.text for p in prompts])
    opts = [option_tokens(tokenizer, p) for p in prompts]
    good = [[o[p.answer]] for o, p in zip(opts, prompts)]
    bad = [o[:p.answer] + o[p.answer + 1:] for o, p in zip(opts, prompts)]
    metric = LogitDiff(good=jnp.asarray(pad_ids(good)), bad=jnp.asarray(pad_ids(bad)))
    return ChoiceBatch(ids, attn_mask, metric, np.array([p.answer for p in prompts], np.int32), pad_ids(opts))


def accuracy(logits_last: np.ndarray, batch: ChoiceBatch) -> np.ndarray:
    """bool [B]: the answer's token has the highest logit among the options' (logits_last [B, V])."""
    opt = np.asarray(batch.option_ids)
    lg = np.where(opt >= 0, np.take_along_axis(np.asarray(logits_last), np.maximum(opt, 0), 1), -np.inf)
    return lg.argmax(1) == batch.answer_index
