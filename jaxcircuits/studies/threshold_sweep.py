"""A generic subset sweep: task prompts -> source/target runs -> family sweep -> analysis report."""

from __future__ import annotations

import dataclasses
import os
from typing import Optional, Tuple

import jax.numpy as jnp
import numpy as np

import jaxcircuits as jc
from jaxcircuits import positions as P
from jaxcircuits import sites
from jaxcircuits import subsets as S
from jaxcircuits.metrics import LogitDiff, pad_ids
from jaxcircuits.models.transformer import run_with_cache
from jaxcircuits.patching import PatchingProblem, target_run
from jaxcircuits.report import Report, add_sweep_analysis, table
from jaxcircuits.studies.common import OptionError, TaskBatches, check_layers, load_model
from jaxcircuits.tasks import decimals as D
from jaxcircuits.tasks import ioi

FAMILIES = ("all", "sizes", "sampled", "even", "odd", "strided", "contiguous", "explicit")
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
    success: str                    # 'positive' | 'above:X' | 'below:X'
    aggregate: str                  # 'mean' | 'fraction'
    n_blocks: Optional[int]
    chunk_size: int
    seed: int
    out: str
    resume: bool
    dtype: str = "float32"


def parse_success(spec: str) -> Tuple[str, float]:
    """'positive' -> ('positive', 0); 'above:0.5' -> ('above', 0.5); 'below:-1' -> ('below', -1)."""
    kind, _, value = spec.partition(":")
    if kind == "positive" and not value:
        return kind, 0.0
    if kind in ("above", "below") and value:
        try:
            return kind, float(value)
        except ValueError:
            raise OptionError(f"--success={spec}: X in {kind}:X must be a number") from None
    raise OptionError(f"--success must be 'positive', 'above:X' or 'below:X', got {spec!r}")


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


def make_family(opts: Options, n: int) -> S.Family:
    """The --family flag over n pool units (structured families are explicit lists of subsets)."""
    if n > S.MAX_UNITS:
        raise OptionError(f"the pool has {n} units (--site={opts.site}, --pool={opts.pool}); families take at "
                          f"most {S.MAX_UNITS}: list units with --pool=i,j,k")
    bad = [k for k in opts.sizes if not 0 <= k <= n] if opts.family in ("sizes", "sampled", "contiguous") else []
    if bad:
        raise OptionError(f"--sizes={','.join(map(str, opts.sizes))}: size(s) {bad} out of range [0, {n}] "
                          f"for a pool of {n} units")
    try:
        family = _family(opts, n)
    except ValueError as e:
        raise OptionError(f"--family={opts.family}: {e}") from None
    if family.size() > S.MAX_RANK:
        raise OptionError(f"--family={opts.family} over {n} units has {family.size()} members, more than a "
                          f"sweep's {S.MAX_RANK}: use --family=sizes or sampled, or fewer units (--pool)")
    return family


def _family(opts: Options, n: int) -> S.Family:
    f = opts.family
    if f == "all":
        return S.all_subsets(n)
    if f == "sizes":
        return S.of_sizes(n, opts.sizes)
    if f == "sampled":
        return S.sampled_per_size(n, opts.sizes, opts.samples_per_size, opts.seed)
    if f == "even":
        return S.even(n)
    if f == "odd":
        return S.odd(n)
    if f == "strided":
        return S.explicit(n, [S.strided(n, opts.stride, o).masks[0] for o in range(opts.stride)])
    if f == "contiguous":
        return S.explicit(n, [m for k in opts.sizes for m in S.contiguous(n, k).masks])
    return S.explicit(n, [list(s) for s in opts.explicit])


def task_batches(model, opts: Options) -> TaskBatches:
    """The --task's source and target batches and metric."""
    tok = model.tokenizer
    if opts.task == "decimals":
        pairs = [D.STUDY_PAIR] + D.generate_pairs(max(opts.n_prompts - 1, 0), opts.seed)
        src, tgt = (D.build_batch(pairs, f, tok) for f in (opts.source_format, opts.target_format))
        return TaskBatches(src.ids, src.mask, tgt.ids, tgt.mask, tgt.metric,
                           f"{len(pairs)} decimal pairs, {opts.source_format} -> {opts.target_format}")
    if opts.task == "ioi":
        clean = ioi.generate_ioi(opts.n_prompts, opts.seed, tok)
        src, tgt = ioi.ioi_batch(clean, tok), ioi.ioi_batch(ioi.corrupt(clean, opts.seed + 1, tok), tok)
        return TaskBatches(src.ids, src.mask, tgt.ids, tgt.mask, tgt.metric, f"{len(clean)} IOI prompts, clean -> corrupted")
    texts = []
    for path in opts.prompts:
        with open(path) as f:
            texts.append([l.rstrip("\n").replace("\\n", "\n") for l in f if l.strip()])
    if len(texts[0]) != len(texts[1]):
        raise ValueError(f"{opts.prompts[0]} has {len(texts[0])} prompts, {opts.prompts[1]} has {len(texts[1])}")
    s_ids, s_mask = tok.batch(texts[0])
    t_ids, t_mask = tok.batch(texts[1])
    good = [tok.answer_token_ids(opts.answers[0], prompt=t)[:1] for t in texts[1]]
    bad = [tok.answer_token_ids(opts.answers[1], prompt=t)[:1] for t in texts[1]]
    metric = LogitDiff(good=jnp.asarray(pad_ids(good)), bad=jnp.asarray(pad_ids(bad)))
    return TaskBatches(s_ids, s_mask, t_ids, t_mask, metric, f"{len(texts[0])} prompts from files")


def check_options(opts: Options, cfg) -> None:
    """Every option against the model's config (OptionError naming the flag); positions are checked
    against the prompts once they exist."""
    check_layers("layers", opts.layers, cfg)
    make_family(opts, make_pool(opts.site, opts.layers, cfg, opts.pool, opts.n_blocks).n)
    parse_positions(opts.positions)
    parse_success(opts.success)


def run(opts: Options) -> str:
    report = Report(opts.out, f"Threshold sweep: {opts.site} of layers {list(opts.layers)}")
    model = load_model(opts.model, opts.dtype)
    cfg = model.cfg
    check_options(opts, cfg)
    pool = make_pool(opts.site, opts.layers, cfg, opts.pool, opts.n_blocks)
    family = make_family(opts, pool.n)
    task = task_batches(model, opts)
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
    kind, threshold = parse_success(opts.success)
    report.add("Setup", table(["model", "task", "site", "units", "family", "members", "positions", "align", "success"],
                              [[opts.model, task.description, opts.site, pool.n, opts.family, family.size(),
                                opts.positions, opts.align, f"{opts.success} ({opts.aggregate} over prompts)"]]))
    add_sweep_analysis(report, "Sweep", res.subsets(pool.n), res.metric, pool.labels(), kind, threshold, opts.aggregate)
    return report.write()
