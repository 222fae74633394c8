"""The attribution-graph study: transcoders (loaded, or trained on a few layers over the Wikipedia
corpus), the graph of one prompt (`methods.graphs`), its files and HTML view, and its check by
intervention in the real model (`methods.graph_validation`); see experiments/graph.py for the steps."""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
from typing import Dict, List, Optional, Sequence

import numpy as np
from absl import logging

from jaxcircuits.dictionaries import core, evaluate, files, splice, stream, train
from jaxcircuits.methods import dla
from jaxcircuits.methods import graph_validation as V
from jaxcircuits.methods import graphs
from jaxcircuits.reports import viz
from jaxcircuits.reports.report import Report, table
from jaxcircuits.studies import kit
from jaxcircuits.studies.kit import OptionError, flag

HOST = "transcoder"
AUTO_LAYERS = 4                   # --layers unset: this many layers, evenly spaced, get a transcoder
ROWS_PER_CHUNK = 8                # corpus rows per model run when collecting activations
TOP_FEATURES = 10                 # features named in the report's tables
# preset -> the values of the options left unset. quick: transcoders on 4 layers of SmolLM2-135M, the
# graph and its checks on 2 CPU cores in under 10 minutes.
PRESETS: Dict[str, Dict[str, object]] = {
    "quick": dict(width=1024, k=16, steps=300, batch=128, lr=1e-3, documents=200, eval_rows=8, top_nodes=128),
    "full": dict(width=8192, k=64, steps=4000, batch=1024, lr=3e-4, documents=0, eval_rows=64, top_nodes=0),
}


def _edits(values: Sequence[str]) -> tuple:
    return tuple(V.Edit.parse(v) for v in values)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Options(kit.DictionaryOptions):
    """The study's options: its binary's flags (`kit.flag` fields); those left None take the preset's value."""

    presets = PRESETS
    preset: str = flag("enum", "quick", "Values of the flags left unset. quick: transcoders on 4 layers of "
                       "SmolLM2-135M trained, the graph built and checked in under 10 minutes on 2 CPU cores; full: a "
                       "GPU-sized training over the whole corpus (on --layers: list them all for a full replacement).", enum_values=list(PRESETS))
    prompt: str = flag("string", "The capital of France is", "The prompt (the corpus' separator token, the "
                       "tokenizer's BOS, goes first).")
    transcoders: Optional[str] = flag("string", None, "Directory of transcoders to load (`dictionaries.files`: "
                                      "circuit-tracer's config.yaml and layer files, or one SAELens directory per "
                                      "layer in it); unset: train them on --layers.")
    layers: tuple = flag("list", [], "Layers to train transcoders on (without --transcoders); empty: "
                         f"{AUTO_LAYERS} evenly spaced. The other layers' MLPs are error nodes whole.", parse=kit.ints)
    max_feature_nodes: int = flag("integer", 0, "Feature nodes at most, chosen by influence (0: every active feature).")
    node_threshold: float = flag("float", 0.8, "Pruning: the nodes holding this fraction of the influence are kept.")
    edge_threshold: float = flag("float", 0.98, "Pruning: the edges holding this fraction of the edge scores are kept.")
    max_n_logits: int = flag("integer", 10, "Logit nodes at most.")
    desired_logit_prob: float = flag("float", 0.95, "Logit nodes: the most probable tokens up to this probability.")
    graph_batch: int = flag("integer", 32, "Graph targets per vmapped backward pass.")
    edits: tuple = flag("list", ["zero", "scale:2", "set:1"], "Edits of single feature nodes checked in the real "
                        "model: zero, scale:C (activation times C), set:V.", parse=_edits)
    top_nodes: Optional[int] = kit.unset("Feature nodes edited one by one, the most influential (0: all).")
    region_size: int = flag("integer", 10, "Features (the most influential at the last position) whose 2^n subsets "
                            f"are zero-ablated (at most {V.MAX_REGION}).")
    seed: int = flag("integer", 0, "Seed of the training.")
    out: str = kit.out("graph")
    resume: bool = flag("bool", True, "Continue the training checkpointed in --out/checkpoints and the region's "
                        "sweep in --out (else restart them).")

    def check_flags(self) -> None:
        """The training's flags (`kit.DictionaryOptions`), the graph's counts, fractions and sizes in range, a
        non-empty prompt, --transcoders a directory."""
        super().check_flags()
        kit.at_least(self, max_feature_nodes=0, max_n_logits=1, graph_batch=1, top_nodes=0, region_size=1)
        if self.region_size > V.MAX_REGION:
            raise OptionError(f"--region_size={self.region_size}: 2^n subsets are run, n at most {V.MAX_REGION}")
        for name in ("node_threshold", "edge_threshold"):
            if not 0 <= getattr(self, name) <= 1:
                raise OptionError(f"--{name} must lie in [0, 1], got {getattr(self, name)}")
        if not 0 < self.desired_logit_prob <= 1:
            raise OptionError(f"--desired_logit_prob must lie in (0, 1], got {self.desired_logit_prob}")
        if not self.prompt.strip():
            raise OptionError("--prompt is empty")
        if self.transcoders is not None and not os.path.isdir(self.transcoders):
            raise OptionError(f"--transcoders={self.transcoders}: not a directory")

    def check(self, cfg) -> None:
        """--layers within the model's layers."""
        kit.check_layers("layers", self.layers, cfg)

    def trained_layers(self, n_layers: int) -> List[int]:
        """--layers, or `AUTO_LAYERS` evenly spaced layers of a model of n_layers."""
        return sorted(set(self.layers)) or sorted({int((i + 0.5) * n_layers / AUTO_LAYERS) for i in range(AUTO_LAYERS)})


# ---- transcoders ---------------------------------------------------------------------------------

def prompt_tokens(model, prompt: str, separator: int) -> np.ndarray:
    """int32 [T]: the separator, then the prompt's tokens (OptionError naming --prompt when it has none)."""
    ids = model.tokenizer.hf([prompt], add_special_tokens=False)["input_ids"][0]
    if not ids:
        raise OptionError(f"--prompt={prompt!r} has no tokens")
    return np.asarray([separator, *ids], np.int32)


def layer_activations(model, rows: np.ndarray, layers: Sequence[int], separator: int) -> Dict[int, np.ndarray]:
    """{layer: float32 [N, 2 D]}: the MLP's input then output (a transcoder's `stream` rows) at every real,
    non-separator position of token rows `rows` [R, T], one run of the first max(layers) + 1 layers per
    `ROWS_PER_CHUNK` rows (`stream.prefix_cache`)."""
    sites = stream.host_sites(HOST)
    parts: Dict[int, list] = {l: [] for l in layers}
    for start in range(0, len(rows), ROWS_PER_CHUNK):
        tokens = rows[start:start + ROWS_PER_CHUNK]
        mask = np.ones(tokens.shape, np.int32)
        cache = stream.prefix_cache(model.params, model.cfg, tokens, mask, max(layers) + 1, sites)
        keep = tokens != separator
        for l in layers:
            acts = np.concatenate([np.asarray(stream.flat(cache[s], l), np.float32) for s in sites], axis=-1)
            parts[l].append(acts[keep])
    return {l: np.concatenate(p) for l, p in parts.items()}


def load_transcoders(path: str, model) -> List[core.Dictionary]:
    """The transcoders in directory `path`: one `dictionaries.files` format there (circuit-tracer's set),
    else one per subdirectory (SAELens directories)."""
    markers = [f.marker for f in files.FORMATS.values()]
    dirs = [path] if any(os.path.isfile(os.path.join(path, m)) for m in markers) else \
        sorted(d for d in (os.path.join(path, n) for n in os.listdir(path)) if os.path.isdir(d))
    if not dirs:
        raise FileNotFoundError(f"{path} holds no dictionary files ({', '.join(markers)}) and no directories of them")
    loaded = [files.load(d, model.cfg, params=model.params) for d in dirs]
    dicts = [d for x in loaded for d in (x if isinstance(x, list) else [x])]
    bad = sorted({d.host for d in dicts} - {HOST})
    if bad:
        raise ValueError(f"{path}: attribution graphs need transcoders (host {HOST!r}); found {bad} dictionaries")
    return sorted(dicts, key=lambda d: d.layer)


def train_transcoders(model, opts: Options, rows: np.ndarray, layers: Sequence[int], separator: int):
    """{layer: the `train.Training` of its transcoder} on the activations of `rows` (one pass of the
    model, `layer_activations`), checkpointed under --out/checkpoints (a finished one is restored as it
    is with --resume)."""
    checkpoints = os.path.join(opts.out, "checkpoints")
    if not opts.resume:
        shutil.rmtree(checkpoints, ignore_errors=True)
    logging.info("collecting MLP activations of layers %s on %d corpus rows", list(layers), len(rows))
    acts = layer_activations(model, rows, layers, separator)
    return {l: train.train(stream.ArraySource(acts[l], model.cfg.d_model, rows=opts.batch, seed=opts.seed),
                           opts.training(), os.path.join(checkpoints, f"layer_{l}")) for l in layers}


def _transcoders_section(report: Report, dicts, held_out: Dict[int, np.ndarray], runs: dict) -> None:
    evals = {d.layer: evaluate.metrics(d.config, d.params, held_out[d.layer]) for d in dicts}
    rows = [[d.layer, d.config.kind, d.config.width, evals[d.layer].l0, evals[d.layer].explained_variance,
             evals[d.layer].dead_fraction, runs[d.layer].step if d.layer in runs else "-"] for d in dicts]
    report.add("Transcoders",
               "Each reads its layer's MLP input (after the norm) and writes the MLP's output; on held-out corpus "
               "tokens: L0 (active features per token), the explained variance of the MLP's output, the fraction of "
               "features never active there; training steps (- for loaded transcoders).",
               table(["layer", "kind", "width", "L0", "explained variance", "dead fraction", "training steps"], rows))
    report.results["transcoders"] = {l: dataclasses.asdict(m) for l, m in evals.items()}


# ---- the graph -----------------------------------------------------------------------------------

def slug(prompt: str) -> str:
    """A file-name slug of the prompt: lower-case words joined by '-', at most 60 characters."""
    return re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:60] or "graph"


def _node_label(graph: graphs.Graph, i: int, token_str) -> str:
    l, p, f = graph.features[i].tolist()
    return f"L{l}F{f}@{p} {token_str(int(graph.tokens[p]))!r}"


def _top_contexts(model, dicts, graph: graphs.Graph, nodes, eval_rows, separator: int) -> Dict[int, str]:
    """{node: the tokens its feature is largest on over the held-out rows (`evaluate.top_contexts`)}."""
    by_layer = {d.layer: d for d in dicts}
    out = {}
    for l in sorted({int(graph.features[i, 0]) for i in nodes}):
        mine = [int(i) for i in nodes if graph.features[i, 0] == l]
        source = stream.ModelActivations(model.params, model.cfg, eval_rows, HOST, l, separator,
                                         rows_per_chunk=ROWS_PER_CHUNK)
        tops = evaluate.top_contexts(source, by_layer[l], sorted({int(graph.features[i, 2]) for i in mine}), k=3)
        for i in mine:
            cs = tops[int(graph.features[i, 2])]
            out[i] = " ".join(repr(model.tokenizer.token_str(int(c.tokens[c.focus]))) for c in cs) or "never active"
    return out


def _graph_section(report: Report, graph, pruned, scores: dict, token_str, contexts: Dict[int, str]) -> None:
    infl = graphs.influence(graph)
    o = graph.offsets()
    logit_rows = [[repr(token_str(int(v))), float(p)] for v, p in zip(graph.logit_ids, graph.logit_probs)]
    top = V.top_nodes(graph, TOP_FEATURES)
    feat_rows = [[_node_label(graph, i, token_str), float(graph.activations[i]), float(infl[i]),
                  contexts.get(int(i), "-")] for i in top]
    kept = pruned.node_mask[o["features"]].sum()
    report.add("Graph",
               f"{len(graph.features)} feature nodes (of {graph.n_active} active features), {graph.n_layers * graph.n_pos} "
               f"error nodes, {graph.n_pos} tokens, {len(graph.logit_ids)} logit nodes. Pruning keeps {kept} feature "
               f"nodes and {int(pruned.edge_mask.sum())} edges. Replacement score {scores['replacement']:.3f}, "
               f"completeness {scores['completeness']:.3f}. Files: the graph file circuit-tracer's local server and "
               "Neuronpedia read (graphs/), graph.html (a local view: hover a node for its edges).",
               table(["logit node", "probability"], logit_rows),
               "The most influential features (LxFy@p: layer x, feature y at position p; influence on the logits "
               "through every path; top corpus tokens: where the feature is largest on held-out rows):",
               table(["feature", "activation", "influence", "top corpus tokens"], feat_rows))
    report.results["graph"] = {"scores": scores, "logit_ids": graph.logit_ids, "logit_probs": graph.logit_probs,
                               "n_features": len(graph.features), "n_active": graph.n_active,
                               "kept_features": int(kept), "kept_edges": int(pruned.edge_mask.sum()),
                               "top_features": [dict(zip(("layer", "position", "feature"), graph.features[i].tolist()),
                                                     activation=float(graph.activations[i]), influence=float(infl[i]))
                                                for i in top]}


# ---- validation ----------------------------------------------------------------------------------

def node_checks(spliced, graph, run: V.RealRun, edits, nodes) -> Dict[str, dict]:
    """{edit: {'measured' [K], each estimate's values [K] ('<name>_values') and its `V.agreement` with the
    measured ('<name>')}} for the feature nodes `nodes` edited one by one in the real model; the estimates:
    the graph's (the other features responding, 'through_features', or not, 'direct_only') and the real
    model's gradient (`V.node_gradients`), as it is and with its norm scales frozen on the prompt."""
    frozen = dla.freeze_norms(spliced.params, spliced.cfg, graph.tokens[None])
    frozen_run = V.real_run(frozen, spliced.cfg, graph)
    out = {}
    for edit in edits:
        logging.info("editing %d feature nodes (%s) in the real model", len(nodes), edit)
        measured = V.node_effects(spliced.params, spliced.cfg, graph, edit, nodes, run)
        deltas = V.node_deltas(graph, edit, nodes)
        predicted = graphs.predicted_effects(graph, deltas)[:, 0]
        direct = graphs.predicted_effects(graph, deltas, through_features=False)[:, 0]
        gradient = V.node_gradients(spliced.params, spliced.cfg, graph, edit, nodes, run)
        frozen_gradient = V.node_gradients(frozen, spliced.cfg, graph, edit, nodes, frozen_run)
        estimates = {"through_features": predicted, "direct_only": direct, "real_gradient": gradient,
                     "frozen_norms_gradient": frozen_gradient}
        out[str(edit)] = {"measured": measured, **{f"{k}_values": v for k, v in estimates.items()},
                          **{k: V.agreement(measured, v, run.value) for k, v in estimates.items()}}
    return out


def _checks_section(report: Report, checks: Dict[str, dict], run: V.RealRun, token: str) -> None:
    rows = [[edit, how, c[key]["n"], c[key]["pearson"], c[key]["spearman"], c[key]["r2"], c[key]["median_rel_error"],
             c[key]["median_rel_effect"]]
            for edit, c in checks.items() for how, key in (("graph, others respond", "through_features"),
                                                           ("graph, direct only", "direct_only"),
                                                           ("real model's gradient", "real_gradient"),
                                                           ("its gradient, norm scales frozen",
                                                            "frozen_norms_gradient"))]
    report.add("Single-node edits in the real model",
               f"Each feature node among the most influential edited alone at its position in the real model "
               f"(transcoders spliced with their errors kept: the other features, the MLPs, attention and norms respond "
               f"as the model does); measured: the change of the top logit node ({token!r}, demeaned logit "
               f"{run.value:.3f}); predicted: the graph's, with the other feature nodes responding linearly or by "
               "direct edges only, and for reference the real model's own linear estimate (attribution patching: its "
               "gradient times the edit), which differs from the graph's by what the graph freezes (norm scales, "
               "attention patterns, the error nodes: the MLPs without a transcoder whole), and the same with the norm "
               "scales frozen (`methods.dla.freeze_norms`), which separates the norms' part of that gap. Error: median |measured - predicted|, effect: median |measured|, both relative to "
               "the logit node's value.",
               table(["edit", "prediction", "nodes", "Pearson", "Spearman", "R^2", "median error / logit",
                      "median effect / logit"], rows, digits=4))
    report.results["node_checks"] = checks


def _region_section(report: Report, summary: dict, graph, token_str, value: float) -> None:
    names = [_node_label(graph, i, token_str) for i in summary["nodes"]]
    subset = lambda idx: "not reached" if idx is None else "{" + ", ".join(names[i] for i in idx) + "}"
    rows = [[f"{float(f):.0%}", subset(r["measured"]), subset(r["predicted"]),
             "-" if r["top_k_by_influence"] is None else ("yes" if r["top_k_by_influence"] else "no"),
             "-" if r["rank_by_prediction"] is None else r["rank_by_prediction"]]
            for f, r in summary["carrying"].items()]
    fit, direct = summary["fit"], summary["fit_direct"]
    report.add("Region: every subset of the last position's top features",
               f"The {len(names)} most influential feature nodes at the last position, {', '.join(names)}, and all "
               f"{2 ** len(names)} subsets of them zero-ablated at that position in the real model (an exhaustive "
               f"sweep). Graph vs measured over the subsets: R^2 {fit['r2']:.3f}, Pearson {fit['pearson']:.3f} "
               f"(direct edges only: R^2 {direct['r2']:.3f}); additivity (the sum of the single ablations as a "
               f"prediction) R^2 {summary['additivity']:.3f}. Ablating all of them removes "
               f"{summary['removed_all']:.1%} of the logit node's value {value:.3f}; the most any subset removes is "
               f"{summary['removed']:.1%}.",
               table(["removes at least", "smallest subset (measured)", "smallest subset (graph)",
                      "= top-k by influence", "rank by the graph's prediction"], rows))
    report.results["region"] = summary


# ---- findings and the run ------------------------------------------------------------------------

def _findings(report: Report, graph, scores: dict, token_str, checks: Dict[str, dict], summary: dict) -> None:
    token = token_str(int(graph.logit_ids[0]))
    top = V.top_nodes(graph, 3)
    report.finding(f"The model predicts {token!r} with probability {graph.logit_probs[0]:.3f}; the graph "
                   f"({len(graph.features)} feature nodes) has replacement score {scores['replacement']:.3f} and "
                   f"completeness {scores['completeness']:.3f}; its most influential features: "
                   + ", ".join(f"{_node_label(graph, i, token_str)} (activation {graph.activations[i]:.3g})" for i in top)
                   + ".", "graph")
    for edit, c in checks.items():
        t, d, g, f = c["through_features"], c["direct_only"], c["real_gradient"], c["frozen_norms_gradient"]
        report.finding(f"Edit {edit} of {t['n']} single feature nodes in the real model: the graph's predicted change "
                       f"of the {token!r} logit correlates with the measured one at Pearson {t['pearson']:.3f}, "
                       f"Spearman {t['spearman']:.3f} (direct edges only: {d['pearson']:.3f}, {d['spearman']:.3f}); "
                       f"median error {t['median_rel_error']:.2%} of the logit, median measured effect "
                       f"{t['median_rel_effect']:.2%}; the real model's own gradient estimate: Pearson "
                       f"{g['pearson']:.3f} ({f['pearson']:.3f} with its norm scales frozen).", "graph_check")
    carrying = []
    for f, r in summary["carrying"].items():
        if r["measured"] is None:
            carrying.append(f"no subset removes {float(f):.0%} of it")
        else:
            agree = "the graph's top features by influence are that subset" if r["top_k_by_influence"] else \
                "it is not the graph's top features by influence"
            carrying.append(f"the smallest subset removing {float(f):.0%} has {len(r['measured'])} features ({agree}; "
                            f"rank {r['rank_by_prediction']} by the graph's prediction)")
    report.finding(f"Region of the {len(summary['nodes'])} top features at the last position, all subsets ablated: the "
                   f"graph predicts the measured changes with R^2 {summary['fit']['r2']:.3f}; additivity R^2 "
                   f"{summary['additivity']:.3f}; ablating all removes {summary['removed_all']:.1%} of the logit; "
                   + "; ".join(carrying) + ".", "graph_region")


def run(opts: Options) -> str:
    """Run the study; returns the path of report.md."""
    report = Report(opts.out, f"Attribution graph of {opts.prompt!r}")
    model = kit.load(opts)
    train_rows, eval_rows = kit.corpus_rows(model, opts)
    separator = int(train_rows[0, 0])
    tokens = prompt_tokens(model, opts.prompt, separator)
    token_str = model.tokenizer.token_str
    runs = {} if opts.transcoders else train_transcoders(model, opts, train_rows,
                                                          opts.trained_layers(model.cfg.n_layers), separator)
    dicts = load_transcoders(opts.transcoders, model) if opts.transcoders else \
        [tr.dictionary(HOST, l) for l, tr in runs.items()]
    layers = [d.layer for d in dicts]
    report.add("Setup",
               table(["model", "preset", "prompt tokens", "transcoder layers", "source", "logit nodes",
                      "node / edge threshold"],
                     [[opts.model, opts.preset, " ".join(repr(token_str(int(t))) for t in tokens), layers,
                       opts.transcoders or f"trained ({opts.kind}, {len(train_rows)} corpus rows)",
                       f"<= {opts.max_n_logits}, p {opts.desired_logit_prob}",
                       f"{opts.node_threshold} / {opts.edge_threshold}"]]))
    _transcoders_section(report, dicts, layer_activations(model, eval_rows, layers, separator), runs)
    params, cfg = splice.attach(model.params, model.cfg, dicts)
    spliced = dataclasses.replace(model, params=params, cfg=cfg)
    graph = graphs.attribute(params, cfg, tokens, opts.max_n_logits, opts.desired_logit_prob,
                             opts.max_feature_nodes or None, opts.graph_batch)
    try:
        region = V.region(graph, opts.region_size)
    except ValueError as e:
        raise OptionError(f"--region_size={opts.region_size}: {e}") from None
    pruned = graphs.prune(graph, opts.node_threshold, opts.edge_threshold)
    scores = graphs.scores(graph)
    graphs.write_graph_files(graph, pruned, token_str, report.path("graphs"), slug(opts.prompt), opts.model,
                             opts.node_threshold)
    viz.graph_html(graph, pruned, token_str, report.path("graph.html"))
    contexts = _top_contexts(model, dicts, graph, V.top_nodes(graph, TOP_FEATURES), eval_rows, separator)
    _graph_section(report, graph, pruned, scores, token_str, contexts)

    run_ = V.real_run(params, cfg, graph)
    checks = node_checks(spliced, graph, run_, opts.edits, V.top_nodes(graph, opts.top_nodes or None))
    _checks_section(report, checks, run_, token_str(int(graph.logit_ids[0])))
    sweep_dir = report.path("region_sweep")
    if not opts.resume:
        shutil.rmtree(sweep_dir, ignore_errors=True)
    subsets, measured = V.region_sweep(params, cfg, graph, region, sweep_dir, run_)
    summary = V.region_summary(graph, region, subsets, measured, run_.value)
    _region_section(report, summary, graph, token_str, run_.value)
    _findings(report, graph, scores, token_str, checks, summary)
    return report.write()
