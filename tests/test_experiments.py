"""The experiment binaries end to end on a tiny random Llama that carries SmolLM2's tokenizer."""

import json

import pytest

from tests.conftest import run_binary as _run


def test_even_heads_both_protocols_end_to_end(tiny_dir, tmp_path):
    out = tmp_path / "eh"
    r = _run("experiments.even_heads", f"--model={tiny_dir}", "--protocol=both", "--n_pairs=1",
             "--source_format=auto", "--target_format=auto",
             "--confirm=2", "--max_new_tokens=3", "--sweep_layers=1", f"--out={out}")
    assert r.returncode == 0, r.stderr[-3000:]
    report = (out / "report.md").read_text()
    assert report.startswith("# Even heads") and "python -m experiments.even_heads" in report
    for heading in ("Format scan", "Formats chosen", "heads protocol, layer 1", "original protocol, layer 1",
                    "Protocols side by side"):
        assert f"## {heading}" in report, heading
    res = json.loads((out / "results.json").read_text())
    assert res["heads protocol, layer 1"]["n_subsets"] == 16          # all subsets of 4 heads
    assert res["original protocol, layer 1"]["n_subsets"] == 16       # all subsets of 4 blocks
    assert len(list(out.glob("*.png"))) >= 4


def test_threshold_sweep_end_to_end_and_resumes(tiny_dir, tmp_path):
    flags = [f"--model={tiny_dir}", "--task=decimals", "--n_prompts=2", "--site=attn_block", "--n_blocks=4",
             "--layers=0,1", "--family=sizes", "--sizes=1,2", "--positions=last", f"--out={tmp_path / 'ts'}"]
    r = _run("experiments.threshold_sweep", *flags)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((tmp_path / "ts" / "results.json").read_text())
    assert res["Sweep"]["n_subsets"] == 8 + 28
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
    (("experiments.even_heads", "--protocol=original", "--n_blocks=7"), "--n_blocks: n_blocks=7 does not divide d_model=32"),
    (("experiments.even_heads", "--protocol=heads", "--n_blocks=4"), "--n_blocks=4 applies only to the original protocol"),
    (("experiments.even_heads", "--sweep_layers=5"), "--sweep_layers=5: layer(s) [5] out of range [0, 2)"),
    (("experiments.ioi", "--top_heads=9"), "--top_heads=9 exceeds the model's 8 heads"),
])
def test_flags_checked_against_the_model_in_one_line(tiny_dir, tmp_path, cmd, message):
    """Flags that do not fit the model's config stop before any weights load or anything compiles
    (the report directory is never created), as one usage line without a traceback; positions,
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
    opts = lib.Options(model=tiny_dir, dtype="float32", protocols=("heads",), source_format="simple",
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
