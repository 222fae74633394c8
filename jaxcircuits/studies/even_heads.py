"""The even-heads decimal-comparison study (see experiments/even_heads.py for the steps)."""

from __future__ import annotations

import dataclasses
import os
from typing import Optional, Tuple

import jax.numpy as jnp
import numpy as np
from absl import logging

from jaxcircuits import analysis
from jaxcircuits import positions as P
from jaxcircuits.formats import encode_prompt
from jaxcircuits.generate import decode_intervention, source_at_position
from jaxcircuits.models.transformer import run_with_cache
from jaxcircuits.patching import PatchingProblem, run_masks, target_run
from jaxcircuits.report import Report, add_sweep_analysis, table
from jaxcircuits.sites import Intervention, Mask
from jaxcircuits import sites
from jaxcircuits.studies.common import OptionError, check_layers, load_model, unpatched_metric
from jaxcircuits.subsets import Pool, all_subsets, sampled_per_size
from jaxcircuits.sweep import blend_crossing, run_sweep
from jaxcircuits.tasks import decimals as D


@dataclasses.dataclass(frozen=True)
class Options:
    model: str
    dtype: str
    protocols: Tuple[str, ...]
    source_format: str
    target_format: str
    scan_formats: Tuple[str, ...]
    n_pairs: int
    sweep_layers: Tuple[int, ...]
    top_layers: int
    n_blocks: Optional[int]
    max_new_tokens: int
    confirm: int
    chunk_size: int
    seed: int
    out: str
    resume: bool
    samples_per_size: int = 200


def format_scan(model, pairs, formats, max_new) -> dict:
    """Per format: first-token logit difference, teacher-forced log-odds, generation verdicts."""
    out = {}
    for fmt in formats:
        b = D.build_batch(pairs, fmt, model.tokenizer)
        first = unpatched_metric(model, b.ids, b.mask, b.metric)
        tf = D.build_teacher_forced(pairs, fmt, model.tokenizer)
        lp = [unpatched_metric(model, tf.ids[i], tf.mask[i], m) for i, m in enumerate((tf.good, tf.bad))]
        ids, mask = model.tokenizer.pad([encode_prompt(fmt, p.question, model.tokenizer) for p in pairs], "left")
        texts = model.complete_ids(ids, mask, max_new)
        out[fmt] = {"first_token_logit_diff": first, "teacher_forced_log_odds": lp[0] - lp[1],
                    "generation": texts, "strict": [D.classify_generation(t, p) for t, p in zip(texts, pairs)],
                    "loose": [D.classify_generation_loose(t, p) for t, p in zip(texts, pairs)]}
    return out


def _format_section(report, scan, pairs):
    rows = []
    for fmt, r in scan.items():
        rows.append([fmt, float(np.mean(r["first_token_logit_diff"])), f"{np.mean(r['first_token_logit_diff'] > 0):.0%}",
                     float(np.mean(r["teacher_forced_log_odds"])),
                     " / ".join(str(r["strict"].count(v)) for v in ("correct", "wrong", "unclear")),
                     " / ".join(str(r["loose"].count(v)) for v in ("correct", "wrong", "unclear")),
                     repr(r["generation"][0][:60])])
    cases = [(p.question, a, b) for i, p in enumerate(pairs) for a in scan for b in scan
             if scan[a]["first_token_logit_diff"][i] > 0 > scan[b]["first_token_logit_diff"][i]]
    report.add("Format scan",
               f"{len(pairs)} pairs (the study's 9.8 vs 9.11 first). Logit metrics: first distinguishing answer "
               "token (good - bad, > 0 = right) and teacher-forced log p(good answer) - log p(bad answer). "
               "Generation verdicts (correct / wrong / unclear) by the original strict classifier and a loose one "
               "that also accepts a bare leading number.",
               table(["format", "mean first-token diff", "pairs right", "mean log-odds", "strict c/w/u",
                      "loose c/w/u", "9.8 vs 9.11 generation"], rows),
               f"Cases where a pair is right in one format and wrong in another (logit metric): {len(cases)}. "
               + "; ".join(f"{q} right in `{a}`, wrong in `{b}`" for q, a, b in cases[:8]))
    report.results["format_scan"] = scan
    report.results["format_cases"] = cases


def _layer_scan(model, problem, opts, report):
    cfg = model.cfg
    m = np.zeros((cfg.n_layers, cfg.n_layers, cfg.n_heads), np.float32)
    m[np.arange(cfg.n_layers), np.arange(cfg.n_layers)] = 1.0
    vals = run_masks(model.params, cfg, problem, Mask(head_out=m), chunk_size=opts.chunk_size).mean(-1)
    from jaxcircuits import plots
    fig = plots.plot_layer_curve(vals, report.path("layer_scan.png"), baselines=report.results["baselines"])
    report.add("Layer scan (heads protocol)",
               "Every head of one layer patched at once (source -> target, token-matched positions, prefill only); "
               "mean first-token logit difference over pairs.",
               table(["layer", "mean metric"], [[l, float(v)] for l, v in enumerate(vals)]), report.figure(fig, "layer scan"))
    report.results["layer_scan"] = vals
    return [int(l) for l in np.argsort(-vals)[:opts.top_layers]]


def _protocol_problem(protocol, src, tgt, cache, target) -> PatchingProblem:
    """The protocol's patching problem: token-matched positions (heads) or left-aligned (original)."""
    if protocol == "heads":
        pos_map = P.token_matched(tgt.ids, tgt.mask, src.ids, src.mask)
    else:
        pos_map = P.left_aligned(tgt.mask, src.mask)
    return PatchingProblem.make(target, P.align(cache, pos_map), P.weights("all", pos_map), tgt.metric)


def _pool(model, protocol, layer, opts):
    if protocol == "heads":
        return Pool.heads(layer, model.cfg.n_heads)
    return Pool.blocks(layer, opts.n_blocks or model.cfg.n_heads)


EXHAUSTIVE_MAX_UNITS = 16


def _rates_text(rates) -> str:
    return " ".join(f"{int(k)}:{r:.2f}" for k, r in zip(rates["k"], rates["rate"]))


def _restricted_rates(subsets, success, units):
    """Success rate by size among subsets using only `units`."""
    others = np.setdiff1d(np.arange(subsets.shape[1]), units)
    keep = ~subsets[:, others].any(1)
    return analysis.rate_by_size(subsets[keep][:, units], success[keep])


def _generation_check(model, protocol, pairs, layer, pool, named, opts, gen):
    """Greedy text under each named subset's mask with the protocol's phases; verdict counts."""
    shape = pool.site_shape(model.cfg)
    rows = []
    for name, units in named:
        bits = np.zeros(pool.n, bool)
        bits[list(units)] = True
        mask = Mask(**{pool.site: pool.scatter(bits, shape)})
        kw = {"prefill": Intervention(mask, gen["aligned"], jnp.asarray(gen["pos_w"]))}
        if protocol == "original":
            kw["decode"] = decode_intervention(mask, gen["decode_source"])
        texts = model.complete_ids(gen["ids"], gen["mask"], opts.max_new_tokens, **kw)
        verdicts = [D.classify_generation(t, p) for t, p in zip(texts, pairs)]
        rows.append([name, len(units), verdicts.count("correct"), verdicts.count("wrong"),
                     verdicts.count("unclear"), repr(texts[0][:50])])
    return rows


def _sweep_protocol(model, protocol, layer, problem, pairs, gen, opts, report):
    """Sweeps, blend crossing and generation checks of one protocol at one layer."""
    cfg = model.cfg
    pool = _pool(model, protocol, layer, opts)
    n = pool.n
    even, odd = np.arange(0, n, 2), np.arange(1, n, 2)
    name = f"{protocol} protocol, layer {layer}"

    def sweep(tag, sub_pool, family):
        return run_sweep(model.params, cfg, problem, sub_pool, family,
                         os.path.join(opts.out, "sweeps", f"{protocol}_L{layer}_{tag}"), chunk_size=opts.chunk_size,
                         resume=opts.resume, describe={"model": opts.model, "protocol": protocol})

    fam_rows = []
    if n <= EXHAUSTIVE_MAX_UNITS:
        # One exhaustive sweep holds every even-only and odd-only subset too.
        res = sweep("all", pool, all_subsets(n))
        subsets, metric = res.subsets(n), res.metric
        success = analysis.success_from(metric, "positive")
        for fam, units in (("all units", np.arange(n)), ("even units only", even), ("odd units only", odd)):
            r = _restricted_rates(subsets, success, units)
            fam_rows.append([fam, len(units), "exhaustive", _rates_text(r)])
    else:
        # e.g. Llama-3.1-8B's 32 heads: all 2^16 subsets of the even and of the odd units,
        # and a stratified sample over all units.
        for fam, units in (("even units only", even), ("odd units only", odd)):
            sub = Pool(pool.site, tuple(pool.units[i] for i in units), pool.n_blocks)
            r = sweep(fam.split()[0], sub, all_subsets(len(units)))
            rates = analysis.rate_by_size(r.subsets(len(units)), analysis.success_from(r.metric, "positive"))
            fam_rows.append([fam, len(units), "exhaustive", _rates_text(rates)])
        res = sweep("sampled", pool, sampled_per_size(n, range(n + 1), opts.samples_per_size, opts.seed))
        subsets, metric = res.subsets(n), res.metric
        success = analysis.success_from(metric, "positive")
        fam_rows.insert(0, ["all units", n, f"{opts.samples_per_size} per size",
                            _rates_text(analysis.rate_by_size(subsets, success))])
    summary = add_sweep_analysis(report, name, subsets, metric, pool.labels())
    # Blend weight of the whole layer (the original's "60% pattern replacement").
    whole = Mask(attn_out=jnp.zeros(cfg.n_layers).at[layer].set(1.0))
    cross = blend_crossing(model.params, cfg, problem, whole, tol=1e-2)
    named = [("all", range(n)), ("even", even), ("odd", odd), ("first half", range(n // 2))]
    minimal = analysis.minimal_sufficient(subsets, success)
    maximal = analysis.maximal_insufficient(subsets, success)
    named += [(f"minimal {np.flatnonzero(s).tolist()}", np.flatnonzero(s)) for s in minimal[:opts.confirm // 2]]
    named += [(f"maximal insufficient {np.flatnonzero(s).tolist()}", np.flatnonzero(s))
              for s in maximal[:opts.confirm - opts.confirm // 2]]
    gen_rows = _generation_check(model, protocol, pairs, layer, pool, named, opts, gen[protocol])
    report.add(f"{name}: even vs odd, blend, generation",
               "Success rate by subset size within each family (k:rate):",
               table(["family", "units", "subsets", "rate by k"], fam_rows),
               "Whole-layer blend weight where the mean metric crosses 0: " + (
                   "none in [0, 1]." if cross["crossing"] is None else f"{cross['low']:.3f}..{cross['high']:.3f}."),
               "Greedy generation under named and boundary subsets (strict classifier verdict counts over pairs):",
               table(["subset", "size", "correct", "wrong", "unclear", "9.8 vs 9.11 text"], gen_rows))
    return {"summary": summary, "families": fam_rows, "blend": cross, "generation": gen_rows,
            "rate_all": float(success.mean())}


def _generation_inputs(model, pairs, opts):
    """Per protocol: prompt-only target ids/mask, aligned source, position weights, decode source."""
    tok = model.tokenizer
    src_ids, src_mask = tok.pad([encode_prompt(opts.source_format, p.question, tok) for p in pairs], "left")
    tgt_ids, tgt_mask = tok.pad([encode_prompt(opts.target_format, p.question, tok) for p in pairs], "left")
    _, cache = run_with_cache(model.params, model.cfg, src_ids, jnp.asarray(src_mask), sites=("head_out", "attn_out"))
    out = {}
    for protocol, pos_map in (("heads", P.token_matched(tgt_ids, tgt_mask, src_ids, src_mask)),
                              ("original", P.left_aligned(tgt_mask, src_mask))):
        out[protocol] = {"ids": tgt_ids, "mask": tgt_mask, "aligned": P.align(cache, pos_map),
                         "pos_w": P.weights("all", pos_map),
                         "decode_source": source_at_position(cache, np.argmax(src_mask, axis=1))}
    return out


def _choose_formats(opts: Options, scan: dict, report: Report) -> Options:
    """Resolve 'auto' formats: source = best mean first-token logit difference, target = worst."""
    ranked = sorted(scan, key=lambda f: float(np.mean(scan[f]["first_token_logit_diff"])))
    source = ranked[-1] if opts.source_format == "auto" else opts.source_format
    target = next(f for f in ranked if f != source) if opts.target_format == "auto" else opts.target_format
    if source == target:
        raise ValueError(f"source and target format are both {source!r}")
    if (source, target) != (opts.source_format, opts.target_format):
        report.add("Formats chosen", f"'auto' picked source `{source}` (highest mean first-token difference) and "
                   f"target `{target}` (lowest) from the format scan.")
    return dataclasses.replace(opts, source_format=source, target_format=target)


def check_options(opts: Options, cfg) -> None:
    """The options against the model's config (OptionError naming the flag)."""
    check_layers("sweep_layers", opts.sweep_layers, cfg)
    if opts.n_blocks is not None:
        if "original" not in opts.protocols:
            raise OptionError(f"--n_blocks={opts.n_blocks} applies only to the original protocol "
                              "(--protocol=original or both)")
        try:
            sites.get("attn_block").shape(cfg, opts.n_blocks)
        except ValueError as e:
            raise OptionError(f"--n_blocks: {e}") from None
    if not 1 <= opts.top_layers <= cfg.n_layers:
        raise OptionError(f"--top_layers={opts.top_layers} out of range [1, {cfg.n_layers}]")


def run(opts: Options) -> str:
    """Run the study; returns the path of report.md."""
    report = Report(opts.out, "Even heads: format-dependent decimal comparison")
    model = load_model(opts.model, opts.dtype)
    cfg = model.cfg
    check_options(opts, cfg)
    pairs = [D.STUDY_PAIR] + D.generate_pairs(opts.n_pairs, opts.seed)
    report.add("Setup", table(["model", "layers", "heads / KV heads", "d_model", "pairs", "source -> target"],
                              [[opts.model, cfg.n_layers, f"{cfg.n_heads} / {cfg.n_kv_heads}", cfg.d_model, len(pairs),
                                f"{opts.source_format} -> {opts.target_format}"]]))
    logging.info("format scan over %s", opts.scan_formats)
    scan = format_scan(model, pairs, opts.scan_formats, opts.max_new_tokens)
    _format_section(report, scan, pairs)
    opts = _choose_formats(opts, scan, report)

    src = D.build_batch(pairs, opts.source_format, model.tokenizer)
    tgt = D.build_batch(pairs, opts.target_format, model.tokenizer)
    _, cache = run_with_cache(model.params, cfg, src.ids, jnp.asarray(src.mask), sites=("head_out", "attn_out"))
    base = {"source": float(np.mean(unpatched_metric(model, src.ids, src.mask, src.metric))),
            "target": float(np.mean(unpatched_metric(model, tgt.ids, tgt.mask, tgt.metric)))}
    report.results["baselines"] = base
    report.add("Baselines", f"Mean first-token logit difference: source ({opts.source_format}) {base['source']:.3f}, "
               f"target ({opts.target_format}) {base['target']:.3f}. A patch 'succeeds' on a pair when the "
               "patched target's difference is > 0; a subset succeeds when the mean over pairs is > 0.")
    target = target_run(model.params, cfg, tgt.ids, tgt.mask)
    problems = {p: _protocol_problem(p, src, tgt, cache, target) for p in ("heads", "original")}
    layers = list(opts.sweep_layers) or _layer_scan(model, problems["heads"], opts, report)
    gen = _generation_inputs(model, pairs, opts)
    compare = []
    for layer in layers:
        for protocol in opts.protocols:
            logging.info("sweep: %s protocol, layer %d", protocol, layer)
            r = _sweep_protocol(model, protocol, layer, problems[protocol], pairs, gen, opts, report)
            th = r["summary"]["threshold"]
            compare.append([protocol, layer, r["summary"]["n_units"], f"{r['rate_all']:.2f}",
                            th["k_star"], th["sharpness"], r["summary"]["monotonicity"]["monotone"],
                            r["summary"]["symmetric"], r["summary"]["minimal_sufficient"]["count"],
                            r["blend"]["crossing"]])
            report.results[f"{protocol}_L{layer}"] = r
    report.add("Protocols side by side",
               table(["protocol", "layer", "units", "subsets succeeding", "k*", "sharpness (k10-k90)",
                      "monotone", "depends only on |S|", "minimal sufficient sets", "blend crossing"], compare))
    return report.write()
