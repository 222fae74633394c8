"""Every script in examples/ runs end to end on a tiny random Llama carrying SmolLM2's tokenizer."""

import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT

EXAMPLES = {  # script -> flags that fit the tiny model (2 layers, 4 heads)
    "even_heads.py": ["--layer=1"],
    "ioi_head_map.py": ["--n_prompts=2"],
    "prompt_pairs.py": ["--layers=0,1"],
}


def test_every_example_is_tested():
    assert sorted(f for f in os.listdir(os.path.join(ROOT, "examples")) if f.endswith(".py")) == sorted(EXAMPLES)


@pytest.mark.parametrize("script", sorted(EXAMPLES))
def test_example_runs(script, tiny_dir, tmp_path):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1",
               JAXCIRCUITS_CACHE=str(tmp_path / "cache"))
    r = subprocess.run([sys.executable, os.path.join("examples", script), f"--model={tiny_dir}",
                        f"--out={tmp_path / 'out'}", *EXAMPLES[script]],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    if script == "ioi_head_map.py":
        names = sorted(os.listdir(tmp_path / "out"))
        assert names == ["attention.html", "attention.png", "head_map.html", "head_map.png"]
    else:
        assert "units" in r.stdout and "success" in r.stdout       # the table's header
