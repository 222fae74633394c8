"""The experiment binaries end to end on a tiny random Llama that carries SmolLM2's tokenizer."""

import json

import numpy as np
import pytest

from jaxcircuits.reports.findings import cell, threshold_cell
from tests.conftest import run_binary as _run


@pytest.fixture(scope="module")
def even_heads(tiny_dir, tmp_path_factory):
    """One run of the even-heads binary, both protocols, read by the tests below: (out dir, report, results)."""
    out = tmp_path_factory.mktemp("eh")
    r = _run("experiments.even_heads", f"--model={tiny_dir}", "--protocol=both", "--n_pairs=3", "--sweep_pairs=2",
             "--source_format=auto", "--target_format=auto", "--confirm=2", "--max_new_tokens=2", f"--out={out}")
    assert r.returncode == 0, r.stderr[-3000:]
    return out, (out / "report.md").read_text(), json.loads((out / "results.json").read_text())


def test_even_heads_both_protocols_end_to_end(even_heads):
    out, report, res = even_heads
    best = res["layer_scan"]["best"][0]
    assert report.startswith("# Even heads") and "python -m experiments.even_heads" in report
    for heading in ("Format scan", "Formats chosen", f"heads protocol, layer {best}", f"original protocol, layer {best}",
                    "Protocols side by side"):
        assert f"## {heading}" in report, heading
    assert res[f"heads protocol, layer {best}"]["n_subsets"] == 16          # all subsets of 4 heads
    assert res[f"original protocol, layer {best}"]["n_subsets"] == 16       # all subsets of 4 blocks
    assert len(list(out.glob("*.png"))) >= 4


def test_threshold_sweep_end_to_end_and_resumes(tiny_dir, tmp_path):
    flags = [f"--model={tiny_dir}", "--task=decimals", "--n_prompts=2", "--site=attn_block", "--n_blocks=4",
             "--layers=0,1", "--family=sizes", "--sizes=1,2", "--positions=last", f"--out={tmp_path / 'ts'}"]
    r = _run("experiments.threshold_sweep", *flags)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((tmp_path / "ts" / "results.json").read_text())
    assert res["Sweep"]["n_subsets"] == 8 + 28
    assert {"python", "packages", "backend"} <= set(res["provenance"]) and "jax" in res["provenance"]["packages"]
    rows = (tmp_path / "ts" / "Sweep.csv").read_text().splitlines()
    assert rows[0].split(",")[1:] == ["units", "size", "metric_0", "metric_1", "metric", "success"]
    assert len(rows) == 1 + 8 + 28 and rows[1].split(",")[1] == "L0B0"
    by_size = (tmp_path / "ts" / "Sweep_by_size.csv").read_text().splitlines()
    assert by_size[0].split(",")[1:] == ["k", "count", "successes", "rate", "lo", "hi"] and len(by_size) == 3
    again = _run("experiments.threshold_sweep", *flags)
    assert again.returncode == 0 and "already done" in again.stderr
    assert json.loads((tmp_path / "ts" / "results.json").read_text())["Sweep"] == res["Sweep"]


@pytest.mark.parametrize("site,pool,n_units", [("head_v", "all", 2), ("mlp_neuron", "0,5,47", 3)])
def test_threshold_sweep_on_new_sites(tiny_dir, tmp_path, site, pool, n_units):
    """KV-head values (GQA: 2 KV heads) and chosen MLP neurons as sweep units from the binary."""
    out = tmp_path / site
    r = _run("experiments.threshold_sweep", f"--model={tiny_dir}", "--task=decimals", "--n_prompts=2",
             f"--site={site}", f"--pool={pool}", "--layers=1", "--family=all", "--positions=last", f"--out={out}")
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    assert res["Sweep"]["n_subsets"] == 2 ** n_units


@pytest.mark.parametrize("module,flags,message", [
    ("experiments.threshold_sweep", ["--family=sizes"], "needs --sizes"),
    ("experiments.threshold_sweep", ["--layers=a"], "--layers must be integers"),
    ("experiments.threshold_sweep", ["--success=sometimes"], "--success must be"),
    ("experiments.threshold_sweep", ["--site=nowhere"], "site"),
    ("experiments.threshold_sweep", ["--source_format=nope"], "nope"),
    ("experiments.even_heads", ["--target_format=simple"], "must differ"),
    ("experiments.even_heads", ["--protocol=new"], "protocol"),
    ("experiments.even_heads", ["--source_format=auto", "--scan_formats=qa"], "at least two --scan_formats"),
    ("experiments.even_heads", ["--success=ratio>1"], "--success: a success criterion is recovery>=X"),
    ("experiments.threshold_sweep", ["--aggregate=fraction"], "--aggregate=fraction applies to --success=positive"),
    ("experiments.threshold_sweep", ["--success=recovery>=x"], "--success must be 'recovery>=X'"),
])
def test_bad_flags_stop_before_loading_a_model(module, flags, message):
    r = _run(module, "--model=/does/not/exist", *flags)
    assert r.returncode != 0
    assert message in r.stderr + r.stdout
    assert "/does/not/exist" not in r.stderr + r.stdout


TS = ("experiments.threshold_sweep", "--task=decimals", "--n_prompts=1", "--layers=1")


@pytest.mark.parametrize("cmd,message", [
    (TS + ("--layers=99",), "--layers=99: layer(s) [99] out of range [0, 2)"),
    (TS + ("--pool=0,99",), "--pool=0,99: indices out of range [0, 4) of --site=head_out"),
    (TS + ("--family=sizes", "--sizes=99"), "--sizes=99: size(s) [99] out of range [0, 4] for a pool of 4 units"),
    (TS + ("--site=attn_block", "--n_blocks=7"), "--n_blocks: n_blocks=7 does not divide d_model=32"),
    (TS + ("--n_blocks=4",), "--n_blocks=4 applies only to --site=attn_block"),
    (TS + ("--site=mlp_neuron",), "--family=all over 48 units has 281474976710656 members"),
    (TS + ("--site=mlp_neuron", "--layers=0,1"), "the pool has 96 units"),
    (TS + ("--positions=last:abc",), "--positions=last:abc: k in last:k must be an integer >= 1"),
    (TS + ("--success=above:abc",), "--success=above:abc: X in above:X must be a number"),
    (TS + ("--positions=99",), "--positions=99: positions [99] out of range"),
    (TS + ("--site=head_v", "--family=kv_groups"), "--family=kv_groups: needs a site whose units are query heads"),
    (("experiments.even_heads", "--protocol=original", "--n_blocks=7"), "--n_blocks: n_blocks=7 does not divide d_model=32"),
    (("experiments.even_heads", "--protocol=heads", "--n_blocks=4"), "--n_blocks=4 applies only to the original protocol"),
    (("experiments.even_heads", "--sweep_layers=5"), "--sweep_layers=5: layer(s) [5] out of range [0, 2)"),
    (("experiments.ioi", "--top_heads=9"), "--top_heads=9 exceeds the model's 8 heads"),
])
def test_flags_checked_against_the_model_in_one_line(tiny_dir, tmp_path, cmd, message):
    """Flags that do not fit the model's config stop before any weights load or anything compiles
    (the report directory is never created), as one error line without a traceback; positions,
    which need the prompts, stop before anything compiles."""
    out = tmp_path / "out"
    r = _run(cmd[0], f"--model={tiny_dir}", *cmd[1:], f"--out={out}")
    assert r.returncode != 0
    assert message in r.stderr, r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    assert not out.exists() or "positions" in message


def test_even_heads_large_layers_sweep_even_odd_exhaustively_and_sample_all(tiny_dir, tmp_path, monkeypatch):
    """The >16-unit path (Llama-3.1-8B's 32 heads), exercised on 4 heads by lowering the limit."""
    from jaxcircuits.studies import even_heads as lib
    monkeypatch.setattr(lib, "EXHAUSTIVE_MAX_UNITS", 2)
    opts = lib.Options(model=tiny_dir, dtype="float32", protocol="heads", source_format="simple",
                       target_format="qa", scan_formats=("simple", "qa"), n_pairs=0, sweep_layers=(1,),
                       top_layers=1, n_blocks=None, max_new_tokens=2, confirm=0, chunk_size=8, seed=0,
                       out=str(tmp_path / "eh"), resume=True, samples_per_size=3)
    lib.run(opts)
    sweeps = sorted(p.name for p in (tmp_path / "eh" / "sweeps").iterdir())
    assert sweeps == ["heads_L1_even", "heads_L1_odd", "heads_L1_sampled"]
    res = json.loads((tmp_path / "eh" / "results.json").read_text())
    assert res["heads protocol, layer 1"]["n_subsets"] == 1 + 3 + 3 + 3 + 1   # sizes 0..4, <= 3 each
    families = res["heads_L1"]["families"]
    assert [f[0] for f in families] == ["all units", "even units only", "odd units only"]


def test_even_heads_report_opens_with_findings_that_match_its_tables(even_heads):
    """The layer scan (by recovery), the chosen formats in Setup, nested sections without a title,
    the families on all pairs (GQA positions), and findings quoting the tables' numbers."""
    _, report, res = even_heads
    headings = [line for line in report.splitlines() if line.startswith("#")]
    assert headings[:3] == ["# Even heads: format-dependent decimal comparison", "## Findings", "## Setup"]
    assert sum(h.startswith("# ") for h in headings) == 1
    findings = res["findings"]
    assert all(f"- {f}" in report.split("## Setup")[0] for f in findings)

    names, t = list(res["format_scan"]), res["format_table"]
    means = [np.mean(res["format_scan"][f]["first_token_logit_diff"]) for f in names]
    src, tgt = names[int(np.argmax(means))], names[int(np.argmin(means))]
    assert f"| {src} -> {tgt} (auto) | recovery>=0.5 |" in report and "auto -> auto" not in report
    mean, right = cell(t, "mean", names.index(src)), cell(t, "right", names.index(src), ".0%")
    assert findings[0].startswith("Premise") and f"the source `{src}` (mean metric {mean}; right on {right}" in findings[0]
    assert f"| {src} | {mean} | {right} |" in report

    scan = res["layer_scan"]
    recovery = [-np.inf if v is None else v for v in scan["table"]["recovery"]]
    best = int(np.argmax(recovery))
    assert scan["best"] == [best]
    layer = cell(scan["table"], "recovery", best)
    statement = next(f for f in findings if f"layer {best}, recovery {layer} over 2 pairs" in f)
    lo, his = scan["table"]["recovery_lo"], [h for l, h in enumerate(scan["table"]["recovery_hi"]) if l != best]
    resolved = lo[best] is not None and lo[best] > max([0.0] + [h for h in his if h is not None])
    assert statement.startswith("Best layer by recovery: " if resolved else "No best layer resolved: ")
    assert f"| {best} | {cell(scan['table'], 'mean', best)} | {layer} |" in report

    name = f"heads protocol, layer {best}"
    summary = res[name]
    threshold = next(f for f in findings if f.startswith(f"{name} (recovery>=0.5, 2 prompts): "))
    if "threshold" in summary["undefined"]:
        assert threshold.endswith(f"no threshold: {summary['undefined']['threshold']}.")
        assert f"Threshold: not defined: {summary['undefined']['threshold']}." in report
    else:
        assert f"threshold k* = {threshold_cell(summary, 'k_star')}" in threshold
        assert f"Threshold k* = {threshold_cell(summary, 'k_star')};" in report
    families = res[f"heads_L{best}"]["family_table"]
    assert f"## {name}: unit families on all 4 pairs" in report and "| group position 0 (= even units) |" in report
    assert f"{name}, 4 pairs: even units (2) - odd units (2): mean metric {cell(families, 'contrast', 0)}: " \
           in report
    assert len(families["contrasts"]) == 1                 # G = 2: positions 0/1 are the even/odd heads, not repeated


def test_threshold_sweep_ioi_degenerate_criterion_says_why_not(tiny_dir, tmp_path):
    """No subset reaches the criterion: no fitted threshold, fit or maximal sets, and the reason."""
    out = tmp_path / "ioi"
    r = _run("experiments.threshold_sweep", f"--model={tiny_dir}", "--task=ioi", "--n_prompts=3", "--site=head_out",
             "--layers=0,1", "--family=sizes", "--sizes=1,2,3", "--positions=last", "--success=recovery>=1000",
             f"--out={out}")
    assert r.returncode == 0, r.stderr[-3000:]
    report, res = (out / "report.md").read_text(), json.loads((out / "results.json").read_text())
    sweep = res["Sweep"]
    reason = sweep["undefined"]["threshold"]
    assert sweep["criterion"]["spec"] == "recovery>=1000" and reason.startswith("no subset succeeds (recovery ")
    sections = [line for line in report.splitlines() if line.startswith("## ")]
    assert sections[:3] == ["## Findings", "## Setup", "## Baselines"]
    assert res["findings"][0].startswith("Premise") and "the source `clean`" in res["findings"][0]
    assert f"Sweep (recovery>=1000, 3 prompts): no threshold: {reason}." in res["findings"]
    assert f"Threshold: not defined: {reason}." in report and "linear threshold fit: not defined" in report
    assert "bias" not in report and sweep["maximal_insufficient"] is None
    assert "| source (clean) |" in report


def test_threshold_sweep_gqa_family(tiny_dir, tmp_path):
    out = tmp_path / "gqa"
    r = _run("experiments.threshold_sweep", f"--model={tiny_dir}", "--task=decimals", "--n_prompts=2",
             "--layers=0,1", "--family=group_positions", "--positions=last", f"--out={out}")
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    assert res["Sweep"]["n_subsets"] == 4                  # 2 layers x 2 positions within the KV groups
    assert "threshold" in res["Sweep"]["undefined"]         # every member has 2 heads: one size, no threshold
