"""The README's Python examples run as written and print what their comments say."""

import contextlib
import io
import os
import re

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
