"""Patched runs of a `PatchingProblem`: one mask (differentiable) or a batch (chunked, vmapped, sharded).

Node masks take the fast path. A mask can change nothing before the first layer it touches
(`Plan.start_layer`) nor, under causal attention, any position before the first one it touches:
each patched run starts from the target's cached residual stream at `start_layer`, recomputes only
the final `Plan.suffix_len` positions (earlier keys and values read in place from the target's
cache), starts from the target's cached head outputs when the first layer is touched only after
them (`Plan.from_z`), and gives the last layer queries only at the positions the metric reads. All
of it is arguments of `models.transformer.run_layers` (`Context`); the block itself is unchanged.
`suffix_len == T` is the full-position path; `suffix_len == 0` (`NOTHING`: the masks touch no
layer, or pos_w selects no position) patches nothing and returns the target's own final states,
bit-identical to the unpatched run.

Masks with edges (`Mask.edges`) run the whole model at every position (`interventions.edges`);
the gradient of a pure edge mask keeps no per-layer sender buffer (`_edge_metric`'s custom VJP).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxcircuits.engine import memory
from jaxcircuits.engine.runner import ChunkCall, RunOptions, run_chunks, stacked
from jaxcircuits.interventions import sites
from jaxcircuits.interventions.edges import EdgeGraph, EdgeMask
from jaxcircuits.interventions.problem import PatchingProblem
from jaxcircuits.interventions.sites import Intervention, Mask
from jaxcircuits.models import transformer as M
from jaxcircuits.models.config import ModelConfig

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class Plan:
    """Static shape of the patched computation.

    start_layer: first layer any mask touches; suffix_len: final positions recomputed (T = all,
    0 = none: `NOTHING`); from_z: the first layer is touched only at or after its head outputs z (no
    `before_z` site).
    """

    start_layer: int
    suffix_len: int
    from_z: bool = False


NOTHING = Plan(0, 0)          # the masks patch nothing: the target's own final states


def make_plan(touched: dict, pos_w) -> Plan:
    """Plan from {site: layers any mask may touch there} and the position weights [B, T] (host);
    `NOTHING` when no layer is touched or no position selected."""
    layers = sorted({int(l) for ls in touched.values() for l in ls})
    if not layers or not _suffix_len(pos_w):
        return NOTHING
    from_z = not any(layers[0] in touched[s] for s in touched if sites.get(s).before_z)
    return Plan(layers[0], _suffix_len(pos_w), from_z)


def _suffix_len(pos_w) -> int:
    """Final positions from the first one any row of pos_w [B, T] (host) selects to the end (0: none)."""
    cols = np.flatnonzero(np.asarray(pos_w).any(0))
    return int(np.asarray(pos_w).shape[1] - cols[0]) if len(cols) else 0


def layers_touched(mask: Mask) -> dict:
    """{site: sorted layers} where a concrete node mask (leaves [L, ...] or [N, L, ...]) is nonzero."""
    out = {}
    for s in mask.sites():
        a = np.abs(np.asarray(getattr(mask, s)))
        layer_axis = a.ndim - 1 - len(sites.get(s).units)
        per_layer = a.sum(axis=tuple(i for i in range(a.ndim) if i != layer_axis))
        out[s] = np.flatnonzero(per_layer > 0).tolist()
    return out


@struct.dataclass
class PlanLayers:
    """The layer params a plan's patched run reads, cut from the stacked params once, outside the
    compiled call (slicing a stacked array inside it copies the slice on every call), each stacked
    [l, ...]: `first` (layer start_layer, when the plan starts from its cached z), `mid` (the scanned
    layers) and `last` (layer L-1 when it runs alone with queries only for the metric's positions);
    None where the plan has no such part."""

    first: Optional[dict]
    mid: Optional[dict]
    last: Optional[dict]


def _bounds(cfg: ModelConfig, plan: Plan, n_out: int):
    """(first scanned layer, end of the scan) of `plan` for a metric reading n_out positions."""
    start = plan.start_layer + int(plan.from_z)
    split = cfg.n_layers - 1 if plan.suffix_len > n_out else cfg.n_layers   # the last layer runs alone if it can shrink
    return start, split


@functools.partial(jax.jit, static_argnames=("cfg", "plan", "n_out"))
def plan_layers(params, cfg: ModelConfig, plan: Plan, n_out: int) -> PlanLayers:
    """The `PlanLayers` of `plan` (metric reading n_out positions) from stacked params."""
    layers, L = params["layers"], cfg.n_layers
    if plan == NOTHING:
        return PlanLayers(None, None, None)
    start, split = _bounds(cfg, plan, n_out)
    cut = lambda a, b: jax.tree.map(lambda x: x[a:b], layers)
    return PlanLayers(cut(plan.start_layer, plan.start_layer + 1) if plan.from_z else None,
                      cut(start, split) if start < split else None,
                      cut(L - 1, L) if start <= L - 1 and split == L - 1 else None)


def _node_hidden(params, cfg: ModelConfig, problem: PatchingProblem, mask: Mask, plan: Plan,
                 layers: Optional[PlanLayers]) -> Array:
    """`patched_hidden` of a node mask, on the fast path of `plan`."""
    target, n_out = problem.target, problem.metric.n_positions
    L, T = cfg.n_layers, target.tokens.shape[1]
    L0, R = plan.start_layer, plan.suffix_len
    if plan == NOTHING:
        return target.final[:, T - n_out:]
    if n_out > R:
        raise ValueError(f"metric reads {n_out} final positions but only {R} are recomputed")
    layers = plan_layers(params, cfg, plan, n_out) if layers is None else layers
    first = T - R
    iv = Intervention(mask, problem.source, problem.pos_w)
    pos, valid = target.pos_ids[:, first:], target.attn_mask
    # Keys and values of the positions before the suffix: the target's, read in place (one part).
    prefix = lambda a, b: None if R == T else M.KVCache(*((c[a:b, :, :first],) for c in target.kv), first)
    x = target.resid_pre[L0][:, first:]
    if plan.from_z:
        z = target.head_out[L0:L0 + 1, :, first:]
        x, _, _ = M.run_layers(layers.first, cfg, x, M.Context(pos, valid, z=z, first_layer=L0), iv.layers(L0, L0 + 1))
    start, split = _bounds(cfg, plan, n_out)
    if layers.mid is not None:
        x, _, _ = M.run_layers(layers.mid, cfg, x, M.Context(pos, valid, prefix(start, split), first_layer=start),
                               iv.layers(start, split))
    if layers.last is not None:
        ctx = M.Context(pos, valid, prefix(L - 1, L), n_queries=n_out, first_layer=L - 1)
        x, _, _ = M.run_layers(layers.last, cfg, x, ctx, iv.layers(L - 1, L))
    return M.final_norm(params, cfg, x[:, -n_out:])


def _full_run(params, cfg: ModelConfig, problem: PatchingProblem, mask: Mask, shift=None):
    """(final-normed hidden states [B, n, D] of the metric's last n positions, the edge run's sender
    deltas [S, B, T, D] or None) of the whole model under `mask` (`Intervention`, with `shift`)."""
    t = problem.target
    h, _, carry = M.run(params, cfg, t.tokens, M.Context(t.pos_ids, t.attn_mask),
                        Intervention(mask, problem.source, problem.pos_w, shift), n_out=problem.metric.n_positions)
    return h, carry


def patched_hidden(params, cfg: ModelConfig, problem: PatchingProblem, mask: Mask, plan: Optional[Plan] = None,
                   layers: Optional[PlanLayers] = None) -> Array:
    """Final-normed hidden states [B, n, D] of the last n = metric.n_positions positions under one mask.

    A node mask (leaves [L, ...] over all layers, zero before plan.start_layer; problem.pos_w zero
    before the last plan.suffix_len positions) computes only what it can change (module doc);
    `layers`: the plan's `PlanLayers` (cut here when None). A mask with edges runs the whole model.
    """
    if mask.edges is not None:
        return _full_run(params, cfg, problem, mask)[0]
    return _node_hidden(params, cfg, problem, mask, plan or _plan_for(problem, mask), layers)


def _plan_for(problem: PatchingProblem, mask: Mask) -> Plan:
    """The cheapest plan for a concrete node mask; for a traced one, every layer and the positions
    pos_w selects (all positions when pos_w is traced too)."""
    if sites.concrete(mask):
        return make_plan(layers_touched(mask), problem.pos_w)
    if not sites.concrete(problem.pos_w):
        return Plan(0, problem.target.tokens.shape[1])
    return Plan(0, _suffix_len(problem.pos_w))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _edge_metric(params, cfg: ModelConfig, problem: PatchingProblem, mask: Mask) -> Array:
    """Metric [B] of a mask of edges only; a function of the mask only: params and the problem are
    constants to its gradient (zero cotangents).

    Its gradient keeps no per-layer sender buffer: with g_r the gradient with respect to receiver r's
    input (a zero shift, every downstream effect included) and d_s the run's sender deltas, the mask
    enters only as x_r = ... + m[s, r] d_s, so d/dm[s, r] = sum_{b,t,d} g_r d_s on valid edges.
    Memory of a backward pass: one [L, R, B, T, D] gradient instead of L sender buffers [S, B, T, D].
    """
    return problem.metric(params, _full_run(params, cfg, problem, mask)[0])


def _edge_metric_fwd(params, cfg: ModelConfig, problem: PatchingProblem, mask: Mask):
    B, T = problem.target.tokens.shape
    R = EdgeGraph.of(cfg).n_receivers

    def shifted(shift):
        h, deltas = _full_run(params, cfg, problem, mask, shift)
        return problem.metric(params, h), deltas
    zero = (jnp.zeros((cfg.n_layers, R, B, T, cfg.d_model)), jnp.zeros((B, T, cfg.d_model)))
    value, vjp, deltas = jax.vjp(shifted, zero, has_aux=True)
    return value, (vjp, deltas, mask)


def _edge_metric_bwd(cfg: ModelConfig, res, ct):
    vjp, deltas, mask = res
    (g_layers, g_final), = vjp(ct)
    layers = jnp.einsum("lrbtd,sbtd->lsr", g_layers, deltas, preferred_element_type=jnp.float32)
    final = jnp.einsum("btd,sbtd->s", g_final, deltas, preferred_element_type=jnp.float32)
    layers = jnp.where(EdgeGraph.of(cfg).valid().layers, layers, 0.0)
    e = mask.edges
    return None, None, Mask(edges=EdgeMask(layers.astype(jnp.result_type(e.layers)), final.astype(jnp.result_type(e.final))))


_edge_metric.defvjp(_edge_metric_fwd, _edge_metric_bwd)


def _metric_fn(params, cfg: ModelConfig, problem: PatchingProblem, mask: Mask, plan: Optional[Plan] = None,
               layers: Optional[PlanLayers] = None) -> Array:
    """The metric [B] of one mask on a problem already cut to its footprint."""
    if mask.edges is not None and not mask.sites():
        return _edge_metric(params, cfg, problem, mask)
    return problem.metric(params, patched_hidden(params, cfg, problem, mask, plan, layers))


_full_metric = jax.jit(_metric_fn, static_argnames=("cfg", "plan"))


def patched_metric(params, cfg: ModelConfig, problem: PatchingProblem, mask: Mask,
                   plan: Optional[Plan] = None) -> Array:
    """The metric [B] of the target run patched by one `mask` (node leaves [L, ...], edges [L, S, R]
    and [S]); differentiable in the mask (`jax.grad` of its mean at mask 0 is attribution patching).
    The mask and, where concrete, the source inside its footprint are checked
    (`PatchingProblem.for_footprint`; a traced mask's footprint is every unit of its leaves). `plan`
    (node masks) defaults to the cheapest one valid for the mask (`_plan_for`); edges run compiled."""
    sites.check_mask(mask, cfg)
    problem = problem.for_footprint(cfg, sites.footprint(mask))
    if mask.edges is not None:
        return _full_metric(params, cfg, problem, mask)
    return _metric_fn(params, cfg, problem, mask, plan or _plan_for(problem, mask))


def masks_metric_fn(params, cfg: ModelConfig, problem: PatchingProblem, masks: Mask, plan: Optional[Plan] = None,
                    layers: Optional[PlanLayers] = None) -> Array:
    """Metric [N, B] for a batch of masks (leaves [N, ...]), vmapped over the mask axis; the problem
    is already cut to the masks' footprint and `layers` are the plan's (`run_masks`)."""
    return jax.vmap(lambda m: problem.metric(params, patched_hidden(params, cfg, problem, m, plan, layers)))(masks)


masks_metric = jax.jit(masks_metric_fn, static_argnames=("cfg", "plan"))


def _as_float(masks: Mask) -> Mask:
    return jax.tree.map(lambda a: a.astype(jnp.float32), masks)


def masks_call(params, cfg: ModelConfig, problem: PatchingProblem, masks: Mask, plan: Optional[Plan] = None):
    """(the compiled call of a chunk of `masks`, the masks as its items) for `runner.run_chunks`: the
    masks (`sites.check_mask`) and the source inside the batch's footprint
    (`PatchingProblem.for_footprint`) checked; node masks on `plan` (default: the layers the masks
    touch and the positions pos_w selects), masks with edges on every layer and position."""
    sites.check_mask(masks, cfg, batched=True)
    touched = sites.footprint(masks, batched=True)
    problem = problem.for_footprint(cfg, touched)
    layers = None
    if masks.edges is None:
        plan = plan or make_plan(layers_touched(touched), problem.pos_w)
        layers = plan_layers(params, cfg, plan, problem.metric.n_positions)
    items = stacked(_as_float(masks))
    call = ChunkCall(masks_metric, dict(params=params, problem=problem, layers=layers), dict(cfg=cfg, plan=plan),
                     "masks", key=(cfg, plan, signature((params, problem, layers)), signature(items.take(0, 1))),
                     made=memory.tree_bytes((problem.source, layers)))
    return call, items


def run_masks(params, cfg: ModelConfig, problem: PatchingProblem, masks: Mask, opts: RunOptions = RunOptions(),
              plan: Optional[Plan] = None, **options) -> np.ndarray:
    """Metric [N, B] for N masks (a `Mask` with leaves [N, ...], host or device; node leaves and/or
    edges), in chunks of one compiled call each (`engine.runner.run_chunks`; `opts`, or its fields as
    keywords: chunk_size (None or 0: from free memory), shard, on_chunk(start, values)). The last chunk
    is padded with zero masks and trimmed. `plan` (node masks) defaults to the layers the masks touch
    and the positions pos_w selects; masks with edges run every layer at every position. The masks
    and the source they read are checked once, before the first chunk (`masks_call`).
    """
    call, items = masks_call(params, cfg, problem, masks, plan)
    return run_chunks(call, items, dataclasses.replace(opts, **options), "run_masks")


def signature(tree) -> tuple:
    """The structure, shapes and dtypes of `tree`'s leaves, hashable (what a compiled call's memory
    depends on besides static arguments)."""
    leaves, treedef = jax.tree.flatten(tree)
    return str(treedef), tuple((tuple(np.shape(a)), str(getattr(a, "dtype", type(a)))) for a in leaves)
