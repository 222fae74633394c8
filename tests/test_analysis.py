"""Sweep analysis against boolean functions with known answers, and the plots."""

import itertools
import json
import math

import chex
import numpy as np
import pytest

from jaxcircuits.reports.findings import report_markdown
from jaxcircuits.stats.criteria import Criterion
from jaxcircuits.stats.games import banzhaf, banzhaf_sampled, interactions, shapley, shapley_sampled, table_fn
from jaxcircuits.stats.rates import metric_by_size, rate_by_size, threshold, wilson_interval
from jaxcircuits.stats.sets import (is_symmetric, linear_threshold_fit, maximal_insufficient, minimal_sufficient,
                                    monotonicity)
from jaxcircuits.stats.summary import SummaryOptions, summarize
from jaxcircuits.reports import plots as P
from jaxcircuits.engine import subsets as S


def cube(n):
    """All 2^n subsets, bool [2^n, n], row r = bitmask r."""
    return S.unrank_np(S.all_subsets(n), np.arange(1 << n))


def rows(sets, n):
    """Unit-index sets -> bool [M, n], ordered by (size, bitmask) like the analysis outputs."""
    sets = sorted((tuple(s) for s in sets), key=lambda s: (len(s), sum(1 << u for u in s)))
    return np.array([[u in s for u in range(n)] for s in sets], dtype=bool).reshape(-1, n)


# ----------------------------------------------------------------------------- success, rates

def test_criterion_strings_for_kinds_and_prompt_aggregation():
    metric = np.array([[1.0, -0.5, 2.0], [-1.0, -2.0, 0.5], [0.0, 0.0, 0.0]])   # [N=3, P=3]
    np.testing.assert_array_equal(Criterion.parse("metric>0").success(metric), [True, False, False])  # mean > 0
    np.testing.assert_array_equal(Criterion.parse("metric>=0").success(metric), [True, False, True])
    np.testing.assert_array_equal(Criterion.parse("metric<=-0.5").success(metric), [False, True, False])
    np.testing.assert_allclose(Criterion.parse("metric>0").success_fraction(metric), [2 / 3, 1 / 3, 0.0])
    np.testing.assert_array_equal(Criterion.parse("fraction>=0.6").success(metric), [True, False, False])
    np.testing.assert_array_equal(Criterion.parse("metric>0.5").success(metric[:, 0]), [True, False, False])


def test_wilson_interval_known_values():
    lo, hi = wilson_interval([0, 5, 10, 0], [10, 10, 10, 0])
    np.testing.assert_allclose(lo, [0.0, 0.236593, 0.722467, 0.0], atol=1e-6)
    np.testing.assert_allclose(hi, [0.277533, 0.763407, 1.0, 1.0], atol=1e-6)


def test_threshold_and_sharpness_of_a_synthetic_curve():
    k = np.arange(11)
    th = threshold({"k": k, "rate": np.clip((k - 3) / 4, 0, 1)})
    assert th["k_star"] == 5
    np.testing.assert_allclose([th["k50"], th["k10"], th["k90"], th["sharpness"]], [5.0, 3.4, 6.6, 3.2])
    never = threshold({"k": k, "rate": np.full(11, 0.3)})
    assert never["k_star"] is None and never["k90"] is None and never["sharpness"] is None
    assert never["k10"] == 0.0


def test_rate_by_size_exact_layers_and_sampled_intervals():
    n = 10
    family = S.sampled_per_size(n, (1, 4, 5), 30, seed=0)     # k=1 whole, k=4/5 sampled
    bits = S.unrank_np(family, np.arange(family.size()))
    success = bits[:, :3].any(1)
    rates = rate_by_size(bits, success)
    np.testing.assert_array_equal(rates["k"], [1, 4, 5])
    np.testing.assert_array_equal(rates["count"], [10, 30, 30])
    np.testing.assert_array_equal(rates["exhaustive"], [True, False, False])
    assert rates["rate"][0] == rates["lo"][0] == rates["hi"][0] == 0.3
    lo, hi = wilson_interval(rates["successes"][1:], 30)
    np.testing.assert_allclose(rates["lo"][1:], lo)
    np.testing.assert_allclose(rates["hi"][1:], hi)
    assert np.all(rates["lo"][1:] < rates["rate"][1:]) and np.all(rates["rate"][1:] <= rates["hi"][1:])


def test_metric_by_size_quantiles():
    bits = cube(4)
    metric = np.arange(16.0)[:, None] * np.array([1.0, 3.0])             # [N, P=2], mean = 2 * r
    dist = metric_by_size(bits, metric)
    j = 2
    expected = 2 * np.arange(16.0)[bits.sum(1) == j]
    np.testing.assert_allclose(dist["quantiles"][j], np.quantile(expected, dist["q"]))
    np.testing.assert_allclose(dist["mean"][j], expected.mean())
    chex.assert_shape(dist["quantiles"], (5, 7))


# ----------------------------------------------------------------------------- known functions

def test_k_of_n_threshold():
    n, k = 6, 3
    bits = cube(n)
    success = bits.sum(1) >= k
    assert is_symmetric(bits, success)
    mono = monotonicity(bits, success)
    assert mono["monotone"] and mono["n_violations"] == 0 and mono["n_pairs"] == n * 2 ** (n - 1)
    np.testing.assert_array_equal(minimal_sufficient(bits, success), rows(itertools.combinations(range(n), k), n))
    np.testing.assert_array_equal(maximal_insufficient(bits, success),
                                  rows(itertools.combinations(range(n), k - 1), n))
    np.testing.assert_allclose(shapley(bits, success), np.full(n, 1 / n))
    np.testing.assert_allclose(banzhaf(bits, success), np.full(n, math.comb(n - 1, k - 1) / 2 ** (n - 1)))
    assert linear_threshold_fit(bits, success)["accuracy"] == 1.0
    rates = rate_by_size(bits, success)
    np.testing.assert_array_equal(rates["rate"], [0, 0, 0, 1, 1, 1, 1])
    th = threshold(rates)
    assert th["k_star"] == k
    np.testing.assert_allclose(th["sharpness"], 0.8)                     # 0 at k=2 to 1 at k=3


def test_weighted_threshold():
    bits = cube(3)
    success = bits @ np.array([2, 1, 1]) >= 2                           # weights (2, 1, 1), quota 2
    np.testing.assert_allclose(shapley(bits, success), [2 / 3, 1 / 6, 1 / 6])
    np.testing.assert_allclose(banzhaf(bits, success), [3 / 4, 1 / 4, 1 / 4])
    fit = linear_threshold_fit(bits, success)
    assert fit["accuracy"] == 1.0 and fit["weights"][0] == 1.0
    np.testing.assert_array_equal((bits @ fit["weights"] >= fit["bias"]), success)
    assert not is_symmetric(bits, success) and monotonicity(bits, success)["monotone"]
    np.testing.assert_array_equal(minimal_sufficient(bits, success), rows([{0}, {1, 2}], 3))
    np.testing.assert_array_equal(maximal_insufficient(bits, success), rows([{1}, {2}], 3))
    inter = interactions(bits, success, top=3)
    # Shapley interaction: I(0,1) = 1/2 [0] + 1/2 [v(012)-v(02)-v(12)+v(2)] = -1/2 (redundant),
    # I(1,2) = 1/2 [v(12)-v(1)-v(2)+v()] + 1/2 [0] = +1/2 (synergy).
    np.testing.assert_allclose(inter["matrix"], [[0, -0.5, -0.5], [-0.5, 0, 0.5], [-0.5, 0.5, 0]])
    banz = interactions(bits, success, units=[1, 2], index="banzhaf")
    np.testing.assert_allclose(banz["matrix"], [[0, 0.5], [0.5, 0]])


def test_non_monotone_function():
    n = 4
    bits = cube(n)
    success = bits.sum(1) == 1                                           # exactly one unit
    mono = monotonicity(bits, success, max_examples=2)
    assert not mono["monotone"] and mono["n_violations"] == n * (n - 1)
    np.testing.assert_array_equal(mono["violations_by_unit"], [n - 1] * n)
    assert mono["examples"] == [{"subset": [0], "added": 1}, {"subset": [0], "added": 2}]
    np.testing.assert_array_equal(minimal_sufficient(bits, success), np.eye(n, dtype=bool))
    parity = bits.sum(1) % 2 == 1                                        # not a threshold function
    assert linear_threshold_fit(bits, parity)["accuracy"] < 1.0
    assert not monotonicity(bits, parity)["monotone"]


def test_dictator_unit():
    n = 5
    bits = cube(n)
    success = bits[:, 2]
    expected = np.eye(n)[2]
    np.testing.assert_allclose(shapley(bits, success), expected)
    np.testing.assert_allclose(banzhaf(bits, success), expected)
    np.testing.assert_array_equal(minimal_sufficient(bits, success), rows([{2}], n))
    np.testing.assert_array_equal(maximal_insufficient(bits, success), rows([{0, 1, 3, 4}], n))
    inter = interactions(bits, success, top=3)
    assert 2 in inter["units"] and np.all(inter["matrix"] == 0)


def test_bitmask_inputs_match_bool_inputs():
    bits = cube(4)
    success = bits @ np.array([3, 1, 1, 1]) >= 3
    masks = np.arange(16)
    np.testing.assert_allclose(shapley(masks, success), shapley(bits, success))
    np.testing.assert_array_equal(minimal_sufficient(masks, success), minimal_sufficient(bits, success))


def test_exact_importance_needs_every_subset():
    bits = cube(4)[1:]
    with pytest.raises(ValueError, match="missing"):
        shapley(bits, bits[:, 0])


# ----------------------------------------------------------------------------- sampled estimates

def _game(n):
    """A metric-valued, non-additive game with all 2^n values."""
    bits = cube(n)
    w = np.linspace(0.2, 1.5, n)
    return bits, np.tanh(bits @ w - 2.0) + 0.3 * (bits[:, 0] & bits[:, 1])


def test_sampled_shapley_and_banzhaf_within_three_standard_errors():
    n = 6
    bits, v = _game(n)
    value = table_fn(bits, v)
    for sampled, exact in ((shapley_sampled(value, n, 400, seed=0), shapley(bits, v)),
                           (banzhaf_sampled(value, n, 400, seed=0), banzhaf(bits, v))):
        assert np.all(sampled["samples"] == 400) and np.all(sampled["stderr"] > 0)
        assert np.all(np.abs(sampled["value"] - exact) <= 3 * sampled["stderr"])
    np.testing.assert_allclose(shapley(bits, v).sum(), v[-1] - v[0])  # efficiency


def test_sampled_estimates_on_an_incomplete_table_drop_missing_values():
    n = 5
    bits, v = _game(n)
    keep = bits.sum(1) != 2                                               # the size-2 layer is missing
    value = table_fn(bits[keep], v[keep])
    assert np.isnan(value(rows([{0, 1}], n)))[0] and value(rows([{0}], n))[0] == v[1]
    est = shapley_sampled(value, n, 200, seed=1)
    assert np.all(est["samples"] < 200) and np.all(np.isfinite(est["value"]))


# ----------------------------------------------------------------------------- summary, plots

def test_summarize_is_json_and_reports():
    n = 5
    bits = cube(n)
    metric = (bits @ np.array([2.0, 1, 1, 0.5, 0.5]))[:, None] - 2.2 + np.array([0.0, 0.4])
    success = Criterion.parse("metric>0").success(metric)
    names = S.Pool.heads(0, n).labels()
    summary = summarize(bits, success, metric, unit_names=names, options=SummaryOptions(top=3))
    text = json.dumps(summary, allow_nan=False)
    assert json.loads(text) == summary and summary["exhaustive"]
    np.testing.assert_allclose(summary["importance"]["shapley"], shapley(bits, success))
    assert summary["minimal_sufficient"]["count"] == len(minimal_sufficient(bits, success))
    report = report_markdown(summary)
    for heading in ("## Success rate by size", "## Minimal sufficient sets", "## Unit importance",
                    "## Pairwise interactions", "L0H0"):
        assert heading in report
    partial = summarize(bits[bits.sum(1) <= 2], success[bits.sum(1) <= 2])
    assert partial["importance"] is None and not partial["exhaustive"]
    assert "Unit importance" not in report_markdown(partial)


def test_plots_write_nontrivial_pngs(tmp_path):
    n = 6
    bits = cube(n)
    metric = (bits @ np.linspace(0.5, 1.5, n))[:, None] - 3 + np.linspace(-1, 1, 4)
    success = Criterion.parse("metric>0").success(metric)
    rates = rate_by_size(bits, success)
    paths = [
        P.plot_success_rate(rates, tmp_path / "rate.png", spread=metric_by_size(bits, Criterion.parse("metric>0").success_fraction(metric)),
                            threshold=threshold(rates)),
        P.plot_metric_by_size(metric_by_size(bits, metric), tmp_path / "metric.png", "logit diff"),
        P.plot_unit_importance(shapley(bits, success), banzhaf(bits, success), tmp_path / "importance.png",
                               S.Pool.heads(0, n).labels()),
        P.plot_minimal_inclusion(minimal_sufficient(bits, success), tmp_path / "minimal.png"),
    ]
    for path in paths:
        with open(path, "rb") as f:
            data = f.read()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
