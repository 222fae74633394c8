"""Prompt formats as data: how a question becomes the text and ids a model is run on.

A `PromptFormat` is one of three kinds:

- ``plain``: ``template`` with ``{question}`` substituted (e.g. ``"Q: {question}\\nA:"``);
- ``raw``: the same, for a literal chat string written out by hand (special tokens as text); a raw
  format may instead ``select`` another format by the first marker token found in the vocabulary;
- ``chat``: the tokenizer's own chat template applied to ``[system?, user]`` messages, the user
  message being ``template`` (default ``"{question}"``).

``{question}`` is the only placeholder; any other braces are literal text.

BOS rules (`encode_prompt`): plain and raw texts are encoded with ``tokenizer.encode(text)``, i.e. HF
``tokenizer(prompt)``, which adds BOS where the tokenizer does (Llama 3: ``<|begin_of_text|>``;
SmolLM2, GPT-2: nothing). Chat texts are encoded with ``add_special_tokens=False``, HF's convention:
the template already writes BOS where the model wants one.
"""

from __future__ import annotations

import dataclasses
import json
import os
import types
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence

if TYPE_CHECKING:
    import numpy as np

    from jaxcircuits.weights.tokenize import Tokenizer

FORMAT_KINDS = ("plain", "chat", "raw")


@dataclasses.dataclass(frozen=True)
class PromptFormat:
    """One prompt format. `select` holds (marker token, format name) pairs, tried in order
    (a mapping is accepted too)."""

    name: str
    kind: str
    template: str | None = None
    system: str | None = None
    add_generation_prompt: bool = True
    select: tuple[tuple[str, str], ...] = ()

    def __post_init__(self):
        if not self.name:
            raise ValueError("a prompt format needs a name")
        if self.kind not in FORMAT_KINDS:
            raise ValueError(f"format {self.name!r}: kind must be one of {FORMAT_KINDS}, got {self.kind!r}")
        if self.select and (self.kind != "raw" or self.template is not None):
            raise ValueError(f"format {self.name!r}: only a raw format without a template may select")
        if self.kind != "chat" and not self.select and self.template is None:
            raise ValueError(f"format {self.name!r}: a {self.kind} format needs a template")
        if self.template is not None and "{question}" not in self.template:
            raise ValueError(f"format {self.name!r}: the template has no {{question}} placeholder")
        if self.kind != "chat" and (self.system is not None or not self.add_generation_prompt):
            raise ValueError(f"format {self.name!r}: only a chat format has system and add_generation_prompt")
        object.__setattr__(self, "select", tuple((str(m), str(n)) for m, n in dict(self.select).items()))

    def fill(self, question: str) -> str:
        """The template (``{question}`` for a chat format without one) with the question put in."""
        return (self.template or "{question}").replace("{question}", question)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields, defaults left out."""
        out: dict[str, Any] = {}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if value != field.default:
                out[field.name] = dict(value) if field.name == "select" else value
        return out

    @classmethod
    def from_dict(cls, spec: Mapping[str, Any]) -> PromptFormat:
        unknown = set(spec) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown prompt format fields {sorted(unknown)} in {dict(spec)}")
        return cls(**spec)


LLAMA3_CHAT_RAW = (
    "<|start_header_id|>user<|end_header_id|>\n\n{question}<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\n"
)
CHATML_CHAT_RAW = "<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"


def _table(formats: Iterable[PromptFormat]) -> dict[str, PromptFormat]:
    table: dict[str, PromptFormat] = {}
    for fmt in formats:
        if fmt.name in table:
            raise ValueError(f"prompt format {fmt.name!r} is defined twice")
        table[fmt.name] = fmt
    return table


# The built-in table (read-only; `load_formats` makes extended copies).
FORMATS: Mapping[str, PromptFormat] = types.MappingProxyType(
    _table(
        [
            PromptFormat("simple", "plain", "{question}\nAnswer:"),
            PromptFormat("qa", "plain", "Q: {question}\nA:"),
            PromptFormat("chat", "chat"),  # the model's own template (and its default system prompt, if any)
            PromptFormat("chat_raw_llama3", "raw", LLAMA3_CHAT_RAW),  # no system header; BOS from the tokenizer
            PromptFormat("chat_raw_chatml", "raw", CHATML_CHAT_RAW),  # no system message
            PromptFormat(
                "chat_raw",
                "raw",
                select=(("<|im_start|>", "chat_raw_chatml"), ("<|start_header_id|>", "chat_raw_llama3")),
            ),
        ]
    )
)


def _check_selects(table: Mapping[str, PromptFormat]) -> None:
    for fmt in table.values():
        for _, target in fmt.select:
            if target not in table or table[target].select:
                raise ValueError(f"format {fmt.name!r} selects {target!r}, which is not a format with a template")


def load_formats(path: str | os.PathLike, base: Mapping[str, PromptFormat] = FORMATS) -> dict[str, PromptFormat]:
    """`base` extended (or overridden, by name) with the formats of a JSON file: a list of objects
    with `PromptFormat`'s fields (``select`` as an object ``{marker: format name}``)."""
    with open(path, encoding="utf-8") as f:
        specs = json.load(f)
    if not isinstance(specs, list):
        raise ValueError(f"{path}: expected a JSON list of prompt formats")
    table = {**base, **_table(PromptFormat.from_dict(s) for s in specs)}
    _check_selects(table)
    return table


def save_formats(formats: Iterable[PromptFormat], path: str | os.PathLike) -> None:
    """Write formats as the JSON list `load_formats` reads."""
    with open(path, "w", encoding="utf-8") as f:
        json.dump([fmt.to_dict() for fmt in formats], f, indent=2, ensure_ascii=False)
        f.write("\n")


def get_format(name: str, formats: Mapping[str, PromptFormat] | None = None) -> PromptFormat:
    """The format called `name`; ValueError listing the known names if there is none."""
    formats = FORMATS if formats is None else formats
    if name not in formats:
        raise ValueError(f"unknown prompt format {name!r}; known formats: {', '.join(sorted(formats))}")
    return formats[name]


def resolve(
    fmt: PromptFormat | str, tokenizer: Tokenizer, formats: Mapping[str, PromptFormat] | None = None
) -> PromptFormat:
    """The concrete format used for `tokenizer`: looks names up and follows `select`."""
    if isinstance(fmt, str):
        fmt = get_format(fmt, formats)
    if not fmt.select:
        return fmt
    for marker, target in fmt.select:
        if tokenizer.token_to_id(marker) is not None:
            return get_format(target, formats)
    markers = ", ".join(m for m, _ in fmt.select)
    raise ValueError(f"format {fmt.name!r}: the tokenizer {tokenizer.source} has none of the tokens {markers}")


def render(
    fmt: PromptFormat | str, question: str, tokenizer: Tokenizer, formats: Mapping[str, PromptFormat] | None = None
) -> str:
    """The prompt text of `question` in format `fmt`."""
    fmt = resolve(fmt, tokenizer, formats)
    if fmt.kind != "chat":
        return fmt.fill(question)
    system = [] if fmt.system is None else [{"role": "system", "content": fmt.system}]
    messages = system + [{"role": "user", "content": fmt.fill(question)}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=fmt.add_generation_prompt)


def encode_prompt(
    fmt: PromptFormat | str, question: str, tokenizer: Tokenizer, formats: Mapping[str, PromptFormat] | None = None
) -> list[int]:
    """Ids of the rendered prompt, with the module's BOS rules (special tokens added unless chat)."""
    fmt = resolve(fmt, tokenizer, formats)
    return tokenizer.encode(render(fmt, question, tokenizer), add_special_tokens=fmt.kind != "chat")


def batch_prompts(
    fmt: PromptFormat | str,
    questions: Sequence[str],
    tokenizer: Tokenizer,
    pad_side: str = "left",
    formats: Mapping[str, PromptFormat] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """`encode_prompt` for each question, padded: (ids int32 [B, T], attention_mask int32 [B, T])."""
    return tokenizer.pad([encode_prompt(fmt, q, tokenizer, formats) for q in questions], pad_side)
