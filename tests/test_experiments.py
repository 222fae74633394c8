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
