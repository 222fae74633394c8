"""The README's Python examples and the tutorial notebook run as written and print what they say (one
file: the notebook's kernel then finds the programs the README compiled in the on-disk compile cache)."""

import contextlib
import io
import os
import re

import nbclient
import nbformat

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_readme_python_examples(tmp_path, monkeypatch):
    with open(os.path.join(ROOT, "README.md")) as f:
        blocks = re.findall(r"```python\n(.*?)```", f.read(), re.S)
    assert len(blocks) == 5
    monkeypatch.chdir(tmp_path)                      # the sweep writes runs/ here
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile("\n".join(blocks), "README.md", "exec"), {})
    assert out.getvalue().splitlines() == ["' '", "[' 9.11\\nB:']", "(84, 1)", "(1,)",
                                           "['units', 'size', 'metric_0']", "(1,)", "True 5",
                                           "True", "(1,)", "(1024,)"]


def test_tutorial_notebook_runs(tmp_path):
    nb = nbformat.read(os.path.join(ROOT, "notebooks", "tutorial.ipynb"), as_version=4)
    nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}}).execute()
    text = "\n".join(o.get("text", "") for c in nb.cells for o in c.get("outputs", []))
    for printed in ("30 9 3 576", "(30, 1, 20, 9, 64) (30, 1, 20, 576)",       # the embedded model, its cache
                    r"[' 9.11\n']",                                            # the bug the notebook studies
                    "(30, 9)", "70651 edges; top 3: [('", "same logits: True", "(1024,)"):
        assert printed in text, (printed, text)
    assert any(o.get("output_type") == "display_data" and "image/png" in o.get("data", {})
               for c in nb.cells for o in c.get("outputs", []))             # the attribution heatmap
