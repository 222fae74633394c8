"""The IOI study: per-head patching map, attribution patching, and threshold / backup sweeps over
the top heads (see experiments/ioi.py for the steps)."""

from __future__ import annotations

import dataclasses
import functools
import os
import time

import jax.numpy as jnp
import numpy as np
from absl import logging

import jaxcircuits as jc
from jaxcircuits.stats.agreement import correlations
from jaxcircuits.stats.criteria import Criterion
from jaxcircuits.stats.summary import SummaryOptions
from jaxcircuits.reports import plots
from jaxcircuits.interventions import positions as P
from jaxcircuits.interventions.ablation import mean_source
from jaxcircuits.methods.attribution import attribution_patching
from jaxcircuits.interventions.problem import PatchingProblem
from jaxcircuits.reports.report import Report, add_sweep_analysis, table
from jaxcircuits.interventions.sites import unit_label
from jaxcircuits.studies import kit
from jaxcircuits.studies.kit import OptionError, flag
from jaxcircuits.engine.subsets import Pool, all_subsets
from jaxcircuits.tasks import registry

MAX_TOP_HEADS = 12                # the sweeps run all 2^top_heads subsets


@dataclasses.dataclass(frozen=True, kw_only=True)
class Options(kit.StudyOptions):
    """The study's options: its binary's flags (`kit.flag` fields)."""

    n_prompts: int = flag("integer", 8, "Clean IOI prompts (each with its corrupted twin).")
    seed: int = flag("integer", 0, "Seed of the prompts (the corruption uses seed + 1).")
    top_heads: int = flag("integer", 6, "Candidate heads of each sign; the sweeps cover all 2^top_heads subsets "
                          f"of the positive ones (at most {MAX_TOP_HEADS}).")
    chunk_size: int = flag("integer", 64, "Masks per compiled chunk (0: from free memory).")
    out: str = kit.out("ioi")
    resume: bool = kit.resume()

    def check_flags(self) -> None:
        """Prompts, top heads and chunk size in range."""
        if self.n_prompts < 1:
            raise OptionError(f"--n_prompts must be >= 1, got {self.n_prompts}")
        if not 1 <= self.top_heads <= MAX_TOP_HEADS:
            raise OptionError(f"--top_heads must be in [1, {MAX_TOP_HEADS}] (the sweeps run 2^top_heads subsets), "
                              f"got {self.top_heads}")
        if self.chunk_size < 0:
            raise OptionError(f"--chunk_size must be >= 0 (0: from free memory), got {self.chunk_size}")

    def check(self, cfg) -> None:
        """--top_heads within the model's heads."""
        if self.top_heads > cfg.n_layers * cfg.n_heads:
            raise OptionError(f"--top_heads={self.top_heads} exceeds the model's {cfg.n_layers * cfg.n_heads} heads")


_name = functools.partial(unit_label, "head_out")        # (layer, head) -> 'L3H5'


def _ranked(values: np.ndarray, k: int, descending: bool = True) -> list:
    """The k (layer, head) of a map [L, H] with the largest (or smallest) values."""
    order = np.argsort(-values if descending else values, axis=None, kind="stable")[:k]
    return [tuple(int(i) for i in np.unravel_index(j, values.shape)) for j in order]


def _additivity(metric: np.ndarray, n: int) -> dict:
    """From an all_subsets sweep's metric [2^n, B]: each unit's effect alone, all units' joint
    effect and the sum of the single effects, relative to the empty subset (means over prompts)."""
    m = metric.mean(-1)
    single = m[1 << np.arange(n)] - m[0]
    joint = float(m[-1] - m[0])
    total = float(single.sum())
    return {"single": single, "joint": joint, "sum_single": total,
            "ratio": joint / total if total else None}


def _verdict(ratio, above: str, below: str, tol: float = 0.1) -> str:
    """Reading of joint / sum-of-single effects: `above` when super-additive, `below` when sub-additive."""
    if ratio is None:
        return "no single effects to compare with"
    if abs(ratio - 1) <= tol:
        return f"joint / sum = {ratio:.2f}, about additive (within {tol:.0%})"
    return f"joint / sum = {ratio:.2f}, " + (f"super-additive: {above}" if ratio > 1 else f"sub-additive: {below}")


def _baselines_section(report, base, gap):
    report.results["baselines"] = {**base, "gap": gap}
    report.add("Baselines",
               f"Mean logit difference IO - S at the final position: clean {base['clean']:.3f}, corrupted "
               f"{base['corrupted']:.3f} (gap {gap:.3f}); clean prompts preferring IO: "
               f"{base['clean_right']:.0%}. Patching effects below are normalised as "
               "(patched - corrupted) / (clean - corrupted): 1 = the clean behaviour restored, 0 = no change.")


def _map_sections(report, exact, attrib, raw, opts, seconds):
    """Per-head map, candidate heads and attribution-vs-exact sections; returns the top heads."""
    L, H = exact.shape
    k = opts.top_heads
    top, neg = _ranked(exact, k), _ranked(exact, k, descending=False)
    fig = plots.plot_head_map(exact, report.path("head_patch_map.png"), value_name="recovered fraction",
                              title="Patching each head clean -> corrupted (all positions)")
    rows = lambda heads: [[_name(lh), float(exact[lh]), float(raw[lh]), float(attrib[lh])] for lh in heads]
    header = ["head", "recovered (exact)", "mean metric", "recovered (attribution)"]
    report.add("Per-head patching map",
               f"Each of the {L * H} heads' outputs (`head_out`, the o_proj input) patched alone from the clean "
               f"run into the corrupted run at every position; one batched call ({seconds['exact']:.1f} s, compilation "
               "included).",
               report.figure(fig, "per-head patching map"))
    report.add("Candidate heads",
               "Patching at every position credits every head on the IO path (duplicate-token, induction, "
               "S-inhibition and name-mover heads alike): these are candidates, not a classification.",
               f"Top {k} positive heads (name-mover candidates):", table(header, rows(top)),
               f"Top {k} negative heads (negative name-mover candidates):", table(header, rows(neg)))
    flat_e, flat_a = exact.ravel(), attrib.ravel()
    corr = correlations(flat_a, flat_e)
    top_a = _ranked(attrib, k)
    fig = plots.plot_scatter(flat_e, flat_a, report.path("attribution_vs_exact.png"),
                             xlabel="exact patching (recovered fraction)",
                             ylabel="attribution estimate (recovered fraction)",
                             title=f"Attribution vs exact, {L * H} heads",
                             labels=[_name(lh) if lh in top + neg + top_a else "" for lh in np.ndindex(L, H)])
    report.add("Attribution patching",
               "Gradient of the mean metric with respect to the `head_out` mask at 0 (corrupted run, clean "
               f"source): a linear estimate of every head's patching effect from one backward pass "
               f"({seconds['attribution']:.1f} s, compilation included). Against the exact map: Pearson "
               f"{corr['pearson']:.3f}, Spearman {corr['spearman']:.3f}; top-{k} overlap "
               f"{len(set(top) & set(top_a))}/{k}.",
               report.figure(fig, "attribution vs exact"),
               f"Top {k} heads by attribution:", table(header, rows(top_a)))
    report.results.update(
        head_map=exact, head_map_raw=raw, attribution=attrib, attribution_correlation=corr, seconds=seconds,
        top_heads=[_name(lh) for lh in top], negative_heads=[_name(lh) for lh in neg],
        top_heads_attribution=[_name(lh) for lh in top_a])
    return top


def _patch_sweep(model, problem, pool, base, per_prompt, opts, report):
    """All subsets of the pool patched clean -> corrupted: additivity and sweep analysis sections
    (per_prompt: the clean and corrupted metrics [B], the baselines of recovery)."""
    n, gap = pool.n, base["clean"] - base["corrupted"]
    res = jc.run_sweep(model.params, model.cfg, problem, pool, all_subsets(n),
                       os.path.join(opts.out, "sweeps", "patch_top"), chunk_size=opts.chunk_size,
                       resume=opts.resume, describe={"model": opts.model, "study": "ioi patch_top"})
    add = _additivity(res.metric, n)
    verdict = _verdict(add["ratio"], "the heads need each other (serial or AND-like)",
                       "the heads carry overlapping, redundant signal")
    report.add("Patching subsets of the top heads",
               f"All {1 << n} subsets of the top {n} heads patched together (clean -> corrupted, all positions). "
               f"A subset succeeds when the mean metric recovers at least half the gap (recovery>=0.5): >= "
               f"corrupted + 0.5 * gap = {base['corrupted'] + 0.5 * gap:.3f}.",
               f"All {n} heads together recover {add['joint'] / gap:.3f} of the gap; the sum of their single "
               f"recoveries is {add['sum_single'] / gap:.3f} ({verdict}).")
    report.results["patch_top"] = {"units": pool.labels(), "metric": res.metric, **add}
    add_sweep_analysis(report, "Patch sweep: threshold and redundancy", res.subsets(n), res.metric, pool.labels(),
                       "recovery>=0.5", (per_prompt[0], per_prompt[1]), SummaryOptions(seed=opts.seed))


def _ablation_problem(model, task: registry.TaskBatches) -> PatchingProblem:
    """Mean ablation of the clean (source) run: its head outputs replaced by their mean over the
    batch and real positions, at every position."""
    _, cache = jc.run_with_cache(model.params, model.cfg, task.source_ids, jnp.asarray(task.source_attn_mask),
                                 sites=("head_out",))
    clean = jc.target_run(model.params, model.cfg, task.source_ids, task.source_attn_mask)
    return PatchingProblem.make(clean, mean_source(cache, clean.attn_mask), P.select("all", clean.attn_mask),
                                task.source_metric)


def _ablation_sweep(model, task, pool, base, opts, report):
    """All subsets of the pool mean-ablated on the clean run: per-head effects, single vs joint
    effects and sweep analysis sections."""
    n = pool.n
    problem = _ablation_problem(model, task)
    res = jc.run_sweep(model.params, model.cfg, problem, pool, all_subsets(n), os.path.join(opts.out, "sweeps", "ablate_top"), chunk_size=opts.chunk_size,
                       resume=opts.resume, describe={"model": opts.model, "study": "ioi ablate_top"})
    add = _additivity(res.metric, n)
    verdict = _verdict(add["ratio"], "the heads cover for one another when only one is removed (redundancy / backup)",
                       "the single effects overlap (shared or saturating contributions)")
    rows = [[u, float(e), float(e / base["clean"])] for u, e in zip(pool.labels(), add["single"])]
    report.add("Mean ablation of the top heads (clean run)",
               "On the clean run, each subset of the top heads has its `head_out` replaced by its mean over the "
               "clean batch and real positions. Effect = ablated - unablated mean metric.",
               table(["head", "effect of ablating it alone", "fraction of the clean metric"], rows),
               f"Ablating all {n}: {add['joint']:.3f}; sum of single effects: {add['sum_single']:.3f} "
               f"({verdict}).",
               f"In the sweep below a subset 'succeeds' when ablating it BREAKS the task: the mean metric falls "
               f"to <= half the clean metric ({0.5 * base['clean']:.3f}). Success then rises with the number "
               "of heads ablated, so k* is how many of these heads must go, and the minimal sufficient sets "
               "are the minimal sets whose loss breaks IOI.")
    report.results["ablate_top"] = {"units": pool.labels(), "metric": res.metric, **add}
    add_sweep_analysis(report, "Ablation sweep: threshold and redundancy", res.subsets(n), res.metric, pool.labels(),
                       Criterion("metric", "<=", 0.5 * base["clean"]))


def run(opts: Options) -> str:
    """Run the study; returns the path of report.md."""
    report = Report(opts.out, "IOI: per-head patching, attribution patching and backup heads")
    model = kit.load(opts)
    cfg = model.cfg
    task = registry.build("ioi", model.tokenizer, opts)
    clean_p, corrupt_p = task.prompts
    problem = kit.problem(model, task, ("head_out",))       # equal token lengths: right-aligned is the identity
    clean_m, corrupted_m = kit.baselines(model, task)
    base = {"clean": float(clean_m.mean()), "corrupted": float(corrupted_m.mean()),
            "clean_right": float((clean_m > 0).mean())}
    gap = base["clean"] - base["corrupted"]
    report.add("Setup",
               table(["model", "layers", "heads / KV heads", "prompts", "tokens", "seed"],
                     [[opts.model, cfg.n_layers, f"{cfg.n_heads} / {cfg.n_kv_heads}", len(clean_p),
                       task.source_ids.shape[1], opts.seed]]),
               f"Clean: {clean_p[0].text!r} -> IO {clean_p[0].io!r}, S {clean_p[0].s!r}.  \n"
               f"Corrupted (three other names, same template and token length): {corrupt_p[0].text!r}.")
    report.results["prompts"] = [{"clean": c.text, "corrupted": x.text, "io": c.io, "s": c.s, "metric": float(m)}
                                 for c, x, m in zip(clean_p, corrupt_p, clean_m)]
    _baselines_section(report, base, gap)

    logging.info("per-head patching map over %d heads", cfg.n_layers * cfg.n_heads)
    t0 = time.time()
    raw = kit.unit_map(model, problem, opts.chunk_size).mean(-1)
    t1 = time.time()
    attrib = attribution_patching(model.params, cfg, problem, "head_out")
    seconds = {"exact": t1 - t0, "attribution": time.time() - t1}
    top = _map_sections(report, (raw - base["corrupted"]) / gap, attrib / gap, raw, opts, seconds)

    pool = Pool("head_out", units=tuple(top))
    logging.info("patch sweep over %s", pool.labels())
    _patch_sweep(model, problem, pool, base, (clean_m, corrupted_m), opts, report)
    logging.info("ablation sweep over %s", pool.labels())
    _ablation_sweep(model, task, pool, base, opts, report)
    return report.write()
