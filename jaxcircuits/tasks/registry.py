"""The task registry: a task's name -> the builder of its source and target batches for a tokenizer.

A task is a patching task as data (`TaskBatches`): a source (good) run, a target (bad) run, the
metric that scores the target and the patched runs, and the one that scores the source run.
Every study and binary reads `TASKS`; `build(name, tokenizer, spec)` checks the name.

  decimals  9.8/9.11 and generated trap pairs, `source_format` -> `target_format`
  ioi       clean IOI prompts -> corrupted ones (three other names, same token length)
  prompts   prompt files, one prompt per line, scored by logit(good) - logit(bad) of `answers`
  colors, mc, recall
            choice tasks (`multiple_choice`): the target is the task's prompts, the source their
            `rotated_options` contrast (the answer moved to another option), one metric for both
"""

from __future__ import annotations

import dataclasses
import os
from typing import TYPE_CHECKING, Any, Callable, Dict, Optional, Sequence, Tuple

import jax.numpy as jnp
import numpy as np

from jaxcircuits.interventions.metrics import LogitDiff, pad_ids
from jaxcircuits.tasks import decimals as D
from jaxcircuits.tasks import ioi
from jaxcircuits.tasks import multiple_choice as mc

if TYPE_CHECKING:
    from jaxcircuits.weights.tokenize import Tokenizer


class AnswerError(ValueError):
    """Answers that cannot score a prompt: they merge with its end, or good and bad share their first
    token (logit(good) - logit(bad) would be 0 whatever is patched)."""


@dataclasses.dataclass(frozen=True)
class TaskBatches:
    """A patching task as token batches: source (good) and target (bad) runs, left-padded ids/mask
    [B, T_src] and [B, T_tgt]; `metric` scores the target run and patched runs [B], `source_metric`
    the source run (the same metric where both runs share their answers); `names` of the two runs,
    a one-line `description`, and `prompts`: the source's and the target's prompts as the task
    builds them (B each: decimal pairs, IOI prompts, texts or choice prompts)."""

    source_ids: np.ndarray
    source_attn_mask: np.ndarray
    target_ids: np.ndarray
    target_attn_mask: np.ndarray
    metric: Any
    source_metric: Any
    names: Tuple[str, str]
    description: str
    prompts: Tuple[Sequence, Sequence]

    def swapped(self) -> TaskBatches:
        """The same task with the roles exchanged: the target run becomes the source (a circuit is
        kept from the good run, everything else patched from the bad one)."""
        return TaskBatches(self.target_ids, self.target_attn_mask, self.source_ids, self.source_attn_mask,
                           self.source_metric, self.metric, self.names[::-1], self.description, self.prompts[::-1])


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """What a builder reads: prompts and seed for all tasks; `decimals` its two formats; `prompts`
    its two files and the (good, bad) answers. A study's options carry the same attributes and are
    passed in its place."""

    n_prompts: int = 8
    seed: int = 0
    source_format: str = "simple"
    target_format: str = "qa"
    source_prompts: Optional[str] = None
    target_prompts: Optional[str] = None
    answers: Tuple[str, ...] = ()


def decimal_batches(pairs: Sequence[D.DecimalPair], source_format: str, target_format: str,
                    tokenizer: Tokenizer) -> TaskBatches:
    """The pairs asked in `source_format` (source) and `target_format` (target), each scored by its
    own first-distinguishing-token metric (`decimals.build_batch`)."""
    src, tgt = (D.build_batch(pairs, f, tokenizer) for f in (source_format, target_format))
    return TaskBatches(src.ids, src.attn_mask, tgt.ids, tgt.attn_mask, tgt.metric, src.metric,
                       (source_format, target_format), f"{len(pairs)} decimal pairs, {source_format} -> {target_format}",
                       (pairs, pairs))


def text_batches(tokenizer: Tokenizer, texts: Tuple[Sequence[str], Sequence[str]],
                 answers: Tuple[Sequence[str], Sequence[str]], names: Tuple[str, str] = ("source", "target"),
                 description: str = "") -> TaskBatches:
    """Source and target texts [B] each, scored by logit(good) - logit(bad) of the first token of
    each prompt's answers (`answers`: good [B] and bad [B] strings) after that prompt; AnswerError
    where they cannot score it (merged with the prompt's end, or the same first token)."""
    if len(texts[0]) != len(texts[1]):
        raise ValueError(f"texts: {len(texts[0])} source and {len(texts[1])} target prompts")

    def first(answer, prompt):
        try:
            return tokenizer.answer_token_ids(answer, prompt=prompt)[:1]
        except ValueError as e:
            raise AnswerError(str(e)) from None

    def metric(prompts):
        good, bad = ([first(a, t) for a, t in zip(side, prompts)] for side in answers)
        for i, (g, b) in enumerate(zip(good, bad)):
            if g == b:
                raise AnswerError(f"answers {answers[0][i]!r} and {answers[1][i]!r} share their first token "
                                  f"{tokenizer.token_str(g[0])!r} (id {g[0]}) after prompt {i}: logit(good) - "
                                  "logit(bad) is 0 whatever is patched; choose answers whose first tokens differ")
        return LogitDiff(good=jnp.asarray(pad_ids(good)), bad=jnp.asarray(pad_ids(bad)))
    (s_ids, s_attn_mask), (t_ids, t_attn_mask) = tokenizer.batch(list(texts[0])), tokenizer.batch(list(texts[1]))
    return TaskBatches(s_ids, s_attn_mask, t_ids, t_attn_mask, metric(texts[1]), metric(texts[0]), names,
                       description or f"{len(texts[0])} prompt pairs", tuple(texts))


def _decimals(tokenizer: Tokenizer, spec) -> TaskBatches:
    pairs = [D.STUDY_PAIR] + D.generate_pairs(max(spec.n_prompts - 1, 0), spec.seed)
    return decimal_batches(pairs, spec.source_format, spec.target_format, tokenizer)


def _ioi(tokenizer: Tokenizer, spec) -> TaskBatches:
    clean = ioi.generate_ioi(spec.n_prompts, spec.seed, tokenizer)
    corrupted = ioi.corrupt(clean, spec.seed + 1, tokenizer)
    src, tgt = ioi.ioi_batch(clean, tokenizer), ioi.ioi_batch(corrupted, tokenizer)
    # A corrupted prompt keeps its clean prompt's names: one metric serves both runs.
    return TaskBatches(src.ids, src.attn_mask, tgt.ids, tgt.attn_mask, tgt.metric, tgt.metric, ("clean", "corrupted"),
                       f"{len(clean)} IOI prompts, clean -> corrupted", (clean, corrupted))


def _files(tokenizer: Tokenizer, spec) -> TaskBatches:
    paths = (spec.source_prompts, spec.target_prompts)
    texts = []
    for path in paths:
        with open(path) as f:
            texts.append([l.rstrip("\n").replace("\\n", "\n") for l in f if l.strip()])
    if len(texts[0]) != len(texts[1]):
        raise ValueError(f"{paths[0]} has {len(texts[0])} prompts, {paths[1]} has {len(texts[1])}")
    return text_batches(tokenizer, (texts[0], texts[1]), tuple([a] * len(texts[1]) for a in spec.answers),
                        tuple(os.path.basename(p) for p in paths), f"{len(texts[0])} prompts from files")


def _choice(generate: Callable[[int, int], list]) -> Callable[[Tokenizer, Any], TaskBatches]:
    """The builder of a choice task: target = `generate(n_prompts, seed)`, source = each prompt's
    `rotated_options` contrast, both scored by the target's answers."""
    def build(tokenizer: Tokenizer, spec) -> TaskBatches:
        prompts = generate(spec.n_prompts, spec.seed)
        twins = [mc.rotated_options(p) for p in prompts]
        batch, contrast = (mc.choice_batch(ps, tokenizer) for ps in (prompts, twins))
        return TaskBatches(contrast.ids, contrast.attn_mask, batch.ids, batch.attn_mask, batch.metric, batch.metric,
                           ("rotated options", "prompts"),
                           f"{len(prompts)} choice prompts, rotated options -> prompts", (twins, prompts))
    return build


# task name -> builder(tokenizer, spec) of its batches (spec: a `TaskSpec` or options with its attributes)
TASKS: Dict[str, Callable[[Tokenizer, Any], TaskBatches]] = {
    "decimals": _decimals, "ioi": _ioi, "prompts": _files,
    "colors": _choice(mc.colored_objects), "mc": _choice(mc.multiple_choice), "recall": _choice(mc.recall_list),
}


def build(task: str, tokenizer: Tokenizer, spec) -> TaskBatches:
    """The batches of the registered `task` (`TASKS`) for `tokenizer`, as `spec` asks."""
    if task not in TASKS:
        raise ValueError(f"task={task!r}: known tasks are {sorted(TASKS)}")
    return TASKS[task](tokenizer, spec)
