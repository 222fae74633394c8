"""The SAE study: an attention-output SAE (host 'head_out', the heads' z concatenated) trained on
activations streamed from the model over the Wikipedia corpus, evaluated on held-out rows, and read
on IOI through the spliced model (see experiments/sae.py for the steps)."""

from __future__ import annotations

import dataclasses
import os
import shutil
from typing import Dict, Optional, Sequence

import numpy as np
from absl import logging

import jaxcircuits as jc
from jaxcircuits.dictionaries import corpus, evaluate, splice, stream, train
from jaxcircuits.dictionaries.attention import head_parts
from jaxcircuits.engine.patching import run_masks
from jaxcircuits.interventions.problem import PatchingProblem
from jaxcircuits.interventions.sites import Mask, unit_label
from jaxcircuits.methods.attribution import attribution_patching
from jaxcircuits.reports import viz
from jaxcircuits.reports.findings import MIN_FEATURE_RECOVERY, cell, premise_findings
from jaxcircuits.reports.report import Report, table
from jaxcircuits.stats.bootstrap import prompt_table
from jaxcircuits.studies import kit
from jaxcircuits.studies.kit import OptionError, flag
from jaxcircuits.tasks import registry

HOST = "head_out"                 # the SAE reads and writes the heads' z concatenated (hook_z)
ROWS_PER_CHUNK = 8                # corpus rows per streamed chunk
# preset -> the values of the options left unset. quick: SmolLM2-135M on 2 CPU cores in under 15
# minutes, at layer 23: `python -m experiments.ioi --n_prompts=8` on it finds its name-mover candidates
# there (L23H3, L23H0, L23H7 patched alone recover 0.67, 0.28, 0.12 of the logit difference; no other
# layer's head recovers more than 0.06 but L29H1, 0.28).
PRESETS: Dict[str, Dict[str, object]] = {
    "quick": dict(layer=23, width=2048, k=32, steps=400, batch=256, lr=1e-3, documents=1200, eval_rows=16,
                  n_prompts=16),
    "full": dict(layer=23, width=9216, k=32, steps=2000, batch=2048, lr=3e-4, documents=0, eval_rows=64,
                 n_prompts=64),
}


@dataclasses.dataclass(frozen=True, kw_only=True)
class Options(kit.DictionaryOptions):
    """The study's options: its binary's flags (`kit.flag` fields); those left None take the preset's value."""

    presets = PRESETS
    preset: str = flag("enum", "quick", "Values of the flags left unset. quick: SmolLM2-135M in 7-8 minutes on 2 "
                       "CPU cores, at layer 23, where its IOI name-mover candidates are (experiments.ioi: L23H3, L23H0 "
                       "and L23H7 patched alone recover 0.67, 0.28 and 0.12 of the logit difference); full: a "
                       "GPU-sized run over the whole corpus.",
                       enum_values=list(PRESETS))
    layer: Optional[int] = kit.unset("Layer of the SAE.")
    n_prompts: Optional[int] = kit.unset("Clean IOI prompts (each with its corrupted twin; >= 2 for intervals).")
    top_features: int = flag("integer", 4, "Features analysed and patched at each IOI position, twice: those of "
                             "the largest clean - corrupted difference and of the largest attribution estimate.")
    seed: int = flag("integer", 0, "Seed of the training and of the prompts.")
    out: str = kit.out("sae")
    resume: bool = flag("bool", True, "Continue the training checkpointed in --out/checkpoints (else restart it).")

    def check_flags(self) -> None:
        """The training's flags (`kit.DictionaryOptions`), the layer and the prompts in range."""
        super().check_flags()
        kit.at_least(self, layer=0, n_prompts=2, top_features=1)
        if self.top_features > self.width:
            raise OptionError(f"--top_features={self.top_features} exceeds --width={self.width}")

    def check(self, cfg) -> None:
        """--layer within the model's layers."""
        kit.check_layers("layer", [self.layer], cfg)


# ---- corpus and training -------------------------------------------------------------------------

def train_sae(model, rows: np.ndarray, separator: int, opts: Options) -> train.Training:
    """The SAE trained on the activations of `rows` (checkpointed under --out/checkpoints)."""
    checkpoints = os.path.join(opts.out, "checkpoints")
    if not opts.resume and os.path.isdir(checkpoints):
        shutil.rmtree(checkpoints)
    source = stream.ModelActivations(model.params, model.cfg, rows, HOST, opts.layer, separator,
                                     rows_per_chunk=ROWS_PER_CHUNK, seed=opts.seed)
    return train.train(source, opts.training(), checkpoints)


def _training_section(report: Report, tr: train.Training, rows: int) -> None:
    h = tr.history
    steps = sorted({0, len(h["loss"]) // 2, len(h["loss"]) - 1})
    report.add("Training",
               f"{tr.step} steps of {tr.options.batch} activations ({tr.step * tr.options.batch:,} tokens drawn from "
               f"{rows} corpus rows through a shuffled buffer of {tr.options.buffer}), `{tr.options.kind}` loss "
               f"({train.LOSSES[tr.options.kind].penalty} as its second term).",
               table(["step", "loss", "MSE", "penalty", "L0", "dead fraction"],
                     [[s + 1, *(float(h[k][s]) for k in train.HISTORY)] for s in steps]))
    report.results["training"] = dict(h)


# ---- evaluation ----------------------------------------------------------------------------------

def evaluation(model, dictionary, held_out: stream.ModelActivations) -> dict:
    """Metrics and CE losses (`evaluate.ce_losses`: spliced, the reconstruction replaces the host
    activation, the error dropped) of the dictionary on the held-out rows."""
    acts, keep = held_out.run(np.arange(len(held_out.tokens)))
    m = evaluate.metrics(dictionary.config, dictionary.params, acts[keep])
    ce = evaluate.ce_losses(model.params, model.cfg, dictionary, held_out.tokens, separator=held_out.separator)
    return {**dataclasses.asdict(m), "ce": dataclasses.asdict(ce), "tokens": int(keep.sum())}


def _evaluation_section(report: Report, ev: dict, rows: int) -> None:
    ce = ev["ce"]
    report.add("Evaluation (held-out corpus rows)",
               f"{ev['tokens']:,} tokens of {rows} corpus rows never trained on. CE loss recovered = "
               "(zero-ablated - spliced) / (zero-ablated - clean): the next-token loss with the SAE's "
               "reconstruction in place of the layer's head outputs, between the clean run (1) and the run "
               "with them zeroed (0).",
               table(["L0", "explained variance", "dead fraction", "MSE", "CE clean", "CE spliced", "CE zero-ablated",
                      "CE loss recovered"],
                     [[ev["l0"], ev["explained_variance"], ev["dead_fraction"], ev["mse"], ce["clean"], ce["spliced"],
                       ce["ablated"], ce["recovered"]]]))
    report.results["evaluation"] = ev


# ---- IOI through the spliced model ---------------------------------------------------------------

def ioi_positions(task: registry.TaskBatches) -> Dict[str, np.ndarray]:
    """{position name: int [B] slot per prompt}: the final position (where the name movers write)
    and S2, the clean prompt's last occurrence of the subject's token (where S-inhibition reads).
    Clean and corrupted prompts share their slots (same template and token length)."""
    ids, s_token = np.asarray(task.source_ids), np.asarray(task.source_metric.bad)[:, 0]
    T = ids.shape[1]
    s2 = np.asarray([T - 1 - int(np.argmax(row[::-1] == s)) for row, s in zip(ids, s_token)])
    return {"final": np.full(len(ids), T - 1), "S2": s2}


def _at(cache_entry, layer: int, slots: np.ndarray) -> np.ndarray:
    """One layer's activation at one slot per prompt: [B, ...] of an entry [L, B, T, ...]."""
    return np.asarray(cache_entry[layer])[np.arange(len(slots)), slots]


def feature_differences(spliced, dictionary, task, slots: Dict[str, np.ndarray], top: int, seed: int) -> dict:
    """Per IOI position (`spliced`: the model with `dictionary` spliced in, error kept): the `top`
    features with the largest |mean clean - corrupted| activation, the difference's `prompt_table`
    (intervals over prompts), their mean activations, and each feature's direct attribution by head
    on the clean prompts (mean `head_parts` [H] over prompts)."""
    runs = [jc.run_with_cache(spliced.params, spliced.cfg, ids, np.asarray(mask), sites=("features", HOST))[1]
            for ids, mask in ((task.source_ids, task.source_attn_mask), (task.target_ids, task.target_attn_mask))]
    dc, p, layer = dictionary.config, dictionary.params, dictionary.layer
    out = {}
    for name, s in slots.items():
        clean, corrupted = (_at(r["features"], layer, s) for r in runs)               # [B, F]
        diff = clean - corrupted
        order = np.argsort(-np.abs(diff.mean(0)), kind="stable")[:top]
        parts = np.asarray(head_parts(dc, p, _at(runs[0][HOST], layer, s))[0]).mean(0)    # [H, F]
        out[name] = {"features": order.tolist(), "clean": clean[:, order].mean(0),
                     "corrupted": corrupted[:, order].mean(0),
                     "difference": prompt_table(diff[:, order].T, seed=seed), "heads": parts[:, order].T}
    return out


def _heads(parts: np.ndarray, layer: int, n: int = 2) -> str:
    """The n heads with the largest |part| of one feature's per-head parts [H], with their shares."""
    share = parts / max(np.abs(parts).sum(), 1e-30)
    return ", ".join(f"{unit_label(HOST, (layer, int(h)))} {share[h]:+.0%}" for h in np.argsort(-np.abs(parts))[:n])


def _features_section(report: Report, diffs: dict, layer: int, top_tokens: Dict[int, str]) -> None:
    parts = []
    for name, d in diffs.items():
        rows = [[f, cell(d["difference"], "mean", i), float(d["clean"][i]), float(d["corrupted"][i]),
                 _heads(d["heads"][i], layer), top_tokens.get(f, "-")] for i, f in enumerate(d["features"])]
        parts += [f"At the {name} position:",
                  table(["feature", "clean - corrupted (95% prompts)", "clean", "corrupted", "heads it reads "
                         "(share of its pre-activation, clean)", "top corpus tokens"], rows)]
    report.add("IOI features", "Feature activations of the SAE at the final position (where name movers write "
               "the answer) and at S2 (the repeated subject, where S-inhibition heads read), on clean prompts and "
               "their corrupted twins (three other names); the features whose mean differs most. Heads: direct "
               "feature attribution (the encoder reads z concatenated, so a pre-activation splits into one part "
               "per head). Top corpus tokens: the tokens where the feature is largest on the held-out rows "
               "(feature_contexts.html).", *parts)
    report.results["ioi_features"] = diffs


def position_problems(spliced, task, slots: Dict[str, np.ndarray]) -> Dict[str, PatchingProblem]:
    """{position set: the IOI patching problem of the spliced model's 'features' (clean -> corrupted)
    with weight 1 at those slots only}: each position alone, then all of them."""
    base = kit.problem(spliced, task, ("features",))
    sets = {**{n: [n] for n in slots}, " + ".join(slots): list(slots)}
    out = {}
    for label, names in sets.items():
        pos_w = np.zeros(base.pos_w.shape, np.float32)
        for n in names:
            pos_w[np.arange(len(pos_w)), slots[n]] = 1
        out[label] = PatchingProblem.make(base.target, base.source, pos_w, base.metric)
    return out


def attributed(spliced, problems: Dict[str, PatchingProblem], layer: int, top: int, gap: float) -> Dict[str, tuple]:
    """{position set: (the `top` features with the largest attribution-patching estimate of their
    recovery, the estimates)}: the estimated change of the mean logit difference over the gap
    clean - corrupted (one backward pass per set)."""
    out = {}
    for label, problem in problems.items():
        est = attribution_patching(spliced.params, spliced.cfg, problem, "features")[layer] / gap
        order = np.argsort(-est, kind="stable")[:top]
        out[label] = (order.tolist(), est[order])
    return out


def patching_rows(spliced, problems: Dict[str, PatchingProblem], layer: int,
                  selections: Dict[str, Dict[str, Sequence[int]]]) -> Dict[str, list]:
    """Feature patching clean -> corrupted through the spliced model (error kept): {position set:
    [(row name, metric [B])]} for each selection of features {name: features} of that set and for
    every feature of the layer, patched at the set's slots only (one batched call per set)."""
    cfg = spliced.cfg
    out = {}
    for label, problem in problems.items():
        chosen = selections[label]
        masks = np.zeros((len(chosen) + 1, cfg.n_layers, cfg.dict_width), np.float32)
        for i, features in enumerate(chosen.values()):
            masks[i, layer, list(features)] = 1
        masks[-1, layer] = 1
        metric = run_masks(spliced.params, cfg, problem, Mask(features=masks))
        names = [f"top features by {how}" for how in chosen] + [f"all {cfg.dict_width} features"]
        out[label] = list(zip(names, metric))
    return out


def _patching_section(report: Report, rows: Dict[str, list], baselines, ranked: Dict[str, tuple],
                      top_tokens: Dict[int, str], seed: int) -> dict:
    names = [(label, name) for label, rs in rows.items() for name, _ in rs]
    t = prompt_table(np.stack([m for rs in rows.values() for _, m in rs]), *baselines, seed=seed)
    est = "; ".join(f"{label}: " + ", ".join(f"{f} ({e:+.2f}; {top_tokens[f]})" for f, e in zip(*fe))
                    for label, fe in ranked.items())
    report.add("Feature patching (confirmation)",
               "On the spliced model (the SAE's error kept, so the unpatched run is the model's own), features' "
               "activations patched from each clean prompt into its corrupted twin at the named positions only; "
               "recovery = (patched - corrupted) / (clean - corrupted) of the mean logit difference IO - S. "
               "Top features by difference: those of the section above (both positions' for the set of both). By "
               "attribution: the largest attribution-patching estimates of their recovery (the gradient of the "
               f"mean logit difference in the feature mask, over the gap; then their top corpus tokens), {est}. "
               "'All features' patches the whole reconstruction there (the error stays corrupted): the most a "
               "feature patch can recover.",
               table(["positions", "patch", "mean logit difference (95% prompts)", "recovery (95% prompts)"],
                     [[*n, cell(t, "mean", i), cell(t, "recovery", i, ".2f")] for i, n in enumerate(names)]))
    report.results["feature_patching"] = {"rows": names, "attribution": ranked, **t}
    return t


def _findings(report: Report, ev: dict, diffs: dict, rows: Dict[str, list], patch: dict, layer: int) -> None:
    ce = ev["ce"]
    report.finding(f"The SAE at layer {layer} explains {ev['explained_variance']:.1%} of the held-out head-output "
                   f"variance with L0 {ev['l0']:.1f}; spliced in, it recovers {ce['recovered']:.1%} of the CE loss "
                   f"(clean {ce['clean']:.3f}, spliced {ce['spliced']:.3f}, zero-ablated {ce['ablated']:.3f}); "
                   f"{ev['dead_fraction']:.1%} of its features never fire there.", "dictionary")
    for name, d in diffs.items():
        t, f = d["difference"], d["features"][0]
        lo, hi = t["mean_lo"][0], t["mean_hi"][0]
        verdict = "differs" if (lo is not None and lo > 0) or (hi is not None and hi < 0) else "no difference resolved"
        report.finding(f"At the {name} position, feature {f} moves most between clean and corrupted prompts: "
                       f"{cell(t, 'mean', 0)} ({verdict}); it reads mostly from {_heads(d['heads'][0], layer)}.",
                       "features")
    rec = lambda i: cell(patch, "recovery", i, ".2f")
    above = lambda i: patch["recovery_lo"][i] is not None and patch["recovery_lo"][i] > MIN_FEATURE_RECOVERY
    i = 0
    for label, rs in rows.items():
        parts = [f"the {name} recover {rec(i + j)} of the logit difference "
                 f"({'confirmed' if above(i + j) else 'not confirmed'})" for j, (name, _) in enumerate(rs[:-1])]
        i += len(rs)
        report.finding(f"At {label}, patching " + "; ".join(parts) + f"; all features there: {rec(i - 1)}.",
                       "feature_patch")


def _contexts(model, dictionary, held_out, features: Sequence[int], report: Report) -> Dict[int, str]:
    """Top activating contexts of `features` on the held-out rows as HTML; {feature: its top tokens}."""
    tops = evaluate.top_contexts(held_out, dictionary, features, k=8)
    viz.feature_contexts_html(tops, model.tokenizer.token_str, report.path("feature_contexts.html"),
                              f"Top activating contexts, layer {dictionary.layer} {HOST} SAE")
    return {f: " ".join(repr(model.tokenizer.token_str(int(c.tokens[c.focus]))) for c in cs[:3]) or "never active"
            for f, cs in tops.items()}


def run(opts: Options) -> str:
    """Run the study; returns the path of report.md."""
    report = Report(opts.out, f"SAE: an attention-output dictionary at layer {opts.layer}, evaluated and read on IOI")
    model = kit.load(opts)
    train_rows, eval_rows = kit.corpus_rows(model, opts)
    separator = int(train_rows[0, 0])
    report.add("Setup",
               table(["model", "preset", "layer", "host", "kind", "width", "k", "corpus rows (train / held out)",
                      "seq_len", "IOI prompts", "seed"],
                     [[opts.model, opts.preset, opts.layer, HOST, opts.kind, opts.width,
                       opts.k if opts.kind == "topk" else "-", f"{len(train_rows)} / {len(eval_rows)}", opts.seq_len,
                       opts.n_prompts, opts.seed]]),
               f"Corpus: {corpus.PACKAGE}'s English Wikipedia lead sections (CC BY-SA 4.0), "
               f"{opts.documents or 'all'} documents.")
    logging.info("training on %d rows", len(train_rows))
    tr = train_sae(model, train_rows, separator, opts)
    _training_section(report, tr, len(train_rows))
    dictionary = tr.dictionary(HOST, opts.layer)
    held_out = stream.ModelActivations(model.params, model.cfg, eval_rows, HOST, opts.layer, separator,
                                       rows_per_chunk=ROWS_PER_CHUNK)
    logging.info("evaluating on %d held-out rows", len(eval_rows))
    ev = evaluation(model, dictionary, held_out)
    _evaluation_section(report, ev, len(eval_rows))

    task = registry.build("ioi", model.tokenizer, opts)
    clean_m, corrupted_m = kit.baselines(model, task)
    base = prompt_table(np.stack([clean_m, corrupted_m]), contrasts=[(0, 1)], seed=opts.seed)
    for statement, rule in premise_findings(base, ["clean", "corrupted"], 0, 1, kind="runs")[1]:
        report.finding(statement, rule)
    slots = ioi_positions(task)
    params, cfg = splice.attach(model.params, model.cfg, [dictionary])
    spliced = dataclasses.replace(model, params=params, cfg=cfg)
    diffs = feature_differences(spliced, dictionary, task, slots, opts.top_features, opts.seed)
    problems = position_problems(spliced, task, slots)
    ranked = attributed(spliced, problems, opts.layer, opts.top_features, float(clean_m.mean() - corrupted_m.mean()))
    features = sorted({f for d in diffs.values() for f in d["features"]} | {f for fs, _ in ranked.values() for f in fs})
    top_tokens = _contexts(model, dictionary, held_out, features, report)
    _features_section(report, diffs, opts.layer, top_tokens)
    selections = {label: {"difference": sorted({f for n in label.split(" + ") for f in diffs[n]["features"]}),
                          "attribution": ranked[label][0]} for label in problems}
    rows = patching_rows(spliced, problems, opts.layer, selections)
    patch = _patching_section(report, rows, (clean_m, corrupted_m), ranked, top_tokens, opts.seed)
    _findings(report, ev, diffs, rows, patch, opts.layer)
    return report.write()
