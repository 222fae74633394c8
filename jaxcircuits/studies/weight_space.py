"""Weight-space study (see experiments/weight_space.py): which heads compose, their spectra, and
whether the composition runs through a low-rank channel.

  1. Q/K/V composition scores of every head pair (`weight_space.composition_scores`, one compiled
     call) against a random-matrix baseline: a writer x reader heat map per type and the top pairs.
  2. The OV and QK singular-value spectra of the heads in the top pairs.
  3. Q/K massive values: per layer, how concentrated |q| and |k| are on a few head dimensions
     (with and without RoPE), and the task metric with the top n dimensions of every head's
     queries and keys zeroed (`weight_space.zero_top_dims`, vmapped over n).
  4. The Talking-Heads check on a registered choice task, an activation patch: for each top pair,
     the writer's head output (site head_out) is patched from the task's contrast run
     (`multiple_choice.rotated_options`: each option becomes the next one in the text, so the answer
     changes) only within a rank-k subspace of its z space ('subspace:head_out'): the top-k singular
     directions of the link from writer to reader (`pair_directions`) against random k-dim subspaces
     of the same rank, with rank 0 (unpatched) and the full patch (rank d_head) in the same vmapped
     call (`pair_patch`). If the low-rank channel carries the behaviour, the top-k patch moves the
     metric more than random ones, and a small k already moves a large part of the full patch's
     effect.
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

from jaxcircuits.methods import folding
from jaxcircuits.methods import weight_space as ws
from jaxcircuits.models import transformer
from jaxcircuits.interventions.problem import PatchingProblem
from jaxcircuits.reports.report import Report, table
from jaxcircuits.interventions.sites import Mask, transform_key, unit_label
from jaxcircuits.studies import kit
from jaxcircuits.studies.kit import OptionError, flag
from jaxcircuits.tasks import registry

Array = jax.Array
# the registered choice tasks (target: the prompts, source: their rotated-options contrast), --task
TASKS = ("colors", "mc", "recall")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Options(kit.StudyOptions):
    """The study's options: its binary's flags (`kit.flag` fields)."""

    task: str = flag("enum", "colors", "Choice task of the check: Colored Objects, lettered multiple choice, list "
                     "recall.", enum_values=list(TASKS))
    n_prompts: int = flag("integer", 8, "Prompts of the check.", lower_bound=1)
    seed: int = flag("integer", 0, "Seed of the prompts and random subspaces.")
    top: int = flag("integer", 3, "Top pairs per composition type listed (and checked, overall).", lower_bound=1)
    ranks: Tuple[int, ...] = flag("list", ["1", "4", "16"], "Subspace ranks of the check (each in [1, d_head]).",
                                  parse=kit.ints)
    n_random: int = flag("integer", 3, "Random subspaces per rank (one vmapped call per pair with the top-k ones).",
                         lower_bound=1)
    zero_dims: Tuple[int, ...] = flag("list", ["1", "4"], "Numbers of top Q/K head dimensions zeroed (massive "
                                      "values; 0 is added).", parse=kit.ints)
    fold: bool = flag("bool", False, "Fold the norms into the weights first (folding.fold_norms).")
    out: str = kit.out("weight_space")

    def check_flags(self) -> None:
        """A registered choice task."""
        if self.task not in TASKS:
            raise OptionError(f"--task={self.task}: unknown; known: {sorted(TASKS)}")

    def check(self, cfg) -> None:
        """Top pairs, ranks and zeroed dimensions within the model's heads; two layers at least."""
        if not 1 <= self.top <= cfg.n_heads * cfg.n_heads:
            raise OptionError(f"--top={self.top} out of range [1, {cfg.n_heads * cfg.n_heads}]")
        bad = [k for k in self.ranks if not 1 <= k <= cfg.d_head]
        if bad or not self.ranks:
            raise OptionError(f"--ranks={','.join(map(str, self.ranks))}: each must lie in [1, d_head={cfg.d_head}]")
        if any(not 0 <= n <= cfg.d_head for n in self.zero_dims):
            raise OptionError(f"--zero_dims={','.join(map(str, self.zero_dims))}: each must lie in "
                              f"[0, d_head={cfg.d_head}]")
        if cfg.n_layers < 2:
            raise OptionError("the model has one layer: no head pairs compose")


def pair_directions(params, cfg, pair: dict) -> Array:
    """Orthonormal rows [Dh, Dh] in the writer's z space (the head_out site, W_O's input), ordered by
    how strongly the pair's link carries them.

    Row-vector convention (`weight_space`): the writer (l_A, h_A) adds z W_O^A to the residual, and
    the reader (l_B, h_B) reads it through M_B = QK_B (Q-composition: into its query), QK_B^T
    (K: into its keys) or OV_B (V: into its values), the matrices of the composition score. The
    link is z -> z W_O^A M_B, i.e. the [Dh, D] matrix W_O^A M_B, factored as (W_O^A left_B) right_B
    and decomposed by `weight_space.svd` = U S Vh. The rows are U^T: the top singular directions
    on the writer's side (right singular vectors of the link written as a column-vector map)."""
    ov, qk = (ws.head_factors(params, cfg, kind) for kind in ws.HEAD_MATRICES)
    reader = dict(zip(ws.COMPOSITIONS, (qk, qk.T, ov)))[pair["type"]]
    (la, ha), (lb, hb) = pair["writer"], pair["reader"]
    link = ws.Factored(ov.right[la, ha] @ reader.left[lb, hb], reader.right[lb, hb])
    return ws.svd(link)[0].T


def pair_bases(key, directions: Array, ranks: Tuple[int, ...], n_random: int) -> Array:
    """Bases [2 + len(ranks) * (1 + n_random), Dh, Dh] of the check for one pair, orthonormal rows
    padded with zero rows (`weight_space.rank_bases`): rank 0 (the unpatched run); per rank k the
    top-k `directions` [Dh, Dh], then `n_random` random k-dim subspaces of R^Dh (the first k rows of
    Haar-random orthonormal sets, one set per rank); last the identity (rank Dh: the plain patch)."""
    d = directions.shape[-1]
    out = [jnp.zeros((1, d, d))]
    for i, k in enumerate(ranks):
        rand = jnp.linalg.qr(jax.random.normal(jax.random.fold_in(key, i), (n_random, d, d)))[0]
        out += [ws.rank_bases(directions, [k]), jax.vmap(lambda r: ws.rank_bases(r, [k])[0])(jnp.swapaxes(rand, -1, -2))]
    return jnp.concatenate([*out, jnp.eye(d)[None]])


def pair_patch(params, cfg, problem: PatchingProblem, writer: Tuple[int, int], bases: Array) -> np.ndarray:
    """Mean task metric [N] with the writer head's output (site head_out, unit `writer` (l, h))
    patched from the problem's source only within the span of each basis [N, k, Dh] (orthonormal
    rows, zero rows allowed: 'subspace:head_out'), all N in one vmapped call."""
    l, h = writer
    mask = Mask(head_out=jnp.zeros((cfg.n_layers, cfg.n_heads)).at[l, h].set(1.0))
    full = jnp.zeros((bases.shape[0], cfg.n_layers, cfg.n_heads, *bases.shape[1:])).at[:, l, h].set(bases)
    return np.asarray(ws.transform_metric(params, cfg, problem, mask, transform_key("subspace", "head_out"), full))


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
    model = kit.load(opts)
    if opts.fold:
        params, cfg = folding.fold_norms(model.params, model.cfg)
        model = dataclasses.replace(model, params=params, cfg=cfg)
    params, cfg = model.params, model.cfg
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
    for kind in ws.HEAD_MATRICES:
        s = np.asarray(ws.svd(ws.head_factors(params, cfg, kind))[1])
        spectra.update({f"{name(lh)} {kind.upper()}": s[lh] for lh in heads})
    report.add("Spectra", "Singular values of the OV and QK matrices of the heads in the top pairs "
               "(normalised to the largest; effective rank = (sum s)^2 / sum s^2):",
               table(["head", "kind", "sigma_0", "effective rank"],
                     [[*k.split(" "), float(s[0]), float(s.sum() ** 2 / (s ** 2).sum())] for k, s in spectra.items()]),
               report.figure(_spectra(spectra, report.path("spectra.png")), "spectra"))
    task = registry.build(opts.task, model.tokenizer, opts)
    _massive(report, opts, model, task)
    _check(report, opts, model, task, sorted(pairs, key=lambda p: -p["z"])[:opts.top], seconds)
    report.results.update(top_pairs=pairs, baseline={c: [float(b.mean()), float(b.std())]
                                                      for c, b in zip(ws.COMPOSITIONS, base)},
                          spectra={k: v.tolist() for k, v in spectra.items()}, seconds=seconds)
    return report.write()


def _task_metric(cfg, ids, attn_mask, metric):
    """params -> mean metric of a plain run of ids, attn_mask [B, T] (traceable)."""
    ids, attn_mask = jnp.asarray(ids), jnp.asarray(attn_mask)

    def mean_metric(p):
        _, c = transformer.forward_fn(p, cfg, ids, attn_mask, collect=("final_norm",), return_logits=False)
        return metric(p, c["final_norm"][:, -1:]).mean()
    return mean_metric


def _massive(report: Report, opts: Options, model, task: registry.TaskBatches) -> None:
    """The Q/K massive-values section (see the module docstring) on the task's target prompts."""
    params, cfg = model.params, model.cfg
    t = time.time()
    prof = {k: np.asarray(v) for k, v in ws.qk_profile(params, cfg, task.target_ids, task.target_attn_mask).items()}
    # concentration: largest dimension over the median dimension, the most concentrated head per layer
    conc = {k: (v.max(-1) / np.median(v, -1)).max(-1) for k, v in prof.items()}          # [L]
    ranks = {"q": ws.top_dims(prof["q"]), "k": ws.top_dims(prof["k"])}
    ns = np.asarray(sorted(set(opts.zero_dims) | {0}))
    metric = _task_metric(cfg, task.target_ids, task.target_attn_mask, task.metric)
    curve = np.asarray(jax.jit(lambda n: ws.zeroed_metric(params, ranks, n, metric))(ns))
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


def _check(report: Report, opts: Options, model, task: registry.TaskBatches, pairs: list, seconds: dict) -> None:
    """The Talking-Heads check for each pair (see the module docstring), as a report section: the
    task's prompts patched from their contrast (its source run, `rotated_options`)."""
    params, cfg = model.params, model.cfg
    t = time.time()
    twins, prompts = task.prompts
    problem = kit.problem(model, task, ("head_out",))
    source_score = float(kit.baselines(model, task)[0].mean())
    same_len = int((task.target_attn_mask.sum(1) == task.source_attn_mask.sum(1)).sum())
    rows, results = [], []
    for p in pairs:
        bases = pair_bases(jax.random.PRNGKey(opts.seed), pair_directions(params, cfg, p), opts.ranks, opts.n_random)
        m = pair_patch(params, cfg, problem, p["writer"], bases)
        clean, full, per_rank = m[0], m[-1] - m[0], m[1:-1].reshape(len(opts.ranks), 1 + opts.n_random) - m[0]
        for k, row in zip(opts.ranks, per_rank):
            rows.append([p["type"].upper(), unit_label("head_out", p["writer"]), unit_label("head_out", p["reader"]),
                         k, float(row[0]), float(row[1:].mean()), float(row[1:].std()), float(full)])
            results.append(dict(zip(["type", "writer", "reader", "rank", "top_delta", "random_delta_mean",
                                     "random_delta_std", "full_delta"], rows[-1]), clean=float(clean)))
        logging.info("check: pair %s done", p)
    seconds["check"] = time.time() - t
    report.add("Low-rank channel check",
               f"Task: {opts.task}, {opts.n_prompts} prompts; metric: log P(answer) - log P(other options), mean "
               f"over prompts: {results[0]['clean']:.3f} on the task's prompts. Source: the contrast prompts, each "
               f"option replaced by the next one in the text (e.g. {prompts[0].text!r} -> {twins[0].text!r}), so the "
               f"right answer moves to another option; they score the task's answers at {source_score:.3f} "
               f"({same_len}/{len(task.target_ids)} with the same token length; positions right-aligned). For each "
               "pair, the writer's head output (head_out) at every position is patched from the contrast run "
               "only within a rank-k subspace of its z space (d_head = "
               f"{cfg.d_head}): the top-k singular directions of the link W_O(writer) M(reader) (M = QK, QK^T or "
               f"OV of the reader for Q-, K-, V-composition), against {opts.n_random} random k-dim subspaces; "
               f"the full patch (rank {cfg.d_head}) gives the scale. Change of the metric from the unpatched run "
               f"({seconds['check']:.1f} s):",
               table(["type", "writer", "reader", "rank k", "top-k patched", "random-k patched (mean)", "(std)",
                      f"full patch (rank {cfg.d_head})"], rows, digits=4))
    report.results["check"] = results
    report.results["check_source"] = {"metric": source_score, "same_length": same_len}
