"""The edge site: sender -> receiver paths, one blend weight per edge.

Senders write into the residual stream: the embeddings ('embed'), each head's output
contribution z_h W_O[h] (no bias) and each MLP's output. Receivers read it: each query head's q
input, each KV head's k and v inputs (GQA: K of them), each MLP's input and the unembedding
input ('logits'). In an edge-patched run every receiver r reads

    x_r = resid + sum_s m[s, r] * w_pos * (src_s - cur_s)

where resid is the run's own residual stream at r's layer, cur_s the sender's output in this
run, src_s its output in the source run and w_pos [B, T] the position weights (the convention of
ACDC and auto-circuit: an edge with m = 1 carries the source's value of its sender, every other
edge the run's own). An all-zero mask is the plain run, bit for bit. A single edge, or edges from
senders into receivers of one layer, is Wang et al.'s path patching: senders patched, everything
else frozen, only the receivers' inputs changed. Edges out of every receiver of a node equal
the node-level patch of that node.

An `EdgeMask` holds `layers` [L, S, R] (into the R receivers of each layer: H query heads, K key
heads, K value heads, the MLP) and `final` [S] (into the unembedding), over S = 1 + L (H + 1)
senders ordered embed, then per layer its heads and its MLP. A sender feeds receivers of later
layers and, for a head, its own layer's MLP; other entries must be 0. `EdgeGraph` names and flattens
the valid edges. A batch of masks has a leading axis on both leaves and vmaps like any mask; the
metric is differentiable in the mask (edge attribution patching).

The edge-patched layer is built here from the model's public pieces (norms, projections,
`attend`, `mlp`), like the patched fast paths in `jaxcircuits.engine.patching`; it computes every layer
at every position (edges can start anywhere).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxcircuits.interventions import sites
from jaxcircuits.models import transformer as M
from jaxcircuits.models.config import ModelConfig
from jaxcircuits.engine.patching import PatchingProblem, chunking, run_chunks
from jaxcircuits.interventions.sites import LayerHooks, Mask

Array = jax.Array


@struct.dataclass
class EdgeMask:
    """Blend weights per edge: layers [L, S, R] into each layer's receivers, final [S] into the
    unembedding input ([N, L, S, R] and [N, S] for a batch of N masks)."""

    layers: Array
    final: Array


@dataclasses.dataclass(frozen=True)
class EdgeGraph:
    """The senders, receivers and valid edges of a model shape (hashable, static)."""

    n_layers: int
    n_heads: int
    n_kv_heads: int

    @classmethod
    def of(cls, cfg: ModelConfig) -> "EdgeGraph":
        return cls(cfg.n_layers, cfg.n_heads, cfg.n_kv_heads)

    @property
    def n_senders(self) -> int:
        """S = 1 + L (H + 1): embed, then per layer H heads and the MLP."""
        return 1 + self.n_layers * (self.n_heads + 1)

    @property
    def n_receivers(self) -> int:
        """R per layer = H + 2K + 1: q inputs of H heads, k and v inputs of K heads, the MLP input."""
        return self.n_heads + 2 * self.n_kv_heads + 1

    def first_sender(self, layer: int) -> int:
        """Index of layer `layer`'s first sender (its head 0); its MLP is first_sender + H."""
        return 1 + layer * (self.n_heads + 1)

    @property
    def sender_labels(self) -> Tuple[str, ...]:
        per_layer = lambda l: [f"L{l}H{h}" for h in range(self.n_heads)] + [f"L{l}MLP"]
        return ("embed", *(n for l in range(self.n_layers) for n in per_layer(l)))

    @property
    def receiver_labels(self) -> Tuple[str, ...]:
        """[L * R + 1]: per layer 'LlHh.q', 'LlKk.k', 'LlKk.v', 'LlMLP'; then 'logits'."""
        H, K = self.n_heads, self.n_kv_heads
        per_layer = lambda l: ([f"L{l}H{h}.q" for h in range(H)] + [f"L{l}K{k}.k" for k in range(K)]
                               + [f"L{l}K{k}.v" for k in range(K)] + [f"L{l}MLP"])
        return (*(n for l in range(self.n_layers) for n in per_layer(l)), "logits")

    @property
    def sender_layer(self) -> np.ndarray:
        """int [S]: the layer of each sender (-1 for embed)."""
        return np.concatenate([[-1], np.repeat(np.arange(self.n_layers), self.n_heads + 1)])

    def valid(self) -> EdgeMask:
        """bool EdgeMask: True where the sender precedes the receiver (a head also feeds its own
        layer's MLP)."""
        S, R, H = self.n_senders, self.n_receivers, self.n_heads
        layer = self.sender_layer
        is_head = np.zeros(S, bool)
        is_head[1:] = (np.arange(S - 1) % (H + 1)) < H
        before = layer[None, :, None] < np.arange(self.n_layers)[:, None, None]          # [L, S, 1]
        v = np.broadcast_to(before, (self.n_layers, S, R)).copy()
        v[:, :, -1] |= (layer[None, :] == np.arange(self.n_layers)[:, None]) & is_head[None]
        return EdgeMask(v, np.ones(S, bool))

    @functools.cached_property
    def _index(self) -> np.ndarray:
        return np.flatnonzero(self.valid().layers)

    @property
    def n_edges(self) -> int:
        return len(self._index) + self.n_senders

    @property
    def edges(self) -> Tuple[Tuple[str, str], ...]:
        """(sender, receiver) labels of every valid edge, in `flat` order (layer, sender, receiver;
        then the unembedding's senders)."""
        S, R = self.n_senders, self.n_receivers
        l, s, r = np.unravel_index(self._index, (self.n_layers, S, R))
        snd, rcv = self.sender_labels, self.receiver_labels
        return (*((snd[a], rcv[b * R + c]) for a, b, c in zip(s, l, r)), *((n, "logits") for n in snd))

    def flat(self, mask: EdgeMask):
        """Leaves [..., L, S, R] and [..., S] -> [..., E], the valid edges in `edges` order."""
        lead = jnp.shape(mask.final)[:-1]
        lay = jnp.reshape(mask.layers, (*lead, -1))[..., self._index]
        return jnp.concatenate([lay, jnp.asarray(mask.final, lay.dtype)], -1)

    def unflat(self, vec) -> EdgeMask:
        """[..., E] -> EdgeMask (zero at invalid edges)."""
        vec = jnp.asarray(vec)
        lead, n = vec.shape[:-1], len(self._index)
        if vec.shape[-1] != self.n_edges:
            raise ValueError(f"edge vector has {vec.shape[-1]} entries on its last axis, expected {self.n_edges}")
        lay = jnp.zeros((*lead, self.n_layers * self.n_senders * self.n_receivers), vec.dtype)
        lay = lay.at[..., self._index].set(vec[..., :n])
        return EdgeMask(lay.reshape(*lead, self.n_layers, self.n_senders, self.n_receivers), vec[..., n:])

    def path_mask(self, senders: Sequence[str], receivers: Sequence[str]) -> EdgeMask:
        """float32 EdgeMask with 1 on every valid edge from a sender in `senders` to a receiver in
        `receivers` (labels of `sender_labels` / `receiver_labels`; a head's label 'LlHh' as a receiver
        means its q, k and v inputs, and its KV head's for k and v)."""
        snd, rcv = self.sender_labels, self.receiver_labels
        unknown = [s for s in senders if s not in snd]
        if unknown:
            raise ValueError(f"unknown sender(s) {unknown}; senders are 'embed', 'LlHh', 'LlMLP'")
        wanted = set()
        for r in receivers:
            got = self._receivers_of(r)
            if not got:
                raise ValueError(f"unknown receiver {r!r}; receivers are {rcv[:3]}..., 'LlMLP', 'logits' "
                                 "or a head 'LlHh' (its q, k, v inputs)")
            wanted |= got
        m = np.zeros(self.n_layers * self.n_receivers + 1, bool)
        m[sorted(wanted)] = True
        s = np.isin(np.array(snd), list(senders))
        full = s[:, None] & m[None, :]                                              # [S, L R + 1]
        lay = full[:, :-1].reshape(self.n_senders, self.n_layers, self.n_receivers).transpose(1, 0, 2)
        valid = self.valid()
        return EdgeMask(jnp.asarray(lay & valid.layers, jnp.float32), jnp.asarray(full[:, -1], jnp.float32))

    def _receivers_of(self, label: str) -> set:
        """Flat receiver indices [into receiver_labels] named by `label`."""
        rcv = self.receiver_labels
        if label in rcv:
            return {rcv.index(label)}
        if label.startswith("L") and "H" in label and label[1:].replace("H", "", 1).isdigit():
            l, h = (int(x) for x in label[1:].split("H"))
            if l < self.n_layers and h < self.n_heads:
                k = h // (self.n_heads // self.n_kv_heads)
                return {rcv.index(f"L{l}H{h}.q"), rcv.index(f"L{l}K{k}.k"), rcv.index(f"L{l}K{k}.v")}
        return set()


def path_masks(graph: EdgeGraph, senders: Sequence[str], receivers: Sequence[str], subsets) -> EdgeMask:
    """Path patching over sender subsets: a batch of float32 masks [N, ...] whose row i patches every valid
    edge from the senders subsets[i] selects (bool [N, len(senders)]) into `receivers` (as in
    `EdgeGraph.path_mask`). Run them in one call with `run_edge_masks`; the positions are the problem's
    pos_w."""
    subsets = np.asarray(subsets)
    if subsets.ndim != 2 or subsets.shape[1] != len(senders) or not np.isin(subsets, (0, 1)).all():
        raise ValueError(f"subsets has shape {subsets.shape}, expected 0/1 [N, {len(senders)}] (one column per sender)")
    one = [graph.path_mask([s], receivers) for s in senders]
    stack = lambda leaves: np.stack([np.asarray(a).ravel() for a in leaves])          # [U, n]
    w = subsets.astype(np.float32)
    layers = np.minimum(w @ stack([m.layers for m in one]), 1.0)
    final = np.minimum(w @ stack([m.final for m in one]), 1.0)
    return EdgeMask(layers.reshape(len(w), *one[0].layers.shape) if one else np.zeros((len(w), 0)), final)


def check_edge_mask(mask: EdgeMask, graph: EdgeGraph, batched: bool = False) -> None:
    """ValueError unless the leaves have shapes [L, S, R] and [S] ([N, ...] when `batched`), values in
    [0, 1] and zeros on invalid edges (where concrete)."""
    lead = 1 if batched else 0
    want = ((graph.n_layers, graph.n_senders, graph.n_receivers), (graph.n_senders,))
    got = (tuple(jnp.shape(mask.layers)[lead:]), tuple(jnp.shape(mask.final)[lead:]))
    if got != want or (batched and jnp.shape(mask.layers)[0] != jnp.shape(mask.final)[0]):
        raise ValueError(f"edge mask leaves have shapes {jnp.shape(mask.layers)}, {jnp.shape(mask.final)}; "
                         f"expected {'[N] + ' if batched else ''}{want[0]} (L, senders, receivers) and {want[1]}")
    if not sites.concrete(mask):
        return
    for name, a in (("layers", mask.layers), ("final", mask.final)):
        v = np.asarray(a, np.float64)
        if v.size and not (v.min() >= 0 and v.max() <= 1):
            raise ValueError(f"edge mask {name} has values outside [0, 1] or NaN: min {v.min()}, max {v.max()}")
    bad = (np.asarray(mask.layers) != 0) & ~graph.valid().layers
    if bad.any():
        idx = np.argwhere(bad)[0]
        l, s, r = (int(i) for i in idx[-3:])
        raise ValueError(f"edge mask is nonzero on an edge that does not exist: sender "
                         f"{graph.sender_labels[s]!r} does not precede receiver "
                         f"{graph.receiver_labels[l * graph.n_receivers + r]!r} (layers index {tuple(int(i) for i in idx)})")


def _receiver_input(x: Array, deltas: Array, m: Array, shift: Optional[Array] = None) -> Array:
    """x [B, T, D] plus each receiver's mask-weighted sender deltas: m [S, R], deltas [S, B, T, D]
    -> [R, B, T, D], plus `shift` [R, B, T, D] if given. A receiver whose weights are all zero (and no
    shift) reads x exactly."""
    xr = x[None] + jnp.einsum("sr,sbtd->rbtd", m.astype(x.dtype), deltas)
    return xr if shift is None else xr + shift


def _per_head(p: dict, plain: Array, h: Array, active: Array, spec: str) -> Array:
    """A projection [B, T, n, Dh] where each head n reads its own normed input h [n, B, T, D]:
    heads with `active` [n] take the per-head value; the others keep `plain` (the fused projection
    of the shared input) exactly, with the per-head value's gradient (straight through), so that
    the gradient at an all-zero mask is the edges' own."""
    own = M.dense(p, h, spec)
    return jnp.where(active[:, None], own, jax.lax.stop_gradient(plain) + (own - jax.lax.stop_gradient(own)))


def _edge_layer(cfg: ModelConfig, rope, allowed: Array, pos_w: Array, carry, per_layer):
    """One layer of the edge-patched run (`_edge_run`'s scan).

    carry: (x [B, T, D], deltas [S, B, T, D]: each sender's w_pos * (src - cur) so far, 0 after);
    per_layer: (params_l, m_l [S, R], shift_l [R, B, T, D] or None (added to the receivers' inputs),
    source z_l [B, T, H, Dh], source mlp_out_l [B, T, D], l).
    """
    x, deltas = carry
    p, m, shift, src_z, src_mlp, l = per_layer
    shift = (None, None) if shift is None else (shift[:-1], shift[-1:])
    H, K = cfg.n_heads, cfg.n_kv_heads
    hooks = LayerHooks(None, ())
    n1 = functools.partial(M.norm, cfg, p["norm1"])
    xr = n1(_receiver_input(x, deltas, m[:, :H + 2 * K], shift[0]))                    # [H + 2K, B, T, D]
    active = (m != 0).any(0)
    q0, k0, v0 = M.qkv(cfg, p, n1(x), None, hooks)
    q = M.rotate(_per_head(p["q"], q0, xr[:H], active[:H], "hbtd,dhe->bthe"), rope)
    k = M.rotate(_per_head(p["k"], k0, xr[H:H + K], active[H:H + K], "kbtd,dke->btke"), rope)
    v = _per_head(p["v"], v0, xr[H + K:], active[H + K:H + 2 * K], "kbtd,dke->btke")
    z = M.attend(cfg, q, k, v, allowed, hooks)
    x = x + M.attn_output(cfg, p, z, hooks)
    w_o = p["o"]["w"]
    head_delta = jnp.einsum("bthe,hed->hbtd", (src_z.astype(z.dtype) - z), w_o) * pos_w[None, :, :, None]
    first = 1 + l * (H + 1)
    deltas = jax.lax.dynamic_update_slice_in_dim(deltas, head_delta.astype(deltas.dtype), first, 0)
    mlp_in = _receiver_input(x, deltas, m[:, -1:], shift[1])[0]
    out = M.mlp(cfg, p, M.norm(cfg, p["norm2"], mlp_in), hooks)
    mlp_delta = ((src_mlp.astype(out.dtype) - out) * pos_w[..., None])[None]
    deltas = jax.lax.dynamic_update_slice_in_dim(deltas, mlp_delta.astype(deltas.dtype), first + H, 0)
    return (x + out, deltas), None


def _check_source(problem: PatchingProblem) -> None:
    """ValueError unless the problem's source holds the entries senders read (`sites.EDGE_SOURCE`)."""
    missing = [k for k in sites.EDGE_SOURCE if k not in problem.source]
    if missing:
        raise ValueError(f"an edge-patched run reads the source's {list(sites.EDGE_SOURCE)}; it lacks {missing}")


def _edge_run(params, cfg: ModelConfig, problem: PatchingProblem, mask: EdgeMask, shift=None):
    """(final-normed hidden states [B, n, D] of the last n = metric.n_positions positions, the sender
    deltas [S, B, T, D]: w_pos * (src - cur) of every sender) of the edge-patched run; `shift`
    (layers [L, R, B, T, D], final [B, T, D]) is added to the receivers' inputs when given."""
    target, source = problem.target, problem.source
    graph = EdgeGraph.of(cfg)
    x = M.embed(params, cfg, target.tokens, target.pos_ids)
    pos_w = problem.pos_w.astype(x.dtype)
    B, T, D = x.shape
    deltas = jnp.zeros((graph.n_senders, B, T, D), x.dtype)
    deltas = deltas.at[0].set((source["resid_pre"][0].astype(x.dtype) - x) * pos_w[..., None])
    body = functools.partial(_edge_layer, cfg, M.rope_tables(cfg, target.pos_ids),
                             M.attention_mask(target.attn_mask, T), pos_w)
    xs = (params["layers"], mask.layers, None if shift is None else shift[0], source["head_out"],
          source["mlp_out"], jnp.arange(cfg.n_layers))
    (x, deltas), _ = jax.lax.scan(body, (x, deltas), xs)
    x = _receiver_input(x, deltas, mask.final[:, None], None if shift is None else shift[1][None])[0]
    return M.final_norm(params, cfg, x[:, -problem.metric.n_positions:]), deltas


def edge_hidden(params, cfg: ModelConfig, problem: PatchingProblem, mask: EdgeMask) -> Array:
    """Final-normed hidden states [B, n, D] of the last n = metric.n_positions positions of the target
    run patched along the edges of `mask` (leaves [L, S, R], [S]) from problem.source, at the
    positions problem.pos_w selects."""
    return _edge_run(params, cfg, problem, mask)[0]


def prepared(cfg: ModelConfig, problem: PatchingProblem) -> PatchingProblem:
    """The problem cut to what senders read: the source's embeddings (layer 0's resid_pre), head z's
    and MLP outputs at the positions pos_w selects, checked (`PatchingProblem.for_footprint`)."""
    _check_source(problem)
    L, H = cfg.n_layers, cfg.n_heads
    reads = dict(zip(sites.EDGE_SOURCE, (np.arange(L) == 0, np.ones((L, H), bool), np.ones(L, bool))))
    return problem.for_footprint(cfg, Mask(**reads))


def edge_metric(params, cfg: ModelConfig, problem: PatchingProblem, mask: EdgeMask) -> Array:
    """The metric [B] of the target run patched along the edges of one `mask`; differentiable in the
    mask (`jax.grad` of its mean at 0 is edge attribution patching). The mask (`check_edge_mask`)
    and the source it reads are checked where concrete."""
    check_edge_mask(mask, EdgeGraph.of(cfg))
    return _metric(params, cfg, prepared(cfg, problem), mask)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _metric_fn(params, cfg: ModelConfig, problem: PatchingProblem, mask: EdgeMask) -> Array:
    """Metric [B] of one edge mask on a prepared problem; a function of the mask only: params and the
    problem are constants to its gradient (zero cotangents).

    Its gradient keeps no per-layer sender buffer: with g_r the gradient with respect to receiver r's
    input (a zero shift, every downstream effect included) and d_s the run's sender deltas, the mask
    enters only as x_r = ... + m[s, r] d_s, so d/dm[s, r] = sum_{b,t,d} g_r d_s on valid edges.
    Memory of a backward pass: one [L, R, B, T, D] gradient instead of L sender buffers [S, B, T, D].
    """
    return problem.metric(params, edge_hidden(params, cfg, problem, mask))


def _metric_fwd(params, cfg: ModelConfig, problem: PatchingProblem, mask: EdgeMask):
    B, T = problem.target.tokens.shape
    R = EdgeGraph.of(cfg).n_receivers

    def shifted(shift):
        h, deltas = _edge_run(params, cfg, problem, mask, shift)
        return problem.metric(params, h), deltas
    zero = (jnp.zeros((cfg.n_layers, R, B, T, cfg.d_model)), jnp.zeros((B, T, cfg.d_model)))
    value, vjp, deltas = jax.vjp(shifted, zero, has_aux=True)
    return value, (vjp, deltas, mask)


def _metric_bwd(cfg: ModelConfig, res, ct):
    vjp, deltas, mask = res
    (g_layers, g_final), = vjp(ct)
    layers = jnp.einsum("lrbtd,sbtd->lsr", g_layers, deltas, preferred_element_type=jnp.float32)
    final = jnp.einsum("btd,sbtd->s", g_final, deltas, preferred_element_type=jnp.float32)
    layers = jnp.where(EdgeGraph.of(cfg).valid().layers, layers, 0.0)
    return None, None, EdgeMask(layers.astype(jnp.result_type(mask.layers)), final.astype(jnp.result_type(mask.final)))


_metric_fn.defvjp(_metric_fwd, _metric_bwd)


def _masks_metric_fn(params, cfg: ModelConfig, problem: PatchingProblem, masks: EdgeMask) -> Array:
    """Metric [N, B] of a batch of edge masks (leaves [N, ...]), vmapped over the mask axis."""
    return jax.vmap(lambda m: _metric_fn(params, cfg, problem, m))(masks)


_metric = jax.jit(_metric_fn, static_argnames=("cfg",))
_masks_metric = jax.jit(_masks_metric_fn, static_argnames=("cfg",))


def run_edge_masks(params, cfg: ModelConfig, problem: PatchingProblem, masks: EdgeMask, *,
                   chunk_size: int = 64, shard: bool = True,
                   on_chunk: Optional[Callable[[int, np.ndarray], None]] = None) -> np.ndarray:
    """Metric [N, B] of N edge masks (leaves [N, L, S, R] and [N, S]), run in chunks of `chunk_size`
    (one compilation; the last chunk padded with zero masks and trimmed; with shard=True and several
    devices each chunk is split over them). Masks and source are checked once, before the first
    chunk; on_chunk(start, values) sees each chunk. Memory per mask: the sender deltas [S, B, T, D]."""
    graph = EdgeGraph.of(cfg)
    check_edge_mask(masks, graph, batched=True)
    problem = prepared(cfg, problem)
    n = int(jnp.shape(masks.final)[0])
    chunk_size, sharding = chunking(n, chunk_size, shard)
    as_float = lambda chunk: jax.tree.map(lambda a: a.astype(jnp.float32), chunk)
    return run_chunks(lambda chunk: _masks_metric(params, cfg, problem, as_float(chunk)), masks, n, chunk_size,
                      sharding, "run_edge_masks", on_chunk)
