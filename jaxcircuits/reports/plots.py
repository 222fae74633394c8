"""PNG charts of a subset sweep's analysis (`jaxcircuits.stats` rates, sets and
games outputs, or `summarize` parts).

Figures are drawn with matplotlib's object API on the Agg canvas: no pyplot state, no window.
Every function writes a PNG to `path` and returns the path as a string.
"""

from __future__ import annotations

import os
import re
from typing import Optional, Sequence, Tuple

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from jaxcircuits.stats.sets import inclusion_frequency


def _figure(width: float = 6.4, height: float = 4.0):
    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot()


def _save(fig: Figure, path) -> str:
    path = os.fspath(path)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def _quantile(dist: dict, level: float) -> np.ndarray:
    """Column of dist['quantiles'] [K, Q] at quantile `level` (must be one of dist['q'])."""
    hit = np.flatnonzero(np.isclose(np.asarray(dist["q"], dtype=float), level))
    if not len(hit):
        raise ValueError(f"quantile {level} not in {dist['q']}")
    return np.asarray(dist["quantiles"], dtype=float)[:, hit[0]]


def _unit_axis(ax, n: int, unit_names: Optional[Sequence[str]]):
    ax.set_xticks(np.arange(n))
    ax.set_xticklabels(unit_names if unit_names is not None else [str(i) for i in range(n)],
                       rotation=90 if n > 12 else 0, fontsize=8 if n > 24 else 10)
    ax.set_xlabel("unit")


def plot_success_rate(rates: dict, path, spread: Optional[dict] = None, threshold: Optional[dict] = None,
                      title: str = "Success rate by subset size", prompt_interval: Optional[dict] = None) -> str:
    """Success rate vs k with Wilson 95% intervals over sampled subsets (from `rate_by_size`; none
    where a size ran in full).

    spread: optional `metric_by_size` of a per-subset score in [0, 1] (e.g.
    `Criterion.success_fraction(metric)`, the fraction of prompts each subset succeeds on), drawn as
    10-90% and 25-75% bands with its median; threshold: optional `threshold` output, marking k*
    and the 10%->90% transition; prompt_interval: optional `prompt_intervals` output, its
    rate_lo/rate_hi [K] drawn as a band (the bootstrap over prompts).
    """
    k = np.asarray(rates["k"], dtype=float)
    rate = np.asarray(rates["rate"], dtype=float)
    fig, ax = _figure()
    if spread is not None:
        sk = np.asarray(spread["k"], dtype=float)
        ax.fill_between(sk, _quantile(spread, 0.1), _quantile(spread, 0.9), color="tab:blue", alpha=0.12,
                        label="per-subset prompt success, 10-90%")
        ax.fill_between(sk, _quantile(spread, 0.25), _quantile(spread, 0.75), color="tab:blue", alpha=0.25,
                        label="per-subset prompt success, 25-75%")
        ax.plot(sk, _quantile(spread, 0.5), color="tab:blue", ls=":", label="per-subset median")
    if prompt_interval is not None:
        ax.fill_between(k, np.asarray(prompt_interval["rate_lo"], dtype=float),
                        np.asarray(prompt_interval["rate_hi"], dtype=float), color="tab:green", alpha=0.2,
                        label=f"prompts resampled, 95% ({prompt_interval['n_prompts']} prompts)")
    err = np.stack([rate - np.asarray(rates["lo"], dtype=float), np.asarray(rates["hi"], dtype=float) - rate])
    ax.errorbar(k, rate, yerr=np.maximum(err, 0), fmt="o-", color="black", capsize=3,
                label="success rate (subsets sampled: Wilson 95%)")
    if threshold is not None and threshold.get("k10") is not None and threshold.get("k90") is not None:
        ax.axvspan(threshold["k10"], threshold["k90"], color="tab:orange", alpha=0.15,
                   label=f"10%-90% transition (width {threshold['sharpness']:.2f})")
    if threshold is not None and threshold.get("k_star") is not None:
        ax.axvline(threshold["k_star"], color="tab:red", ls="--", label=f"k* = {threshold['k_star']}")
    ax.axhline(0.5, color="grey", lw=0.8, ls=":")
    ax.set(xlabel="subset size k", ylabel="fraction of subsets succeeding", ylim=(-0.03, 1.03), title=title)
    ax.legend(fontsize=8, loc="best")
    return _save(fig, path)


def plot_metric_by_size(dist: dict, path, metric_name: str = "metric",
                        title: str = "Metric distribution by subset size") -> str:
    """Box per k from `metric_by_size`: box 25-75%, whiskers 10-90%, dots min/max, line median,
    triangle mean (dist must hold quantiles 0, 0.1, 0.25, 0.5, 0.75, 0.9, 1)."""
    k = np.asarray(dist["k"])
    cols = {q: _quantile(dist, q) for q in (0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0)}
    stats = [{"label": str(int(kk)), "med": cols[0.5][j], "q1": cols[0.25][j], "q3": cols[0.75][j],
              "whislo": cols[0.1][j], "whishi": cols[0.9][j], "mean": float(dist["mean"][j]),
              "fliers": np.array([cols[0.0][j], cols[1.0][j]])} for j, kk in enumerate(k)]
    fig, ax = _figure(max(6.4, 0.35 * len(k)), 4.0)
    ax.bxp(stats, showmeans=True, flierprops={"marker": ".", "markersize": 4})
    ax.set(xlabel="subset size k", ylabel=f"{metric_name} (mean over prompts)", title=title)
    ax.text(0.01, 0.98, "box 25-75%, whiskers 10-90%, dots min/max, triangle mean", transform=ax.transAxes,
            fontsize=7, va="top", color="dimgrey")
    return _save(fig, path)


def plot_unit_importance(shapley, banzhaf, path, unit_names: Optional[Sequence[str]] = None,
                         shapley_se=None, banzhaf_se=None, value_name: str = "success",
                         title: str = "Unit importance") -> str:
    """Shapley and Banzhaf values [n] side by side per unit, with optional standard-error bars."""
    shapley, banzhaf = np.asarray(shapley, dtype=float), np.asarray(banzhaf, dtype=float)
    n = len(shapley)
    x = np.arange(n)
    fig, ax = _figure(max(6.4, 0.3 * n), 4.0)
    ax.bar(x - 0.2, shapley, 0.4, yerr=shapley_se, capsize=2, label="Shapley", color="tab:blue")
    ax.bar(x + 0.2, banzhaf, 0.4, yerr=banzhaf_se, capsize=2, label="Banzhaf", color="tab:orange")
    ax.axhline(0, color="black", lw=0.8)
    _unit_axis(ax, n, unit_names)
    ax.set(ylabel=f"importance (v = {value_name})", title=title)
    ax.legend()
    return _save(fig, path)


def plot_minimal_inclusion(sets, path, unit_names: Optional[Sequence[str]] = None,
                           title: str = "Units in minimal sufficient sets") -> str:
    """Fraction of the minimal sufficient sets (bool [M, n], `minimal_sufficient`) holding each unit."""
    sets = np.asarray(sets, dtype=bool)
    freq = inclusion_frequency(sets)
    fig, ax = _figure(max(6.4, 0.3 * len(freq)), 4.0)
    ax.bar(np.arange(len(freq)), freq, color="tab:green")
    _unit_axis(ax, len(freq), unit_names)
    ax.set(ylabel="fraction of minimal sets containing the unit", ylim=(0, 1.05),
           title=f"{title} ({len(sets)} sets)")
    return _save(fig, path)


def plot_layer_curve(values, path, baselines: Optional[dict] = None, metric_name: str = "metric",
                     title: str = "Patching each layer whole") -> str:
    """Metric per layer [L] as a line, with optional horizontal baselines {label: value}."""
    values = np.asarray(values, dtype=float)
    fig, ax = _figure()
    ax.plot(np.arange(len(values)), values, marker="o", label="patched target")
    for i, (label, v) in enumerate((baselines or {}).items()):
        ax.axhline(v, linestyle="--", color=f"C{i + 1}", label=f"unpatched {label}")
    ax.axhline(0.0, color="grey", linewidth=0.8)
    ax.set_xlabel("layer")
    ax.set_ylabel(metric_name)
    ax.set_title(title)
    ax.legend()
    return _save(fig, path)


def plot_head_map(values, path, title: str = "Per-head effect", value_name: str = "value") -> str:
    """Heatmap of a per-head map [L, H] (layer rows, head columns), diverging colours centred on 0,
    cells annotated with their values (to 2 decimals; blank where that rounds to 0)."""
    values = np.asarray(values, dtype=float)
    n_layers, n_heads = values.shape
    lim = max(float(np.nanmax(np.abs(values))), 1e-12)
    fig, ax = _figure(max(4.0, 0.6 * n_heads + 2.2), max(3.0, 0.3 * n_layers + 1.4))
    im = ax.imshow(values, cmap="RdBu_r", vmin=-lim, vmax=lim, aspect="auto", interpolation="nearest")
    for (l, h), v in np.ndenumerate(values):
        if abs(v) >= 0.005:
            ax.text(h, l, f"{v:.2f}", ha="center", va="center", fontsize=6,
                    color="white" if abs(v) > 0.6 * lim else "black")
    ax.set_xticks(np.arange(n_heads))
    ax.set_yticks(np.arange(n_layers))
    ax.tick_params(labelsize=7)
    ax.set(xlabel="head", ylabel="layer", title=title)
    fig.colorbar(im, ax=ax, label=value_name)
    return _save(fig, path)


def plot_scatter(x, y, path, xlabel: str = "x", ylabel: str = "y", title: str = "",
                 labels: Optional[Sequence[str]] = None, diagonal: bool = True) -> str:
    """Scatter of y [N] against x [N]; the non-empty `labels` [N] are written next to their points,
    `diagonal` draws y = x."""
    x, y = np.asarray(x, dtype=float).ravel(), np.asarray(y, dtype=float).ravel()
    fig, ax = _figure(5.2, 5.0)
    ax.scatter(x, y, s=14, alpha=0.7)
    if diagonal:
        lo, hi = min(x.min(), y.min()), max(x.max(), y.max())
        ax.plot([lo, hi], [lo, hi], color="grey", lw=0.8, ls="--", label="y = x")
        ax.legend(fontsize=8, loc="best")
    for xi, yi, name in zip(x, y, labels or ()):
        if name:
            ax.annotate(name, (xi, yi), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.axhline(0.0, color="grey", lw=0.5)
    ax.axvline(0.0, color="grey", lw=0.5)
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    return _save(fig, path)


def plot_faithfulness(lines: dict, path, threshold: float, xlabel: str, frontier=None, title: str = "") -> str:
    """Faithfulness vs size per method (lines {name: (sizes, faith)}); the criterion's threshold
    dashed; frontier [n + 1] (best of any subset of each size), when given, as a black step line."""
    fig, ax = _figure()
    for name, (x, y) in lines.items():
        ax.plot(x, y, marker="o", ms=3, label=name)
    if frontier is not None:
        ax.step(np.arange(len(frontier)), frontier, where="mid", color="black", lw=1.5, label="exhaustive frontier")
    ax.axhline(threshold, color="grey", ls="--", lw=0.8, label=f"F = {threshold:g}")
    ax.axhline(1.0, color="grey", lw=0.5)
    if max(len(x) for x, _ in lines.values()) > 20:
        ax.set_xscale("log")
    ax.set(xlabel=xlabel, ylabel="faithfulness", title=title)
    ax.legend(fontsize=8)
    return _save(fig, path)


_NODE = re.compile(r"L(\d+)(H|K|MLP)(\d*)")


def _node(label: str, g) -> Tuple[str, float, float]:
    """(node name, x, y) on the `edges.EdgeGraph` g of a head or an edge endpoint label: head 'LlHh' (and its q input
    'LlHh.q') at (l, h); KV head 'LlKk' (its k and v inputs) a quarter layer left, level with its
    query heads; 'LlMLP' at l + 0.5; 'embed' at x = -1 and 'logits' at x = L, mid-height."""
    name, mid = label.split(".")[0], (g.n_heads - 1) / 2
    if name in ("embed", "logits"):
        return name, -1.0 if name == "embed" else float(g.n_layers), mid
    l, kind, i = _NODE.fullmatch(name).groups()
    group = g.n_heads // g.n_kv_heads
    return name, *{"H": (int(l), float(i or 0)), "K": (int(l) - 0.25, (int(i or 0) + 0.5) * group - 0.5),
                   "MLP": (int(l) + 0.5, mid)}[kind]


def plot_circuit_graph(units, scores, g, path, max_edges: int = 80, title: str = "") -> str:
    """A layered picture of a circuit on the `edges.EdgeGraph` g: units are heads ('LlHh', nodes sized by |score| on the grid of
    all heads) or edges ('sender->receiver', lines weighted by |score|, blue for positive scores,
    red for negative; the max_edges of largest |score|). x = layer, y = head index (`_node`)."""
    scores = np.asarray(scores, float)
    order = np.argsort(-np.abs(scores), kind="stable")[:max_edges]
    ends = lambda u: [None if e is None else _node(e, g)[0] for e in (u.split("->") + [None])[:2]]
    pairs = [(*ends(units[i]), scores[i]) for i in order]
    pos = {n: _node(n, g)[1:] for a, b, _ in pairs for n in (a, b) if n}
    fig, ax = _figure(max(6.4, 0.4 * (g.n_layers + 2)), max(4.0, 0.45 * g.n_heads + 1.5))
    grid = np.mgrid[0:g.n_layers, 0:g.n_heads].reshape(2, -1)
    ax.scatter(grid[0], grid[1], s=6, color="lightgrey", zorder=1)
    top = max(np.abs(scores).max(initial=0), 1e-12)
    for a, b, s in pairs:
        if b is not None:
            ax.annotate("", pos[b], pos[a], arrowprops=dict(
                arrowstyle="-|>", lw=0.4 + 3 * abs(s) / top, alpha=0.6, color="tab:blue" if s >= 0 else "tab:red",
                connectionstyle="arc3,rad=0.1"))
    size = {a: 30 + 300 * abs(s) / top for a, b, s in pairs if b is None}
    colour = {a: "tab:blue" if s >= 0 else "tab:red" for a, b, s in pairs if b is None}
    ax.scatter([x for x, _ in pos.values()], [y for _, y in pos.values()], s=[size.get(n, 30) for n in pos],
               c=[colour.get(n, "tab:grey") for n in pos], zorder=3)
    for n, (x, y) in pos.items():
        ax.annotate(n, (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points", zorder=4)
    ax.set_xticks(np.arange(-1, g.n_layers + 1))
    ax.set_xticklabels(["emb", *map(str, range(g.n_layers)), "out"], fontsize=7)
    ax.set(xlabel="layer", ylabel="head", title=title)
    return _save(fig, path)
