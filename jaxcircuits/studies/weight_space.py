"""Weight-space study (see experiments/weight_space.py): which heads compose, their spectra, and
whether the composition runs through a low-rank channel.

  1. Q/K/V composition scores of every head pair (`weight_space.composition_scores`, one compiled
     call) against a random-matrix baseline: a writer x reader heat map per type and the top pairs.
  2. The OV and QK singular-value spectra of the heads in the top pairs.
  3. Q/K massive values: per layer, how concentrated |q| and |k| are on a few head dimensions
     (with and without RoPE), and the task metric with the top n dimensions of every head's
     queries and keys zeroed (`weight_space.zero_top_dims`, vmapped over n).
  4. The Talking-Heads check on a choice task: for each top pair, the writer's top-k OV output
     directions (rows of Vh) are projected out of what it writes (W_O of that head, a weight edit),
     against random k-dim subspaces of the same write space; the task metric is computed for
     every edit in one vmapped call. If the low-rank channel carries the behaviour, removing the
     top directions moves the metric more than removing random ones of the same rank.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Tuple

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from jaxcircuits import folding
from jaxcircuits import weight_space as ws
from jaxcircuits.models import transformer
from jaxcircuits.report import Report, table
from jaxcircuits.sites import unit_label
from jaxcircuits.studies.common import OptionError, load_model
from jaxcircuits.tasks import multiple_choice as mc

Array = jax.Array
TASKS = {"colors": mc.colored_objects, "mc": mc.multiple_choice, "recall": mc.recall_list}


@dataclasses.dataclass(frozen=True)
class Options:
    model: str
    dtype: str
    task: str                       # a key of TASKS
    n_prompts: int
    seed: int
    top: int                        # top pairs per composition type (check: the overall top `top`)
    ranks: Tuple[int, ...]          # subspace ranks of the check
    n_random: int                   # random subspaces per rank
    zero_dims: Tuple[int, ...]      # numbers of top Q/K dimensions zeroed (massive values)
    fold: bool
    out: str


def check_options(opts: Options, cfg) -> None:
    """The options against the model's config (OptionError naming the flag)."""
    if opts.task not in TASKS:
        raise OptionError(f"--task={opts.task}: unknown; known: {sorted(TASKS)}")
    if not 1 <= opts.top <= cfg.n_heads * cfg.n_heads:
        raise OptionError(f"--top={opts.top} out of range [1, {cfg.n_heads * cfg.n_heads}]")
    bad = [k for k in opts.ranks if not 1 <= k <= cfg.d_head]
    if bad or not opts.ranks:
        raise OptionError(f"--ranks={','.join(map(str, opts.ranks))}: each must lie in [1, d_head={cfg.d_head}]")
    if any(not 0 <= n <= cfg.d_head for n in opts.zero_dims):
        raise OptionError(f"--zero_dims={','.join(map(str, opts.zero_dims))}: each must lie in "
                          f"[0, d_head={cfg.d_head}]")
    if cfg.n_layers < 2:
        raise OptionError("the model has one layer: no head pairs compose")


def channel_bases(key, vh: Array, ranks: Tuple[int, ...], n_random: int) -> np.ndarray:
    """Orthonormal row bases [len(ranks) * (1 + n_random), max(ranks), D], zero rows past the rank:
    per rank, the top-k rows of vh [r, D] (a head's output singular directions), then `n_random`
    random k-dim subspaces of the same row space (vh's span)."""
    kmax, r = max(ranks), vh.shape[0]
    out = []
    for i, k in enumerate(ranks):
        sel = (np.arange(kmax) < k)[:, None]
        out.append(np.asarray(vh[:kmax]) * sel)
        g = jax.random.normal(jax.random.fold_in(key, i), (n_random, r, kmax))
        q = np.linalg.qr(np.asarray(g))[0]                                   # [n, r, kmax] orthonormal
        out.extend(np.einsum("nrk,rd->nkd", q, np.asarray(vh)) * sel)
    return np.stack(out).astype(np.float32)


def _edited_metric(params, cfg, batch: mc.ChoiceBatch, where: Tuple[int, int], bases: np.ndarray) -> np.ndarray:
    """Mean task metric [N] with each basis [N, k, D] projected out of W_O of head `where` (vmapped)."""
    l, h = where
    metric = _task_metric(cfg, batch)

    def one(basis):
        o = params["layers"]["o"]["w"]
        return metric({**params, "layers": {**params["layers"], "o": {**params["layers"]["o"], "w": o.at[l, h].set(
            ws.project_out(o[l, h], basis, -1))}}})
    return np.asarray(jax.jit(lambda b: jax.lax.map(one, b, batch_size=4))(jnp.asarray(bases)))


def _pair_map(scores: np.ndarray, path: str, title: str) -> str:
    """Heat map of a pair map [L, H, L, H] as [writer L*H, reader L*H] (NaN blank)."""
    L, H = scores.shape[:2]
    fig = Figure(figsize=(7, 6))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    im = ax.imshow(scores.reshape(L * H, L * H), cmap="viridis", interpolation="nearest")
    ticks = np.arange(0, L * H, H * max(1, L // 10))
    ax.set(xticks=ticks, yticks=ticks, xticklabels=ticks // H, yticklabels=ticks // H,
           xlabel="reader layer (heads within)", ylabel="writer layer (heads within)", title=title)
    fig.colorbar(im, ax=ax, label="composition score")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def _spectra(spectra: dict, path: str) -> str:
    """Singular values (normalised to the largest) per head and kind, on a log scale."""
    fig = Figure(figsize=(6.4, 4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for name, s in spectra.items():
        ax.semilogy(np.asarray(s) / s[0], label=name, lw=1)
    ax.set(xlabel="singular value index", ylabel="sigma_i / sigma_0", title="Head spectra")
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def run(opts: Options) -> str:
    """Run the study; returns the path of report.md."""
    report = Report(opts.out, "Weight space: composition, spectra and low-rank channels")
    model = load_model(opts.model, opts.dtype)
    params, cfg = model.params, model.cfg
    check_options(opts, cfg)
    if opts.fold:
        params, cfg = folding.fold_norms(params, cfg)
    t = time.time()
    scores = np.asarray(jax.jit(ws.composition_scores, static_argnums=(1, 2))(params, cfg, 8))
    base = np.asarray(ws.random_baseline(jax.random.PRNGKey(opts.seed), cfg, 256))
    seconds = {"composition": time.time() - t}
    pairs = ws.top_pairs(scores, base, opts.top)
    name = lambda lh: unit_label("head_out", lh)
    report.add("Composition",
               f"Q/K/V composition scores (Elhage et al.) of all {cfg.n_layers * cfg.n_heads} heads against "
               f"every head of a later layer{' (LN-folded weights)' if opts.fold else ''}, one compiled call "
               f"({seconds['composition']:.1f} s with compilation). Random matrices of the heads' shapes score "
               + ", ".join(f"{c.upper()} {b.mean():.4f} +- {b.std():.4f}" for c, b in zip(ws.COMPOSITIONS, base)) + ".",
               table(["type", "writer", "reader", "score", "z vs random"],
                     [[p["type"].upper(), name(p["writer"]), name(p["reader"]), p["score"], f"{p['z']:.0f}"]
                      for p in pairs]),
               *(report.figure(_pair_map(scores[i], report.path(f"composition_{c}.png"), f"{c.upper()}-composition"),
                               f"{c.upper()}-composition") for i, c in enumerate(ws.COMPOSITIONS)))
    heads = sorted({lh for p in pairs for lh in (p["writer"], p["reader"])})[:8]
    spectra = {}
    for kind in ws.KINDS:
        s = np.asarray(ws.svd(ws.head_factors(params, cfg, kind))[1])
        spectra.update({f"{name(lh)} {kind.upper()}": s[lh] for lh in heads})
    report.add("Spectra", "Singular values of the OV and QK matrices of the heads in the top pairs "
               "(normalised to the largest; effective rank = (sum s)^2 / sum s^2):",
               table(["head", "kind", "sigma_0", "effective rank"],
                     [[*k.split(" "), float(s[0]), float(s.sum() ** 2 / (s ** 2).sum())] for k, s in spectra.items()]),
               report.figure(_spectra(spectra, report.path("spectra.png")), "spectra"))
    batch = mc.choice_batch(TASKS[opts.task](opts.n_prompts, opts.seed), model.tokenizer)
    _massive(report, opts, (params, cfg), batch)
    _check(report, opts, (params, cfg), batch, sorted(pairs, key=lambda p: -p["z"])[:opts.top], seconds)
    report.results.update(top_pairs=pairs, baseline={c: [float(b.mean()), float(b.std())]
                                                      for c, b in zip(ws.COMPOSITIONS, base)},
                          spectra={k: v.tolist() for k, v in spectra.items()}, seconds=seconds)
    return report.write()


def _task_metric(cfg, batch: mc.ChoiceBatch):
    """params -> mean task metric of a plain run of the batch (traceable)."""
    ids, mask = jnp.asarray(batch.ids), jnp.asarray(batch.mask)

    def metric(p):
        _, c = transformer.forward_fn(p, cfg, ids, mask, collect=("final_norm",), return_logits=False)
        return batch.metric(p, c["final_norm"][:, -1:]).mean()
    return metric


def _massive(report: Report, opts: Options, params_cfg, batch: mc.ChoiceBatch) -> None:
    """The Q/K massive-values section (see the module docstring)."""
    params, cfg = params_cfg
    t = time.time()
    prof = {k: np.asarray(v) for k, v in ws.qk_profile(params, cfg, batch.ids, batch.mask).items()}
    # concentration: largest dimension over the median dimension, the most concentrated head per layer
    conc = {k: (v.max(-1) / np.median(v, -1)).max(-1) for k, v in prof.items()}          # [L]
    ranks = {"q": ws.top_dims(prof["q"]), "k": ws.top_dims(prof["k"])}
    ns = np.asarray(sorted(set(opts.zero_dims) | {0}))
    curve = np.asarray(jax.jit(lambda n: ws.zeroed_metric(params, ranks, n, _task_metric(cfg, batch)))(ns))
    report.add("Q/K massive values",
               "Mean |q| and |k| per head dimension over the task's tokens; per layer, the most concentrated head's "
               "largest dimension over its median dimension (before and after RoPE):",
               table(["layer", "q", "q (RoPE)", "k", "k (RoPE)"],
                     [[l, *(float(conc[k][l]) for k in ("q", "q_rope", "k", "k_rope"))] for l in range(cfg.n_layers)],
                     digits=1),
               f"Task metric ({opts.task}) with the top n pre-RoPE dimensions of every head's queries and keys zeroed "
               f"(ranked by the profile; {time.time() - t:.1f} s):",
               table(["n zeroed", "metric"], [[int(n), float(v)] for n, v in zip(ns, curve)]))
    report.results["massive"] = {"concentration": {k: v.tolist() for k, v in conc.items()},
                                 "zeroed": {int(n): float(v) for n, v in zip(ns, curve)}}


def _check(report: Report, opts: Options, params_cfg, batch: mc.ChoiceBatch, pairs: list, seconds: dict) -> None:
    """The Talking-Heads check for each pair (see the module docstring), as a report section."""
    params, cfg = params_cfg
    t = time.time()
    rows, results, by_writer = [], [], {}
    vh_all = ws.svd(ws.head_factors(params, cfg, "ov"))[2]                             # [L, H, Dh, D]
    for p in pairs:
        if p["writer"] not in by_writer:                       # the edit depends on the writer alone
            bases = channel_bases(jax.random.PRNGKey(opts.seed), vh_all[p["writer"]], opts.ranks, opts.n_random)
            none = np.zeros((1, *bases.shape[1:]), np.float32)
            by_writer[p["writer"]] = _edited_metric(params, cfg, batch, p["writer"], np.concatenate([none, bases]))
        m = by_writer[p["writer"]]
        clean, m = m[0], m[1:].reshape(len(opts.ranks), 1 + opts.n_random)
        for k, row in zip(opts.ranks, m):
            rnd = row[1:] - clean
            rows.append([p["type"].upper(), unit_label("head_out", p["writer"]), unit_label("head_out", p["reader"]),
                         k, float(row[0] - clean), float(rnd.mean()), float(rnd.std())])
            results.append(dict(zip(["type", "writer", "reader", "rank", "top_delta", "random_delta_mean",
                                     "random_delta_std"], rows[-1])))
        logging.info("check: pair %s done", p)
    seconds["check"] = time.time() - t
    report.add("Low-rank channel check",
               f"Task: {opts.task}, {opts.n_prompts} prompts; metric: log P(answer) - log P(other options), "
               "mean over prompts. For each pair, the writer's top-k OV output directions are projected out of "
               f"its W_O (a weight edit, so every reader of the writer loses them; pairs sharing a writer share the "
               f"numbers), against {opts.n_random} random k-dim subspaces of its output space; change of the metric "
               f"from the unedited model ({seconds['check']:.1f} s):",
               table(["type", "writer", "reader", "rank k", "top-k removed", "random-k removed (mean)", "(std)"], rows))
    report.results["check"] = results
