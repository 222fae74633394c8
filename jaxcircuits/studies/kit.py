"""The study kit: what the studies and their binaries share (no study imports another).

  tasks -> problems  `problem` / `problems`: a registered task's batches (`tasks.registry`) as a
                     `PatchingProblem` (its source run cached at the given sites, a position map
                     `ALIGNS`, its target run, position weights, its metric); `baselines`: the
                     unpatched runs' metrics
  corpus             `corpus_rows`: the dictionaries' corpus (`dictionaries.corpus`) as training and
                     held-out token rows
  scans              `unit_map` (each unit of a site patched alone), `layer_scan` (every unit of one
                     layer patched together, layer by layer)
  options = flags    a study's `Options` is a frozen dataclass whose `flag` fields are its binary's
                     absl flags, declared once: `define_flags` defines them, `from_flags` builds the
                     options by field name; groups: `StudyOptions` (model, dtype, out), `TaskOptions`
                     (a registered task's flags), `DictionaryOptions` (training dictionaries on the
                     corpus, flags defaulting to a preset's); `run_binary` is every binary's main
  checks             `OptionError` (a flag that does not fit) and the library's other expected errors
                     (`EXPECTED`) end a binary with one line; a bug keeps its traceback
"""

from __future__ import annotations

import dataclasses
import os
import sys
from typing import Any, Callable, ClassVar, Dict, Mapping, NoReturn, Optional, Sequence, Tuple, TypeVar

import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging

import jaxcircuits as jc
from jaxcircuits import logs, storage
from jaxcircuits.dictionaries import corpus, train
from jaxcircuits.bundle import DEFAULT_MODEL, Model
from jaxcircuits.interventions.problem import PatchingProblem, target_run
from jaxcircuits.engine.patching import run_masks
from jaxcircuits.interventions import positions as P
from jaxcircuits.interventions.sites import Mask
from jaxcircuits.interventions.sites import get as get_site
from jaxcircuits.models.config import ModelConfig
from jaxcircuits.models.params import PARAM_DTYPES
from jaxcircuits.models.transformer import run_with_cache
from jaxcircuits.tasks.formats import get_format
from jaxcircuits.tasks import registry
from jaxcircuits.tasks.registry import TaskBatches
from jaxcircuits.weights.registry import load_config

O = TypeVar("O")

# Flags defined here are the calling binary's own (listed by its --help), not this module's.
flags.disclaim_key_flags()


class OptionError(ValueError):
    """A study option (a binary's flag) that does not fit the model or the task."""


# ---- models and unpatched runs -------------------------------------------------------------------

def load_model(name: str, dtype: str) -> Model:
    """`jc.load(name, dtype)` for a study: the model must have a tokenizer."""
    model = jc.load(name, dtype)
    if model.tokenizer is None:
        raise ValueError(f"{name} has no tokenizer")
    return model


def load(opts: StudyOptions) -> Model:
    """The model of a study's options (`load_model`), the options checked against its config."""
    model = load_model(opts.model, opts.dtype)
    opts.check_flags()
    opts.check(model.cfg)
    return model


def final_hidden(model: Model, ids, attn_mask, n: int):
    """Final-normed hidden states [B, n, D] of the last n positions of a plain run of ids, attn_mask [B, T]."""
    _, c = jc.forward(model.params, model.cfg, jnp.asarray(ids), jnp.asarray(attn_mask), collect=("final_norm",),
                      return_logits=False)
    return c["final_norm"][:, -n:]


def unpatched_metric(model: Model, ids, attn_mask, metric) -> np.ndarray:
    """The metric [B] of a plain run of ids, attn_mask [B, T]."""
    return np.asarray(metric(model.params, final_hidden(model, ids, attn_mask, metric.n_positions)))


def baselines(model: Model, task: TaskBatches) -> Tuple[np.ndarray, np.ndarray]:
    """(the source run's metric [B] by the task's source metric, the target run's [B] by its metric)."""
    return (unpatched_metric(model, task.source_ids, task.source_attn_mask, task.source_metric),
            unpatched_metric(model, task.target_ids, task.target_attn_mask, task.metric))


# ---- the dictionaries' corpus --------------------------------------------------------------------

def corpus_rows(model: Model, opts) -> Tuple[np.ndarray, np.ndarray]:
    """(training rows, held-out rows) int32 [N, seq_len] of the first --documents corpus documents
    (`dictionaries.corpus`), the held-out rows (--eval_rows of them) from its last documents (whole:
    no document is split between the two); opts: a study's options with documents, seq_len and
    eval_rows."""
    try:
        texts = corpus.texts()
    except RuntimeError as e:
        raise ConnectionError(str(e)) from None
    docs = texts[:opts.documents or None]
    held = 1                  # the last documents, as few as fill --eval_rows: no document is in both parts
    while held < len(docs) and len(_rows(model, docs[-held:], opts.seq_len)) < opts.eval_rows:
        held *= 2
    held = min(held, len(docs))
    train_rows, eval_rows = _rows(model, docs[:-held], opts.seq_len), _rows(model, docs[-held:], opts.seq_len)
    if len(train_rows) == 0 or len(eval_rows) < opts.eval_rows:
        raise OptionError(f"--documents={opts.documents} give {len(train_rows)} training and {len(eval_rows)} held-out "
                          f"rows of --seq_len={opts.seq_len}: too few for --eval_rows={opts.eval_rows} held out "
                          "(whole documents) and some to train on")
    return train_rows, eval_rows[:opts.eval_rows]


def _rows(model, docs, seq_len: int) -> np.ndarray:
    """`corpus.token_rows` of `docs`, or no rows [0, seq_len] when they fill none."""
    try:
        return corpus.token_rows(model.tokenizer, docs, seq_len)
    except ValueError:
        return np.zeros((0, seq_len), np.int32)


# ---- tasks -> patching problems ------------------------------------------------------------------

# position-map kind -> map int32 [B, T_tgt] (target slot -> source slot, -1 unmapped) of
# (target ids, target mask, source ids, source mask)
ALIGNS: Dict[str, Callable[..., np.ndarray]] = {
    "token": P.token_matched,                                             # identical tokens, difflib blocks
    "right": lambda t_ids, t_attn, s_ids, s_attn: P.right_aligned(t_attn, s_attn),      # from the last token
    "left": lambda t_ids, t_attn, s_ids, s_attn: P.left_aligned(t_attn, s_attn),        # from the first token
}


def position_map(align: str, target: Tuple[Any, Any], source: Tuple[Any, Any]) -> np.ndarray:
    """The `ALIGNS[align]` map [B, T_tgt] of target (ids, attn_mask) [B, T_tgt] to source (ids, attn_mask)
    [B, T_src]."""
    if align not in ALIGNS:
        raise ValueError(f"align={align!r}: known position maps are {list(ALIGNS)}")
    return ALIGNS[align](*target, *source)


def problems(model: Model, task: TaskBatches, sites: Sequence[str], aligns: Sequence[str],
             positions: P.Selector = "all") -> Dict[str, PatchingProblem]:
    """{align: problem} for each position-map kind in `aligns`, sharing one source and one target run.

    Target: the task's target run, scored by its metric. Source: the task's source run's cache
    entries `sites` [L, B, T_src, ...], aligned to the target's slots by the map. Position weights
    [B, T_tgt]: `positions` (a `positions.Selector`) among the mapped target slots; a selector that
    does not fit the prompts is an OptionError naming --positions, raised before any run."""
    maps = {a: position_map(a, (task.target_ids, task.target_attn_mask), (task.source_ids, task.source_attn_mask))
            for a in aligns}
    try:
        pos_w = {a: P.weights(positions, m) for a, m in maps.items()}
    except ValueError as e:
        spec = positions if isinstance(positions, str) else ",".join(map(str, positions))
        raise OptionError(f"--positions={spec}: {e}") from None
    _, cache = run_with_cache(model.params, model.cfg, task.source_ids, jnp.asarray(task.source_attn_mask),
                              sites=tuple(sites))
    target = target_run(model.params, model.cfg, task.target_ids, task.target_attn_mask)
    return {a: PatchingProblem.make(target, P.align(cache, m), pos_w[a], task.metric) for a, m in maps.items()}


def problem(model: Model, task: TaskBatches, sites: Sequence[str], align: str = "right",
            positions: P.Selector = "all") -> PatchingProblem:
    """The task's patching problem under one position-map kind (`problems`)."""
    return problems(model, task, sites, (align,), positions)[align]


# ---- scans ---------------------------------------------------------------------------------------

def _run_all(model: Model, problem: PatchingProblem, site: str, masks: np.ndarray, chunk_size: int) -> np.ndarray:
    """Metric [N, B] of N masks [N, L, ...] of `site` in balanced chunks of at most `chunk_size`
    (little padding; 0: the size that fits the free memory)."""
    n = masks.shape[0]
    n_chunks = -(-n // chunk_size) if chunk_size else 1
    return run_masks(model.params, model.cfg, problem, Mask(**{site: masks}),
                     chunk_size=-(-n // n_chunks) if chunk_size else None)


def unit_map(model: Model, problem: PatchingProblem, chunk_size: int, site: str = "head_out") -> np.ndarray:
    """Metric [L, *units, B] (heads: [L, H, B]) with each unit of `site` patched alone, in one batched call."""
    shape = get_site(site).shape(model.cfg)
    n = int(np.prod(shape))
    masks = np.eye(n, dtype=np.float32).reshape(n, *shape)
    return _run_all(model, problem, site, masks, chunk_size).reshape(*shape, -1)


def layer_scan(model: Model, problem: PatchingProblem, chunk_size: int, site: str = "head_out") -> np.ndarray:
    """Metric [L, B] with every unit of `site` in one layer patched together, layer by layer (a
    study picks the layer that matters from it)."""
    shape = get_site(site).shape(model.cfg)
    L = shape[0]
    masks = np.broadcast_to(np.eye(L, dtype=np.float32).reshape(L, L, *[1] * (len(shape) - 1)), (L, *shape))
    return _run_all(model, problem, site, np.ascontiguousarray(masks), chunk_size)


# ---- options and flags ---------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Flag:
    """An option's absl flag: `flags.DEFINE_<kind>(name, default, help, **define)` (enum_values,
    lower_bound, ...); `parse` turns the flag's value into the option's."""

    kind: str
    default: Any
    help: str
    define: Mapping[str, Any]
    parse: Callable[[Any], Any]


# flag kind -> the option value of a flag value, where they differ (lists become tuples)
PARSE: Dict[str, Callable[[Any], Any]] = {"list": tuple}


def flag(kind: str, default: Any, help: str, parse: Optional[Callable[[Any], Any]] = None, **define) -> Any:
    """A dataclass field that is also the absl flag of its name (`Flag`); the field's default is the
    parsed flag default. `parse` raises ValueError with a message that reads after '--name', e.g.
    'must be integers, got [...]'."""
    parse = parse or PARSE.get(kind, lambda v: v)
    return dataclasses.field(default=parse(default), metadata={"flag": Flag(kind, default, help, define, parse)})


def _each(convert: Callable[[str], Any], what: str) -> Callable[[Sequence[str]], Tuple[Any, ...]]:
    """A list flag's parse: every value converted, else ValueError 'must be <what>, got [...]'."""
    def parse(values):
        try:
            return tuple(convert(v) for v in values)
        except ValueError:
            raise ValueError(f"must be {what}, got {list(values)}") from None
    return parse


ints = _each(int, "integers")
floats = _each(float, "numbers")


def parsed(name: str, parse: Callable[[Any], Any], value: Any) -> Any:
    """`parse(value)` of flag `name`; its ValueError becomes an OptionError '--name <message>'."""
    try:
        return parse(value)
    except ValueError as e:
        raise OptionError(f"--{name} {e}") from None


def _flags(options: type):
    return [(f.name, f.metadata["flag"]) for f in dataclasses.fields(options) if "flag" in f.metadata]


def define_flags(options: type) -> None:
    """Define the binary's absl flags: one per `flag` field of the study's options class, and the
    logging switches (`logs.define_flags`). Call at the binary's module level."""
    for name, f in _flags(options):
        getattr(flags, f"DEFINE_{f.kind}")(name, default=f.default, help=f.help, **f.define)
    logs.define_flags()


def from_flags(options: type[O]) -> O:
    """The study's options from the parsed flags, field by field (OptionError naming a flag whose
    value its `parse` rejects)."""
    return options(**{name: parsed(name, f.parse, flags.FLAGS[name].value) for name, f in _flags(options)})


@dataclasses.dataclass(frozen=True, kw_only=True)
class StudyOptions:
    """What every study's options hold (model, dtype, its report directory) and check; a study's
    `Options` subclasses it, adds its `flag` fields and overrides the checks. `out` is the study's
    own flag (`out(study)`: its default differs)."""

    model: str = flag("string", DEFAULT_MODEL, "Embedded model, HF checkpoint dir, .gguf file, alias or HF "
                                               "id 'org/name' (downloaded when not in the local HF hub cache).")
    dtype: str = flag("enum", "float32", "Parameter dtype.", enum_values=list(PARAM_DTYPES))
    out: str

    def check_flags(self) -> None:
        """Raise OptionError (or a ValueError) naming the flag of a value wrong for any model; run
        before the model's config is read."""

    def check(self, cfg: ModelConfig) -> None:
        """Raise OptionError naming the flag of a value that does not fit the model's config."""


def out(study: str) -> Any:
    """The --out flag: the report directory, reports/<study> by default."""
    return flag("string", f"reports/{study}", "Report directory.")


def resume() -> Any:
    """The --resume flag of a study whose sweeps resume."""
    return flag("bool", True, "Continue sweeps already on disk in --out.")


def _check_formats(opts: TaskOptions) -> None:
    for name in (opts.source_format, opts.target_format):
        get_format(name)                                     # ValueError listing the known formats


def _check_prompt_files(opts: TaskOptions) -> None:
    if not (opts.source_prompts and opts.target_prompts and len(opts.answers) == 2):
        raise OptionError("--task=prompts needs --source_prompts, --target_prompts and --answers=good,bad")
    if not all(opts.answers) or opts.answers[0] == opts.answers[1]:
        raise OptionError(f"--answers={','.join(opts.answers)!r}: needs two different non-empty answers, good,bad "
                          "(logit(good) - logit(bad) of equal answers is 0 whatever is patched)")
    for path in (opts.source_prompts, opts.target_prompts):
        if not os.path.isfile(path):
            raise OptionError(f"prompt file {path} not found")


def _answer_list(value: str) -> Tuple[str, ...]:
    """--answers split at its commas, every space kept (an absl list flag strips them: ' Mary' would
    silently become 'Mary', another first token)."""
    return tuple(value.split(",")) if value else ()


# task -> the check of the `TaskOptions` flags it reads (tasks not listed read none of them)
TASK_FLAGS: Dict[str, Callable[[Any], None]] = {"decimals": _check_formats, "prompts": _check_prompt_files}


@dataclasses.dataclass(frozen=True, kw_only=True)
class TaskOptions(StudyOptions):
    """Options of a study on a registered source -> target task (`tasks.registry.build` reads them
    as its spec). `task`, `n_prompts` and `seed` are the study's own flags (defaults and help differ)."""

    task: str
    n_prompts: int
    seed: int
    source_format: str = flag("string", "simple", "decimals: format of the source run.")
    target_format: str = flag("string", "qa", "decimals: format of the target run.")
    source_prompts: Optional[str] = flag("string", None, "prompts: file, one source prompt per line (\\n for "
                                         "newlines).")
    target_prompts: Optional[str] = flag("string", None, "prompts: file, one target prompt per line.")
    answers: Tuple[str, ...] = flag("string", "", "prompts: good,bad answer strings, split at the comma with "
                                    "spaces kept (--answers=' Mary, John' is ' Mary' and ' John': the space "
                                    "usually belongs to a word's first token); metric = logit(good) - "
                                    "logit(bad) of their first tokens.", parse=_answer_list)

    def check_flags(self) -> None:
        """The flags the task reads (`TASK_FLAGS`): formats known, prompt files and answers given."""
        TASK_FLAGS.get(self.task, lambda opts: None)(self)


def at_least(opts: StudyOptions, **minimum) -> None:
    """OptionError naming the first flag name=low of `minimum` whose value in `opts` is below low."""
    for name, low in minimum.items():
        if getattr(opts, name) < low:
            raise OptionError(f"--{name} must be >= {low}, got {getattr(opts, name)}")


def unset(help: str, kind: str = "integer") -> Any:
    """A flag whose default, None, is the --preset's value (`DictionaryOptions.presets`)."""
    return flag(kind, None, f"{help} Default: the preset's.")


@dataclasses.dataclass(frozen=True, kw_only=True)
class DictionaryOptions(StudyOptions):
    """Options of a study that trains dictionaries on the corpus (`corpus_rows`, `dictionaries.train`):
    the training flags, `training()` their `train.Options`. Flags left None take the values of the
    study's `--preset` (its own flag), a key of the subclass's `presets`. `seed` is the study's own."""

    presets: ClassVar[Dict[str, Dict[str, Any]]] = {}
    preset: str
    seed: int
    kind: str = flag("enum", "topk", "Dictionary kind (`dictionaries.train.LOSSES`).", enum_values=sorted(train.LOSSES))
    width: Optional[int] = unset("Features per dictionary.")
    k: Optional[int] = unset("Active features per token of --kind=topk.")
    sparsity: float = flag("float", 1e-3, "Sparsity penalty of --kind=relu, jumprelu, gated (topk: unused).")
    steps: Optional[int] = unset("Training steps per dictionary.")
    batch: Optional[int] = unset("Activations per training step.")
    lr: Optional[float] = unset("Adam learning rate.", "float")
    documents: Optional[int] = unset("Corpus documents tokenized (0: all 10,033).")
    seq_len: int = flag("integer", 128, "Tokens per corpus row (the first is the separator).")
    eval_rows: Optional[int] = unset("Corpus rows held out for evaluation (from the last documents).")

    def __post_init__(self):
        if self.preset not in self.presets:
            raise OptionError(f"--preset={self.preset}: unknown; known: {sorted(self.presets)}")
        for name, value in self.presets[self.preset].items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, value)

    def check_flags(self) -> None:
        """Counts, sizes and rates of the training in range."""
        at_least(self, width=1, k=1, steps=1, batch=1, documents=0, seq_len=8, eval_rows=1)
        if self.kind == "topk" and self.k > self.width:
            raise OptionError(f"--k={self.k} active features exceed --width={self.width}")
        if not self.lr > 0 or self.sparsity < 0:
            raise OptionError(f"--lr must be > 0 and --sparsity >= 0, got {self.lr}, {self.sparsity}")

    def training(self) -> train.Options:
        """The `train.Options` of these options (buffer: 8 batches; a checkpoint every tenth of the steps;
        dead after a quarter of the tokens)."""
        return train.Options(kind=self.kind, width=self.width, k=self.k if self.kind == "topk" else None,
                             sparsity=self.sparsity, lr=self.lr, steps=self.steps, batch=self.batch,
                             buffer=8 * self.batch, seed=self.seed, checkpoint_every=max(1, self.steps // 10),
                             dead_tokens=max(1, self.steps * self.batch // 4))


def task_batches(model: Model, opts: TaskOptions) -> TaskBatches:
    """The batches of the options' registered task (`registry.build`); answers that cannot score its
    prompts (`registry.AnswerError`) are an OptionError naming --answers."""
    try:
        return registry.build(opts.task, model.tokenizer, opts)
    except registry.AnswerError as e:
        raise OptionError(f"--answers={','.join(opts.answers)!r}: {e} (spaces in --answers are kept: "
                          "--answers=' Mary, John')") from None


# ---- binaries ------------------------------------------------------------------------------------

# What a binary reports in one line, "<binary>: error: <message>", exit status 1: the library's
# expected errors, whose messages name the argument or file and what to do (bad values, and with
# them OptionError, `storage.DamagedFileError` and a directory holding a different sweep; missing or
# misplaced files; a directory in use; memory; a Hub download refused or cut off). Any other
# exception is a bug and keeps its traceback; so does every error with JAXCIRCUITS_TRACEBACK=1.
EXPECTED = (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, FileExistsError,
            PermissionError, ConnectionError, storage.LockedError, MemoryError)


def _prog() -> str:
    return os.path.splitext(os.path.basename(sys.argv[0]))[0]


def _message(e: BaseException) -> str:
    """The text of an error: 'file: reason' for an OSError about a file, else its message."""
    text = f"{e.filename}: {e.strerror}" if isinstance(e, OSError) and e.filename and e.strerror else str(e)
    return text or type(e).__name__


def _exit(text: str) -> NoReturn:
    """End the binary with the one line '<binary>: error: <text>' on stderr, exit status 1."""
    sys.exit(f"{_prog()}: error: {' '.join(text.splitlines())}")


def _parse_flags(argv: Sequence[str]) -> Sequence[str]:
    """absl's flag parsing, a malformed or unknown flag reported in one line."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        _exit(f"{e} (--helpshort lists the flags)")


def check_out(opts: StudyOptions) -> None:
    """OptionError naming --out when it cannot become the report directory (a file is in the way)."""
    try:
        storage.check_dir(opts.out)
    except OSError as e:
        raise OptionError(f"--out={opts.out}: {_message(e)}; choose another --out") from None


def _main(options: type, run: Callable[[Any], str], argv: Sequence[str]) -> None:
    logs.apply_flags()
    if len(argv) > 1:
        raise OptionError(f"unexpected argument(s) {argv[1:]}: flags are --name=value (quote a value that "
                          "holds spaces)")
    opts = from_flags(options)
    opts.check_flags()
    check_out(opts)
    opts.check(load_config(opts.model)[0])              # before any weights are converted or anything compiles
    path = os.path.abspath(run(opts))
    logging.info("report: %s", path)
    print(path)


def run_binary(options: type, run: Callable[[Any], str]) -> None:
    """A study binary's main (after `define_flags(options)`): flags -> options (`from_flags`), the
    checks that need no model (`check_flags`, `check_out`), then against the model's config
    (`opts.check`), then `run(opts)`; prints the report's path. Every bad flag, file or setup
    (`EXPECTED`) ends the binary with one line naming it."""
    def main(argv):
        try:
            _main(options, run, argv)
        except EXPECTED as e:
            if os.environ.get("JAXCIRCUITS_TRACEBACK", "0") not in ("", "0"):
                raise
            _exit(_message(e))
    app.run(main, flags_parser=_parse_flags)


def check_layers(flag_name: str, layers, cfg: ModelConfig) -> None:
    """OptionError unless every layer index lies in [0, n_layers)."""
    bad = [l for l in layers if not 0 <= l < cfg.n_layers]
    if bad:
        raise OptionError(f"--{flag_name}={','.join(map(str, layers))}: layer(s) {bad} out of range [0, {cfg.n_layers})")
