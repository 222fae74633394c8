"""A sweep summary (`stats.summary.summarize`) in words: its Markdown section, and the findings
stated from the numbers by fixed rules (`FINDING_RULES`), each with the rule it follows."""

from __future__ import annotations

import itertools
import math
from typing import Optional, Sequence

import numpy as np

from jaxcircuits.stats.summary import MIN_UNITS, braces

SHARP_WIDTH = 1.0             # a 10%->90% transition this narrow (one size step) is "sharp"
FIT_ACCURACY = 0.95           # a linear threshold fit this accurate is named among the findings
MIN_FEATURE_RECOVERY = 0.01   # a feature patch confirms its features when its recovery's interval lies above this


# ----------------------------------------------------------------------------- markdown of a summary

def _fmt(x, digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def interval(lo, hi, spec: str = ".2f", missing: str = "not reached") -> str:
    """An interval 'lo..hi' in format `spec`; None ends (JSON for inf, or NaN) read `missing`."""
    end = lambda x: missing if x is None else format(x, spec)
    return f"{end(lo)}..{end(hi)}"


def cell(table: dict, key: str, i: int, spec: str = "+.3f") -> str:
    """Row i of a `prompt_table` statistic with its interval: '+0.044 (-0.118..+0.225)'."""
    value = table[key][i]
    ends = interval(table[key + "_lo"][i], table[key + "_hi"][i], spec, "-")
    return f"{'-' if value is None else format(value, spec)} ({ends})"


def _not_defined(summary: dict, key: str) -> Optional[str]:
    reason = summary.get("undefined", {}).get(key)
    return None if reason is None else f"not defined: {reason}."


def _k(x, digits: int = 2) -> str:
    """A threshold statistic: None (not reached) -> 'not reached'."""
    return "not reached" if x is None else str(x) if isinstance(x, int) else f"{x:.{digits}f}"


def threshold_cell(summary: dict, stat: str) -> str:
    """A `THRESHOLD_STATS` value of a `summarize` dict with its prompt interval: '6 (prompts 95%:
    5.00..not reached)'; 'not defined' when the threshold is not."""
    if "threshold" in summary["undefined"]:
        return "not defined"
    pi = summary["prompt_intervals"]
    return _k(summary["threshold"][stat]) + (f" (prompts 95%: {interval(*pi['threshold'][stat])})" if pi else "")


def _threshold_line(summary: dict) -> str:
    th = summary["threshold"]
    if _not_defined(summary, "threshold"):
        return "Threshold: " + _not_defined(summary, "threshold")
    return (f"Threshold k* = {threshold_cell(summary, 'k_star')}; interpolated k50 = {_k(th['k50'])}; "
            f"10%->90% transition from k = {_k(th['k10'])} to {_k(th['k90'])}, width "
            f"{threshold_cell(summary, 'sharpness')}.")


def report_markdown(summary: dict, level: int = 3) -> str:
    """A Markdown report of a `summarize` dict, its headings at `level` (3: to sit inside a report's
    '##' section; no title of its own)."""
    h = "#" * level + " "
    names = summary["unit_names"]
    rates, mono, fit, pi = (summary[k] for k in ("rate_by_size", "monotonicity", "linear_fit", "prompt_intervals"))
    crit, n_prompts = summary.get("criterion"), summary.get("n_prompts")
    prompt_ci = ([interval(a, b, missing="-") for a, b in zip(pi["rate_lo"], pi["rate_hi"])] if pi else
                 [f"not defined ({n_prompts or 1} prompt)"] * len(rates["k"]))
    lines = [
        f"{summary['n_subsets']} subsets of {summary['n_units']} units"
        f" ({'exhaustive' if summary['exhaustive'] else 'not exhaustive'})"
        + (f", {n_prompts} prompts" if n_prompts else "") + ".",
        *([f"Success: {crit['description']}."] if crit else []),
        *([f"Closest to succeeding: {summary['best']['text']}."] if summary.get("best") else []), "",
        h + "Success rate by size", "",
        "Two axes of uncertainty. Subsets: 'exact' where every subset of a size ran, else a Wilson 95% "
        "interval over the sampled subsets. Prompts: the prompts are a sample, so each rate is recomputed on "
        + (f"the {pi['n_prompts']} prompts resampled with replacement (percentile bootstrap, "
           f"{pi['n_resamples']} resamples, seed {pi['seed']})." if pi else
           "resampled prompts, which needs at least 2 prompts: not defined here."), "",
        "| k | count | successes | rate | subsets 95% | prompts 95% |", "|---|---|---|---|---|---|",
        *(f"| {k} | {c} | {s} | {_fmt(r)} | {'exact' if e else interval(lo, hi)} | {p} |"
          for k, c, s, r, lo, hi, e, p in zip(*(rates[f] for f in ("k", "count", "successes", "rate", "lo", "hi",
                                                                   "exhaustive")), prompt_ci)),
        "", _threshold_line(summary), "",
        h + "Structure", "",
        f"- symmetric (success depends only on |S|): {summary['symmetric']}",
        f"- monotone: {mono['monotone']} ({mono['n_violations']} violations in {mono['n_pairs']} one-unit steps)",
        *(f"  - {braces(e['subset'], names)} succeeds, + {names[e['added']]} fails" for e in mono["examples"]),
        "- linear threshold fit: " + (_not_defined(summary, "linear_fit") or
                                      f"accuracy {_fmt(fit['accuracy'])}, weights "
                                      f"{', '.join(f'{names[i]}={w:.2f}' for i, w in enumerate(fit['weights']))}, "
                                      f"bias {fit['bias']:.2f}"),
    ]
    for key, title in (("minimal_sufficient", "Minimal sufficient sets"),
                       ("maximal_insufficient", "Maximal insufficient sets")):
        sets, reason = summary[key], _not_defined(summary, key)
        if reason:
            lines += ["", h + title, "", reason[0].upper() + reason[1:]]
        elif sets is not None:
            left = sets["count"] - len(sets["sets"])
            lines += ["", f"{h}{title} ({sets['count']})", "", *(f"- {braces(s, names)}" for s in sets["sets"]),
                      *([f"- ... and {left} more, not listed"] if left else []),
                      *(["None."] if not sets["count"] else [])]
    imp = summary["importance"]
    if _not_defined(summary, "importance") and summary["exhaustive"]:
        lines += ["", h + "Unit importance", "", "Shapley and Banzhaf values of success: "
                  + _not_defined(summary, "importance")]
    if imp is not None:
        order = sorted(range(len(names)), key=lambda i: -abs(imp["shapley"][i]))
        lines += ["", f"{h}Unit importance (v = {imp['value']})", "",
                  "| unit | Shapley | Banzhaf |", "|---|---|---|",
                  *(f"| {names[i]} | {imp['shapley'][i]:.4f} | {imp['banzhaf'][i]:.4f} |" for i in order)]
        inter = summary["interactions"]
        pairs = sorted(((inter["matrix"][a][b], inter["units"][a], inter["units"][b])
                        for a, b in itertools.combinations(range(len(inter["units"])), 2)),
                       key=lambda p: -abs(p[0]))
        lines += ["", f"{h}Pairwise interactions ({inter['index']}; > 0 synergy, < 0 redundancy)", "",
                  *(f"- {names[i]} x {names[j]}: {x:+.4f}" for x, i, j in pairs)]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- findings

FINDING_RULES = {
    "premise": "Premise: the source answers right on average (the 95% prompt interval of its mean metric lies "
               "above 0) and beats the target (the interval of the paired difference source - target lies "
               "above 0). When it fails, that is the first finding.",
    "layer": "Best layer: the layer with the largest recovery (movement of the mean metric toward the source "
             "when all heads of one layer are patched at once), named only when the 95% prompt interval of "
             "its recovery lies above 0 and above every other layer's (its lower bound exceeds their upper "
             "bounds). Otherwise none is resolved, and the pairs that would resolve it are estimated as n x "
             "((sum of the two intervals' half-widths) / (gap of the recoveries))^2, the largest over the "
             "other layers and 0 (intervals shrink as 1/sqrt(n)).",
    "threshold": f"Threshold: k* is the smallest size whose success rate reaches 0.5. The transition is sharp "
                 f"when the 95% prompt interval of its width k90 - k10 lies at or below {SHARP_WIDTH:g} size "
                 f"step, gradual when it lies above, else not resolved. It is not "
                 f"defined when no subset or every subset succeeds, with fewer than {MIN_UNITS} units, or "
                 "with one size.",
    "size": "Depends only on |S|: at every size the subsets all succeed or all fail. Otherwise, when a "
            "weighted threshold of the units (the linear threshold fit) classifies at least "
            f"{FIT_ACCURACY:.0%} of the subsets, its largest weights are named.",
    "contrast": "Families: one family moves the target more than another when the 95% prompt interval of the "
                "paired difference of their mean metrics excludes 0.",
    "dictionary": "Dictionary: explained variance, L0 and dead fraction of the SAE on held-out corpus tokens, and the "
                  "CE loss recovered, (zero-ablated - spliced) / (zero-ablated - clean), on the same rows (measured on "
                  "tokens, not prompts: no interval).",
    "features": "Features: at each position, the feature whose mean activation differs most between clean and "
                "corrupted prompts; it differs when the 95% prompt interval of the paired difference excludes 0. Its "
                "heads: the largest per-head parts of its pre-activation on the clean prompts.",
    "feature_patch": "Feature patching: patching the top features clean -> corrupted at a position set confirms "
                     "them when the 95% prompt interval of the recovery of the mean logit difference lies above "
                     f"{MIN_FEATURE_RECOVERY:g} (of the clean - corrupted gap).",
    "graph": "Graph: the top logit node is the most probable next token; the replacement score is the tokens' share "
             "of the influence on the logits that starts at tokens or error nodes, the completeness score the "
             "influence-weighted share of the nodes' inputs not from error nodes (circuit-tracer's scores); the most "
             "influential features are those of the largest influence on the logits through every path.",
    "graph_check": "Graph against interventions: each feature node among the most influential edited alone in the real "
                   "model (transcoders spliced with their errors, so everything else responds as the model does); the "
                   "graph's predictions (the other features responding linearly, or direct effects only) are compared "
                   "with the measured change of the top logit node by Pearson and Spearman correlation and the median "
                   "absolute error relative to the logit node's value; the real model's gradient estimate (attribution "
                   "patching) is the reference a linear account of the unfrozen model reaches, the same with its norm "
                   "scales frozen what remains without the norms' response.",
    "graph_region": "Region: every subset of the most influential features at the last position zero-ablated; fit is the "
                    "R^2 of the graph's predictions of the measured changes, additivity the R^2 of the sum of the single "
                    "features' measured changes; a subset carries a fraction of the logit when its ablation removes at "
                    "least that fraction of the logit node's value (the smallest such subset, the largest removal among "
                    "its size), and the graph agrees when its top-k features by influence are that subset.",
    "fails": "What fails: the sizes at which no subset succeeds, the full set when it fails, and families that "
             "miss the criterion.",
}


def _spans(ks: Sequence[int]) -> str:
    """[0, 1, 2, 5] -> '0-2, 5'."""
    runs = [list(g) for _, g in itertools.groupby(ks, key=lambda k, c=itertools.count(): k - next(c))]
    return ", ".join(f"{r[0]}-{r[-1]}" if len(r) > 1 else str(r[0]) for r in runs)


def _sharpness(width, bounds) -> str:
    """The threshold rule's verdict on a width (None: never reaches 90%) and its prompt interval
    `bounds` ([lo, hi], None ends: not reached; None: one prompt, the width alone decides)."""
    if width is None:
        return "no complete transition (the rate never reaches 90%)"
    lo, hi = (width, width) if bounds is None else (math.inf if x is None else x for x in bounds)
    note = " (one prompt: no prompt interval)" if bounds is None else ""
    if hi <= SHARP_WIDTH:
        return "sharp" + note
    if lo > SHARP_WIDTH:
        return "gradual" + note
    return "not resolved with these prompts"


def sweep_findings(summary: dict, name: str) -> list:
    """Findings of one sweep by `FINDING_RULES` 'threshold', 'size' and 'fails': [(statement, rule)]."""
    rates, th, pi = summary["rate_by_size"], summary["threshold"], summary["prompt_intervals"]
    about = [summary["criterion"]["spec"]] if summary.get("criterion") else []
    about += [f"{summary['n_prompts']} prompts"] if summary.get("n_prompts") else []
    crit = f" ({', '.join(about)})" if about else ""
    reason = summary["undefined"].get("threshold")
    if reason:
        return [(f"{name}{crit}: no threshold: {reason}.", "threshold")]
    out = [(f"{name}{crit}: threshold k* = {threshold_cell(summary, 'k_star')}; 10%->90% transition width "
            f"{threshold_cell(summary, 'sharpness')}: "
            f"{_sharpness(th['sharpness'], pi['threshold']['sharpness'] if pi else None)}.", "threshold")]
    k, count, hits = (np.asarray(rates[f]) for f in ("k", "count", "successes"))
    mixed = np.flatnonzero((hits > 0) & (hits < count))
    if not len(mixed):
        out.append((f"{name}: success depends only on |S|.", "size"))
    else:
        j = mixed[np.argmin(np.abs(hits[mixed] / count[mixed] - 0.5))]
        fit, names = summary["linear_fit"], summary["unit_names"]
        lead = ""
        if fit and fit["accuracy"] >= FIT_ACCURACY:
            w = np.asarray(fit["weights"])
            lead = (f"; a weighted threshold of the units fits {fit['accuracy']:.1%} of the subsets, largest "
                    "weights " + ", ".join(f"{names[u]} {w[u]:+.2f}" for u in np.argsort(-np.abs(w), kind="stable")[:3]))
        out.append((f"{name}: success does not depend only on |S|: {len(mixed)} of {len(k)} sizes mix successes "
                    f"and failures (k = {k[j]}: {hits[j]} of {count[j]} succeed){lead}.", "size"))
    if (hits == 0).any():
        full = " (the full set of units included)" if k[-1] == summary["n_units"] and hits[-1] == 0 else ""
        out.append((f"{name}: no subset of size {_spans(k[hits == 0].tolist())} succeeds{full}.", "fails"))
    return out


def _pairs_to_separate(table: dict, best: int, other: Optional[int]) -> float:
    """Rough pairs for the recovery interval of row `best` to clear that of row `other` (None: 0):
    n x ((half-width + half-width) / gap)^2 (callers ask for at least n + 1: bootstrap intervals are
    not symmetric); inf when the gap is not positive."""
    half = lambda i: (table["recovery_hi"][i] - table["recovery_lo"][i]) / 2
    rival, width = (0.0, 0.0) if other is None else (table["recovery"][other], half(other))
    gap = table["recovery"][best] - rival
    return table["n_prompts"] * ((half(best) + width) / gap) ** 2 if gap > 0 else math.inf


def layer_findings(table: dict, order: Sequence[int], context: str = "") -> list:
    """`FINDING_RULES['layer']` on a `prompt_table` whose rows are layers, `order` the layers by
    recovery, best first (rows without a recovery last); `context` ends the statement (e.g. the
    baselines). [(statement, rule)]."""
    t, n, best = table, table["n_prompts"], order[0]
    lead = f"layer {best}, recovery {cell(t, 'recovery', best)} over {n} pairs"
    if t["recovery"][best] is None:
        return [(f"No best layer: recovery is not defined (source and target runs score alike){context}.", "layer")]
    if t["recovery_lo"][best] is None:
        return [(f"No best layer resolved: {lead}, and {n} pair(s) give no interval{context}.", "layer")]
    others = [l for l in order[1:] if t["recovery_hi"][l] is not None]
    rival = max(others, key=lambda l: t["recovery_hi"][l], default=None)
    clears = t["recovery_lo"][best] > max(0.0, *(t["recovery_hi"][l] for l in others))
    if clears:
        return [(f"Best layer by recovery: {lead}, its interval above 0"
                 + (f" and above every other layer's (next highest: layer {rival}, {cell(t, 'recovery', rival)})"
                    if rival is not None else "") + f"{context}.", "layer")]
    need = max(_pairs_to_separate(t, best, l) for l in [None, *others])
    lo = t["recovery_lo"][best]
    why = " and ".join((["its interval does not lie above 0"] if lo <= 0 else [])
                       + ([f"it overlaps layer {rival}'s ({cell(t, 'recovery', rival)})"]
                          if rival is not None and t["recovery_hi"][rival] >= lo else []))
    more = (f"about {max(math.ceil(need), n + 1)} pairs would resolve it at these gaps" if math.isfinite(need)
            else "more pairs would not resolve it: another layer recovers as much")
    return [(f"No best layer resolved: {lead} leads, but {why}; {more}{context}.", "layer")]


def premise_findings(table: dict, names: Sequence[str], source: int, target: int, contrast: int = 0,
                     kind: str = "rows") -> tuple:
    """`FINDING_RULES['premise']` on a `prompt_table` whose rows are `names` (`kind`, e.g. 'formats'),
    with the source and target rows and the index of the contrast source - target. Returns
    (whether the premise holds, [(statement, rule)])."""
    t, P = table, table["n_prompts"]
    above = lambda key, i: t[f"{key}_lo"][i] is not None and t[f"{key}_lo"][i] > 0
    row = lambda i: (f"`{names[i]}` (mean metric {cell(t, 'mean', i)}; "
                     f"right on {cell(t, 'right', i, '.0%')} of {P} prompts)")
    diff = f"source - target {cell(t, 'contrast', contrast)}"
    right, beats = above("mean", source), above("contrast", contrast)
    if right and beats:
        return True, [(f"Premise holds: the source {row(source)} answers right and beats the target {row(target)}: "
                       f"{diff}.", "premise")]
    reasons = ([] if right else [f"the source {row(source)} does not answer right on average"]) + \
        ([f"it beats the target {row(target)}: {diff}"] if beats else
         [f"it does not beat the target {row(target)}: {diff}"])
    out = [(f"Premise fails: {'; '.join(reasons)}. 'Recovery' below measures movement toward the source, not "
            "the repair of a wrong answer.", "premise")]
    if len(names) > 2 and not any(above("mean", i) for i in range(len(names))):
        out.append((f"None of the {len(names)} {kind} answers right on average: "
                    + ", ".join(f"`{n}` {m:+.3f}" for n, m in zip(names, t["mean"])) + ".", "premise"))
    return False, out


def contrast_findings(table: dict, names: Sequence[str], what: str) -> list:
    """`FINDING_RULES['contrast']` for each contrast of a `prompt_table` with rows `names`: [(statement, rule)]."""
    out = []
    for c, (i, j) in enumerate(table["contrasts"]):
        lo, hi = table["contrast_lo"][c], table["contrast_hi"][c]
        verdict = (f"favours {names[i]}" if lo is not None and lo > 0 else
                   f"favours {names[j]}" if hi is not None and hi < 0 else "no difference resolved")
        out.append((f"{what}: {names[i]} - {names[j]}: mean metric {cell(table, 'contrast', c)}: {verdict}.",
                    "contrast"))
    return out
