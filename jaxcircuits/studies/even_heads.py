"""The even-heads decimal-comparison study (see experiments/even_heads.py for the steps).

Two sets of prompt pairs: all pairs (the study pair first) give the headline rates, fractions of
pairs with bootstrap intervals (the format scan and premise, and the unit families patched at
each swept layer); the first `sweep_pairs` of them run the layer scan, the exhaustive sweeps, the
blend and the generation checks, whose cost grows with 2^n per pair.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Callable, Optional, Tuple

import jax.numpy as jnp
import numpy as np
from absl import logging

from jaxcircuits.stats.bootstrap import prompt_table
from jaxcircuits.stats.criteria import Criterion
from jaxcircuits.stats.rates import Z95, rate_by_size
from jaxcircuits.stats.summary import SummaryOptions
from jaxcircuits.reports import plots
from jaxcircuits.interventions import positions as P
from jaxcircuits.interventions import sites
from jaxcircuits.engine import subsets as S
from jaxcircuits.tasks.formats import encode_prompt, get_format
from jaxcircuits.models.config import ModelConfig
from jaxcircuits.interventions.positions import decode_intervention, source_at_position
from jaxcircuits.models.transformer import run_with_cache
from jaxcircuits.engine.patching import run_masks
from jaxcircuits.reports.findings import cell, contrast_findings, layer_findings, premise_findings, threshold_cell
from jaxcircuits.reports.report import Report, add_sweep_analysis, table
from jaxcircuits.interventions.sites import Intervention, Mask
from jaxcircuits.studies import kit
from jaxcircuits.studies.kit import OptionError, flag
from jaxcircuits.engine.subsets import Pool, all_subsets, sampled_per_size
from jaxcircuits.engine.sweep import blend_crossing, run_sweep
from jaxcircuits.tasks import decimals as D
from jaxcircuits.tasks import registry

HEADLINE_HALF_WIDTH = 0.15        # the widest 95% interval wanted on a headline rate (a fraction of pairs)


@dataclasses.dataclass(frozen=True)
class Protocol:
    """How a protocol patches: its position map (`kit.ALIGNS`), the units of a layer it sweeps
    (cfg, layer, n_blocks) -> `Pool`, whether its units form KV groups, and whether generation is
    patched at every decoded token too (else in prefill only)."""

    align: str
    pool: Callable[[ModelConfig, int, Optional[int]], Pool]
    grouped: bool
    decode: bool


PROTOCOLS = {
    "heads": Protocol("token", lambda cfg, layer, n_blocks: Pool.heads(layer, cfg.n_heads), True, False),
    "original": Protocol("left", lambda cfg, layer, n_blocks: Pool.blocks(layer, n_blocks or cfg.n_heads), False,
                         True),
}
PROTOCOL_RUNS = {"heads": ("heads",), "original": ("original",), "both": tuple(PROTOCOLS)}   # --protocol
# --preset -> the values of the flags left unset
PRESETS = {"quick": {"n_pairs": 63, "sweep_pairs": 3, "top_layers": 1},
           "full": {"n_pairs": 95, "sweep_pairs": 16, "top_layers": 2}}


@dataclasses.dataclass(frozen=True, kw_only=True)
class Options(kit.StudyOptions):
    """The study's options: its binary's flags (`kit.flag` fields); None = the preset's value
    (`resolved`)."""

    protocol: str = flag("enum", "heads", "Which protocol(s) to run.", enum_values=list(PROTOCOL_RUNS))
    preset: str = flag("enum", "quick", "quick: study pair + 63 generated pairs, the first 3 for the sweeps, 1 layer "
                       "swept (CPU, minutes); full: 95 generated pairs, the first 16 for the sweeps, 2 layers.",
                       enum_values=list(PRESETS))
    source_format: str = flag("string", "simple", "Prompt format of the good (source) run; 'auto' = the scanned "
                              "format with the highest mean first-token logit difference.")
    target_format: str = flag("string", "qa", "Prompt format of the bad (target) run; 'auto' = the scanned format "
                              "with the lowest.")
    scan_formats: Tuple[str, ...] = flag("list", ["simple", "qa", "chat", "chat_raw"], "Formats of the format scan.")
    n_pairs: Optional[int] = flag("integer", None, "Generated trap pairs besides 9.8/9.11 (default by preset): the "
                                  "headline rates use them all.", lower_bound=0)
    sweep_pairs: Optional[int] = flag("integer", None, "The first pairs (9.8/9.11 first) for the layer scan, the "
                                      "sweeps, the blend and the generation checks (default by preset).",
                                      lower_bound=1)
    success: str = flag("string", "recovery>=0.5", "Success of a subset: recovery>=X (normalised recovery of the "
                        "mean metric toward the source), metric>X (mean metric), fraction>=X (of pairs answered "
                        "right) or fraction(metric>=Y)>=X (of pairs with metric >= Y).")
    sweep_layers: Tuple[int, ...] = flag("list", [], "Layers to sweep (default: the best of the layer scan).",
                                         parse=kit.ints)
    top_layers: Optional[int] = flag("integer", None, "How many best layers to sweep (default by preset).",
                                     lower_bound=1)
    n_blocks: Optional[int] = flag("integer", None, "Residual blocks of the original protocol (default: n_heads).",
                                   lower_bound=1)
    max_new_tokens: int = flag("integer", 20, "Greedy tokens per generation.", lower_bound=1)
    confirm: int = flag("integer", 4, "Boundary subsets confirmed by generation per sweep.", lower_bound=0)
    chunk_size: int = flag("integer", 64, "Masks per compiled chunk (0: from free memory).", lower_bound=0)
    samples_per_size: int = flag("integer", 200, "Layers with more than 16 heads/blocks (e.g. Llama-3.1-8B): all "
                                 "subsets of the even and of the odd units, and this many sampled subsets per size "
                                 "over all units.", lower_bound=1)
    seed: int = flag("integer", 0, "Seed of the generated pairs.")
    out: str = kit.out("even_heads")
    resume: bool = kit.resume()

    @property
    def protocols(self) -> Tuple[str, ...]:
        """The protocols to run (`PROTOCOLS` keys)."""
        return PROTOCOL_RUNS[self.protocol]

    def resolved(self) -> Options:
        """The options with the preset's values for the flags left unset (None)."""
        return dataclasses.replace(self, **{k: v for k, v in PRESETS[self.preset].items() if getattr(self, k) is None})

    def check_flags(self) -> None:
        """Formats known and distinct ('auto' needs two scanned), success criterion, layers >= 0."""
        for name in (self.source_format, self.target_format, *self.scan_formats):
            if name != "auto":
                get_format(name)                   # raises listing the known formats
        if "auto" in (self.source_format, self.target_format) and len(self.scan_formats) < 2:
            raise OptionError("'auto' formats need at least two --scan_formats")
        if self.source_format == self.target_format != "auto":
            raise OptionError("--source_format and --target_format must differ")
        try:
            Criterion.parse(self.success)
        except ValueError as e:
            raise OptionError(f"--success: {e}") from None
        if any(l < 0 for l in self.sweep_layers):
            raise OptionError("--sweep_layers must be >= 0")

    def check(self, cfg) -> None:
        """Swept layers, blocks (original protocol only) and top layers against the model's config."""
        kit.check_layers("sweep_layers", self.sweep_layers, cfg)
        if self.n_blocks is not None:
            if "original" not in self.protocols:
                raise OptionError(f"--n_blocks={self.n_blocks} applies only to the original protocol "
                                  "(--protocol=original or both)")
            try:
                sites.get("attn_block").shape(cfg, self.n_blocks)
            except ValueError as e:
                raise OptionError(f"--n_blocks: {e}") from None
        top_layers = self.resolved().top_layers
        if not 1 <= top_layers <= cfg.n_layers:
            raise OptionError(f"--top_layers={top_layers} out of range [1, {cfg.n_layers}]")


def pairs_needed(half_width: float = HEADLINE_HALF_WIDTH, z: float = Z95) -> int:
    """Pairs for a 95% interval of a fraction no wider than +-half_width at worst (rate 1/2):
    z * sqrt(1/4 / n) <= half_width (43 for 0.15)."""
    return math.ceil((z * 0.5 / half_width) ** 2)


def format_scan(model, pairs, formats, max_new) -> dict:
    """Per format: first-token logit difference, teacher-forced log-odds, generation verdicts."""
    out = {}
    for fmt in formats:
        b = D.build_batch(pairs, fmt, model.tokenizer)
        first = kit.unpatched_metric(model, b.ids, b.attn_mask, b.metric)
        tf = D.build_teacher_forced(pairs, fmt, model.tokenizer)
        lp = [kit.unpatched_metric(model, tf.ids[i], tf.attn_mask[i], m) for i, m in enumerate((tf.good, tf.bad))]
        ids, attn_mask = model.tokenizer.pad([encode_prompt(fmt, p.question, model.tokenizer) for p in pairs], "left")
        texts = model.complete_ids(ids, attn_mask, max_new)
        out[fmt] = {"first_token_logit_diff": first, "teacher_forced_log_odds": lp[0] - lp[1], "generation": texts,
                    "answer": [D.classify_generation(t, p) for t, p in zip(texts, pairs)],
                    "original_test": [D.classify_generation_original(t, p) for t, p in zip(texts, pairs)]}
    return out


def _counts(verdicts) -> str:
    return " / ".join(str(verdicts.count(v)) for v in ("correct", "wrong", "unclear"))


def _format_section(report, scan, pairs, opts) -> None:
    """The format scan table (rates over all pairs, bootstrap 95%) and the premise findings."""
    names = list(scan)
    src, tgt = names.index(opts.source_format), names.index(opts.target_format)
    t = prompt_table(np.stack([scan[f]["first_token_logit_diff"] for f in names]),
                              contrasts=[(src, tgt)], seed=opts.seed)
    rows = [[f, cell(t, "mean", i), cell(t, "right", i, ".0%"),
             float(np.mean(r["teacher_forced_log_odds"])), _counts(r["answer"]), _counts(r["original_test"]),
             repr(r["generation"][0][:60])] for i, (f, r) in enumerate(scan.items())]
    cases = [(p.question, a, b) for i, p in enumerate(pairs) for a in scan for b in scan
             if scan[a]["first_token_logit_diff"][i] > 0 > scan[b]["first_token_logit_diff"][i]]
    report.add("Format scan",
               f"{len(pairs)} pairs (the study's 9.8 vs 9.11 first). Logit metrics: first distinguishing answer token "
               "(good - bad, > 0 = right) and teacher-forced log p(good answer) - log p(bad answer). In brackets: "
               "95% intervals over the pairs (bootstrap). Generation verdicts (correct / wrong / unclear): the "
               "answer the text gives (`classify_generation`: the study's phrases, else the number it opens with) "
               "and the original study's phrase-only test.",
               table(["format", "mean first-token diff", "pairs right", "mean log-odds", "answer c/w/u",
                      "original test c/w/u", "9.8 vs 9.11 generation"], rows),
               f"Source - target (`{opts.source_format}` - `{opts.target_format}`), paired over the pairs: "
               f"{cell(t, 'contrast', 0)}.",
               f"Cases where a pair is right in one format and wrong in another (logit metric): {len(cases)}. "
               + "; ".join(f"{q} right in `{a}`, wrong in `{b}`" for q, a, b in cases[:8]))
    _, findings = premise_findings(t, names, src, tgt, kind="formats")
    for statement, rule in findings:
        report.finding(statement, rule)
    report.results.update(format_scan=scan, format_table=t, format_cases=cases)


def _choose_formats(opts: Options, scan: dict) -> Tuple[Options, bool]:
    """Resolve 'auto' formats: source = best mean first-token logit difference, target = worst.
    Returns the options and whether 'auto' chose any."""
    ranked = sorted(scan, key=lambda f: float(np.mean(scan[f]["first_token_logit_diff"])))
    source = ranked[-1] if opts.source_format == "auto" else opts.source_format
    target = next(f for f in ranked if f != source) if opts.target_format == "auto" else opts.target_format
    if source == target:
        raise ValueError(f"source and target format are both {source!r}")
    auto = (source, target) != (opts.source_format, opts.target_format)
    return dataclasses.replace(opts, source_format=source, target_format=target), auto


@dataclasses.dataclass(frozen=True)
class Task:
    """P pairs, their patching problem per protocol and the unpatched source/target metrics [P]."""

    pairs: list
    problems: dict
    source: np.ndarray
    target: np.ndarray


def _task(model, pairs, opts) -> Task:
    task = registry.decimal_batches(pairs, opts.source_format, opts.target_format, model.tokenizer)
    problems = kit.problems(model, task, ("head_out", "attn_out"), [p.align for p in PROTOCOLS.values()])
    return Task(pairs, {name: problems[p.align] for name, p in PROTOCOLS.items()}, *kit.baselines(model, task))


def best_layers(table: dict, k: int) -> list:
    """The k rows (layers) of a `prompt_table` with the largest recovery, i.e. movement of the mean
    metric toward the source's (not the largest metric); rows whose recovery is not defined last."""
    rec = np.array([-np.inf if r is None else r for r in table["recovery"]])
    return [int(l) for l in np.argsort(-rec, kind="stable")[:k]]


def _layer_scan(model, task: Task, opts, report) -> list:
    """Every head of one layer patched at once; the layers by recovery (movement toward the source)."""
    cfg = model.cfg
    vals = kit.layer_scan(model, task.problems["heads"], opts.chunk_size)
    t = prompt_table(vals, task.source, task.target, seed=opts.seed)
    best = best_layers(t, opts.top_layers)
    fig = plots.plot_layer_curve(vals.mean(-1), report.path("layer_scan.png"),
                                 baselines={"source": float(task.source.mean()), "target": float(task.target.mean())})
    report.add("Layer scan (heads protocol)",
               f"Every head of one layer patched at once (source -> target, token-matched positions, prefill only), "
               f"on the {vals.shape[1]} sweep pairs: mean first-token logit difference and recovery = (patched - "
               "target) / (source - target), the movement toward the source; 95% intervals over the pairs.",
               table(["layer", "mean metric", "recovery (95%)"],
                     [[l, cell(t, "mean", l), cell(t, "recovery", l)] for l in range(cfg.n_layers)]),
               report.figure(fig, "layer scan"))
    b = best[0]
    for statement, rule in layer_findings(t, best_layers(t, cfg.n_layers),
                                          f" (mean metric {t['mean'][b]:+.3f}; target {task.target.mean():+.3f}, "
                                          f"source {task.source.mean():+.3f}); swept (largest recovery): layer(s) {best}"):
        report.finding(statement, rule)
    report.results["layer_scan"] = {"metric": vals, "table": t, "best": best}
    return best


def _families(cfg, protocol: str, n: int) -> list:
    """Named unit families [(name, units)]: all, even, odd, first half; for true heads also each
    position within the KV groups and each KV group (`subsets.group_positions` / `kv_groups`)."""
    members = lambda family: [np.flatnonzero(S.from_bitmask(m, n)) for m in family.bitmasks]
    out = [("all units", np.arange(n)), ("even units", *members(S.even(n))), ("odd units", *members(S.odd(n))),
           ("first half", np.arange(n // 2))]
    if PROTOCOLS[protocol].grouped and cfg.n_kv_heads < cfg.n_heads:
        out += [(f"group position {p}", u) for p, u in enumerate(members(S.group_positions(n, cfg.n_kv_heads)))]
        out += [(f"KV group {g}", u) for g, u in enumerate(members(S.kv_groups(n, cfg.n_kv_heads)))]
    return out


EXHAUSTIVE_MAX_UNITS = 16
GENERATED = ("all units", "even units", "odd units", "group position 0")       # the families generated from


def _only(family: str) -> str:
    """A family's name in the table of subsets restricted to its units: 'even units only'."""
    return family if family == "all units" else f"{family} only"


def _rates_text(rates) -> str:
    return " ".join(f"{int(k)}:{r:.2f}" for k, r in zip(rates["k"], rates["rate"]))


def _restricted_rates(subsets, success, units):
    """Success rate by size among subsets using only `units`."""
    others = np.setdiff1d(np.arange(subsets.shape[1]), units)
    keep = ~subsets[:, others].any(1)
    return rate_by_size(subsets[keep][:, units], success[keep])


def _masks(pool, cfg, units_list) -> Mask:
    """Masks [F, L, ...] of the pool's site selecting each of the F lists of units."""
    bits = np.zeros((len(units_list), pool.n), bool)
    for i, units in enumerate(units_list):
        bits[i, list(units)] = True
    return Mask(**{pool.site: pool.scatter(bits, pool.site_shape(cfg))})


def _generation_check(model, protocol, pairs, pool, named, opts, gen):
    """Greedy text under each named subset's mask with the protocol's phases; verdict counts."""
    masks = getattr(_masks(pool, model.cfg, [u for _, u in named]), pool.site)
    rows = []
    for (name, units), m in zip(named, masks):
        mask = Mask(**{pool.site: m})
        kw = {"prefill": Intervention(mask, gen["aligned"], jnp.asarray(gen["pos_w"]))}
        if PROTOCOLS[protocol].decode:
            kw["decode"] = decode_intervention(mask, gen["decode_source"])
        texts = model.complete_ids(gen["ids"], gen["attn_mask"], opts.max_new_tokens, **kw)
        answer = [D.classify_generation(t, p) for t, p in zip(texts, pairs)]
        original = [D.classify_generation_original(t, p) for t, p in zip(texts, pairs)]
        rows.append([name, len(units), _counts(answer), _counts(original), repr(texts[0][:50])])
    return rows


def _family_section(model, protocol, layer, pool, task: Task, criterion, opts, report) -> tuple:
    """The named families patched on all pairs: the headline rates, parity and group-position
    contrasts. Returns [{family, units, meets}] and the `prompt_table`."""
    families = _families(model.cfg, protocol, pool.n)
    names = [f for f, _ in families]
    vals = run_masks(model.params, model.cfg, task.problems[protocol],
                     _masks(pool, model.cfg, [u for _, u in families]), chunk_size=opts.chunk_size)
    positions = [i for i, f in enumerate(names) if f.startswith("group position")]
    distinct = {}                               # contrasts of the same unit sets once (e.g. G = 2: positions = parity)
    for c in [(names.index("even units"), names.index("odd units"))] + [(positions[0], j) for j in positions[1:]]:
        distinct.setdefault(tuple(tuple(families[i][1]) for i in c), c)
    contrasts = list(distinct.values())
    t = prompt_table(vals, task.source, task.target, contrasts, seed=opts.seed)
    meets = criterion.success(vals, task.source, task.target)
    same = {i: next((names[j] for j in range(i) if np.array_equal(families[j][1], u)), None)
            for i, (_, u) in enumerate(families)}
    labels = pool.labels()
    rows = [[f + (f" (= {same[i]})" if same[i] else ""), " ".join(labels[j] for j in u), cell(t, "mean", i),
             cell(t, "recovery", i), cell(t, "right", i, ".0%"), "yes" if meets[i] else "no"]
            for i, (f, u) in enumerate(families)]
    widest = max(((hi - lo) / 2 for lo, hi in zip(t["right_lo"], t["right_hi"]) if lo is not None), default=None)
    name = f"{protocol} protocol, layer {layer}"
    report.add(f"{name}: unit families on all {vals.shape[1]} pairs",
               f"Each family patched alone on all {vals.shape[1]} pairs (the headline rates). 'pairs right': the "
               "fraction of pairs whose patched first-token difference is > 0; in brackets 95% intervals over the "
               f"pairs (bootstrap, seed {opts.seed}); the widest here is "
               f"+-{'-' if widest is None else f'{widest:.3f}'} "
               f"(at most +-{Z95 * 0.5 / math.sqrt(vals.shape[1]):.3f} for {vals.shape[1]} pairs). "
               + ("Parity and the position within a KV group are tested separately: heads h and h' share a "
                  f"key/value head when h // {model.cfg.n_heads // model.cfg.n_kv_heads} = "
                  f"h' // {model.cfg.n_heads // model.cfg.n_kv_heads}. " if positions else "")
               + f"Criterion: {criterion.describe()}.",
               table(["family", "units", "mean metric", "recovery", "pairs right", f"meets {criterion}"], rows))
    sized = [f"{f} ({len(u)})" for f, u in families]
    for statement, rule in contrast_findings(t, sized, f"{name}, {vals.shape[1]} pairs"):
        report.finding(statement, rule)
    failing = [f for f, ok in zip(names, meets) if not ok]
    if failing:
        report.finding(f"{name}: families that miss {criterion} on all {vals.shape[1]} pairs: "
                       f"{', '.join(failing)}.", "fails")
    return [{"family": f, "units": u, "meets": bool(ok)} for (f, u), ok in zip(families, meets)], t


def _sweep_protocol(model, protocol, layer, task: Task, all_task: Task, gen, opts, report):
    """Sweeps (on the sweep pairs' `task`), unit families (on `all_task`), blend crossing and
    generation checks of one protocol at one layer."""
    cfg, criterion = model.cfg, Criterion.parse(opts.success)
    pool = PROTOCOLS[protocol].pool(cfg, layer, opts.n_blocks)
    n = pool.n
    problem = task.problems[protocol]
    name = f"{protocol} protocol, layer {layer}"
    succeed = lambda metric: criterion.success(metric, task.source, task.target)

    def sweep(tag, sub_pool, family):
        return run_sweep(model.params, cfg, problem, sub_pool, family,
                         os.path.join(opts.out, "sweeps", f"{protocol}_L{layer}_{tag}"), chunk_size=opts.chunk_size,
                         resume=opts.resume, describe={"model": opts.model, "protocol": protocol})

    families = _families(cfg, protocol, n)
    fam_rows = []
    if n <= EXHAUSTIVE_MAX_UNITS:
        # One exhaustive sweep holds every subset of each family's units too.
        res = sweep("all", pool, all_subsets(n))
        subsets, metric = res.subsets(n), res.metric
        success = succeed(metric)
        fam_rows = [[_only(f), len(u), "exhaustive", _rates_text(_restricted_rates(subsets, success, u))]
                    for f, u in families]
    else:
        # e.g. Llama-3.1-8B's 32 heads: all 2^16 subsets of the even and of the odd units,
        # and a stratified sample over all units.
        for fam, units in [(f, u) for f, u in families if f in ("even units", "odd units")]:
            sub = Pool(pool.site, tuple(pool.units[i] for i in units), pool.n_blocks)
            r = sweep(fam.split()[0], sub, all_subsets(len(units)))
            fam_rows.append([_only(fam), len(units), "exhaustive",
                             _rates_text(rate_by_size(r.subsets(len(units)), succeed(r.metric)))])
        res = sweep("sampled", pool, sampled_per_size(n, range(n + 1), opts.samples_per_size, opts.seed))
        subsets, metric = res.subsets(n), res.metric
        success = succeed(metric)
        fam_rows.insert(0, ["all units", n, f"{opts.samples_per_size} per size",
                            _rates_text(rate_by_size(subsets, success))])
    summary = add_sweep_analysis(report, name, subsets, metric, pool.labels(), criterion, (task.source, task.target),
                                 SummaryOptions(seed=opts.seed))
    named_all, family_table = _family_section(model, protocol, layer, pool, all_task, criterion, opts, report)
    # Blend weight of the whole layer (the original's "60% pattern replacement").
    whole = Mask(attn_out=jnp.zeros(cfg.n_layers).at[layer].set(1.0))
    cross = blend_crossing(model.params, cfg, problem, whole, tol=0.02, level=criterion.threshold,
                           aggregate=lambda v: criterion.value(v, task.source, task.target))
    named = [(f, u) for f, u in families if f in GENERATED]
    for key, label, quota in (("minimal_sufficient", "minimal", opts.confirm // 2),
                              ("maximal_insufficient", "maximal insufficient", opts.confirm - opts.confirm // 2)):
        named += [(f"{label} {s}", s) for s in (summary[key] or {"sets": []})["sets"][:quota]]
    gen_rows = _generation_check(model, protocol, task.pairs, pool, named, opts, gen[protocol])
    report.add(f"{name}: families in the sweep, blend, generation",
               f"Success rate by subset size among the subsets of each family's units (k:rate; {criterion}, "
               f"{metric.shape[1]} sweep pairs):",
               table(["family", "units", "subsets", "rate by k"], fam_rows),
               f"Whole-layer blend weight where {criterion.quantity} crosses {criterion.threshold:g}: " + (
                   "none in [0, 1]." if cross["crossing"] is None else f"{cross['low']:.3f}..{cross['high']:.3f}."),
               "Greedy generation under named and boundary subsets on the sweep pairs (verdict counts correct / "
               "wrong / unclear: the answer given, and the original study's phrase test):",
               table(["subset", "size", "answer c/w/u", "original test c/w/u", "9.8 vs 9.11 text"], gen_rows))
    return {"summary": summary, "families": fam_rows, "family_table": family_table, "named": named_all,
            "blend": cross, "generation": gen_rows, "rate_all": float(success.mean())}


def _generation_inputs(model, pairs, opts):
    """Per protocol: prompt-only target ids/mask, aligned source, position weights, decode source."""
    tok = model.tokenizer
    src_ids, src_attn_mask = tok.pad([encode_prompt(opts.source_format, p.question, tok) for p in pairs], "left")
    tgt_ids, tgt_attn_mask = tok.pad([encode_prompt(opts.target_format, p.question, tok) for p in pairs], "left")
    _, cache = run_with_cache(model.params, model.cfg, src_ids, jnp.asarray(src_attn_mask),
                              sites=("head_out", "attn_out"))
    out = {}
    for name, protocol in PROTOCOLS.items():
        pos_map = kit.position_map(protocol.align, (tgt_ids, tgt_attn_mask), (src_ids, src_attn_mask))
        out[name] = {"ids": tgt_ids, "attn_mask": tgt_attn_mask, "aligned": P.align(cache, pos_map),
                     "pos_w": P.weights("all", pos_map),
                     "decode_source": source_at_position(cache, np.argmax(src_attn_mask, axis=1))}
    return out


def _setup_section(report, model, opts, pairs, n_sweep, auto, criterion):
    cfg = model.cfg
    needed = pairs_needed()
    report.add("Setup",
               table(["model", "layers", "heads / KV heads", "d_model", "pairs (all / sweeps)", "source -> target",
                      "success"],
                     [[opts.model, cfg.n_layers, f"{cfg.n_heads} / {cfg.n_kv_heads}", cfg.d_model,
                       f"{len(pairs)} / {n_sweep}",
                       f"{opts.source_format} -> {opts.target_format}" + (" (auto)" if auto else ""),
                       str(criterion)]]),
               f"Why these numbers of pairs. The headline rates (the format scan and premise, and the unit "
               f"families of each swept layer) are fractions of all {len(pairs)} pairs; a fraction's 95% interval "
               f"is widest at 1/2, +-{Z95:.2f} * sqrt(1/4 / n), so +-{HEADLINE_HALF_WIDTH} needs "
               f"n >= {needed} pairs, and a bootstrap interval moves in steps of 1/n, so a margin helps; "
               f"{len(pairs)} pairs give at most +-{Z95 * 0.5 / math.sqrt(len(pairs)):.3f} (+-1/"
               f"{len(pairs)} for the steps). The layer scan, the exhaustive sweeps (2^n "
               f"patched runs per pair and protocol), the blend and the generation checks use the first {n_sweep} "
               "pairs, to keep the run short; their prompt intervals are correspondingly wider.")
    if auto:
        report.add("Formats chosen", f"'auto' picked source `{opts.source_format}` (highest mean first-token "
                   f"difference) and target `{opts.target_format}` (lowest) from the format scan.")


def run(opts: Options) -> str:
    """Run the study; returns the path of report.md."""
    report = Report(opts.out, "Even heads: format-dependent decimal comparison")
    opts = opts.resolved()
    model = kit.load(opts)
    criterion = Criterion.parse(opts.success)
    pairs = [D.STUDY_PAIR] + D.generate_pairs(opts.n_pairs, opts.seed)
    sweep_pairs = pairs[:opts.sweep_pairs]
    formats = tuple(dict.fromkeys(opts.scan_formats + tuple(f for f in (opts.source_format, opts.target_format)
                                                             if f != "auto")))
    logging.info("format scan over %s", formats)
    scan = format_scan(model, pairs, formats, opts.max_new_tokens)
    opts, auto = _choose_formats(opts, scan)
    _setup_section(report, model, opts, pairs, len(sweep_pairs), auto, criterion)
    _format_section(report, scan, pairs, opts)

    all_task, task = _task(model, pairs, opts), _task(model, sweep_pairs, opts)
    base = {"source": float(task.source.mean()), "target": float(task.target.mean()),
            "source_all": float(all_task.source.mean()), "target_all": float(all_task.target.mean())}
    report.results["baselines"] = base
    report.add("Baselines", f"Mean first-token logit difference on all {len(pairs)} pairs: source "
               f"({opts.source_format}) {base['source_all']:.3f}, target ({opts.target_format}) "
               f"{base['target_all']:.3f}; on the {len(sweep_pairs)} sweep pairs: {base['source']:.3f} and "
               f"{base['target']:.3f}. Success of a subset: {criterion.describe()} (recovery 0 = the unpatched "
               "target, 1 = the source).")
    layers = list(opts.sweep_layers) or _layer_scan(model, task, opts, report)
    gen = _generation_inputs(model, sweep_pairs, opts)
    compare = []
    for layer in layers:
        for protocol in opts.protocols:
            logging.info("sweep: %s protocol, layer %d", protocol, layer)
            r = _sweep_protocol(model, protocol, layer, task, all_task, gen, opts, report)
            s = r["summary"]
            compare.append([protocol, layer, s["n_units"], f"{r['rate_all']:.2f}",
                            threshold_cell(s, "k_star"), threshold_cell(s, "sharpness"),
                            s["monotonicity"]["monotone"], s["symmetric"],
                            (s["minimal_sufficient"] or {"count": "-"})["count"], r["blend"]["crossing"]])
            report.results[f"{protocol}_L{layer}"] = r
    report.add("Protocols side by side",
               f"Criterion {criterion}; in brackets 95% intervals over the {len(sweep_pairs)} sweep pairs.",
               table(["protocol", "layer", "units", "subsets succeeding", "k*", "width (k90-k10)",
                      "monotone", "depends only on size", "minimal sufficient sets", "blend crossing"], compare))
    return report.write()
