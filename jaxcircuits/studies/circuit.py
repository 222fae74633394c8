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

import numpy as np
from absl import logging

from jaxcircuits.stats.criteria import Criterion
from jaxcircuits.stats.tables import DENSE_MAX_UNITS
from jaxcircuits.methods import attribution, circuits, learned
from jaxcircuits.interventions import edges, sites
from jaxcircuits.reports import plots
from jaxcircuits.reports.report import Report, table
from jaxcircuits.studies import kit
from jaxcircuits.studies.kit import OptionError, flag
from jaxcircuits.engine.subsets import Pool
from jaxcircuits.tasks import registry

# the registered tasks this study offers (--task): one metric scores both runs
TASKS = ("ioi",)


# ---- methods --------------------------------------------------------------------------------------
# A ranking method gives every unit an importance [U] (higher = keep it first): the estimated drop
# of the mean metric when that unit alone is patched; its circuits are its top-k units. 'learned'
# gives one binary circuit per penalty weight instead (`learned.learn`).

def _path_head(model, problem, base, opts):
    return base["full"] - kit.unit_map(model, problem, opts.chunk_size).mean(-1).ravel()


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


@dataclasses.dataclass(frozen=True, kw_only=True)
class Options(kit.StudyOptions):
    """The study's options: its binary's flags (`kit.flag` fields)."""

    task: str = flag("string", "ioi", "Task (one of jaxcircuits.studies.circuit.TASKS): ioi = clean -> corrupted IOI.")
    level: str = flag("string", "head", "Units of a circuit: head (head outputs) or edge (sender -> receiver edges).")
    method: Tuple[str, ...] = flag("list", [], "Discovery methods (path, eap, eap_ig, learned); default: all four at "
                                   "head level, path, eap and eap_ig at edge level (path only up to "
                                   "--max_path_edges edges).")
    layer: int = flag("integer", -1, "Ground-truth pool: the heads of this layer (-1: the layer whose heads, patched "
                      "together, lower the metric most).")
    criterion: str = flag("string", "recovery>=0.8", "When a circuit is sufficient: recovery>=X is faithfulness >= X.")
    n_prompts: int = flag("integer", 8, "Prompts.", lower_bound=1)
    seed: int = flag("integer", 0, "Seed of the prompts.")
    max_size: int = flag("integer", 0, "Largest circuit on the curves (0: every unit).", lower_bound=0)
    n_points: int = flag("integer", 48, "Circuit sizes on the curves (every size when there are fewer).",
                         lower_bound=2)
    ig_steps: int = flag("integer", 8, "Integrated-gradients steps.", lower_bound=1)
    abs_scores: bool = flag("bool", False, "Rank units by |importance| (a unit whose patching raises the metric "
                            "counts too) rather than by importance.")
    lambdas: Tuple[float, ...] = flag("list", ["1", "3", "10"], "learned: sparsity penalties, one run each; each is "
                                      "the penalty of keeping every unit (divided by the unit count per unit).",
                                      parse=kit.floats)
    learned_steps: int = flag("integer", 100, "learned: adam steps.", lower_bound=1)
    learning_rate: float = flag("float", 0.1, "learned: adam's learning rate.", lower_bound=0)
    max_path_edges: int = flag("integer", 4096, "Largest edge count for --method=path at --level=edge (one patched "
                               "run per edge).", lower_bound=1)
    chunk_size: int = flag("integer", 64, "Masks per compiled chunk (edge masks hold every sender's delta: use "
                           "fewer at --level=edge on large models).", lower_bound=1)
    out: str = kit.out("circuit")

    def check_flags(self) -> None:
        """Task, level, methods, penalties, criterion and curve sizes."""
        if self.task not in TASKS:
            raise OptionError(f"--task={self.task}: known tasks are {sorted(TASKS)}")
        if self.level not in DEFAULT_METHODS:              # 'feature' needs a spliced model, which no flag makes
            raise OptionError(f"--level={self.level}: this study's levels are {sorted(DEFAULT_METHODS)}")
        for m in self.method:
            if m not in METHODS:
                raise OptionError(f"--method={m}: known methods are {', '.join(METHODS)}")
        if not self.lambdas or min(self.lambdas) < 0:
            raise OptionError(f"--lambdas must be values >= 0, got {list(self.lambdas)}")
        try:
            Criterion.parse(self.criterion)
        except ValueError as e:
            raise OptionError(f"--criterion: {e}") from None
        if self.max_size < 0 or self.n_points < 2:
            raise OptionError(f"--max_size must be >= 0 and --n_points >= 2, got {self.max_size} and {self.n_points}")

    def check(self, cfg) -> None:
        """Path patching of every edge within --max_path_edges; --layer within the model."""
        if self.level == "edge" and "path" in self.method and _n_edges(cfg) > self.max_path_edges:
            raise OptionError(f"--method=path at --level=edge patches each of the model's {_n_edges(cfg)} edges "
                              f"alone, more than --max_path_edges={self.max_path_edges}: use eap or eap_ig")
        if self.layer != -1:
            kit.check_layers("layer", [self.layer], cfg)


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
    """The methods to run: --method, or the level's defaults (path at edge level only up to
    --max_path_edges edges)."""
    if opts.method:
        return opts.method
    return tuple(m for m in DEFAULT_METHODS[opts.level]
                 if not (m == "path" and opts.level == "edge" and _n_edges(cfg) > opts.max_path_edges))


# ---- the run ------------------------------------------------------------------------------------

def pick_layer(model, problem, full: float, chunk_size: int) -> Tuple[int, np.ndarray]:
    """(the layer whose heads, patched together, lower the mean metric most; that drop per layer [L])."""
    drop = full - kit.layer_scan(model, problem, chunk_size).mean(-1)
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
    model = kit.load(opts)
    cfg = model.cfg
    methods = methods_for(opts, cfg)
    criterion = Criterion.parse(opts.criterion)
    # The circuit is kept from the task's source run (clean): its problem patches from the target run.
    task = registry.build(opts.task, model.tokenizer, opts).swapped()
    problem = kit.problem(model, task, sites.level(opts.level).source)
    corrupted, full = kit.baselines(model, task)
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
