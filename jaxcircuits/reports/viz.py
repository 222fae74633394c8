"""Looking at a run: attention patterns of chosen heads and per-head maps, as interactive HTML
(treescope, which comes with flax: hover for values, a slider over heads) and as PNG (matplotlib);
dictionary features' top activating contexts as a plain HTML page (tokens shaded by activation); an
attribution graph as inline SVG (`graph_html`).

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
from jaxcircuits.methods import graphs

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


# node kind (a graph file's feature_type) -> its SVG mark at (x, y): circles, squares for error nodes
_MARKS = {
    "cross layer transcoder": lambda x, y, a: f"<circle cx='{x:.1f}' cy='{y:.1f}' r='5' {a}/>",
    "mlp reconstruction error": lambda x, y, a: f"<rect x='{x - 4.5:.1f}' y='{y - 4.5:.1f}' width='9' height='9' {a}/>",
    "embedding": lambda x, y, a: f"<rect x='{x - 7:.1f}' y='{y - 5:.1f}' width='14' height='10' rx='3' {a}/>",
    "logit": lambda x, y, a: f"<polygon points='{x:.1f},{y - 7:.1f} {x + 7:.1f},{y + 5:.1f} {x - 7:.1f},{y + 5:.1f}' {a}/>",
}
_NODE_FILL = {"cross layer transcoder": "#f4a261", "mlp reconstruction error": "#9e9e9e", "embedding": "#8ecae6",
              "logit": "#90be6d"}
_GRAPH_SCRIPT = ("document.querySelectorAll('.n').forEach(n=>{n.onmouseenter=()=>document.querySelectorAll('.e')"
                 ".forEach(e=>e.style.opacity=(e.dataset.s==n.id||e.dataset.t==n.id)?1:.06);"
                 "n.onmouseleave=()=>document.querySelectorAll('.e').forEach(e=>e.style.opacity='');});")


def graph_html(graph, pruned, token_str: Callable[[int], str], path: Optional[str] = None) -> str:
    """A self-contained HTML view of an attribution graph (`methods.graphs`: a `Graph` and its `Pruned`):
    inline SVG, x the position (tokens along the bottom, the logits above the last position at the
    top), y the layer; the shown nodes (`graphs.shown_nodes`: features circles, error nodes squares,
    tokens, logits) and the kept edges as lines, width by |weight|, blue positive, red negative; hovering
    a node shows its id, activation and influence and highlights its edges, a line its weight.
    token_str: token id -> text. Written to `path` if given; returned."""
    records = graphs.node_records(graph, pruned, token_str)
    shown = graphs.shown_nodes(graph, pruned)
    L, T = graph.n_layers, graph.n_pos
    rows = {"E": 0, **{str(l): l + 1 for l in range(L)}, str(L + 1): L + 1}
    cells: dict = {}
    for i in shown:
        cells.setdefault((rows[records[i]["layer"]], records[i]["ctx_idx"]), []).append(int(i))
    col_w, row_h, left, top = max(90, 12 * max(len(v) for v in cells.values())), 40, 40, 30
    width, height = left + col_w * T + 20, top + row_h * (L + 2) + 40
    xy = {}
    for (row, col), ids in cells.items():
        for k, i in enumerate(ids):
            xy[i] = (left + col * col_w + (k + 1) * col_w / (len(ids) + 1), top + row_h * (L + 1 - row))
    dst, src = np.nonzero(pruned.edge_mask)
    w = graph.adjacency[dst, src]
    peak = max(float(np.abs(w).max(initial=0)), 1e-30)
    out = [f"<svg xmlns='http://www.w3.org/2000/svg' width='{width}' height='{height}' font-family='sans-serif' "
           "font-size='10'>"]
    for row in range(L + 2):
        y = top + row_h * (L + 1 - row)
        name = "emb" if row == 0 else "logits" if row == L + 1 else f"L{row - 1}"
        out.append(f"<text x='2' y='{y + 3}' fill='#888'>{name}</text>")
    for d, s, v in zip(dst.tolist(), src.tolist(), w.tolist()):
        if s in xy and d in xy:
            (x1, y1), (x2, y2) = xy[s], xy[d]
            out.append(f"<line class='e' data-s='n{s}' data-t='n{d}' x1='{x1:.1f}' y1='{y1:.1f}' x2='{x2:.1f}' "
                       f"y2='{y2:.1f}' stroke='{'#2166ac' if v > 0 else '#b2182b'}' stroke-opacity='.55' "
                       f"stroke-width='{0.4 + 4 * abs(v) / peak:.2f}'><title>{html.escape(records[s]['node_id'])} -> "
                       f"{html.escape(records[d]['node_id'])}: {v:+.4g}</title></line>")
    for i in shown.tolist():
        r, (x, y) = records[i], xy[i]
        act = "" if r["activation"] is None else f"\nactivation {r['activation']:.4g}"
        infl = "" if r["influence"] is None else f"\ncumulative influence {r['influence']:.3f}"
        label = r["clerp"] or (f"token {token_str(int(graph.tokens[r['ctx_idx']]))!r}" if r["feature_type"] == "embedding"
                               else r["feature_type"])
        attrs = f"class='n' id='n{i}' fill='{_NODE_FILL[r['feature_type']]}' stroke='#333' stroke-width='.6'"
        out.append(f"<g>{_MARKS[r['feature_type']](x, y, attrs)}<title>{html.escape(r['node_id'])}: "
                   f"{html.escape(label)}{act}{infl}</title></g>")
    for p, t in enumerate(graph.tokens.tolist()):
        out.append(f"<text x='{left + (p + 0.5) * col_w:.1f}' y='{height - 12}' text-anchor='middle'>"
                   f"{html.escape(repr(token_str(t)))}</text>")
    out.append("</svg>")
    title = "Attribution graph: " + html.escape("".join(token_str(t) for t in graph.tokens.tolist()))
    return _write(path, f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{title}</title></head><body>"
                        f"<h1 style='font:bold 16px sans-serif'>{title}</h1>{''.join(out)}"
                        f"<script>{_GRAPH_SCRIPT}</script></body></html>")
