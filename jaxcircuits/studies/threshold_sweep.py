"""A generic subset sweep: task prompts -> source/target runs -> family sweep -> analysis report.

Success of a subset is a criterion on its metric over prompts (default: recovery>=0.5, the
normalised recovery toward the source run); the report opens with findings (the premise that
the source beats the target, the threshold, what fails).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Optional, Tuple

import numpy as np

import jaxcircuits as jc
from jaxcircuits.stats.bootstrap import prompt_table
from jaxcircuits.stats.criteria import Criterion
from jaxcircuits.stats.summary import SummaryOptions
from jaxcircuits.interventions import positions as P
from jaxcircuits.interventions import sites
from jaxcircuits.engine import subsets as S
from jaxcircuits.reports.findings import cell, premise_findings
from jaxcircuits.reports.report import Report, add_sweep_analysis, table
from jaxcircuits.studies import kit
from jaxcircuits.studies.kit import OptionError, flag

TASKS = ("decimals", "ioi", "prompts")             # the registered tasks this study offers (--task)
# --pool -> the units of each layer it keeps (else a comma list of unit indices)
POOLS = {"all": slice(None), "even": slice(0, None, 2), "odd": slice(1, None, 2)}
SIZED = ("sizes", "sampled", "contiguous")          # the families that read --sizes


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
    idx = np.arange(units_per_layer)[POOLS[select]] if select in POOLS else np.array(kit.ints(select.split(",")))
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
    "strided": lambda o, pool, cfg: S.explicit(pool.n, [S.strided(pool.n, o.stride, k).bitmasks[0]
                                                        for k in range(o.stride)]),
    "contiguous": lambda o, pool, cfg: S.explicit(pool.n, [m for k in o.sizes
                                                           for m in S.contiguous(pool.n, k).bitmasks]),
    "explicit": lambda o, pool, cfg: S.explicit(pool.n, [list(s) for s in o.subsets]),
    "kv_groups": lambda o, pool, cfg: S.grouped([(l, h // _group_size(o, cfg)) for l, h in pool.units]),
    "group_positions": lambda o, pool, cfg: S.grouped([(l, h % _group_size(o, cfg)) for l, h in pool.units]),
}


def make_family(opts: Options, pool: S.Pool, cfg) -> S.Family:
    """The --family flag over the pool's units (`FAMILIES`)."""
    n = pool.n
    if n > S.MAX_UNITS:
        raise OptionError(f"the pool has {n} units (--site={opts.site}, --pool={opts.pool}); families take at "
                          f"most {S.MAX_UNITS}: list units with --pool=i,j,k")
    bad = [k for k in opts.sizes if not 0 <= k <= n] if opts.family in SIZED else []
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


def subset_lists(spec: str) -> Tuple[Tuple[int, ...], ...]:
    """--subsets '0 2 4;1 3' -> ((0, 2, 4), (1, 3))."""
    return tuple(kit.ints(s.split()) for s in spec.split(";") if s.strip())


@dataclasses.dataclass(frozen=True, kw_only=True)
class Options(kit.TaskOptions):
    """The study's options: its binary's flags (`kit.flag` fields; the task's in `kit.TaskOptions`)."""

    task: str = flag("enum", "decimals", "decimals: 9.8/9.11 + generated pairs in two formats; ioi: clean -> "
                     "corrupted IOI prompts; prompts: --source_prompts/--target_prompts files with --answers.",
                     enum_values=list(TASKS))
    n_prompts: int = flag("integer", 4, "decimals/ioi: number of prompts.", lower_bound=1)
    site: str = flag("enum", "head_out", "Intervention site of the pool (see jaxcircuits.interventions.sites).",
                     enum_values=[s.name for s in sites.SITES if s.on_layers is None])   # of every model
    layers: Tuple[int, ...] = flag("list", ["17"], "Layers whose units form the pool.", parse=kit.ints)
    pool: str = flag("string", "all", "Units per layer: all, even, odd, or comma-separated unit indices (heads or "
                     "blocks; ignored for whole-layer sites).")
    family: str = flag("enum", "all", "all: 2^n subsets; sizes: all subsets of each --sizes; sampled: "
                       "--samples_per_size per size; even/odd: the single even/odd subset; strided: every offset of "
                       "--stride; contiguous: all windows of each --sizes; explicit: --subsets; kv_groups: one subset "
                       "per KV group (the query heads sharing a key/value head, per layer); group_positions: one per "
                       "position within the KV groups (query-head sites).", enum_values=list(FAMILIES))
    sizes: Tuple[int, ...] = flag("list", [], "Subset sizes for sizes/sampled/contiguous.", parse=kit.ints)
    samples_per_size: int = flag("integer", 100, "sampled: members per size.", lower_bound=1)
    stride: int = flag("integer", 2, "strided: stride.", lower_bound=1)
    subsets: Tuple[Tuple[int, ...], ...] = flag("string", "", "explicit: subsets as unit indices, e.g. '0 2 4;1 3'.",
                                                parse=subset_lists)
    positions: str = flag("string", "all", "Target positions: all, last, last:k, or comma-separated token indices.")
    align: str = flag("enum", "token", "Source->target position map.", enum_values=list(kit.ALIGNS))
    success: str = flag("string", "recovery>=0.5", "Success of a subset: recovery>=X (normalised recovery (patched - "
                        "target) / (source - target) of the mean metric), metric>X (mean metric), fraction>=X (of "
                        "prompts with metric > 0), fraction(metric>=Y)>=X (of prompts with metric >= Y); or "
                        "positive, above:X, below:X with --aggregate.")
    aggregate: str = flag("enum", "mean", "For --success=positive|above:X|below:X, over prompts: mean metric, or at "
                          "least half the prompts.", enum_values=["mean", "fraction"])
    n_blocks: Optional[int] = flag("integer", None, "attn_block: blocks per layer (default n_heads).", lower_bound=1)
    chunk_size: int = flag("integer", 128, "Subsets per compiled chunk (0: from free memory).", lower_bound=0)
    seed: int = flag("integer", 0, "Seed of prompts and sampled families.")
    out: str = kit.out("threshold_sweep")
    resume: bool = kit.resume()

    def check_flags(self) -> None:
        """The task's flags, layers, the family's inputs, pool, positions and success criterion."""
        super().check_flags()
        if not self.layers or min(self.layers) < 0:
            raise OptionError("--layers must list layers >= 0")
        if self.family in SIZED and not self.sizes:
            raise OptionError(f"--family={self.family} needs --sizes")
        if self.family == "explicit" and not self.subsets:
            raise OptionError("--family=explicit needs --subsets")
        if self.pool not in POOLS:
            kit.parsed("pool", kit.ints, self.pool.split(","))
        parse_positions(self.positions)
        parse_success(self.success, self.aggregate)

    def check(self, cfg) -> None:
        """Every option against the model's config; positions are checked against the prompts once
        they exist."""
        kit.check_layers("layers", self.layers, cfg)
        make_family(self, make_pool(self.site, self.layers, cfg, self.pool, self.n_blocks), cfg)


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
    """Run the study; returns the path of report.md."""
    report = Report(opts.out, f"Threshold sweep: {opts.site} of layers {list(opts.layers)}")
    model = kit.load(opts)
    cfg = model.cfg
    criterion = parse_success(opts.success, opts.aggregate)
    pool = make_pool(opts.site, opts.layers, cfg, opts.pool, opts.n_blocks)
    family = make_family(opts, pool, cfg)
    task = kit.task_batches(model, opts)
    problem = kit.problem(model, task, (sites.get(opts.site).cache,), opts.align, parse_positions(opts.positions))
    res = jc.run_sweep(model.params, cfg, problem, pool, family, os.path.join(opts.out, "sweep"),
                       chunk_size=opts.chunk_size, resume=opts.resume,
                       describe={"model": opts.model, "task": task.description})
    source, target = kit.baselines(model, task)
    report.add("Setup", table(["model", "task", "site", "units", "family", "members", "positions", "align", "success"],
                              [[opts.model, task.description, opts.site, pool.n, opts.family, family.size(),
                                opts.positions, opts.align, str(criterion)]]),
               f"Success of a subset: {criterion.describe()}.")
    _baselines_section(report, source, target, task.names, opts.seed)
    add_sweep_analysis(report, "Sweep", res.subsets(pool.n), res.metric, pool.labels(), criterion, (source, target),
                       SummaryOptions(seed=opts.seed))
    return report.write()
