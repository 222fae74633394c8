"""The tutorial notebook (notebooks/tutorial.ipynb) runs top to bottom on the embedded model and prints
what its text says."""

import os

import nbclient
import nbformat

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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
