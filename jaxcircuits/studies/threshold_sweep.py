"""A generic subset sweep: task prompts -> source/target runs -> family sweep -> analysis report.

Success of a subset is a criterion on its metric over prompts (default: recovery>=0.5, the
normalised recovery toward the source run); the report opens with findings (the premise that
the source beats the target, the threshold, what fails).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Optional, Tuple

import jax.numpy as jnp
import numpy as np

import jaxcircuits as jc
from jaxcircuits.stats.bootstrap import prompt_table
from jaxcircuits.stats.criteria import Criterion
from jaxcircuits.stats.summary import SummaryOptions
from jaxcircuits.interventions import positions as P
from jaxcircuits.interventions import sites
from jaxcircuits.engine import subsets as S
from jaxcircuits.interventions.metrics import LogitDiff, pad_ids
from jaxcircuits.models.transformer import run_with_cache
from jaxcircuits.interventions.problem import PatchingProblem, target_run
from jaxcircuits.reports.findings import cell, premise_findings
from jaxcircuits.reports.report import Report, add_sweep_analysis, table
from jaxcircuits.studies.common import OptionError, TaskBatches, check_layers, load_model, unpatched_metric
from jaxcircuits.tasks import decimals as D
from jaxcircuits.tasks import ioi

ALIGNS = {"token": None, "right": P.right_aligned, "left": P.left_aligned}


@dataclasses.dataclass(frozen=True)
class Options:
    model: str
    task: str                       # 'decimals' | 'ioi' | 'prompts'
    source_format: str
    target_format: str
    prompts: Tuple[str, str]        # (source file, target file) for task 'prompts'
    answers: Tuple[str, str]        # (good, bad) answer strings for task 'prompts'
    n_prompts: int
    site: str
    layers: Tuple[int, ...]
    pool: str                       # 'all' | 'even' | 'odd' | comma list of unit indices
    family: str
    sizes: Tuple[int, ...]
    samples_per_size: int
    stride: int
    explicit: Tuple[Tuple[int, ...], ...]
    positions: str
    align: str
    success: str                    # a `criteria.Criterion` ('recovery>=0.5', ...) or positive | above:X | below:X
    aggregate: str                  # 'mean' | 'fraction': over prompts, for the last three forms
    n_blocks: Optional[int]
    chunk_size: int
    seed: int
    out: str
    resume: bool
    dtype: str = "float32"


# The older --success spellings (with --aggregate) -> the per-prompt comparison they make on the metric
OLDER_SUCCESS = {"positive": ">", "above": ">=", "below": "<="}


def parse_success(spec: str, aggregate: str = "mean") -> Criterion:
    """--success (and --aggregate) -> a criterion (`Criterion.parse`): 'recovery>=X', 'metric>X',
    'fraction>=X', 'fraction(metric>=Y)>=X' (any of >, >=, <, <=), or the older spellings
    'positive', 'above:X', 'below:X', read as 'metric>0', 'metric>=X', 'metric<=X' (aggregate
    'mean': on the mean over prompts) or 'fraction(metric>=X)>=0.5' etc. ('fraction': on at least
    half the prompts)."""
    kind, _, value = spec.partition(":")
    if kind in OLDER_SUCCESS:
        if (kind == "positive") == bool(value):
            raise OptionError(f"--success={spec}: write 'positive' alone, 'above:X' or 'below:X'")
        try:
            compare = f"metric{OLDER_SUCCESS[kind]}{float(value or 0.0)!r}"
        except ValueError:
            raise OptionError(f"--success={spec}: X in {kind}:X must be a number") from None
        return Criterion.parse(compare if aggregate == "mean" else f"fraction({compare})>=0.5")
    if aggregate != "mean":
        raise OptionError(f"--aggregate={aggregate} applies to --success=positive, above:X or below:X; "
                          f"--success={spec} says how it aggregates the prompts")
    try:
        return Criterion.parse(spec)
    except ValueError:
        raise OptionError(f"--success must be 'recovery>=X', 'metric>X', 'fraction>=X', 'positive', 'above:X' or "
                          f"'below:X', got {spec!r}") from None


def parse_positions(spec: str) -> P.Selector:
    """--positions: 'all', 'last', 'last:k' (k >= 1) or comma-separated token indices -> a selector."""
    if spec in ("all", "last"):
        return spec
    if spec.startswith("last:"):
        if not spec[5:].isdigit() or int(spec[5:]) < 1:
            raise OptionError(f"--positions={spec}: k in last:k must be an integer >= 1")
        return spec
    try:
        return [int(i) for i in spec.split(",")]
    except ValueError:
        raise OptionError(f"--positions={spec}: use all, last, last:k or comma-separated token indices") from None


def make_pool(site: str, layers, cfg, select: str, n_blocks: Optional[int] = None) -> S.Pool:
    """Units of `site` in `layers`: per layer all units, the even or odd ones, or listed indices
    (sites with one unit per layer take every layer's unit)."""
    if n_blocks is not None and not sites.get(site).blocked:
        raise OptionError(f"--n_blocks={n_blocks} applies only to --site=attn_block (got --site={site})")
    try:
        shape = sites.get(site).shape(cfg, n_blocks)
    except ValueError as e:
        raise OptionError(f"--n_blocks: {e}") from None
    if len(shape) == 1:
        return S.Pool(site, tuple((l,) for l in layers))
    if len(shape) != 2:
        raise ValueError(f"site {site!r} has mask shape {shape}: pools take sites with one unit axis")
    units_per_layer = shape[1]
    idx = np.arange(units_per_layer)
    if select == "even":
        idx = idx[0::2]
    elif select == "odd":
        idx = idx[1::2]
    elif select != "all":
        idx = np.array([int(i) for i in select.split(",")])
        if idx.min() < 0 or idx.max() >= units_per_layer:
            raise OptionError(f"--pool={select}: indices out of range [0, {units_per_layer}) of --site={site}")
    return S.Pool(site, tuple((l, int(j)) for l in layers for j in idx), n_blocks if sites.get(site).blocked else None)


def _group_size(opts: Options, cfg) -> int:
    """G of the model's KV groups, for families over a pool of query heads."""
    if sites.get(opts.site).units != ("n_heads",):
        raise ValueError("needs a site whose units are query heads (head_out, head_q, pattern), "
                         f"got --site={opts.site}")
    return S.kv_group_size(cfg.n_heads, cfg.n_kv_heads)


# --family -> its members over the pool's units (structured families are explicit lists of subsets)
FAMILIES = {
    "all": lambda o, pool, cfg: S.all_subsets(pool.n),
    "sizes": lambda o, pool, cfg: S.of_sizes(pool.n, o.sizes),
    "sampled": lambda o, pool, cfg: S.sampled_per_size(pool.n, o.sizes, o.samples_per_size, o.seed),
    "even": lambda o, pool, cfg: S.even(pool.n),
    "odd": lambda o, pool, cfg: S.odd(pool.n),
    "strided": lambda o, pool, cfg: S.explicit(pool.n, [S.strided(pool.n, o.stride, k).masks[0]
                                                        for k in range(o.stride)]),
    "contiguous": lambda o, pool, cfg: S.explicit(pool.n, [m for k in o.sizes for m in S.contiguous(pool.n, k).masks]),
    "explicit": lambda o, pool, cfg: S.explicit(pool.n, [list(s) for s in o.explicit]),
    "kv_groups": lambda o, pool, cfg: S.grouped([(l, h // _group_size(o, cfg)) for l, h in pool.units]),
    "group_positions": lambda o, pool, cfg: S.grouped([(l, h % _group_size(o, cfg)) for l, h in pool.units]),
}


def make_family(opts: Options, pool: S.Pool, cfg) -> S.Family:
    """The --family flag over the pool's units (`FAMILIES`)."""
    n = pool.n
    if n > S.MAX_UNITS:
        raise OptionError(f"the pool has {n} units (--site={opts.site}, --pool={opts.pool}); families take at "
                          f"most {S.MAX_UNITS}: list units with --pool=i,j,k")
    bad = [k for k in opts.sizes if not 0 <= k <= n] if opts.family in ("sizes", "sampled", "contiguous") else []
    if bad:
        raise OptionError(f"--sizes={','.join(map(str, opts.sizes))}: size(s) {bad} out of range [0, {n}] "
                          f"for a pool of {n} units")
    try:
        family = FAMILIES[opts.family](opts, pool, cfg)
    except ValueError as e:
        raise OptionError(f"--family={opts.family}: {e}") from None
    if family.size() > S.MAX_RANK:
        raise OptionError(f"--family={opts.family} over {n} units has {family.size()} members, more than a "
                          f"sweep's {S.MAX_RANK}: use --family=sizes or sampled, or fewer units (--pool)")
    return family


def _decimals(model, opts: Options):
    pairs = [D.STUDY_PAIR] + D.generate_pairs(max(opts.n_prompts - 1, 0), opts.seed)
    src, tgt = (D.build_batch(pairs, f, model.tokenizer) for f in (opts.source_format, opts.target_format))
    return TaskBatches(src.ids, src.mask, tgt.ids, tgt.mask, tgt.metric,
                       f"{len(pairs)} decimal pairs, {opts.source_format} -> {opts.target_format}"), src.metric


def _ioi(model, opts: Options):
    tok = model.tokenizer
    clean = ioi.generate_ioi(opts.n_prompts, opts.seed, tok)
    src, tgt = ioi.ioi_batch(clean, tok), ioi.ioi_batch(ioi.corrupt(clean, opts.seed + 1, tok), tok)
    # A corrupted prompt keeps its clean prompt's names: one metric serves both runs.
    return TaskBatches(src.ids, src.mask, tgt.ids, tgt.mask, tgt.metric,
                       f"{len(clean)} IOI prompts, clean -> corrupted"), tgt.metric


def _files(model, opts: Options):
    tok = model.tokenizer
    texts = []
    for path in opts.prompts:
        with open(path) as f:
            texts.append([l.rstrip("\n").replace("\\n", "\n") for l in f if l.strip()])
    if len(texts[0]) != len(texts[1]):
        raise ValueError(f"{opts.prompts[0]} has {len(texts[0])} prompts, {opts.prompts[1]} has {len(texts[1])}")
    metric = lambda prompts: LogitDiff(*(jnp.asarray(pad_ids([tok.answer_token_ids(a, prompt=t)[:1] for t in prompts]))
                                         for a in opts.answers))
    (s_ids, s_mask), (t_ids, t_mask) = tok.batch(texts[0]), tok.batch(texts[1])
    return TaskBatches(s_ids, s_mask, t_ids, t_mask, metric(texts[1]), f"{len(texts[0])} prompts from files"), \
        metric(texts[0])


# --task -> (its source and target batches with the target's metric, the metric of the source run)
TASKS = {"decimals": _decimals, "ioi": _ioi, "prompts": _files}
# --task -> the names of its source and target runs, for the report
RUN_NAMES = {"decimals": lambda o: (o.source_format, o.target_format), "ioi": lambda o: ("clean", "corrupted"),
             "prompts": lambda o: tuple(os.path.basename(p) for p in o.prompts)}


def task_batches(model, opts: Options) -> TaskBatches:
    """The --task's source and target batches and metric."""
    return TASKS[opts.task](model, opts)[0]


def check_options(opts: Options, cfg) -> None:
    """Every option against the model's config (OptionError naming the flag); positions are checked
    against the prompts once they exist."""
    check_layers("layers", opts.layers, cfg)
    make_family(opts, make_pool(opts.site, opts.layers, cfg, opts.pool, opts.n_blocks), cfg)
    parse_positions(opts.positions)
    parse_success(opts.success, opts.aggregate)


def _baselines_section(report, source, target, names, seed) -> None:
    """The unpatched source and target runs per prompt (`names`), and the premise finding."""
    t = prompt_table(np.stack([source, target]), contrasts=[(0, 1)], seed=seed)
    report.add("Baselines", f"The metric of the unpatched runs over {len(source)} prompts; in brackets 95% "
               "intervals over the prompts (bootstrap). Recovery = (patched - target) / (source - target).",
               table(["run", "mean metric", "prompts with metric > 0"],
                     [[f"{role} ({name})", cell(t, "mean", i), cell(t, "right", i, ".0%")]
                      for i, (role, name) in enumerate(zip(("source", "target"), names))]),
               f"Source - target, paired over the prompts: {cell(t, 'contrast', 0)}.")
    for statement, rule in premise_findings(t, names, 0, 1)[1]:
        report.finding(statement, rule)
    report.results["baselines"] = {"source": source, "target": target, "table": t}


def run(opts: Options) -> str:
    report = Report(opts.out, f"Threshold sweep: {opts.site} of layers {list(opts.layers)}")
    model = load_model(opts.model, opts.dtype)
    cfg = model.cfg
    check_options(opts, cfg)
    criterion = parse_success(opts.success, opts.aggregate)
    pool = make_pool(opts.site, opts.layers, cfg, opts.pool, opts.n_blocks)
    family = make_family(opts, pool, cfg)
    task, source_metric = TASKS[opts.task](model, opts)
    _, cache = run_with_cache(model.params, cfg, task.source_ids, jnp.asarray(task.source_mask),
                              sites=(sites.get(opts.site).cache,))
    align = ALIGNS[opts.align]
    pos_map = P.token_matched(task.target_ids, task.target_mask, task.source_ids, task.source_mask) \
        if align is None else align(task.target_mask, task.source_mask)
    try:
        pos_w = P.weights(parse_positions(opts.positions), pos_map)
    except ValueError as e:
        raise OptionError(f"--positions={opts.positions}: {e}") from None
    problem = PatchingProblem.make(target_run(model.params, cfg, task.target_ids, task.target_mask),
                                   P.align(cache, pos_map), pos_w, task.metric)
    res = jc.run_sweep(model.params, cfg, problem, pool, family, os.path.join(opts.out, "sweep"),
                       chunk_size=opts.chunk_size, resume=opts.resume,
                       describe={"model": opts.model, "task": task.description})
    source = unpatched_metric(model, task.source_ids, task.source_mask, source_metric)
    target = unpatched_metric(model, task.target_ids, task.target_mask, task.metric)
    report.add("Setup", table(["model", "task", "site", "units", "family", "members", "positions", "align", "success"],
                              [[opts.model, task.description, opts.site, pool.n, opts.family, family.size(),
                                opts.positions, opts.align, str(criterion)]]),
               f"Success of a subset: {criterion.describe()}.")
    _baselines_section(report, source, target, RUN_NAMES[opts.task](opts), opts.seed)
    add_sweep_analysis(report, "Sweep", res.subsets(pool.n), res.metric, pool.labels(), criterion, (source, target),
                       SummaryOptions(seed=opts.seed))
    return report.write()
