"""A new user's first ten minutes: quiet logs and progress bars, tables, familiar names, provenance."""

import json
import os
import re
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

import jaxcircuits as jc
from jaxcircuits.interventions import hooknames, sites
from jaxcircuits import logs
from jaxcircuits.reports import report
from jaxcircuits.interventions import positions as P
from jaxcircuits.interventions.metrics import LogitDiff
from jaxcircuits.engine.subsets import Pool, all_subsets
from jaxcircuits.engine.sweep import SweepResult, run_sweep
from tests.conftest import ROOT, make_hf_model, run_binary

_ABSL_LINE = re.compile(r"^[IWEF]\d{4} [\d:.]+\s+\d+ ([\w.]+):\d+\]")
_OURS = {f for d in ("jaxcircuits", "experiments") for _, _, fs in os.walk(os.path.join(ROOT, d)) for f in fs
         if f.endswith(".py")}


def third_party_lines(stderr: str) -> list:
    """Log lines and warnings on stderr that do not come from jaxcircuits' own code."""
    bad = []
    for line in stderr.replace("\r", "\n").splitlines():
        m = _ABSL_LINE.match(line)
        if (m and m.group(1) not in _OURS) or re.match(r"^(INFO|WARNING|ERROR|DEBUG):", line) \
                or re.search(r"\w+Warning: ", line):
            bad.append(line)
    return bad


def test_readme_binary_is_quiet_and_shows_progress(tiny_dir, tmp_path, monkeypatch):
    """The README's main job on a tiny model, converting the params cache afresh: no third-party
    INFO line or warning on stderr, and progress bars with rates."""
    monkeypatch.setenv("JAXCIRCUITS_CACHE", str(tmp_path / "cache"))
    r = run_binary("experiments.even_heads", f"--model={tiny_dir}", "--preset=quick", "--protocol=both",
                   "--source_format=auto", "--target_format=auto", "--n_pairs=1", "--confirm=1",
                   "--max_new_tokens=2", "--sweep_layers=1", f"--out={tmp_path / 'eh'}")
    assert r.returncode == 0, r.stderr[-3000:]
    assert third_party_lines(r.stderr) == []
    assert "converting " in r.stderr and "subset/s" in r.stderr and "%|" in r.stderr


def test_switches_bring_third_party_logs_back_and_bars_off(tiny_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("JAXCIRCUITS_CACHE", str(tmp_path / "cache"))
    r = run_binary("experiments.threshold_sweep", f"--model={tiny_dir}", "--n_prompts=1", "--layers=1",
                   "--family=sizes", "--sizes=1", "--positions=last", "--third_party_logs", "--noprogress",
                   f"--out={tmp_path / 'ts'}")
    assert r.returncode == 0, r.stderr[-3000:]
    assert any("orbax" in l or "checkpoint" in l for l in third_party_lines(r.stderr)), r.stderr[-2000:]
    assert "%|" not in r.stderr


def _library_run(tiny_dir, cache, **env):
    code = f"import jaxcircuits as jc; jc.load({tiny_dir!r}); jc.load({tiny_dir!r})"
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, JAXCIRCUITS_CACHE=str(cache), **env))


def test_library_is_quiet_by_default_and_env_switches(tiny_dir, tmp_path):
    quiet = _library_run(tiny_dir, tmp_path / "a")
    assert quiet.returncode == 0, quiet.stderr
    assert third_party_lines(quiet.stderr) == [] and "converting" in quiet.stderr
    loud = _library_run(tiny_dir, tmp_path / "b", JAXCIRCUITS_THIRD_PARTY_LOGS="1", JAXCIRCUITS_PROGRESS="0")
    assert "TypeHandlerRegistry" in loud.stderr and "converting" not in loud.stderr


def test_filter_touches_only_installed_third_party_code():
    import logging
    site_file = os.path.join(logs._INSTALLED[-1], "orbax", "checkpoint", "x.py")
    record = lambda name, level, path: logging.LogRecord(name, level, path, 1, "m", None, None)
    assert not logs._FILTER.filter(record("absl", logging.INFO, site_file))                 # orbax via absl
    assert not logs._FILTER.filter(record("absl", logging.WARNING, site_file))
    assert not logs._FILTER.filter(record("jax._src.xla_bridge", logging.INFO, site_file))
    assert logs._FILTER.filter(record("jax._src.xla_bridge", logging.WARNING, site_file))    # jax's warnings stay
    assert logs._FILTER.filter(record("absl", logging.ERROR, site_file))                     # errors stay
    assert logs._FILTER.filter(record("absl", logging.INFO, "/home/me/my_script.py"))        # the caller's own
    assert logs._FILTER.filter(record("myapp", logging.INFO, site_file))
    assert logs._FILTER.filter(record("absl", logging.INFO, os.path.join(ROOT, "jaxcircuits", "sweep.py")))


@pytest.fixture(scope="module")
def small_problem(tiny):
    _, cfg, params = tiny("llama_gqa")
    rng = np.random.RandomState(3)
    tgt, src = rng.randint(3, 100, (2, 6)), rng.randint(3, 100, (2, 6))
    _, cache = jc.run_with_cache(params, cfg, src, sites=("head_out",))
    metric = LogitDiff(good=jnp.array([[5], [6]]), bad=jnp.array([[7], [9]]))
    problem = jc.PatchingProblem.make(jc.target_run(params, cfg, tgt), cache, P.select("all", np.ones(tgt.shape)),
                                      metric)
    return params, cfg, problem


def test_run_masks_progress_and_switch(small_problem, capsys):
    params, cfg, problem = small_problem
    masks = jc.Mask(head_out=jnp.asarray(np.random.RandomState(0).rand(6, cfg.n_layers, cfg.n_heads), jnp.float32))
    jc.run_masks(params, cfg, problem, masks, chunk_size=2, shard=False)
    assert "run_masks" in capsys.readouterr().err
    logs.set_progress(False)
    try:
        jc.run_masks(params, cfg, problem, masks, chunk_size=2, shard=False)
    finally:
        logs.set_progress(True)
    assert "run_masks" not in capsys.readouterr().err


def test_to_frame_of_a_sweep(small_problem, tmp_path):
    params, cfg, problem = small_problem
    pool = Pool.heads(1, cfg.n_heads)
    res = run_sweep(params, cfg, problem, pool, all_subsets(pool.n), str(tmp_path / "s"), shard=False)
    df = res.to_frame(pool)
    assert len(df) == 2 ** pool.n and df.index.name == "rank"
    assert list(df.columns) == ["units", "size", "metric_0", "metric_1", "metric", "success", "success_fraction"]
    row = df.loc[int(np.flatnonzero(res.bitmask == 0b101)[0])]
    assert row["units"] == "L1H0 L1H2" and row["size"] == 2
    np.testing.assert_allclose(df[["metric_0", "metric_1"]].to_numpy(), res.metric)
    np.testing.assert_allclose(df["metric"], res.metric.mean(1))
    np.testing.assert_array_equal(df["success"], res.metric.mean(1) > 0)
    path = report.write_table(str(tmp_path), "sweep", df)
    assert open(path).readline().startswith("rank,units,size,metric_0")


def test_to_frame_without_pool_and_criteria():
    res = SweepResult(np.arange(3), np.array([0, 1, 6], np.uint64), np.array([[1., -1], [2, 2], [-3, 1]], np.float32))
    df = res.to_frame(success="fraction(metric>=1)>=0.5")
    assert df["units"].tolist() == ["", "0", "1 2"] and df["size"].tolist() == [0, 1, 2]
    assert df["success_fraction"].tolist() == [0.5, 1.0, 0.5] and df["success"].tolist() == [True, True, True]


# ---- aliases --------------------------------------------------------------------------------------

def _put_in_hub_cache(hub, model_id, model):
    """A snapshot of `model` in the layout of the HF hub cache (what `hf download` leaves)."""
    repo = hub / f"models--{model_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    model.save_pretrained(repo / "snapshots" / ("0" * 40))


@pytest.mark.parametrize("model_id", ["openai-community/gpt2", "gpt2"])
def test_alias_resolves_in_the_local_hub_cache(tmp_path, monkeypatch, model_id):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("JAXCIRCUITS_CACHE", str(tmp_path / "cache"))
    _put_in_hub_cache(tmp_path / "hub", model_id, make_hf_model("gpt2"))
    model = jc.load("GPT2")
    assert model.files.name == model_id and model.cfg.checkpoint == "gpt2" and model.cfg.n_layers == 3


def test_absent_alias_offline_says_how_to_get_it(tmp_path, monkeypatch):
    """Offline (as every test is: conftest), an alias not in the cache names its first HF id and how
    to fetch it (online, it is downloaded: tests/test_hub.py)."""
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(FileNotFoundError, match=r"'meta-llama/Llama-3.1-8B-Instruct' is not in the local HF hub "
                       r"cache .* HF_HUB_OFFLINE=1 is set.*`hf download meta-llama/Llama-3.1-8B-Instruct`"):
        jc.load("llama-3.1-8b-instruct")
    assert not (tmp_path / "hub").exists() or not any((tmp_path / "hub").iterdir())   # nothing downloaded


# ---- TransformerLens-style entry points and hook names -------------------------------------------

@pytest.fixture(scope="module")
def smol_tiny(tiny_dir):
    return jc.load(tiny_dir)


def test_to_tokens_and_to_str_tokens(smol_tiny):
    m = smol_tiny
    ids = m.to_tokens("Which is bigger: 9.8 or 9.11?")
    assert ids.shape[0] == 1 and ids[0].tolist() == m.tokenizer.encode("Which is bigger: 9.8 or 9.11?")
    batch = m.to_tokens(["a", "Which is bigger"])
    assert batch.shape[0] == 2 and batch[0, -1] == m.tokenizer.encode("a")[-1]       # left-padded
    pieces = m.to_str_tokens("Which is bigger: 9.8")
    assert "".join(pieces) == "Which is bigger: 9.8" and pieces[-1] == "8"
    assert m.to_str_tokens(["a b", "c"]) == [m.to_str_tokens("a b"), m.to_str_tokens("c")]
    assert m.to_str_tokens(ids[0]) == m.to_str_tokens("Which is bigger: 9.8 or 9.11?")


def test_model_run_with_cache_on_text(smol_tiny):
    m = smol_tiny
    texts = ["Q: 9.8 or 9.11?", "Hi"]
    logits, cache = m.run_with_cache(texts, sites=("head_out", "final_norm"))
    ids, attn_mask = m.tokenizer.batch(texts)
    want_logits, want = jc.run_with_cache(m.params, m.cfg, ids, jnp.asarray(attn_mask),
                                          sites=("head_out", "final_norm"))
    np.testing.assert_array_equal(logits, want_logits)
    np.testing.assert_array_equal(cache["head_out"], want["head_out"])
    _, tl = m.run_with_cache(texts, sites=("head_out", "final_norm"), hook_names=True)
    assert sorted(tl) == sorted([f"blocks.{l}.attn.hook_z" for l in range(m.cfg.n_layers)] + ["ln_final.hook_normalized"])
    np.testing.assert_array_equal(tl["blocks.1.attn.hook_z"], want["head_out"][1])
    one, _ = m.run_with_cache("Hi", sites=())
    assert one.shape[:2] == (1, len(m.tokenizer.encode("Hi")))


def test_model_patched_on_text(smol_tiny):
    """`Model.patched(text, intervention)` is `jc.forward` of the text's batch under it."""
    m = smol_tiny
    texts = ["Q: 9.8 or 9.11?", "Q: 9.9 or 9.11?"]
    _, cache = m.run_with_cache(["Q: 7.8 or 9.11?", "Q: 1.9 or 9.11?"], sites=("head_out",))
    mask = jc.Mask(head_out=jnp.zeros((m.cfg.n_layers, m.cfg.n_heads)).at[1, 2].set(1.0))
    ids, attn = m.tokenizer.batch(texts)
    iv = jc.Intervention(mask, cache, jnp.ones(ids.shape))
    got, c = m.patched(texts, iv, sites=("head_out",))
    want, _ = jc.forward(m.params, m.cfg, ids, jnp.asarray(attn), intervention=iv)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_allclose(c["head_out"][1, :, :, 2], cache["head_out"][1, :, :, 2], atol=1e-6)  # x + 1 * (s - x)
    assert np.abs(np.asarray(got) - np.asarray(m.run_with_cache(texts, sites=())[0])).max() > 1e-4


@pytest.mark.parametrize("variant", ["gpt2", "llama_gqa"])
def test_hook_names_two_way(tiny, variant):
    _, cfg, params = tiny(variant)
    rotary = cfg.position_embedding == "rotary"
    for entry in [e for e in sites.cache_entries(cfg) if e != "kv"]:
        layers = [None] if entry in hooknames.WHOLE_RUN else range(cfg.n_layers)
        for layer in layers:
            name = hooknames.hook_name(entry, layer, cfg)
            assert hooknames.parse_hook_name(name, cfg) == (entry, layer)
    assert hooknames.hook_name("head_q", 2, cfg) == ("blocks.2.attn.hook_rot_q" if rotary else "blocks.2.attn.hook_q")
    assert hooknames.hook_name("attn_block", 0, cfg) == "blocks.0.hook_attn_out"     # a site reading attn_out
    assert hooknames.parse_hook_name("blocks.0.hook_resid_post", cfg) == ("resid_pre", 1)
    assert hooknames.parse_hook_name(f"blocks.{cfg.n_layers - 1}.hook_resid_post", cfg) == ("resid_final", None)
    with pytest.raises(ValueError, match="out of range"):
        hooknames.parse_hook_name(f"blocks.{cfg.n_layers}.hook_resid_pre", cfg)
    with pytest.raises(ValueError, match="no TransformerLens hook"):
        hooknames.hook_name("kv", 0, cfg)
    if rotary:
        with pytest.raises(ValueError, match="before RoPE"):
            hooknames.parse_hook_name("blocks.0.attn.hook_q", cfg)
    entries = tuple(e for e in sites.cache_entries(cfg) if e != "kv")
    _, cache = jc.run_with_cache(params, cfg, np.arange(3, 9)[None], sites=entries)
    back = hooknames.from_hook_dict(hooknames.to_hook_dict(cache, cfg), cfg)
    assert sorted(back) == sorted(entries)
    for e in entries:
        np.testing.assert_array_equal(back[e], cache[e])


def test_hook_table_in_the_docstring_is_the_mapping():
    rows = dict(re.findall(r"^  (\w+)\s+(\S+hook_\w+)", hooknames.__doc__, re.M))
    assert rows == {e: t.replace("{layer}", "{l}").replace("{last}", "{L-1}") for t, e in hooknames.HOOKS.items()}
    assert sorted(hooknames.HOOKS.values()) == sorted(set(sites.CACHE_SITES) - {"kv", "features"})  # features: FEATURES_HOOK


# ---- provenance -----------------------------------------------------------------------------------

def test_provenance():
    p = report.provenance()
    assert p["packages"]["jax"] and p["packages"]["transformers"] and p["backend"] == "cpu"
    assert p["devices"] == ["cpu"] and p["device_count"] == 4
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    assert p["git_commit"] == (head.stdout.strip() if head.returncode == 0 else None)
    json.dumps(p)


# ---- visual inspection ----------------------------------------------------------------------------

def test_attention_and_head_map_renderings(smol_tiny, tmp_path):
    from jaxcircuits.reports import viz
    m = smol_tiny
    _, cache = m.run_with_cache("When Mary and John went to the store", sites=("pattern",))
    tokens, heads = m.to_str_tokens("When Mary and John went to the store"), [(0, 1), (1, 3)]
    np.testing.assert_array_equal(viz.head_patterns(cache["pattern"], heads)[1], cache["pattern"][1, 0, 3])
    html = viz.attention_html(cache["pattern"], heads, tokens, path=str(tmp_path / "a.html"))
    assert (tmp_path / "a.html").read_text() == html and "treescope" in html and "L1H3" in html
    png = viz.attention_png(cache["pattern"], heads, tokens, str(tmp_path / "a.png"))
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    html = viz.head_map_html(np.arange(8.0).reshape(2, 4) - 3, str(tmp_path / "m.html"), "effect")
    assert "effect per head" in html and "treescope" in html
