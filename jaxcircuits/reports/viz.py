"""Looking at a run: attention patterns of chosen heads and per-head maps, as interactive HTML
(treescope, which comes with flax: hover for values, a slider over heads) and as PNG (matplotlib);
dictionary features' top activating contexts as a plain HTML page (tokens shaded by activation).

In a notebook the HTML shows inline (`IPython.display.HTML(html)`); elsewhere pass `path` and open
the file in a browser (it is self-contained).
"""

from __future__ import annotations

import html
import os
from typing import Callable, Mapping, Optional, Sequence, Tuple

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from jaxcircuits.interventions.sites import unit_label

Head = Tuple[int, int]


def head_patterns(pattern, heads: Sequence[Head], row: int = 0) -> np.ndarray:
    """float32 [len(heads), T, S]: the attention patterns of `heads` ((layer, head) pairs) for batch
    row `row` of a cache's 'pattern' entry [L, B, H, T, S]."""
    pattern = np.asarray(pattern, np.float32)
    return np.stack([pattern[l, row, h] for l, h in heads])


def _write(path: Optional[str], text: str) -> str:
    if path is not None:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            f.write(text)
    return text


def _labels(tokens: Sequence[str]) -> list:
    """Token strings as axis labels: position and the token's repr (spaces and newlines visible)."""
    return [f"{i}:{t!r}" for i, t in enumerate(tokens)]


def attention_html(pattern, heads: Sequence[Head], tokens: Sequence[str], row: int = 0,
                   path: Optional[str] = None) -> str:
    """Interactive HTML of the attention patterns of `heads` (query rows x key columns, a slider
    over heads, tokens as labels on hover): pattern is a cache's 'pattern' [L, B, H, T, S], tokens the T
    token strings of batch row `row` (`Model.to_str_tokens`). Written to `path` if given; returned."""
    import treescope
    arr = head_patterns(pattern, heads, row)
    labels = _labels(tokens)
    fig = treescope.render_array(
        arr, sliders=[0], rows=[1], columns=[2], vmin=0.0, vmax=1.0, pixels_per_cell=min(21, max(3, 600 // len(labels))),
        axis_labels={0: "head", 1: "query", 2: "key"},
        axis_item_labels={0: [unit_label("head_out", h) for h in heads], 1: labels, 2: labels})
    return _write(path, treescope.lowering.render_to_html_as_root(fig.treescope_part, compressed=False))


def attention_png(pattern, heads: Sequence[Head], tokens: Sequence[str], path: str, row: int = 0) -> str:
    """The same patterns as PNG heatmaps, one panel per head (matplotlib's object API on the Agg
    canvas, as `plots`); returns `path`."""
    arr = head_patterns(pattern, heads, row)
    t = arr.shape[1]
    size = 1.5 + 0.25 * t
    fig = Figure(figsize=(size * len(heads), size))
    FigureCanvasAgg(fig)
    for i, (head, a) in enumerate(zip(heads, arr)):
        ax = fig.add_subplot(1, len(heads), i + 1)
        ax.imshow(a, vmin=0.0, vmax=1.0, cmap="viridis", interpolation="nearest")
        ax.set_title(unit_label("head_out", head))
        ax.set_xticks(range(t), [repr(s) for s in tokens], rotation=90, fontsize=7)
        ax.set_yticks(range(t), [repr(s) for s in tokens] if i == 0 else [], fontsize=7)
        ax.set_xlabel("key")
    fig.axes[0].set_ylabel("query")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=100, bbox_inches="tight")
    return path


def head_map_html(values, path: Optional[str] = None, value_name: str = "value") -> str:
    """Interactive HTML of a per-head map values [L, H] (e.g. each head's patching effect; hover for
    values, diverging colours around zero). The PNG is `plots.plot_head_map`."""
    import treescope
    values = np.asarray(values, np.float32)
    fig = treescope.render_array(values, rows=[0], columns=[1], axis_labels={0: "layer", 1: "head"},
                                 pixels_per_cell=20)
    html = f"<p>{value_name} per head (rows: layers, columns: heads)</p>" + treescope.lowering.render_to_html_as_root(fig.treescope_part, compressed=False)
    return _write(path, html)


_CONTEXT_STYLE = ("body{font-family:sans-serif;margin:1.5em}h2{font-size:1.05em;margin:1.2em 0 .3em}"
                  ".ctx{font-family:monospace;white-space:pre;margin:.15em 0}.v{color:#666;display:inline-block;"
                  "width:6em}.t{border-radius:2px}.top{outline:1px solid #c33}")


def feature_contexts_html(contexts: Mapping[int, Sequence], token_str: Callable[[int], str],
                          path: Optional[str] = None, title: str = "Top activating contexts") -> str:
    """A self-contained HTML page of features' top activating contexts ({feature: [Context]} of
    `dictionaries.evaluate.top_contexts`): one line per context, its value, then its tokens shaded
    by the feature's activation (relative to the feature's largest; the value on hover), the top
    token outlined. token_str: token id -> text (`Tokenizer.token_str`). Written to `path` if given;
    returned."""
    out = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
           f"<style>{_CONTEXT_STYLE}</style></head><body><h1>{html.escape(title)}</h1>"]
    for feature, ctxs in contexts.items():
        out.append(f"<h2>feature {int(feature)}</h2>")
        if not ctxs:
            out.append("<p>never active on these tokens</p>")
        peak = max((float(c.value) for c in ctxs), default=0.0) or 1.0
        for c in ctxs:
            spans = []
            for i, (tok, a) in enumerate(zip(c.tokens, c.acts)):
                alpha = min(max(float(a) / peak, 0.0), 1.0)
                cls = "t top" if i == c.focus else "t"
                spans.append(f"<span class='{cls}' style='background:rgba(255,140,0,{alpha:.3f})' "
                             f"title='{float(a):.4g}'>{html.escape(token_str(int(tok)))}</span>")
            out.append(f"<div class='ctx'><span class='v'>{float(c.value):.4g}</span>{''.join(spans)}</div>")
    out.append("</body></html>")
    return _write(path, "\n".join(out))
