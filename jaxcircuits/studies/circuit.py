"""Circuit discovery and evaluation (see experiments/circuit.py for the steps).

The circuit is kept from the target run (the task's source prompts, e.g. clean IOI) and every
unit outside it is patched from the other run (the corrupted prompts); faithfulness as in
`jaxcircuits.methods.circuits`. Each method scores every unit by its importance, the estimated drop of
the metric when that unit alone is patched (higher = keep it first):

  path     exact: the unit patched alone (one batched call over all units)
  eap      attribution patching: minus the gradient of the mean metric w.r.t. the unit's mask at 0
           (at head level the node-level `attribution.attribution_patching` of `head_out`)
  eap_ig   the same with integrated gradients from nothing to everything patched
           (at edge level, of site 'edges')
A ranking's circuits are its top-k units. 'learned' trains masks instead (`learned.learn`, one
binary circuit per sparsity penalty).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Tuple

import jax.numpy as jnp
import numpy as np
from absl import logging

from jaxcircuits.stats.criteria import Criterion
from jaxcircuits.stats.tables import DENSE_MAX_UNITS
from jaxcircuits.methods import attribution, circuits, learned
from jaxcircuits.interventions import edges, sites
from jaxcircuits.reports import plots
from jaxcircuits.interventions import positions as P
from jaxcircuits.models.transformer import run_with_cache
from jaxcircuits.interventions.problem import PatchingProblem, target_run
from jaxcircuits.engine.patching import run_masks
from jaxcircuits.reports.report import Report, table
from jaxcircuits.interventions.sites import Mask
from jaxcircuits.studies.common import OptionError, check_layers, load_model, unpatched_metric
from jaxcircuits.studies.ioi import head_patch_map
from jaxcircuits.studies.threshold_sweep import TASKS as SWEEP_TASKS
from jaxcircuits.engine.subsets import Pool

# --task -> its batches (`threshold_sweep.TASKS`' form: (TaskBatches, the source run's metric));
# the task's source run is the circuit's target run, its target run the patching source.
TASKS = {"ioi": SWEEP_TASKS["ioi"]}


@dataclasses.dataclass(frozen=True)
class Options:
    model: str
    dtype: str
    task: str
    level: str                      # a key of sites.LEVELS
    methods: Tuple[str, ...]        # of METHODS; () = the level's DEFAULT_METHODS
    layer: int                      # ground-truth pool: the heads of this layer; -1 = the layer that matters most
    criterion: str                  # a criteria.Criterion over faithfulness, e.g. 'recovery>=0.8'
    n_prompts: int
    seed: int
    max_size: int                   # largest circuit on the curves (0 = every unit)
    n_points: int                   # sizes on the curves
    ig_steps: int
    abs_scores: bool                # rank by |importance| (both signs matter) instead of importance
    lambdas: Tuple[float, ...]      # learned: sparsity penalties, each the cost of keeping every unit
    learned_steps: int
    learning_rate: float
    max_path_edges: int             # 'path' at edge level runs one masked forward per edge
    chunk_size: int
    out: str


# ---- methods --------------------------------------------------------------------------------------
# A ranking method gives every unit an importance [U] (higher = keep it first): the estimated drop
# of the mean metric when that unit alone is patched; its circuits are its top-k units. 'learned'
# gives one binary circuit per penalty weight instead (`learned.learn`).

def _path_head(model, problem, base, opts):
    return base["full"] - head_patch_map(model, problem, opts.chunk_size).ravel()


def _path_edge(model, problem, base, opts):
    n = edges.EdgeGraph.of(model.cfg).n_edges
    metric, full, _ = circuits.evaluate(model.params, model.cfg, problem, "edge", ~np.eye(n, dtype=bool),
                                        opts.chunk_size)
    return full.mean() - metric.mean(-1)


def _eap_head(model, problem, base, opts):
    return -attribution.attribution_patching(model.params, model.cfg, problem, "head_out").ravel()


def _eap_ig_head(model, problem, base, opts):
    return -attribution.integrated_gradients(model.params, model.cfg, problem, "head_out",
                                             steps=opts.ig_steps).ravel()


def _eap_edge(model, problem, base, opts):
    return -attribution.attribution_patching(model.params, model.cfg, problem, "edges")


def _eap_ig_edge(model, problem, base, opts):
    return -attribution.integrated_gradients(model.params, model.cfg, problem, "edges", steps=opts.ig_steps)


# method -> {level: importance(model, problem, baselines, opts) -> [U]}
RANKINGS = {
    "path": {"head": _path_head, "edge": _path_edge},
    "eap": {"head": _eap_head, "edge": _eap_edge},
    "eap_ig": {"head": _eap_ig_head, "edge": _eap_ig_edge},
}
METHODS = (*RANKINGS, "learned")
# --method's default per level (learned edge masks train a full edge-patched backward per step
# and run: name it to have it; path at edge level only up to --max_path_edges edges)
DEFAULT_METHODS = {"head": METHODS, "edge": tuple(RANKINGS)}


def learn(model, problem, opts: Options, pool=None):
    """`learned.learn` of every head (or the pool's) / every edge, one run per --lambdas value
    (scaled by 1 / the number of units, so that the value is the penalty of keeping them all)."""
    obj = (learned.head_objective(model.params, model.cfg, problem, pool) if pool is not None
           else learned.objective(model.params, model.cfg, problem, opts.level))
    spec = learned.Spec(steps=opts.learned_steps, learning_rate=opts.learning_rate,
                        checkpoint_every=opts.learned_steps)
    return learned.learn(obj, np.asarray(opts.lambdas, np.float32) / obj.n_units, opts.seed, spec)


def _n_edges(cfg) -> int:
    return edges.EdgeGraph.of(cfg).n_edges


def methods_for(opts: Options, cfg) -> Tuple[str, ...]:
    """The methods to run: opts.methods, or the level's defaults (path at edge level only up to
    --max_path_edges edges)."""
    if opts.methods:
        return opts.methods
    return tuple(m for m in DEFAULT_METHODS[opts.level]
                 if not (m == "path" and opts.level == "edge" and _n_edges(cfg) > opts.max_path_edges))


def check_flags(opts: Options) -> None:
    """The options that need no model (OptionError naming the flag)."""
    if opts.task not in TASKS:
        raise OptionError(f"--task={opts.task}: known tasks are {sorted(TASKS)}")
    if opts.level not in sites.LEVELS:
        raise OptionError(f"--level={opts.level}: known levels are {sorted(sites.LEVELS)}")
    for m in opts.methods:
        if m not in METHODS:
            raise OptionError(f"--method={m}: known methods are {', '.join(METHODS)}")
    if not opts.lambdas or min(opts.lambdas) < 0:
        raise OptionError(f"--lambdas must be values >= 0, got {list(opts.lambdas)}")
    try:
        Criterion.parse(opts.criterion)
    except ValueError as e:
        raise OptionError(f"--criterion: {e}") from None
    if opts.max_size < 0 or opts.n_points < 2:
        raise OptionError(f"--max_size must be >= 0 and --n_points >= 2, got {opts.max_size} and {opts.n_points}")


def check_options(opts: Options, cfg) -> None:
    """The options against the model's config (OptionError naming the flag)."""
    check_flags(opts)
    if opts.level == "edge" and "path" in opts.methods and _n_edges(cfg) > opts.max_path_edges:
        raise OptionError(f"--method=path at --level=edge patches each of the model's {_n_edges(cfg)} edges "
                          f"alone, more than --max_path_edges={opts.max_path_edges}: use eap or eap_ig")
    if opts.layer != -1:
        check_layers("layer", [opts.layer], cfg)


# ---- the run ------------------------------------------------------------------------------------

def _problem(model, opts: Options):
    """(task batches, the circuit problem: target = the task's source run, source = its target run
    aligned to it, all positions, the source run's metric)."""
    task, metric = TASKS[opts.task](model, opts)
    _, cache = run_with_cache(model.params, model.cfg, task.target_ids, jnp.asarray(task.target_mask),
                              sites=sites.level(opts.level).source)
    pos_map = P.right_aligned(task.source_mask, task.target_mask)
    problem = PatchingProblem.make(target_run(model.params, model.cfg, task.source_ids, task.source_mask),
                                   P.align(cache, pos_map), P.weights("all", pos_map), metric)
    return task, problem


def pick_layer(model, problem, full: float, chunk_size: int) -> Tuple[int, np.ndarray]:
    """(the layer whose heads, patched together, lower the mean metric most; that drop per layer [L])."""
    L, H = model.cfg.n_layers, model.cfg.n_heads
    masks = np.repeat(np.eye(L, dtype=np.float32)[:, :, None], H, 2)          # [L masks, L, H]
    drop = full - run_masks(model.params, model.cfg, problem, Mask(head_out=masks), chunk_size=chunk_size).mean(-1)
    return int(np.argmax(drop)), drop


def _by_size(kept: np.ndarray) -> np.ndarray:
    return kept[np.argsort(kept.sum(1), kind="stable")]


def discover(model, problem, base: dict, opts: Options, methods, sizes):
    """({method: kept bool [N_m, U] by size}, {method: importance [U]}, {method: seconds}): ranking
    methods' top-k for k in `sizes`, learned masks' circuits (importance: their mean trained logit)."""
    kept, scores, seconds = {}, {}, {}
    for m in methods:
        t = time.time()
        if m == "learned":
            lc = learn(model, problem, opts)
            kept[m] = _by_size(lc.kept)
            scores[m] = np.asarray(lc.training.state.logits, np.float64).mean(0)
        else:
            scores[m] = np.asarray(RANKINGS[m][opts.level](model, problem, base, opts), np.float64)
            kept[m] = circuits.top_k(_ranked(scores[m], opts), sizes)
        seconds[m] = time.time() - t
    return kept, scores, seconds


def _ranked(scores: np.ndarray, opts: Options) -> np.ndarray:
    return np.abs(scores) if opts.abs_scores else scores


def pool_sets(model, problem, opts: Options, pool: Pool, scores: dict) -> dict:
    """{method: bool [N_m, n]}: each ranking's top-k heads of the pool by its scores over every head
    (k = 1..n), learned masks trained over the pool alone (one set per penalty, by size)."""
    idx = [l * model.cfg.n_heads + h for l, h in pool.units]
    return {m: _by_size(learn(model, problem, opts, pool).kept) if m == "learned"
            else circuits.top_k(_ranked(s[idx], opts), np.arange(1, pool.n + 1)) for m, s in scores.items()}


def run(opts: Options) -> str:
    """Run the study; returns the path of report.md."""
    report = Report(opts.out, f"Circuits: discovery and faithfulness ({opts.task}, {opts.level} level)")
    model = load_model(opts.model, opts.dtype)
    cfg = model.cfg
    check_options(opts, cfg)
    methods = methods_for(opts, cfg)
    criterion = Criterion.parse(opts.criterion)
    task, problem = _problem(model, opts)
    full = unpatched_metric(model, task.source_ids, task.source_mask, problem.metric)
    corrupted = unpatched_metric(model, task.target_ids, task.target_mask, problem.metric)
    base = {"full": float(full.mean()), "corrupted": float(corrupted.mean())}
    labels = sites.level(opts.level).labels(cfg)

    logging.info("circuit: %s over %d %s units", ", ".join(methods), len(labels), opts.level)
    sizes = circuits.curve_sizes(len(labels), opts.max_size, opts.n_points)
    kept, scores, seconds = discover(model, problem, base, opts, methods, sizes)
    logging.info("circuit: faithfulness of %d circuits", sum(map(len, kept.values())))
    t = time.time()
    curves = circuits.curves(model.params, cfg, problem, opts.level, kept, opts.chunk_size)
    seconds["curves"] = time.time() - t
    base["none"] = float(curves.none.mean())

    gt = None
    if opts.level == "head" and cfg.n_heads <= DENSE_MAX_UNITS:
        t = time.time()
        layer, drops = (opts.layer, None) if opts.layer != -1 else pick_layer(model, problem, base["full"],
                                                                              opts.chunk_size)
        pool = Pool.heads(layer, cfg.n_heads)
        logging.info("circuit: ground truth over all %d subsets of %s", 1 << pool.n, pool.labels())
        truth = circuits.ground_truth(model.params, cfg, problem, pool, criterion, opts.chunk_size)
        gt = (truth, pool, drops, {m: circuits.compare(truth, k) | {"sets": k}
                                   for m, k in pool_sets(model, problem, opts, pool, scores).items()})
        seconds["ground truth"] = time.time() - t
    sections(report, opts, dict(task=task, base=base, labels=labels, scores=scores, curves=curves, kept=kept,
                                criterion=criterion, seconds=seconds, cfg=cfg, gt=gt))
    return report.write()


# ---- the report ---------------------------------------------------------------------------------

def first_reaching(sizes, faith, threshold: float):
    """The index of the first circuit (by size) whose faithfulness reaches `threshold` (None if none)."""
    hit = np.flatnonzero(np.asarray(faith) >= threshold)
    return int(hit[0]) if len(hit) else None


def sections(report: Report, opts: Options, r: dict) -> None:
    """Findings, setup, curves, ground truth and circuit graph sections from the run's results `r`."""
    base, curves, crit = r["base"], r["curves"], r["criterion"]
    thr, unit = crit.threshold, opts.level + "s"
    findings = []
    first = {m: first_reaching(curves.sizes[m], curves.faith[m], thr) for m in curves.faith}
    for m, i in first.items():
        findings.append(f"{m}: {curves.sizes[m][i]} {unit} reach faithfulness {curves.faith[m][i]:.2f} (>= {thr:g})."
                        if i is not None else
                        f"{m}: no circuit up to {curves.sizes[m].max()} {unit} reaches faithfulness {thr:g} "
                        f"(best {np.nanmax(curves.faith[m]):.2f}).")
    if r["gt"] is not None:
        findings += _ground_truth_findings(r)
    report.add("Findings", "\n".join(f"- {f}" for f in findings),
               "Faithfulness F(C) = (m(C) - m(none)) / (m(full) - m(none)): m is the mean metric over prompts "
               f"with every {opts.level} outside the circuit C patched from the corrupted run; a circuit is "
               f"sufficient when {crit.describe()} with m(full) and m(none) as the baselines (F >= {thr:g}).")
    _setup_section(report, opts, r)
    _curve_section(report, opts, r, first)
    if r["gt"] is not None:
        _ground_truth_section(report, r)
    _graph_section(report, opts, r, first)
    report.results.update(baselines=base, seconds=r["seconds"], criterion=str(crit), scores=r["scores"],
                          units=list(r["labels"]) if opts.level == "head" else None,
                          curves={m: {"size": curves.sizes[m], "faithfulness": curves.faith[m]} for m in curves.faith})


def _ground_truth_findings(r: dict) -> list:
    gt, pool, _, rows = r["gt"]
    names, crit = pool.labels(), r["criterion"]
    where = f"layer {pool.units[0][0]}, {pool.n} heads, all {1 << pool.n} subsets"
    if not len(gt.minimal):
        return [f"Ground truth ({where}): no subset meets {crit} (the whole pool's gap is "
                f"{gt.metric[-1].mean() - gt.metric[0].mean():.3f})."]
    k_min = int(gt.minimal.sum(1).min())
    out = [f"Ground truth ({where}): {len(gt.minimal)} minimal sufficient set(s) under {crit}, the smallest of "
           f"size {k_min} (e.g. {_braces(gt.minimal[np.argmin(gt.minimal.sum(1))], names)})."]
    for m, c in rows.items():
        hit = np.flatnonzero(c["sufficient"])
        if not len(hit):
            out.append(f"{m}: none of its sets of the pool is sufficient.")
            continue
        i, k = hit[0], int(c["size"][hit[0]])
        out.append(f"{m}: its first sufficient set of the pool has {k} heads and is "
                   + ("a minimal sufficient set" if c["minimal"][i] else
                      f"not minimal (Hamming {c['hamming'][i]}, Jaccard distance {c['jaccard'][i]:.2f} to the "
                      "nearest minimal set)")
                   + (f"; the smallest sufficient size is {k_min}." if k > k_min else "."))
    return out


def _braces(bits, names) -> str:
    return "{" + ", ".join(n for b, n in zip(bits, names) if b) + "}"


def _setup_section(report, opts, r):
    cfg, base = r["cfg"], r["base"]
    report.add("Setup",
               table(["model", "task", "level", "units", "methods", "criterion"],
                     [[opts.model, r["task"].description, opts.level, len(r["labels"]), ", ".join(r["scores"]),
                       str(r["criterion"])]]),
               f"{cfg.n_layers} layers, {cfg.n_heads} heads / {cfg.n_kv_heads} KV heads. The circuit's run is the "
               f"task's clean prompts; units outside it are patched from the corrupted prompts at every position. "
               f"Mean metric: full model {base['full']:.3f}, every {opts.level} patched {base['none']:.3f}, the "
               f"corrupted run itself {base['corrupted']:.3f}.",
               "Seconds (compilation included): " + ", ".join(f"{k} {v:.1f}" for k, v in r["seconds"].items()) + ".")


def _curve_section(report, opts, r, first):
    curves = r["curves"]
    path = plots.plot_faithfulness({m: (curves.sizes[m], curves.faith[m]) for m in curves.faith},
                             report.path("faithfulness.png"), r["criterion"].threshold, f"{opts.level}s kept",
                             title=f"Faithfulness of each method's top-k {opts.level}s")
    shown = sorted({int(s) for m in curves.sizes for i, s in enumerate(curves.sizes[m])
                    if s in (1, 2, 5, 10, 20, 50, 100) or i == first[m] or s == curves.sizes[m].max()})
    rows = [[k, *(f"{curves.faith[m][curves.sizes[m] == k].max():.3f}" if k in curves.sizes[m] else "-"
                  for m in curves.faith)] for k in shown]
    report.add("Faithfulness vs circuit size",
               f"Each method's circuits (top-k {opts.level}s; learned: one per penalty, the best shown where "
               f"two have one size) kept, every other {opts.level} patched; all "
               f"{sum(len(v) for v in curves.sizes.values())} circuits in one batched call.",
               report.figure(path, "faithfulness vs size"), table([f"{opts.level}s kept", *curves.faith], rows))


def _ground_truth_section(report, r):
    gt, pool, drops, gt_rows = r["gt"]
    names, crit = pool.labels(), r["criterion"]
    frontier = gt.frontier()
    path = plots.plot_faithfulness({m: (c["size"], c["faithfulness"]) for m, c in gt_rows.items()},
                             report.path("ground_truth.png"), crit.threshold, "heads of the pool kept",
                             frontier=frontier, title=f"Layer {pool.units[0][0]}: methods vs the exhaustive frontier")
    how = ("chosen by --layer" if drops is None else
           f"the layer whose heads patched together lower the metric most (drop {drops.max():.3f})")
    minimal = [[i + 1, int(s.sum()), _braces(s, names), f"{gt.faith[int(s @ (1 << np.arange(gt.n)))]:.3f}"]
               for i, s in enumerate(gt.minimal[:20])]
    parts = [f"Pool: the {pool.n} heads of layer {pool.units[0][0]} ({how}). Every one of the {1 << pool.n} subsets "
             "is kept in turn, the rest of the pool patched, heads of other layers never patched; faithfulness "
             f"is relative to the pool (full model vs the whole pool patched: gap "
             f"{gt.metric[-1].mean() - gt.metric[0].mean():.3f}). Criterion: {crit.describe()}.",
             f"{len(gt.minimal)} minimal sufficient set(s)" + (" (first 20):" if len(gt.minimal) > 20 else ":"),
             table(["#", "size", "heads", "faithfulness"], minimal) if minimal else "",
             report.figure(path, "ground truth"),
             "Each method's sets of the pool (top-k heads for k = 1..n; learned: masks trained over the pool, one "
             "per penalty): its faithfulness, the best of any set of that size "
             "(frontier), whether it is sufficient / a minimal sufficient set, and its Hamming and Jaccard "
             "distance to the nearest minimal sufficient set."]
    for m, c in gt_rows.items():
        rows = [[int(c["size"][k]), _braces(s, names), c["faithfulness"][k], c["frontier"][k],
                 "yes" if c["sufficient"][k] else "no", "yes" if c["minimal"][k] else "no", int(c["hamming"][k]),
                 c["jaccard"][k]] for k, s in enumerate(c["sets"])]
        parts += [f"**{m}**", table(["k", "heads", "faithfulness", "frontier", "sufficient", "minimal", "Hamming",
                                     "Jaccard"], rows)]
    report.add("Ground truth: exhaustive sweep of one layer", *parts)
    report.results["ground_truth"] = {"layer": pool.units[0][0], "units": names, "faithfulness": gt.faith,
                                      "success": gt.success, "minimal": [_braces(s, names) for s in gt.minimal],
                                      "frontier": frontier, "layer_drops": drops,
                                      "methods": {m: {k: v for k, v in c.items() if k != "sets"}
                                                  for m, c in gt_rows.items()}}


def _graph_section(report, opts, r, first):
    """The first method's first circuit reaching the criterion (else its largest), drawn with its scores."""
    m = next(iter(r["kept"]))
    i = first[m] if first[m] is not None else len(r["kept"][m]) - 1
    kept = r["kept"][m][i]
    path = plots.plot_circuit_graph([r["labels"][u] for u in np.flatnonzero(kept)], r["scores"][m][kept],
                              edges.EdgeGraph.of(r["cfg"]), report.path("circuit.png"),
                              title=f"{m}: {int(kept.sum())} {opts.level}s")
    report.add("Circuit graph",
               f"The {int(kept.sum())} {opts.level}s of {m}'s "
               + (f"smallest circuit reaching {r['criterion']}" if first[m] is not None else
                  "largest circuit (none reached the criterion)")
               + ": nodes by layer (embeddings left, logits right) and head index"
               + (", edges weighted by score" if opts.level == "edge" else ", sized by score")
               + " (blue: keeping it matters, red: patching it helps)."
               + (" Scores of learned masks: the mean trained logit." if m == "learned" else ""),
               report.figure(path, "circuit graph"))
