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
layers and, for a head, its own layer's MLP where the block wires it so (`block.same_layer_reads`:
not in a parallel block, whose MLP reads the layer's input); other entries must be 0. `EdgeGraph`
names and flattens the valid edges. A batch of masks has a leading axis on both leaves and vmaps like any mask; the
metric is differentiable in the mask (edge attribution patching).

In an edge-patched run the model's block is unchanged: `EdgeIO` is the run's `LayerIO` (the
block's receiver reads and sender writes, `models.block`), and carries each sender's delta
w_pos * (src_s - cur_s) [S, B, T, D] from layer to layer. Such a run computes every layer at every
position (edges can start anywhere). An edge mask is the `edges` leaf of a `sites.Mask`: it runs,
batches, differentiates and trains through the same entry points as node masks
(`engine.patching.patched_metric` / `run_masks`).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxcircuits.models.block import LayerIO, Parts, same_layer_reads
from jaxcircuits.models.config import ModelConfig

Array = jax.Array


@struct.dataclass
class EdgeMask:
    """Blend weights per edge: layers [L, S, R] into each layer's receivers, final [S] into the
    unembedding input ([N, L, S, R] and [N, S] for a batch of N masks)."""

    layers: Array
    final: Array


@dataclasses.dataclass(frozen=True)
class EdgeGraph:
    """The senders, receivers and valid edges of a model shape (hashable, static); mlp_reads_heads:
    a layer's MLP reads its own heads' writes (`block.same_layer_reads`; not in a parallel block)."""

    n_layers: int
    n_heads: int
    n_kv_heads: int
    mlp_reads_heads: bool = True

    @classmethod
    def of(cls, cfg: ModelConfig) -> "EdgeGraph":
        return cls(cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, "heads" in same_layer_reads(cfg)["mlp"])

    def receivers(self, group: str) -> Tuple[int, int]:
        """[lo, hi) of a receiver group of the block ('q', 'k', 'v', 'mlp'; at the top 'logits')
        among a layer's R receivers (the top's one)."""
        H, K = self.n_heads, self.n_kv_heads
        return {"q": (0, H), "k": (H, H + K), "v": (H + K, H + 2 * K), "mlp": (H + 2 * K, H + 2 * K + 1),
                "logits": (0, 1)}[group]

    def senders(self, group: str) -> Tuple[int, int]:
        """[lo, hi) of a sender group of the block ('heads', 'mlp'; at the top 'embed') from the
        layer's first sender (`first_sender`; the top's: 0)."""
        return {"heads": (0, self.n_heads), "mlp": (self.n_heads, self.n_heads + 1), "embed": (0, 1)}[group]

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
        layer's MLP when `mlp_reads_heads`)."""
        S, R, H = self.n_senders, self.n_receivers, self.n_heads
        layer = self.sender_layer
        is_head = np.zeros(S, bool)
        is_head[1:] = (np.arange(S - 1) % (H + 1)) < H
        before = layer[None, :, None] < np.arange(self.n_layers)[:, None, None]          # [L, S, 1]
        v = np.broadcast_to(before, (self.n_layers, S, R)).copy()
        if self.mlp_reads_heads:
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
        means its q, k and v inputs, and its KV head's for k and v). ValueError when no sender has a
        valid edge into the receivers (they all come before them: there is no path to patch; no
        senders: the mask that patches nothing)."""
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
        lay, final = lay & self.valid().layers, full[:, -1]
        if len(senders) and not (lay.any() or final.any()):
            raise ValueError(f"sender(s) {list(senders)} have no edge into the receivers {list(receivers)}: every "
                             "receiver named comes before them (`EdgeGraph.valid`), so no path runs there")
        return EdgeMask(jnp.asarray(lay, jnp.float32), jnp.asarray(final, jnp.float32))

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
    `EdgeGraph.path_mask`). Run them in one call with `engine.patching.run_masks(..., Mask(edges=...))`;
    the positions are the problem's pos_w."""
    subsets = np.asarray(subsets)
    if subsets.ndim != 2 or subsets.shape[1] != len(senders) or not np.isin(subsets, (0, 1)).all():
        raise ValueError(f"subsets has shape {subsets.shape}, expected 0/1 [N, {len(senders)}] (one column per sender)")
    union = graph.path_mask(senders, receivers)                  # every sender's edges, in its own row
    pick = np.zeros((len(senders), graph.n_senders), np.float32)
    pick[np.arange(len(senders)), [graph.sender_labels.index(s) for s in senders]] = 1.0
    on = np.minimum(subsets.astype(np.float32) @ pick, 1.0)                          # [N, S] senders patched
    return EdgeMask(np.asarray(union.layers)[None] * on[:, None, :, None], np.asarray(union.final)[None] * on)


def check_edge_mask(mask: EdgeMask, graph: EdgeGraph, batched: bool = False) -> None:
    """ValueError unless the leaves have shapes [L, S, R] and [S] ([N, ...] when `batched`), values in
    [0, 1] and zeros on invalid edges (where concrete)."""
    lead = 1 if batched else 0
    want = ((graph.n_layers, graph.n_senders, graph.n_receivers), (graph.n_senders,))
    got = (tuple(jnp.shape(mask.layers)[lead:]), tuple(jnp.shape(mask.final)[lead:]))
    if got != want or (batched and jnp.shape(mask.layers)[0] != jnp.shape(mask.final)[0]):
        raise ValueError(f"edge mask leaves have shapes {jnp.shape(mask.layers)}, {jnp.shape(mask.final)}; "
                         f"expected {'[N] + ' if batched else ''}{want[0]} (L, senders, receivers) and {want[1]}")
    if any(isinstance(a, jax.core.Tracer) for a in jax.tree.leaves(mask)):
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




class EdgeIO(LayerIO):
    """The edge-patched run at one layer (or, with first None, at the model's top): each receiver of
    a group reads x + sum_s m[s, r] * carry[s] (+ shift[r]), and each sender's write records its delta
    w_pos * (src - cur) in the carry [S, B, T, D]; sites and records go to `inner` (node patches and
    the cache).

    The layer's first read contracts the carry once for all R receivers ([R, S] x [S, B T D]: the
    carry is read once per layer, not once per group); a later read adds the deltas written since
    (a layer's heads, into its MLP) from the senders' own rows.

    m [S, R] (the top: [S, 1]): this layer's edge weights; src: {sender group: its source activation
    (as `Parts.act`)}; pos_w [B, T]; first: this layer's first sender (`EdgeGraph.first_sender`, may
    be traced; 0 at the top); shift [R, B, T, D] or None: added to the receivers' inputs (its gradient
    is theirs)."""

    def __init__(self, graph: EdgeGraph, inner: LayerIO, m: Array, src: dict, pos_w: Array, first, carry,
                 shift: Optional[Array]):
        super().__init__(inner.collect, carry)
        self.graph, self.inner, self.m, self.src, self.pos_w, self.first, self.shift = (
            graph, inner, m, src, pos_w, first, shift)
        self.cache, self.names = inner.cache, inner.names
        self.sums: Optional[Array] = None           # [R, B, T, D]: sum_s m[s, r] carry[s] at the first read
        self.since: list = []                       # (first sender, delta [U, B, T, D]) written after it

    def site(self, name: str, x: Array) -> Array:
        return self.inner.site(name, x)

    def record(self, name: str, value) -> None:
        self.inner.record(name, value)

    def read(self, group: str, x: Array, f):
        """f of each receiver's input: one receiver, f(x_r); several, f([U, B, T, D]) unit by unit,
        where a receiver with no nonzero edge keeps f(x) (the plain run's fused projection, bit for
        bit) with the per-unit value's gradient (straight through), so that the gradient at an
        all-zero mask is the edges' own."""
        lo, hi = self.graph.receivers(group)
        m = self.m[:, lo:hi]
        if self.sums is None:
            self.sums = jnp.einsum("sr,sbtd->rbtd", self.m.astype(x.dtype), self.carry)
        xr = x[None] + self.sums[lo:hi]
        for s0, delta in self.since:
            rows = jax.lax.dynamic_slice_in_dim(m, s0, delta.shape[0], 0)
            xr = xr + jnp.einsum("su,sbtd->ubtd", rows.astype(x.dtype), delta)
        if self.shift is not None:
            xr = xr + self.shift[lo:hi]
        if hi - lo == 1:
            return f(xr[0])
        own, plain = f(xr), jax.lax.stop_gradient(f(x))
        active = (m != 0).any(0)
        return jnp.where(active[:, None], own, plain + (own - jax.lax.stop_gradient(own)))

    def write(self, group: str, parts: Parts) -> Array:
        lo, _ = self.graph.senders(group)
        delta = parts.of(self.src[group].astype(parts.act.dtype) - parts.act) * self.pos_w[None, :, :, None]
        delta = delta.astype(self.carry.dtype)
        self.carry = jax.lax.dynamic_update_slice_in_dim(self.carry, delta, self.first + lo, 0)
        if self.sums is not None:
            self.since.append((self.first + lo, delta))
        return parts.total
