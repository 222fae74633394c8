"""Per-head attribution four ways, side by side (see experiments/attribution.py for the steps).

For a source (good) -> target (bad) patching task, every head gets
  DLA        the change of its direct effect on the metric's logit direction, source run minus
             target run, through the final norm as each run applies it (`dla`, 'run' mode)
  AP         attribution patching: d(mean metric)/d(head_out mask) at 0 (`attribution`)
  IG         integrated gradients along the blend of all heads (`attribution`)
  exact      the metric with that head's `head_out` alone patched (one batched call)
all as fractions of the gap (source - target mean metric). DLA measures only the direct path to
the logits; the others include every path through later layers.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np
from absl import logging

from jaxcircuits.stats.agreement import correlations
from jaxcircuits.methods import dla
from jaxcircuits.reports import plots
from jaxcircuits.methods.attribution import attribution_patching, integrated_gradients
from jaxcircuits.interventions.metrics import LogitDiff
from jaxcircuits.reports.report import Report, table
from jaxcircuits.interventions.sites import unit_label
from jaxcircuits.studies import kit
from jaxcircuits.studies.kit import OptionError, flag

METHODS = ("DLA", "AP", "IG", "exact")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Options(kit.TaskOptions):
    """The study's options: its binary's flags (`kit.flag` fields; the task's in `kit.TaskOptions`)."""

    task: str = flag("enum", "ioi", "ioi: clean -> corrupted IOI prompts; decimals: --source_format -> "
                     "--target_format pairs; prompts: --source_prompts/--target_prompts files with --answers.",
                     enum_values=["ioi", "decimals", "prompts"])
    n_prompts: int = flag("integer", 8, "Prompts (ioi, decimals).", lower_bound=1)
    seed: int = flag("integer", 0, "Seed of the prompts.")
    ig_steps: int = flag("integer", 8, "Integrated-gradients steps (midpoint rule).", lower_bound=1)
    top: int = flag("integer", 5, "Heads per method compared for agreement.", lower_bound=1)
    chunk_size: int = flag("integer", 64, "Masks per compiled chunk of the exact map (0: from free memory).",
                           lower_bound=0)
    out: str = kit.out("attribution")

    def check(self, cfg) -> None:
        """--top within the model's heads."""
        if not 1 <= self.top <= cfg.n_layers * cfg.n_heads:
            raise OptionError(f"--top={self.top} out of range [1, {cfg.n_layers * cfg.n_heads}] (the model's heads)")


def head_dla(model, ids, attn_mask, metric: LogitDiff) -> np.ndarray:
    """Mean over prompts of each head's direct effect along the metric's logit direction [L, H]."""
    direction = dla.answer_direction(model.params, metric.good, metric.bad)
    out = dla.direct_logit_attribution(model.params, model.cfg, ids, attn_mask, direction)
    return np.asarray(out["heads"][..., 0]).mean(-1)


def _top(values: np.ndarray, k: int) -> set:
    return {tuple(int(i) for i in np.unravel_index(j, values.shape)) for j in np.argsort(-values, axis=None)[:k]}


def agreement(maps: dict, k: int) -> dict:
    """Heads in the top k of every method ('all'), and for each head in some method's top k but
    not all, the methods that rank it there ('some')."""
    tops = {m: _top(v, k) for m, v in maps.items()}
    union = set().union(*tops.values())
    every = set.intersection(*tops.values())
    return {"all": sorted(every), "some": {h: [m for m in maps if h in tops[m]] for h in sorted(union - every)}}


def run(opts: Options) -> str:
    """Run the study; returns the path of report.md."""
    report = Report(opts.out, "Attribution: DLA, attribution patching, integrated gradients and exact patching")
    model = kit.load(opts)
    cfg = model.cfg
    task = kit.task_batches(model, opts)
    if not isinstance(task.metric, LogitDiff):
        raise OptionError(f"--task={opts.task}: DLA needs a logit-difference metric")
    # Both runs scored by the patched runs' metric: every map below is in its units.
    base = {"source": float(kit.unpatched_metric(model, task.source_ids, task.source_attn_mask, task.metric).mean()),
            "target": float(kit.unpatched_metric(model, task.target_ids, task.target_attn_mask, task.metric).mean())}
    gap = base["source"] - base["target"]
    if abs(gap) < 1e-6:
        raise OptionError(f"source and target runs score the same ({base['source']:.4f}): nothing to attribute")
    problem = kit.problem(model, task, ("head_out",))
    seconds, maps = {}, {}
    for name, compute in (
            ("DLA", lambda: head_dla(model, task.source_ids, task.source_attn_mask, task.metric)
             - head_dla(model, task.target_ids, task.target_attn_mask, task.metric)),
            ("AP", lambda: attribution_patching(model.params, cfg, problem, "head_out")),
            ("IG", lambda: integrated_gradients(model.params, cfg, problem, "head_out", steps=opts.ig_steps)),
            ("exact", lambda: kit.unit_map(model, problem, opts.chunk_size).mean(-1) - base["target"])):
        logging.info("attribution: %s", name)
        t = time.time()
        maps[name] = np.asarray(compute(), np.float64) / gap
        seconds[name] = time.time() - t
    _sections(report, opts, task.description, base, maps, seconds)
    return report.write()


def _sections(report: Report, opts: Options, description: str, base: dict, maps: dict, seconds: dict) -> None:
    L, H = maps["exact"].shape
    report.add("Setup", table(["model", "task", "prompts", "IG steps", "top k"],
                              [[opts.model, description, opts.n_prompts, opts.ig_steps, opts.top]]),
               f"Mean metric: source {base['source']:.3f}, target {base['target']:.3f} (gap "
               f"{base['source'] - base['target']:.3f}). Every value below is a fraction of that gap: 1 = the "
               "whole source-target difference. DLA: change of the head's direct effect on the metric's logit "
               "direction (source run - target run; direct path only). AP: attribution patching (gradient at no "
               "patch). IG: integrated gradients over the blend of all heads. exact: the head patched alone.")
    corr = {(a, b): (c["spearman"], c["pearson"]) for i, a in enumerate(METHODS) for b in METHODS[i + 1:]
            for c in [correlations(maps[a], maps[b])]}
    report.add("Agreement between methods",
               f"Rank (Spearman) and linear (Pearson) correlation over all {L * H} heads:",
               table(["method", "vs", "Spearman", "Pearson"], [[a, b, s, p] for (a, b), (s, p) in corr.items()]),
               "Seconds per method (compilation included): "
               + ", ".join(f"{m} {seconds[m]:.1f}" for m in METHODS) + ".")
    agree = agreement(maps, opts.top)
    name = lambda lh: unit_label("head_out", lh)
    rows = [[name(lh), *(f"{maps[m][lh]:.3f}" for m in METHODS)]
            for lh in sorted(set().union(*(_top(v, opts.top) for v in maps.values())),
                             key=lambda lh: -maps["exact"][lh])]
    findings = [f"All four methods put {', '.join(map(name, agree['all']))} in their top {opts.top}."
                if agree["all"] else f"No head is in the top {opts.top} of all four methods."]
    if agree["some"]:
        shown = list(agree["some"].items())[:12]
        findings.append("Disagreements (head: the methods ranking it in their top "
                        f"{opts.top}): " + "; ".join(f"{name(lh)}: {', '.join(ms)}" for lh, ms in shown)
                        + ("" if len(shown) == len(agree["some"]) else f"; and {len(agree['some']) - len(shown)} more")
                        + ".")
    indirect = sorted(_top(maps["exact"], opts.top) - _top(maps["DLA"], opts.top))
    if indirect:
        findings.append(f"{', '.join(map(name, indirect))} matter when patched but not through their direct path "
                        "to the logits (exact top, not DLA top): they act through later layers.")
    findings.append(f"Against exact patching, attribution patching ranks heads with Spearman "
                    f"{corr[('AP', 'exact')][0]:.2f} and integrated gradients with {corr[('IG', 'exact')][0]:.2f}.")
    findings = " ".join(findings)
    report.add("Findings", findings,
               f"The union of every method's top {opts.top} heads, by exact effect:",
               table(["head", *METHODS], rows))
    figs = [report.figure(plots.plot_head_map(maps[m], report.path(f"map_{m}.png"), title=f"{m} (fraction of gap)",
                                              value_name="fraction of gap"), f"{m} per head") for m in METHODS]
    labels = [name(lh) if lh in set(agree["all"]) | set(agree["some"]) else "" for lh in np.ndindex(L, H)]
    figs += [report.figure(plots.plot_scatter(maps["exact"], maps[m], report.path(f"scatter_{m}.png"),
                                              xlabel="exact patching (fraction of gap)",
                                              ylabel=f"{m} (fraction of gap)", title=f"{m} vs exact, {L * H} heads",
                                              labels=labels), f"{m} vs exact") for m in METHODS[:3]]
    report.add("Maps and scatter plots", *figs)
    report.results.update(baselines=base, maps={m: v.tolist() for m, v in maps.items()}, seconds=seconds,
                          correlations={f"{a} vs {b}": {"spearman": s, "pearson": p} for (a, b), (s, p) in corr.items()},
                          agree_all=[name(lh) for lh in agree["all"]],
                          disagree={name(lh): ms for lh, ms in agree["some"].items()})
