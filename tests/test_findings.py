"""Success criteria, recovery, intervals over prompts, degenerate sweeps (jaxcircuits.stats) and
findings (jaxcircuits.reports.findings), and the report's Findings section (jaxcircuits.reports.report)."""

import itertools
import json
import re

import numpy as np
import pytest

from jaxcircuits.reports.findings import (FINDING_RULES, _sharpness, cell, contrast_findings, layer_findings,
                                         premise_findings, report_markdown, sweep_findings)
from jaxcircuits.stats.bootstrap import bootstrap, prompt_intervals, prompt_table
from jaxcircuits.stats.criteria import Criterion, recovery
from jaxcircuits.stats.rates import threshold, threshold_stats
from jaxcircuits.stats.summary import SummaryOptions, summarize
from jaxcircuits.engine import subsets as S
from jaxcircuits.reports.report import Report, add_sweep_analysis


def cube(n):
    """All 2^n subsets, bool [2^n, n], row r = bitmask r."""
    return S.unrank_np(S.all_subsets(n), np.arange(1 << n))


# ----------------------------------------------------------------------------- recovery and criteria

def test_recovery_by_hand():
    metric = np.array([[0.0, 2.0], [1.0, 1.0], [3.0, 5.0]])               # [N=3, P=2]
    source, target = np.array([2.0, 4.0]), np.array([0.0, 0.0])           # means 3 and 0
    np.testing.assert_allclose(recovery(metric, source, target), [1 / 3, 1 / 3, 4 / 3])
    idx = np.array([[0, 0], [1, 1]])                                      # two resamples of the prompts
    np.testing.assert_allclose(recovery(metric[:, idx], source[idx], target[idx]),
                               [[0.0, 0.5], [0.5, 0.25], [1.5, 1.25]])
    assert np.isnan(recovery(metric, target, target)).all()            # equal baselines: not defined
    # A source below the target: moving down toward it is positive recovery.
    np.testing.assert_allclose(recovery(np.array([[-1.0]]), np.array([-2.0]), np.array([0.0])), [0.5])


def test_criteria_parse_and_agree_with_their_definitions():
    rng = np.random.default_rng(0)
    metric, source, target = rng.normal(size=(20, 5)), rng.normal(1, 0.1, 5), rng.normal(-1, 0.1, 5)
    rec = Criterion.parse("recovery>=0.5")
    assert (rec.quantity, rec.op, rec.threshold, str(rec)) == ("recovery", ">=", 0.5, "recovery>=0.5")
    assert rec.describe().startswith("recovery>=0.5: the normalised recovery")
    np.testing.assert_array_equal(rec.success(metric, source, target), recovery(metric, source, target) >= 0.5)
    np.testing.assert_array_equal(Criterion.parse("metric>0").success(metric), metric.mean(1) > 0)
    np.testing.assert_array_equal(Criterion.parse(" fraction >= 0.6 ").success(metric), (metric > 0).mean(1) >= 0.6)
    for spec, expected in [("metric>0", metric.mean(1) > 0), ("metric>=0.2", metric.mean(1) >= 0.2),
                           ("fraction(metric<=-0.1)>=0.5", (metric <= -0.1).mean(1) >= 0.5)]:
        np.testing.assert_array_equal(Criterion.parse(spec).success(metric), expected)
    with pytest.raises(ValueError, match=r"recovery is undefined: .* equal within float noise"):
        rec.success(metric, target, target)                           # not defined: an error, not a failure
    with pytest.raises(ValueError, match=r"recovery is undefined"):
        rec.success(metric, target + 1e-6, target)                     # nor within float noise of the metric
    # per-prompt or resampled baselines that tie on some rows are data, not an error: those rows fail
    tied = source.copy()
    tied[2] = target[2]
    per_prompt = rec.success_fraction(metric, tied, target)
    np.testing.assert_array_equal(per_prompt, rec.success_fraction(metric[:, [0, 1, 3, 4]], tied[[0, 1, 3, 4]],
                                                                  target[[0, 1, 3, 4]]) * 4 / 5)
    with pytest.raises(ValueError, match="needs the source and target"):
        rec.success(metric)
    for bad in ("recovery", "recovery=>0.5", "ratio>1", "metric>x"):
        with pytest.raises(ValueError, match="recovery>=X, metric>X or fraction>=X"):
            Criterion.parse(bad)


def test_resamples_whose_baselines_tie_are_not_an_error():
    """Only the prompts' own baselines must define recovery; a resample of tied prompts fails."""
    metric = np.array([[0.0, 0.0, 0.0], [2.0, 0.0, 0.0], [1.0, 0.0, 0.0], [2.0, 0.0, 0.0]])     # [4 subsets, 3 prompts]
    out = prompt_intervals(cube(2), metric, Criterion.parse("recovery>=0.5"), np.array([2.0, 0, 0]), np.zeros(3),
                           n_resamples=200)
    assert out is not None and out["n_resamples"] == 200


def test_one_grammar_covers_below_all_prompts_and_counted_prompts():
    metric = np.array([[1.0, -0.5, 2.0], [-1.0, -2.0, 0.5], [0.0, 0.0, 3.0]])   # [N=3, P=3]
    below = Criterion.parse("metric<=-0.5")                                  # mean at most -0.5
    np.testing.assert_array_equal(below.success(metric), [False, True, False])
    np.testing.assert_allclose(below.success_fraction(metric), [1 / 3, 2 / 3, 0.0])   # each prompt alone
    np.testing.assert_array_equal(Criterion.parse("fraction>=1").success(metric), [False, False, False])
    np.testing.assert_array_equal(Criterion.parse("fraction>=1").success(metric[:, 2:]), [True, True, True])
    counted = Criterion.parse(" fraction ( metric >= 0.5 ) >= 0.5 ")
    assert counted == Criterion("fraction", ">=", 0.5, ">=", 0.5) and str(counted) == "fraction(metric>=0.5)>=0.5"
    assert Criterion.parse(str(counted)) == counted and Criterion.of(counted) is counted
    assert counted.describe() == "fraction(metric>=0.5)>=0.5: the fraction of prompts whose metric is >= 0.5 >= 0.5"
    np.testing.assert_array_equal(counted.success(metric), [True, False, False])
    np.testing.assert_allclose(counted.success_fraction(metric), [2 / 3, 1 / 3, 1 / 3])
    assert str(Criterion.parse("fraction(metric>0)>=0.5")) == "fraction>=0.5"   # the default prompt test
    # Per-prompt recovery (m_p - t_p) / (s_p - t_p): prompt 0 recovers 0.5, prompt 1 recovers 2.
    rec = Criterion.parse("recovery>=1")
    np.testing.assert_allclose(rec.success_fraction(np.array([[1.0, 2.0]]), np.array([2.0, 1.0]), np.zeros(2)), [0.5])


@pytest.mark.parametrize("spec, match", [("fraction>=1.5", r"threshold=1.5: expected a finite number in \[0, 1\]"),
                                         ("fraction>-0.1", r"threshold=-0.1: expected a finite number in \[0, 1\]"),
                                         ("recovery>=nan", "threshold=nan: expected a finite number"),
                                         ("metric>inf", "threshold=inf"),
                                         ("fraction(metric>nan)>=0.5", "prompt_threshold=nan")])
def test_thresholds_that_are_nan_or_out_of_range_are_refused(spec, match):
    with pytest.raises(ValueError, match=f"success criterion '{re.escape(spec)}': {match}"):
        Criterion.parse(spec)


@pytest.mark.parametrize("bad", ["ratio>1", "metric(metric>0)>0", "fraction(recovery>0)>=0.5", "fraction(metric>y)>1",
                                 "positive", ""])
def test_an_unknown_criterion_string_is_a_value_error_naming_it(bad):
    with pytest.raises(ValueError, match=re.escape(f"got {bad!r}")):
        Criterion.parse(bad)


def test_summary_options_name_a_bad_importance():
    with pytest.raises(ValueError, match="importance_of must be one of .* got 'shapley'"):
        SummaryOptions(importance_of="shapley")
    with pytest.raises(ValueError, match="importance_of='metric' needs a metric"):
        summarize(cube(3), np.zeros(8, bool), options=SummaryOptions(importance_of="metric"))


def test_the_threshold_sweep_reads_its_older_success_spellings_as_criteria():
    from jaxcircuits.studies.threshold_sweep import parse_success
    assert str(parse_success("positive")) == "metric>0" and str(parse_success("above:1.5")) == "metric>=1.5"
    assert parse_success("below:-1", "fraction") == Criterion.parse("fraction(metric<=-1)>=0.5")
    assert parse_success("recovery>=0.5") == Criterion("recovery", ">=", 0.5)


# ----------------------------------------------------------------------------- intervals over prompts

def test_bootstrap_matches_the_exact_resampling_distribution():
    """Three prompts with values 0, 1, 3: the 27 equally likely resamples give a mean of 0 with
    probability 1/27 (> 2.5%) and of 3 with 1/27, so the exact 95% percentile interval is [0, 3];
    the CDF of the mean passes 10% at 1/3 (from 1/27 to 4/27) and 90% at 7/3 (23/27 to 26/27)."""
    x = np.array([0.0, 1.0, 3.0])
    means = np.array([x[list(t)].mean() for t in itertools.product(range(3), repeat=3)])
    assert np.mean(means == 0) == np.mean(means == 3) == 1 / 27
    mean = lambda idx: x[idx].mean(-1)[None]
    b95 = bootstrap(mean, 3, n_resamples=4000, seed=0)
    assert (b95["lo"][0], b95["hi"][0]) == (0.0, 3.0)
    b80 = bootstrap(mean, 3, n_resamples=20000, seed=1, level=0.8)
    np.testing.assert_allclose([b80["lo"][0], b80["hi"][0]], [1 / 3, 7 / 3])
    again = bootstrap(mean, 3, n_resamples=20000, seed=1, level=0.8)
    assert (again["lo"] == b80["lo"]).all() and (again["hi"] == b80["hi"]).all()    # seeded
    assert bootstrap(mean, 1) is None                                               # one prompt: no spread


def test_prompt_intervals_of_a_sweep_by_hand():
    """3 units, 2 prompts; a subset's metric depends on its size k only: prompt 0 says k - 1.5, prompt
    1 says k - 2.5. Criterion metric>0 on the resampled mean: prompt 0 twice -> k >= 2 succeed,
    prompt 1 twice or both -> k >= 3 (k - 2 > 0). Each pure resample has probability 1/4 > 2.5%."""
    bits = cube(3)
    k = bits.sum(1).astype(float)
    metric = np.stack([k - 1.5, k - 2.5], 1)
    crit = Criterion.parse("metric>0")
    pi = prompt_intervals(bits, metric, crit, n_resamples=2000, seed=0)
    np.testing.assert_allclose(pi["rate_lo"], [0, 0, 0, 1])
    np.testing.assert_allclose(pi["rate_hi"], [0, 0, 1, 1])
    assert pi["threshold"]["k_star"] == [2.0, 3.0]
    np.testing.assert_allclose(pi["threshold"]["sharpness"], [0.8, 0.8])   # a 0 -> 1 step is 0.8 wide
    summary = summarize(bits, crit.success(metric), metric, criterion=crit, options=SummaryOptions(n_resamples=2000))
    assert summary["threshold"]["k_star"] == 3 and summary["prompt_intervals"]["rate_hi"] == [0, 0, 1, 1]


def test_threshold_stats_vectorise_threshold_and_mark_unreached_as_inf():
    k = np.arange(11)
    rates = np.stack([np.clip((k - 3) / 4, 0, 1), np.full(11, 0.3)], 1)      # [K, R=2]
    stats = threshold_stats(k, rates)
    np.testing.assert_allclose(stats[:, 0], [5, 5, 3.4, 6.6, 3.2])
    assert np.isinf(stats[[0, 1, 3, 4], 1]).all() and stats[2, 1] == 0.0
    assert threshold({"k": k, "rate": rates[:, 1]})["k90"] is None


def test_prompt_table_by_hand():
    metric = np.array([[1.0, -1.0, 2.0], [0.0, 0.0, 0.0]])
    t = prompt_table(metric, np.full(3, 2.0), np.zeros(3), contrasts=[(0, 1)])
    np.testing.assert_allclose(t["mean"], [2 / 3, 0])
    np.testing.assert_allclose(t["right"], [2 / 3, 0])
    np.testing.assert_allclose(t["recovery"], [1 / 3, 0])
    np.testing.assert_allclose(t["contrast"], [2 / 3])
    assert t["mean_lo"][0] <= 2 / 3 <= t["mean_hi"][0] and t["mean_lo"][1] == t["mean_hi"][1] == 0.0
    assert cell(t, "right", 0, ".0%") == f"67% ({t['right_lo'][0]:.0%}..{t['right_hi'][0]:.0%})"
    one = prompt_table(metric[:, :1])                                    # one prompt: no intervals
    assert one["mean_lo"] == [None, None] and one["recovery"] == [None, None]


# ----------------------------------------------------------------------------- degenerate sweeps

def _summary(bits, metric, spec="metric>0", **kw):
    crit = Criterion.parse(spec)
    return summarize(bits, crit.success(metric), metric, criterion=crit, options=SummaryOptions(n_resamples=200, **kw))


@pytest.mark.parametrize("case,reason,voided", [
    ("none", "no subset succeeds (metric -0.500 at best, by {0, 1, 2, 3})",
     ("threshold", "linear_fit", "maximal_insufficient", "importance", "interactions")),
    ("all", "every subset succeeds", ("threshold", "linear_fit", "minimal_sufficient", "importance", "interactions")),
    ("two units", "only 2 units (at least 3 needed)", ("threshold", "linear_fit")),
    ("one size", "only one subset size was swept", ("threshold",)),
])
def test_degenerate_sweeps_print_not_defined_with_the_reason(case, reason, voided):
    bits = {"two units": cube(2), "one size": S.unrank_np(S.of_size(5, 2), np.arange(10))}.get(case, cube(4))
    k = bits.sum(1)[:, None].astype(float)
    metric = {"none": k / 2 - 2.5, "all": k + 1.0}.get(case, bits[:, :1] - 0.5) + np.array([0.0, 0.0])
    summary = _summary(bits, metric)
    json.dumps(summary, allow_nan=False)
    assert summary["undefined"] == dict.fromkeys(voided, reason)
    assert all(summary[key] is None for key in voided if key != "threshold")
    assert set(summary["threshold"].values()) == {None}
    report = report_markdown(summary)
    assert f"Threshold: not defined: {reason}." in report
    assert ("linear threshold fit: not defined" in report) == ("linear_fit" in voided)
    assert ("bias" in report) == ("linear_fit" not in voided)
    assert sweep_findings(summary, "S") == [(f"S (metric>0, 2 prompts): no threshold: {reason}.", "threshold")]


def test_long_set_lists_say_how_many_were_left_out():
    bits = cube(6)
    summary = _summary(bits, (bits.sum(1) - 2.5)[:, None] * np.ones(2), max_sets=3)
    assert summary["minimal_sufficient"]["count"] == 20 and len(summary["minimal_sufficient"]["sets"]) == 3
    assert "- ... and 17 more, not listed" in report_markdown(summary)


def test_nested_report_markdown_has_no_title_of_its_own():
    bits = cube(4)
    text = report_markdown(_summary(bits, (bits.sum(1) - 1.5)[:, None] * np.ones(2)))
    assert not any(line.startswith(("# ", "## ")) for line in text.splitlines())
    assert "### Success rate by size" in text and "| k | count | successes | rate | subsets 95% | prompts 95% |" in text


# ----------------------------------------------------------------------------- findings

def test_sweep_findings_of_a_sharp_size_threshold():
    bits = cube(6)
    summary = _summary(bits, (bits.sum(1) - 2.5)[:, None] * np.ones(3))
    (th, rule0), (size, rule1), (fails, rule2) = sweep_findings(summary, "S")
    assert (rule0, rule1, rule2) == ("threshold", "size", "fails")
    assert th == ("S (metric>0, 3 prompts): threshold k* = 3 (prompts 95%: 3.00..3.00); "
                  "10%->90% transition width 0.80 (prompts 95%: 0.80..0.80): sharp.")
    assert size == "S: success depends only on |S|." and fails == "S: no subset of size 0-2 succeeds."


@pytest.mark.parametrize("width,interval,verdict", [
    (0.8, [0.5, 0.9], "sharp"), (0.8, [0.5, 3.0], "not resolved with these prompts"), (3.2, [1.5, None], "gradual"),
    (3.2, None, "gradual (one prompt: no prompt interval)"), (None, [2.0, None], "no complete transition"),
])
def test_sharpness_rule(width, interval, verdict):
    assert _sharpness(width, interval).startswith(verdict)


def test_sweep_findings_name_the_mixed_sizes_and_a_failing_full_set():
    bits = cube(4)
    success = bits[:, 0] & (bits.sum(1) < 4)                              # unit 0, but not all four
    metric = np.where(success, 1.0, -1.0)[:, None] * np.ones(2)
    _, size, fails = sweep_findings(_summary(bits, metric), "S")
    assert size[0].startswith("S: success does not depend only on |S|: 3 of 5 sizes mix successes and failures "
                              "(k = 2: 3 of 6 succeed); a weighted threshold of the units fits 100.0% of the subsets, "
                              "largest weights 0 +1.00, ")                    # unit 0 decides, the others count against
    assert fails[0] == "S: no subset of size 0, 4 succeeds (the full set of units included)."


def _table(source, target, extra=()):
    return prompt_table(np.stack([source, target, *extra]), contrasts=[(0, 1)], n_resamples=500)


def test_premise_holds_or_fails_first_with_its_reasons():
    rng = np.random.default_rng(0)
    right, wrong = rng.normal(2, 0.3, 40), rng.normal(-2, 0.3, 40)
    holds, found = premise_findings(_table(right, wrong), ["simple", "qa"], 0, 1)
    assert holds and found[0][1] == "premise"
    assert found[0][0].startswith("Premise holds: the source `simple` (mean metric +")
    t = _table(rng.normal(0, 1, 40), wrong, [wrong - 1])                  # the source: mean about 0
    holds, found = premise_findings(t, ["chat", "qa", "simple"], 0, 1, kind="formats")
    assert not holds
    assert found[0][0].startswith(f"Premise fails: the source `chat` (mean metric {cell(t, 'mean', 0)}")
    assert "does not answer right on average; it beats the target `qa`" in found[0][0]
    assert found[1][0].startswith("None of the 3 formats answers right on average: `chat` ")
    holds, found = premise_findings(_table(wrong, right), ["a", "b"], 0, 1)
    assert not holds and "it does not beat the target `b`" in found[0][0]


def test_contrast_findings():
    rng = np.random.default_rng(1)
    base = rng.normal(0, 1, 50)
    t = prompt_table(np.stack([base + 1, base, base + 0.001 * rng.normal(size=50)]), contrasts=[(0, 1), (1, 2)])
    (a, _), (b, _) = contrast_findings(t, ["even", "odd", "pos 0"], "L1")
    assert a == f"L1: even - odd: mean metric {cell(t, 'contrast', 0)}: favours even."
    assert b.endswith("no difference resolved.")


def test_layer_scan_picks_the_largest_movement_toward_the_source_not_the_largest_metric():
    from jaxcircuits.studies.even_heads import best_layers
    source, target = np.full(4, -1.0), np.full(4, 1.0)                   # the source lies below the target
    layers = np.array([0.9, -0.8, 2.0, 0.0])[:, None] + np.linspace(-0.01, 0.01, 4)
    t = prompt_table(layers, source, target)
    assert best_layers(t, 2) == [1, 3]                                   # recovery 0.9 and 0.5; layer 2 has -0.5
    assert best_layers(prompt_table(layers, target, target), 1) == [0]  # recovery not defined anywhere


def _layers(recovery, lo, hi, n):
    """A layer `prompt_table`'s recovery columns, by hand."""
    return {"recovery": recovery, "recovery_lo": lo, "recovery_hi": hi, "n_prompts": n}


def test_a_best_layer_is_named_only_when_its_interval_clears_the_others_and_zero():
    wide = _layers([1.2, 0.1, -0.3], [-2.5, -0.2, -0.5], [4.9, 0.4, -0.1], 3)      # the issue's -2.5..+4.9
    (text, rule), = layer_findings(wide, [0, 1, 2])
    # to clear 0: 3 x (3.7 / 1.2)^2 = 28.5; to clear layer 1: 3 x ((3.7 + 0.3) / 1.1)^2 = 39.7
    assert rule == "layer" and text == (
        "No best layer resolved: layer 0, recovery +1.200 (-2.500..+4.900) over 3 pairs leads, but its interval "
        "does not lie above 0 and it overlaps layer 1's (+0.100 (-0.200..+0.400)); about 40 pairs would resolve "
        "it at these gaps.")
    clear = _layers([0.9, 0.1, -0.3], [0.7, -0.2, -0.5], [1.1, 0.4, -0.1], 40)
    (text, _), = layer_findings(clear, [0, 1, 2], "; swept: [0]")
    assert text == ("Best layer by recovery: layer 0, recovery +0.900 (+0.700..+1.100) over 40 pairs, its interval "
                    "above 0 and above every other layer's (next highest: layer 1, +0.100 (-0.200..+0.400)); "
                    "swept: [0].")
    below_zero = _layers([0.3, -0.5], [-0.1, -0.9], [0.7, -0.2], 10)               # clears layer 1, not 0
    assert "does not lie above 0; about 18 pairs" in layer_findings(below_zero, [0, 1])[0][0]   # 10 x (0.4/0.3)^2
    tie = _layers([0.5, 0.5], [0.2, 0.2], [0.8, 0.8], 10)
    assert "more pairs would not resolve it" in layer_findings(tie, [0, 1])[0][0]
    one = _layers([0.5, 0.1], [None, None], [None, None], 1)
    assert layer_findings(one, [0, 1])[0][0] == ("No best layer resolved: layer 0, recovery +0.500 (-..-) over 1 "
                                                 "pairs, and 1 pair(s) give no interval.")
    assert layer_findings(_layers([None], [None], [None], 5), [0])[0][0].startswith("No best layer: recovery is not")


# ----------------------------------------------------------------------------- the report

def test_report_opens_with_findings_and_lists_the_rules(tmp_path):
    report = Report(str(tmp_path), "Study")
    report.add("Setup", "text")
    bits = cube(4)
    metric = (bits.sum(1) - 1.5)[:, None] + np.array([0.0, 0.2])
    add_sweep_analysis(report, "Sweep", bits, metric, [f"u{i}" for i in range(4)],
                       criterion=Criterion.parse("recovery>=0.5"), baselines=(np.full(2, 2.5), metric[0]))
    report.finding("Premise holds.", "premise")
    with pytest.raises(ValueError, match="unknown finding rule"):
        report.finding("x", "hunch")
    text = open(report.write()).read()
    headings = [line for line in text.splitlines() if line.startswith("#")]
    assert headings[:3] == ["# Study", "## Findings", "## Setup"] and sum(h.startswith("# ") for h in headings) == 1
    findings = text.split("## Findings")[1].split("## Setup")[0]
    assert "- Sweep (recovery>=0.5, 2 prompts): threshold k* = 2" in findings
    assert findings.count(FINDING_RULES["premise"]) == 1
    assert findings.index("- Premise holds.") < findings.index("How each was decided")
    assert json.load(open(tmp_path / "results.json"))["findings"][-1] == "Premise holds."
