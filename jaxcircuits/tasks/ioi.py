"""Indirect object identification (IOI) prompts: "When Mary and John went to the store, John gave a
drink to" -> " Mary" (the indirect object, IO), not " John" (the repeated subject, S).

Templates have three name slots {A}, {B} (the introduction) and {S} (the repeat), each after a
space so that a name is one token " Name". Order ABBA fills (IO, S, S), BABA fills (S, IO, S).
A corrupted prompt (`corrupt`) fills all three slots with three other names (the "ABC"
distribution), keeping template, place, object and token length.
"""

from __future__ import annotations

import dataclasses
import random
from typing import TYPE_CHECKING, NamedTuple, Sequence

import jax.numpy as jnp
import numpy as np

from jaxcircuits.interventions.metrics import LogitDiff, pad_ids

if TYPE_CHECKING:
    from jaxcircuits.weights.tokenize import Tokenizer

TEMPLATES = (
    "When {A} and {B} went to the {PLACE}, {S} gave a {OBJECT} to",
    "Then, {A} and {B} went to the {PLACE}. {S} gave a {OBJECT} to",
    "Then, {A} and {B} had a long argument. Afterwards {S} said to",
    "After {A} and {B} went to the {PLACE}, {S} gave a {OBJECT} to",
    "While {A} and {B} were working at the {PLACE}, {S} gave a {OBJECT} to",
    "Then, {A} and {B} had a lot of fun at the {PLACE}. {S} gave a {OBJECT} to",
    "When {A} and {B} got a {OBJECT} at the {PLACE}, {S} decided to give it to",
    "Friends {A} and {B} found a {OBJECT} at the {PLACE}. {S} gave it to",
    "Afterwards, {A} and {B} went to the {PLACE}. {S} handed a {OBJECT} to",
    "The {PLACE} was busy when {A} and {B} arrived, so {S} passed the {OBJECT} to",
)
NAMES = (
    "Mary", "John", "Alice", "Bob", "Tom", "James", "Michael", "Sarah", "Emma", "David",
    "Daniel", "Laura", "Anna", "Paul", "Mark", "Kate", "Lisa", "Peter", "Jack", "Jane",
    "Susan", "Robert", "William", "Richard", "Joseph", "Thomas", "Charles", "George", "Andrew", "Edward",
    "Kevin", "Ryan", "Eric", "Adam", "Emily", "Rachel", "Helen", "Amy", "Linda", "Karen",
)
PLACES = ("store", "garden", "restaurant", "school", "hospital", "office", "house", "station", "park", "market")
OBJECTS = ("ring", "kiss", "bone", "basketball", "computer", "necklace", "drink", "snack", "book", "letter")
ORDERS = ("ABBA", "BABA")


def single_token_names(tokenizer: Tokenizer, names: Sequence[str] = NAMES) -> list[str]:
    """The names that encode as exactly one token with a leading space (" Mary"), in order."""
    return [n for n in names if len(tokenizer.encode(" " + n, add_special_tokens=False)) == 1]


@dataclasses.dataclass(frozen=True)
class IOIPrompt:
    """One prompt. io, s: the names the metric compares (a corrupted prompt keeps its clean
    prompt's); names: the (A, B, S) slot fills; order: "ABBA", "BABA" or "ABC" (corrupted);
    template: index into TEMPLATES; place, object: its fills (unused where it has no such slot)."""

    text: str
    io: str
    s: str
    template: int
    order: str
    names: tuple[str, str, str]
    place: str
    object: str


def render(template: int, names: Sequence[str], place: str, obj: str) -> str:
    """TEMPLATES[template] with the (A, B, S) names, place and object filled in."""
    a, b, s = names
    return TEMPLATES[template].format(A=a, B=b, S=s, PLACE=place, OBJECT=obj)


def generate_ioi(
    n: int, seed: int, tokenizer: Tokenizer, orders: Sequence[str] = ORDERS
) -> list[IOIPrompt]:
    """`n` clean prompts, deterministic in `seed`: prompt i has order orders[i % len(orders)], a
    random template, place, object and two distinct single-token names (IO, S)."""
    if not orders or set(orders) - set(ORDERS):
        raise ValueError(f"orders must be a non-empty sequence of {ORDERS}, got {orders}")
    pool = single_token_names(tokenizer)
    rng = random.Random(seed)
    out = []
    for i in range(n):
        order = orders[i % len(orders)]
        template, (io, s) = rng.randrange(len(TEMPLATES)), rng.sample(pool, 2)
        place, obj = rng.choice(PLACES), rng.choice(OBJECTS)
        names = (io, s, s) if order == "ABBA" else (s, io, s)
        out.append(IOIPrompt(render(template, names, place, obj), io, s, template, order, names, place, obj))
    return out


def corrupt(prompts: Sequence[IOIPrompt], seed: int, tokenizer: Tokenizer, tries: int = 100) -> list[IOIPrompt]:
    """Each prompt with its A, B and S slots filled by three distinct names that are neither its
    IO nor its S, resampled (up to `tries` times) until its token length equals the clean one's;
    ValueError if none fits."""
    rng, names_ok = random.Random(seed), single_token_names(tokenizer)
    out = []
    for p in prompts:
        pool = [n for n in names_ok if n not in (p.io, p.s)]
        length = len(tokenizer.encode(p.text))
        for _ in range(tries):
            names = tuple(rng.sample(pool, 3))
            text = render(p.template, names, p.place, p.object)
            if len(tokenizer.encode(text)) == length:
                out.append(dataclasses.replace(p, text=text, order="ABC", names=names))
                break
        else:
            raise ValueError(f"no names give {p.text!r}'s token length {length} in {tries} tries")
    return out


class IOIBatch(NamedTuple):
    """ids, attn_mask int32 [B, T] (left-padded); metric: `LogitDiff` of " IO" over " S" at the last
    position (> 0: the indirect object is preferred)."""

    ids: np.ndarray
    attn_mask: np.ndarray
    metric: LogitDiff


def _name_token(tokenizer: Tokenizer, name: str, prompt: str) -> int:
    ids = tokenizer.answer_token_ids(" " + name, prompt=prompt)
    if len(ids) != 1:
        raise ValueError(f"{name!r} is {len(ids)} tokens after {prompt!r}, not one")
    return ids[0]


def ioi_batch(prompts: Sequence[IOIPrompt], tokenizer: Tokenizer) -> IOIBatch:
    """The prompts encoded (``tokenizer.encode``, BOS as the tokenizer adds it) and left-padded."""
    ids, attn_mask = tokenizer.batch([p.text for p in prompts])
    good = [[_name_token(tokenizer, p.io, p.text)] for p in prompts]
    bad = [[_name_token(tokenizer, p.s, p.text)] for p in prompts]
    return IOIBatch(ids, attn_mask, LogitDiff(good=jnp.asarray(pad_ids(good)), bad=jnp.asarray(pad_ids(bad))))
