"""Attribution graphs over transcoders (the circuit-tracing method), exact and batched.

The local replacement model of one prompt (`local_replacement`) is the model with every MLP that has a
transcoder replaced by it (its skip included) plus an error node per (layer, position) holding what
the transcoder misses; a layer without a transcoder keeps its whole MLP output as its error. Every
attention pattern and norm scale is frozen from the real run (patterns held as constants, norm scales by
`dla.frozen_norms`). With every node at its value it reproduces the model on the prompt; in the nodes
(feature activations a [L, T, F], errors e [L, T, D], token embeddings x [T, D]) it is affine:

    mlp_out[l] = a[l] W_dec[l] + b_dec[l] + mlp_in[l] W_skip[l] + e[l]

Targets: a feature's pre-activation without its bias, mlp_in[l, p] . W_enc[l][:, f], and a logit
node's demeaned logit at the last position, h . (W_U[:, v] - mean_v W_U[:, v]) (h: final-normed, scale
frozen). The edge weight s -> t is s's direct effect on t, its write times the gradient g_t of t with
respect to the residual at that write in the replacement model (every other node held):

    A[t, s] = a_s W_dec[l, f] . g_t[l, p]      feature s = (l, p, f)
              e[l, p] . g_t[l, p]              error node (l, p)
              x[p] . g_t^embed[p]              token p

so the edges into t sum to t(nodes) - t(no nodes). Rows come from backward passes of the replacement
batched with `jax.vmap` (one a target), a layer at a time from the targets' top layer down, over the
prefix of positions holding them (attention is causal). Conventions follow circuit-tracer (its `attribute`, 0.5): nodes
ordered [features, errors (layer-major), tokens, logits]; rows targets, columns sources; position 0
(the BOS) has no feature or error nodes; logit nodes the most probable tokens up to a cumulative
probability; features expanded in order of their influence on the logits when they are capped;
`prune` with its node and edge thresholds; `graph_json` writes its (and Neuronpedia's) graph files.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Dict, NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxcircuits import checks, logs, storage
from jaxcircuits.dictionaries.core import DictConfig, decode, encode
from jaxcircuits.dictionaries.splice import detach
from jaxcircuits.methods.dla import frozen_norms, norm_scales
from jaxcircuits.models import transformer as M
from jaxcircuits.models.block import LayerIO, Parts
from jaxcircuits.models.config import ModelConfig

Array = jax.Array
ZERO_POSITIONS = 1          # the first positions, which get no feature or error nodes (circuit-tracer's BOS)


# ---- the local replacement model ------------------------------------------------------------------

@struct.dataclass
class Replacement:
    """The local replacement model of one prompt of T tokens (module doc).

    params: the model's params without dictionaries, norm scales frozen on the prompt; dicts: the
    transcoders' params stacked [L, ...] (zeros on layers without one); tokens [T]; acts
    [L, T, F] feature activations (0 where no transcoder); errors [L, T, D]; embeds [T, D] token
    embeddings (the token nodes' writes); const [T, D] the embedding's rest (learned positions);
    patterns [L, H, T, T] the real run's attention patterns; cfg, the model's config without its
    splice; dc, the transcoders' `DictConfig`."""

    params: dict
    dicts: dict
    tokens: Array
    acts: Array
    errors: Array
    embeds: Array
    const: Array
    patterns: Array
    cfg: ModelConfig = struct.field(pytree_node=False)
    dc: DictConfig = struct.field(pytree_node=False)


class _Layer(NamedTuple):
    """What the replacement's layer reads: the transcoders' config and this layer's params, its node
    activations a [1, T, F] and errors e [1, T, D], the real run's patterns [1, H, T, T]."""

    dc: DictConfig
    dictionary: dict
    acts: Array
    errors: Array
    patterns: Array


class _IO(LayerIO):
    """A layer of the replacement (`_Layer`): the patterns are the real run's; the MLP output is the
    transcoder's (decode of the node activations, skip from the MLP input) plus the error node. At the
    model's bottom (layer (embeds, const)) the embedding write is the token nodes' plus the constant rest."""

    def __init__(self, layer, collect, carry):
        super().__init__(collect, carry)
        self.layer, self.h = layer, None

    def site(self, name, x):
        return super().site(name, _SITE_RULES.get(name, lambda io, x: x)(self, x))

    def write(self, group: str, parts: Parts) -> Array:
        return sum(self.layer).astype(parts.total.dtype) if group == "embed" else parts.total


def _keep_input(io: _IO, h: Array) -> Array:
    io.h = h
    return h


def _transcoder_out(io: _IO, out: Array) -> Array:
    t = io.layer
    return (decode(t.dc, t.dictionary, t.acts, io.h.astype(t.acts.dtype)) + t.errors).astype(out.dtype)


_SITE_RULES = {"pattern": lambda io, x: io.layer.patterns.astype(x.dtype), "mlp_in": _keep_input,
               "mlp_out": _transcoder_out}


@struct.dataclass
class _Tap(M.Tap):
    """The run of a `Replacement` (its nodes, transcoders and patterns; any number of layers): per layer
    the transcoder's params, a [L, 1, T, F], e [L, 1, T, D] and the patterns [L, 1, H, T, T]; at the
    bottom the token nodes [1, T, D] and the constant rest [1, T, D]."""

    rep: Replacement

    def per_layer(self):
        r = self.rep
        return r.dicts, r.acts[:, None], r.errors[:, None], r.patterns[:, None]

    def io(self, layer, carry, collect):
        r = self.rep
        return _IO((r.embeds[None], r.const[None]) if layer is None else _Layer(r.dc, *layer), collect, carry)


def replacement_outputs(rep: Replacement, acts: Array, errors: Array, embeds: Array) -> Tuple[Array, Array]:
    """The replacement with nodes acts [L, T, F], errors [L, T, D], embeds [T, D]: (the MLP inputs
    mlp_in [L, T, D], the final-normed last position h [D]); affine in the nodes."""
    T = rep.tokens.shape[0]
    ones = jnp.ones((1, T), jnp.int32)
    tap = _Tap(rep.replace(acts=acts, errors=errors, embeds=embeds))
    h, cache, _ = M.run(rep.params, rep.cfg, rep.tokens[None], M.Context(M.default_positions(ones), ones), tap,
                        collect=("mlp_in",))
    return cache["mlp_in"][:, 0], h[0, -1]


def replacement_targets(rep: Replacement, acts: Array, errors: Array, embeds: Array,
                        logit_vecs: Array) -> Tuple[Array, Array]:
    """Target values of the replacement with the given nodes: feature pre-activations without their
    bias [L, T, F] and the logit nodes h . logit_vecs [n] (logit_vecs [n, D], `logit_vectors`)."""
    mlp_in, h = replacement_outputs(rep, acts, errors, embeds)
    pre = jnp.einsum("ltd,ldf->ltf", mlp_in.astype(jnp.float32), rep.dicts["w_enc"].astype(jnp.float32))
    return pre, logit_vecs @ h.astype(jnp.float32)


def check_transcoders(cfg: ModelConfig) -> None:
    """ValueError unless `cfg` has transcoders spliced (`dictionaries.splice.attach`, host 'transcoder')
    that read their input linearly (no subtract_b_dec). A final logit soft-cap is allowed: logit nodes are
    the logits before it (as circuit-tracer's)."""
    if cfg.splice is None or cfg.splice.host != "transcoder":
        got = "none" if cfg.splice is None else f"{cfg.splice.host!r} dictionaries"
        raise ValueError(f"attribution graphs need transcoders spliced into the model (host 'transcoder', "
                         f"dictionaries.splice.attach); this model has {got}")
    if cfg.splice.dictionary.subtract_b_dec:
        raise ValueError("attribution graphs read a transcoder's encoder as a linear map of its input; "
                         "subtract_b_dec (an SAE's option) is not a transcoder's")


def _tokens(cfg: ModelConfig, tokens) -> Array:
    """tokens as int32 [T] (one prompt, [T] or [1, T]), checked as the model's inputs."""
    t = jnp.asarray(tokens)
    if t.ndim == 2 and t.shape[0] == 1:
        t = t[0]
    if t.ndim != 1:
        raise ValueError(f"an attribution graph is of one prompt: tokens [T] or [1, T], got shape {tuple(t.shape)}")
    if t.shape[0] <= ZERO_POSITIONS:
        raise ValueError(f"tokens has {t.shape[0]} position(s); positions below {ZERO_POSITIONS} (the BOS) get no "
                         "feature nodes, so a graph needs more")
    return M.check_inputs(cfg, t[None])[0][0]


def local_replacement(params, cfg: ModelConfig, tokens) -> Replacement:
    """The `Replacement` of the model with transcoders (params, cfg from `splice.attach`) on one
    prompt `tokens` [T]: the real run's MLP inputs and outputs give the activations and errors."""
    check_transcoders(cfg)
    tokens = _tokens(cfg, tokens)
    dc = cfg.splice.dictionary
    dicts = {k: v for k, v in params["layers"]["dict"].items() if k != "on"}
    on = params["layers"]["dict"]["on"]
    plain, pcfg = detach(params, cfg)
    return _replacement(plain, pcfg, dc, dicts, on, tokens)


@functools.partial(jax.jit, static_argnames=("cfg", "dc"))
def _replacement(params, cfg: ModelConfig, dc: DictConfig, dicts: dict, on: Array, tokens: Array) -> Replacement:
    ones = jnp.ones((1, tokens.shape[0]), jnp.int32)
    _, c = M.forward_fn(params, cfg, tokens[None], ones, return_logits=False,
                        collect=("mlp_in", "mlp_out", "pattern", *norm_scales(cfg)))
    mlp_in, mlp_out = c["mlp_in"][:, 0].astype(jnp.float32), c["mlp_out"][:, 0].astype(jnp.float32)    # [L, T, D]
    acts = jax.vmap(lambda d, x, o: encode(dc, d, x) * o)(dicts, mlp_in, on)
    errors = mlp_out - jax.vmap(lambda d, a, x: decode(dc, d, a, x))(dicts, acts, mlp_in)
    tok = M.token_embeddings(params, cfg, tokens)
    full = M.embed(params, cfg, tokens[None], M.default_positions(ones))[0]
    return Replacement(frozen_norms(params, cfg, c), dicts, tokens, acts, errors,
                       tok.astype(jnp.float32), (full - tok).astype(jnp.float32), c["pattern"][:, 0], cfg, dc)


# ---- edges -----------------------------------------------------------------------------------------

def logit_targets(logits, max_n_logits: int = 10, desired_logit_prob: float = 0.95) -> Tuple[np.ndarray, np.ndarray]:
    """(token ids [n], their probabilities [n]) of the logit nodes: the most probable tokens of logits
    [V], in descending probability, the fewest whose probabilities sum to desired_logit_prob, at most
    max_n_logits."""
    checks.count("max_n_logits", max_n_logits)
    if not 0 < desired_logit_prob <= 1:
        raise ValueError(f"desired_logit_prob must lie in (0, 1], got {desired_logit_prob}")
    probs = np.asarray(jax.nn.softmax(jnp.asarray(logits, jnp.float32)), np.float64)
    ids = np.argsort(-probs, kind="stable")[:max_n_logits]
    n = min(int(np.searchsorted(np.cumsum(probs[ids]), desired_logit_prob)) + 1, len(ids))
    return ids[:n], probs[ids[:n]].astype(np.float32)


def logit_vectors(params, ids) -> Array:
    """[n, D]: the demeaned unembedding columns W_U[:, v] - mean_v W_U[:, v] of token ids [n] (a logit
    node's value is the final-normed h . its vector: the logit minus the mean logit)."""
    cols = M.unembed_columns(params, jnp.asarray(ids)).astype(jnp.float32)
    return cols - M.unembed_matrix(params).astype(jnp.float32).mean(1)


class _Sources(NamedTuple):
    """The feature sources by layer: writes [L, P, D] (a_s W_dec[l, f_s], zero padded to P a layer),
    their positions pos [L, P], and each feature's (layer, slot) in them, layer [S], slot [S]."""

    writes: Array
    pos: Array
    layer: np.ndarray
    slot: np.ndarray


def _sources(rep: Replacement, feats: np.ndarray) -> _Sources:
    """`_Sources` of the features feats [S, 3] (layer, position, feature), sorted by layer."""
    L, _, D = rep.errors.shape
    counts = np.bincount(feats[:, 0], minlength=L)
    slot = np.arange(len(feats)) - (np.cumsum(counts) - counts)[feats[:, 0]]
    l, p, f = feats.T
    writes = rep.dicts["w_dec"][l, f].astype(jnp.float32) * rep.acts[l, p, f][:, None]
    P = max(1, int(counts.max()))
    return _Sources(jnp.zeros((L, P, D), jnp.float32).at[l, slot].set(writes),
                    jnp.zeros((L, P), jnp.int32).at[l, slot].set(p), l, slot)


def _prefix(rep: Replacement, t: int) -> Replacement:
    """The replacement of the first t positions: attention is causal, so its values there are the
    whole prompt's (frozen norm scales, patterns, nodes cut to them)."""
    cut = lambda path, a: a[..., :t, :] if getattr(path[-1], "key", None) == "inv_scale" else a    # noqa: E731
    return rep.replace(params=jax.tree_util.tree_map_with_path(cut, rep.params), tokens=rep.tokens[:t],
                       acts=rep.acts[:, :t], errors=rep.errors[:, :t], embeds=rep.embeds[:t], const=rep.const[:t],
                       patterns=rep.patterns[..., :t, :t])


def _prefix_len(last: int, T: int) -> int:
    """The prefix (a multiple of max(2, T / 8), at most T: few compiled shapes) holding position last."""
    step = max(2, -(-T // 8))
    return min(T, -(-(last + 1) // step) * step)


@jax.jit
def _layer_back(rep: Replacement, l: Array, g_out: Array, layer: Array, pos: Array, vec_in: Array, src: _Sources):
    """One layer l of the replacement backwards for N targets: g_out [N, T, D], the gradient at its
    output; targets n with layer[n] == l read vec_in [N, D] at mlp_in[l, pos[n]]. Returns (the gradient
    at its input [N, T, D], the edges [N, P] from layer l's feature sources, [N, T] from its error nodes).
    The layer is affine (patterns and norm scales frozen, activations fixed), so the gradient is taken at
    0; its attention reads the real run's patterns, not the layer index (RoPE, windows)."""
    N, (T, D) = len(layer), rep.embeds.shape
    one = lambda a: jax.lax.dynamic_slice_in_dim(a, l, 1)                                        # noqa: E731
    ones = jnp.ones((1, T), jnp.int32)
    ctx = M.Context(M.default_positions(ones), ones)

    def f(x, e):
        tap = _Tap(rep.replace(dicts=jax.tree.map(one, rep.dicts), acts=one(rep.acts), errors=e[None],
                               patterns=one(rep.patterns)))
        y, _, cache = M.run_layers(jax.tree.map(one, rep.params["layers"]), rep.cfg, x, ctx, tap, collect=("mlp_in",))
        return y[0], cache["mlp_in"][0, 0]

    _, vjp = jax.vjp(f, jnp.zeros((1, T, D), rep.embeds.dtype), rep.errors[l])
    reads = jnp.zeros((N, T, D), jnp.float32).at[jnp.arange(N), pos].set(jnp.where((layer == l)[:, None], vec_in, 0))
    g_in, g_err = jax.vmap(vjp)((g_out, reads))
    at = jnp.einsum("ntd,pd->npt", g_err, src.writes[l])                  # a matmul: cheaper than gathering g
    p = src.pos[l]
    feats = jnp.take_along_axis(at, jnp.minimum(p, T - 1)[None, :, None], 2)[..., 0] * (p < T)
    errs = jnp.einsum("ntd,td->nt", g_err, rep.errors[l].at[:ZERO_POSITIONS].set(0))
    return g_in[:, 0], feats, errs


@jax.jit
def _logit_grads(rep: Replacement, vec_h: Array) -> Array:
    """[n, T, D]: the gradients of the logit nodes (vec_h [n, D] read at the last final-normed position)
    at the last layer's output."""
    T, D = rep.embeds.shape
    _, vjp = jax.vjp(lambda x: M.final_norm(rep.params, rep.cfg, x)[0, -1], jnp.zeros((1, T, D), rep.embeds.dtype))
    return jax.vmap(lambda v: vjp(v)[0][0])(vec_h)


def _rows(rep: Replacement, src: _Sources, layer: np.ndarray, pos: np.ndarray, vec_in: Array,
          vec_h: Optional[Array] = None) -> np.ndarray:
    """Edge rows [N, S + L T + T] of N targets into the sources [features `src`, error nodes
    (layer-major), tokens]: target n reads vec_in [N, D] at mlp_in[layer[n], pos[n]], or (vec_h [N, D]
    given: logit nodes) the last final-normed position. Backwards from the targets' top layer through
    the prefix of positions holding them (`_prefix_len`), a layer a compiled call, N targets vmapped."""
    L, T, _ = rep.errors.shape
    N = len(layer)
    top, t = (L, T) if vec_h is not None else (int(layer.max()), _prefix_len(int(pos.max()), T))
    part = _prefix(rep, t) if t < T else rep
    g = _logit_grads(part, vec_h) if vec_h is not None else jnp.zeros((N, t, rep.errors.shape[2]), jnp.float32)
    feats, errs = np.zeros((N, L, src.writes.shape[1]), np.float32), np.zeros((N, L, T), np.float32)
    layer, pos = jnp.asarray(layer, jnp.int32), jnp.asarray(pos, jnp.int32)
    for l in reversed(range(min(top, L - 1) + 1)):
        g, feats[:, l], errs[:, l, :t] = _layer_back(part, jnp.int32(l), g, layer, pos, vec_in, src)
    tokens = np.zeros((N, T), np.float32)
    tokens[:, :t] = np.einsum("ntd,td->nt", np.asarray(g), np.asarray(part.embeds))
    return np.concatenate([feats[:, src.layer, src.slot], errs.reshape(N, L * T), tokens], 1)


@dataclasses.dataclass(frozen=True)
class Graph:
    """An attribution graph of one prompt.

    tokens [T]; features [S, 3] (layer, position, feature) of its feature nodes and activations [S];
    logit_ids, logit_probs [n] its logit nodes; adjacency [N, N] float32, N = S + L T + T + n, rows
    targets, columns sources, nodes ordered [features, error nodes (layer-major: error (l, p) at
    S + l T + p), tokens, logits]; n_active: the active features before `max_feature_nodes` chose S of
    them."""

    tokens: np.ndarray
    features: np.ndarray
    activations: np.ndarray
    logit_ids: np.ndarray
    logit_probs: np.ndarray
    adjacency: np.ndarray
    n_layers: int
    n_active: int

    @property
    def n_pos(self) -> int:
        return len(self.tokens)

    @functools.cached_property
    def node_influence(self) -> np.ndarray:
        """[N]: `influence` of the graph as built (computed once)."""
        return partial_influence(self.adjacency, np.arange(len(self.adjacency)), _logit_weights(self))

    def node_keys(self) -> list:
        """`node_keys` of this graph's nodes, in its node order."""
        return node_keys(self.features, self.n_layers, self.n_pos, self.logit_ids)

    def offsets(self) -> Dict[str, slice]:
        """{'features', 'errors', 'tokens', 'logits'}: each kind's slice of the node order."""
        S, LT, T = len(self.features), self.n_layers * self.n_pos, self.n_pos
        return {"features": slice(0, S), "errors": slice(S, S + LT), "tokens": slice(S + LT, S + LT + T),
                "logits": slice(S + LT + T, len(self.adjacency))}


def node_keys(features, n_layers: int, n_pos: int, logit_ids) -> list:
    """One key a node, in the node order (`Graph`): ('feature', layer, position, feature) of each of
    features [S, 3], ('error', layer, position) layer-major, ('token', position), ('logit', token id)
    of each of logit_ids [n]; to match the nodes of graphs ordered otherwise (circuit-tracer's)."""
    return ([("feature", *map(int, f)) for f in features]
            + [("error", l, p) for l in range(n_layers) for p in range(n_pos)]
            + [("token", p) for p in range(n_pos)] + [("logit", int(v)) for v in logit_ids])


def node_order(graph: Graph, keys) -> np.ndarray:
    """[N]: the indices of `graph`'s nodes in the order of `keys` (`node_keys` of another graph of the
    same nodes), so graph.adjacency[np.ix_(order, order)] is in that order; ValueError unless the nodes
    are the same."""
    mine = graph.node_keys()
    if sorted(mine) != sorted(keys):
        missing, extra = set(keys) - set(mine), set(mine) - set(keys)
        raise ValueError(f"the graphs' nodes differ: {len(missing)} not in this graph (e.g. {sorted(missing)[:3]}), "
                         f"{len(extra)} only in it (e.g. {sorted(extra)[:3]})")
    where = {k: i for i, k in enumerate(mine)}
    return np.array([where[k] for k in keys], np.int64)


def _batches(n: int, size: int):
    return [np.arange(i, min(i + size, n)) for i in range(0, n, size)]


def partial_influence(rows: np.ndarray, row_nodes: np.ndarray, weights: np.ndarray, max_iter: int = 1000) -> np.ndarray:
    """Influence [n_nodes] of every node on weighted targets, from the rows known so far: rows
    [R, n_nodes] (targets x sources) of the nodes row_nodes [R] (other rows unknown: read as 0),
    weights [R] of the rows (the logit probabilities on logit rows, else 0). With rows normalised to
    N = |A| / sum_s |A|, the influence is w (N + N^2 + ...), a finite series on a DAG."""
    norm = np.abs(rows) / np.maximum(np.abs(rows).sum(1, keepdims=True), 1e-10)
    prod, total = np.asarray(weights, np.float64) @ norm, np.zeros(rows.shape[1])
    for _ in range(max_iter):
        if not prod.any():
            return total
        total += prod
        prod = prod[row_nodes] @ norm
    raise ValueError(f"influence did not vanish after {max_iter} steps: the rows do not form a DAG")


_outputs = jax.jit(replacement_outputs)


def attribute(params, cfg: ModelConfig, tokens, max_n_logits: int = 10, desired_logit_prob: float = 0.95,
              max_feature_nodes: Optional[int] = None, batch_size: int = 32, update_interval: int = 16) -> Graph:
    """The attribution `Graph` of one prompt `tokens` [T] in the model with transcoders (params, cfg
    from `splice.attach`, host 'transcoder'; layers without one count as error nodes whole).

    Logit nodes: `logit_targets` of the last position (max_n_logits, desired_logit_prob). Feature
    nodes: the active features (activation != 0) at positions from `ZERO_POSITIONS`, all of them, or
    (max_feature_nodes) as many, chosen greedily by their influence on the logits through the rows known
    so far (`partial_influence`, refreshed every update_interval batches). batch_size targets share a
    vmapped backward pass (`_rows`: from their top layer, over the prefix of positions holding them)."""
    checks.count("batch_size", batch_size)
    checks.count("update_interval", update_interval)
    rep = local_replacement(params, cfg, tokens)
    L, T, _ = rep.errors.shape
    ids, probs = logit_targets(M.logits_of(rep.params, _outputs(rep, rep.acts, rep.errors, rep.embeds)[1]),
                               max_n_logits, desired_logit_prob)
    acts = np.array(rep.acts)
    acts[:, :ZERO_POSITIONS] = 0
    active = np.argwhere(acts != 0).astype(np.int32)                     # (layer, position, feature), sorted
    n_active, n = len(active), len(ids)
    cap = n_active if max_feature_nodes is None else min(checks.count("max_feature_nodes", max_feature_nodes, 0),
                                                         n_active)
    vecs, src = logit_vectors(rep.params, ids), _sources(rep, active)
    tail = np.zeros((n, n), np.float32)                                  # the logit columns: never sources
    zeros = jnp.zeros_like(vecs)
    logit_rows = np.concatenate([_rows(rep, src, np.full(n, L), np.full(n, T - 1), zeros, vecs), tail], 1)

    def rows_of(idx):
        padded = np.resize(idx, batch_size)                              # one compiled shape
        l, p, f = active[padded].T
        return _rows(rep, src, l, p, rep.dicts["w_enc"][l, :, f].astype(jnp.float32))[:len(idx)]

    width = n_active + L * T + T + n
    rows = np.zeros((cap, width), np.float32)                            # the chosen features' rows, in
    chosen = np.zeros(0, np.int64)                                       # the order they were computed
    logit_nodes = np.arange(width - n, width)
    with logs.progress(total=cap, desc="attribution graph", unit="feature") as bar:
        while len(chosen) < cap:
            if cap == n_active:
                todo = np.arange(len(chosen), n_active)
            else:
                infl = partial_influence(np.vstack([logit_rows, rows[:len(chosen)]]),
                                         np.concatenate([logit_nodes, chosen]),
                                         np.concatenate([probs, np.zeros(len(chosen))]))[:n_active]
                ranked = np.argsort(-infl, kind="stable")
                todo = ranked[~np.isin(ranked, chosen)]
            todo = np.sort(todo[:min(update_interval * batch_size, cap - len(chosen))])
            for idx in _batches(len(todo), batch_size):
                rows[len(chosen):len(chosen) + len(idx), :-n] = rows_of(todo[idx])
                chosen = np.concatenate([chosen, todo[idx]])
                bar.update(len(idx))
    order = np.argsort(chosen)
    selected = chosen[order]
    cols = np.concatenate([selected, n_active + np.arange(L * T + T + n)])
    S = len(selected)
    adjacency = np.zeros((S + L * T + T + n, S + L * T + T + n), np.float32)
    adjacency[:S] = rows[order][:, cols]
    adjacency[-n:] = logit_rows[:, cols]
    return Graph(np.asarray(rep.tokens), active[selected], acts[tuple(active[selected].T)], np.asarray(ids), probs,
                 adjacency, L, n_active)


# ---- what the graph predicts ----------------------------------------------------------------------

def predicted_effects(graph: Graph, deltas, through_features: bool = True) -> np.ndarray:
    """[K, n]: the change of each logit node the graph predicts for K interventions on its feature nodes,
    deltas [K, S] (the change of each feature's activation: -a to zero it, (c - 1) a to scale it by c).
    An edge's weight per unit of its source's activation is A[t, s] / a_s; with through_features the
    other feature nodes respond linearly (an active feature's activation moves with its pre-activation:
    d = delta + B d, solved exactly on the DAG), else only the direct edges count. Error nodes and features
    outside the graph stay fixed, as do attention patterns and norm scales."""
    o, S = graph.offsets(), len(graph.features)
    deltas = np.asarray(deltas, np.float64).reshape(-1, S)
    per_unit = graph.adjacency[:, o["features"]].astype(np.float64) / np.where(graph.activations == 0, 1,
                                                                               graph.activations)
    d = deltas.T
    if through_features:
        d = np.linalg.solve(np.eye(S) - per_unit[o["features"]], d)
    return (per_unit[o["logits"]] @ d).T


# ---- pruning ---------------------------------------------------------------------------------------

def normalized(adjacency: np.ndarray) -> np.ndarray:
    """|A| with each target's row summed to 1 (rows of zeros stay zero)."""
    a = np.abs(np.asarray(adjacency, np.float64))
    return a / np.maximum(a.sum(1, keepdims=True), 1e-10)


def influence(graph: Graph, adjacency: Optional[np.ndarray] = None) -> np.ndarray:
    """[N]: each node's influence on the logit nodes weighted by their probabilities, through every
    path of the row-normalised |adjacency| (`partial_influence` with all rows known; the graph's own
    adjacency by default, computed once: `Graph.node_influence`)."""
    if adjacency is None:
        return graph.node_influence
    return partial_influence(adjacency, np.arange(len(adjacency)), _logit_weights(graph))


def _logit_weights(graph: Graph) -> np.ndarray:
    w = np.zeros(len(graph.adjacency))
    w[graph.offsets()["logits"]] = graph.logit_probs
    return w


def _threshold(scores: np.ndarray, fraction: float) -> float:
    """The score at which the scores sorted in descending order first reach `fraction` of their sum."""
    s = np.sort(np.asarray(scores, np.float64).ravel())[::-1]
    cum = np.cumsum(s) / max(s.sum(), 1e-300)
    return float(s[min(int(np.searchsorted(cum, fraction)), len(s) - 1)])


@dataclasses.dataclass(frozen=True)
class Pruned:
    """`prune`'s result: node_mask [N], edge_mask [N, N] (targets x sources) and each node's cumulative
    influence score [N] (the fraction of all influence held by the nodes at least as influential)."""

    node_mask: np.ndarray
    edge_mask: np.ndarray
    cumulative: np.ndarray


def prune(graph: Graph, node_threshold: float = 0.8, edge_threshold: float = 0.98) -> Pruned:
    """The circuit-tracing pruning: keep the most influential nodes holding node_threshold of the
    influence on the logits (tokens and logits always kept), then, among the edges between them, those
    holding edge_threshold of the edge scores (normalised weight times its target's influence, the
    logits' own weight included); nodes left without an outgoing kept edge, or features without an
    incoming one, go too, until nothing changes."""
    checks.within("node_threshold", node_threshold, 0, 1)
    checks.within("edge_threshold", edge_threshold, 0, 1)
    o, n = graph.offsets(), len(graph.adjacency)
    keep_always = np.zeros(n, bool)
    keep_always[o["tokens"].start:] = True
    node_infl = influence(graph)
    nodes = (node_infl >= _threshold(node_infl, node_threshold)) | keep_always
    pruned = np.where(nodes[:, None] & nodes[None, :], graph.adjacency, 0)
    w = _logit_weights(graph)
    scores = normalized(pruned) * (influence(graph, pruned) + w)[:, None]
    edges = (scores >= _threshold(scores, edge_threshold)) & nodes[:, None] & nodes[None, :]
    senders, features = slice(0, o["tokens"].start), o["features"]
    while True:
        before = nodes.copy()
        nodes[senders] &= edges[:, senders].any(0)
        nodes[features] &= edges[features].any(1)
        edges &= nodes[:, None] & nodes[None, :]
        if (nodes == before).all():
            break
    order = np.argsort(-node_infl, kind="stable")
    cumulative = np.empty(n)
    cumulative[order] = np.cumsum(node_infl[order]) / max(node_infl.sum(), 1e-300)
    return Pruned(nodes, edges, cumulative)


def scores(graph: Graph) -> Dict[str, float]:
    """circuit-tracer's graph scores: 'replacement' = the tokens' share of the influence that starts at
    tokens or error nodes; 'completeness' = the influence-weighted share of each node's normalised
    input that is not from error nodes."""
    o = graph.offsets()
    a, infl, w = normalized(graph.adjacency), influence(graph), _logit_weights(graph)
    tok, err = infl[o["tokens"]].sum(), infl[o["errors"]].sum()
    non_error = 1 - a[:, o["errors"]].sum(1)
    return {"replacement": float(tok / max(tok + err, 1e-300)),
            "completeness": float((non_error * (infl + w)).sum() / max((infl + w).sum(), 1e-300))}


# ---- files -----------------------------------------------------------------------------------------

def _cantor(a: int, b: int) -> int:
    return (a + b) * (a + b + 1) // 2 + b


# A graph file's node fields, in circuit-tracer's order, with their defaults (None: always given).
NODE_FIELDS = {"node_id": None, "feature": None, "layer": None, "ctx_idx": None, "feature_type": None,
               "token_prob": 0.0, "is_target_logit": False, "run_idx": 0, "reverse_ctx_idx": 0, "jsNodeId": None,
               "clerp": "", "influence": None, "activation": None}


def _node(**fields) -> dict:
    return {k: fields.get(k, v) for k, v in NODE_FIELDS.items()}


def node_records(graph: Graph, pruned: Pruned, token_str) -> list:
    """One dict per node, in node order, with the fields circuit-tracer's graph files give a node
    (`NODE_FIELDS`, in its order); token_str(id) -> str."""
    o, L, T = graph.offsets(), graph.n_layers, graph.n_pos
    out = []
    for (l, p, f), a, c in zip(graph.features.tolist(), graph.activations.tolist(), pruned.cumulative[o["features"]]):
        out.append(_node(node_id=f"{l}_{f}_{p}", feature=_cantor(l, f), layer=str(l), ctx_idx=p,
                         feature_type="cross layer transcoder", jsNodeId=f"{l}_{f}-0", influence=float(c),
                         activation=float(a)))
    for i, c in enumerate(pruned.cumulative[o["errors"]]):
        l, p = divmod(i, T)
        out.append(_node(node_id=f"0_{l}_{p}", feature=-1, layer=str(l), ctx_idx=p,
                         feature_type="mlp reconstruction error", jsNodeId=f"{l}_{p}-0", influence=float(c)))
    for p, (t, c) in enumerate(zip(graph.tokens.tolist(), pruned.cumulative[o["tokens"]])):
        out.append(_node(node_id=f"E_{t}_{p}", feature=p, layer="E", ctx_idx=p, feature_type="embedding",
                         jsNodeId=f"E_{t}-{p}", influence=float(c)))
    for k, (v, prob) in enumerate(zip(graph.logit_ids.tolist(), graph.logit_probs.tolist())):
        out.append(_node(node_id=f"{L + 1}_{v}_{T - 1}", feature=v, layer=str(L + 1), ctx_idx=T - 1,
                         feature_type="logit", token_prob=float(prob), is_target_logit=k == 0,
                         jsNodeId=f"L_{v}-{T - 1}", clerp=f'Output "{token_str(v)}" (p={prob:.3f})'))
    return out


def shown_nodes(graph: Graph, pruned: Pruned) -> np.ndarray:
    """Indices of the nodes a graph file shows: kept by `pruned` and touched by a kept edge (tokens and
    logits always)."""
    shown = pruned.node_mask & (pruned.edge_mask.any(0) | pruned.edge_mask.any(1))
    shown[graph.offsets()["tokens"].start:] = pruned.node_mask[graph.offsets()["tokens"].start:]
    return np.flatnonzero(shown)


def graph_json(graph: Graph, pruned: Pruned, token_str, slug: str, scan: str, node_threshold: float) -> dict:
    """The graph file circuit-tracer's `create_graph_files` writes and Neuronpedia's viewer reads:
    {'metadata', 'qParams', 'nodes', 'links'}; nodes kept by `pruned` that a kept link touches (tokens and
    logits always), links {source, target, weight} of the kept edges (raw signed weights)."""
    records = node_records(graph, pruned, token_str)
    dst, src = np.nonzero(pruned.edge_mask)
    keep = shown_nodes(graph, pruned)
    links = [{"source": records[s]["node_id"], "target": records[d]["node_id"], "weight": float(graph.adjacency[d, s])}
             for d, s in zip(dst.tolist(), src.tolist())]
    metadata = {"slug": slug, "scan": scan, "transcoder_list": [],
                "prompt_tokens": [token_str(t) for t in graph.tokens.tolist()],
                "prompt": "".join(token_str(t) for t in graph.tokens.tolist()),
                "node_threshold": float(node_threshold), "schema_version": 1}
    q = {"pinnedIds": [], "supernodes": [], "linkType": "both", "clickedId": "", "sg_pos": ""}
    return {"metadata": metadata, "qParams": q, "nodes": [records[i] for i in keep], "links": links}


def write_graph_files(graph: Graph, pruned: Pruned, token_str, out_dir: str, slug: str, scan: str,
                      node_threshold: float) -> str:
    """Write `graph_json` to out_dir/<slug>.json and add its metadata to out_dir/graph-metadata.json
    ({'graphs': [...]}, an entry of the same slug replaced), the files circuit-tracer's local server
    serves; atomically (`storage.write_json`). Returns the graph file's path."""
    os.makedirs(out_dir, exist_ok=True)
    data = graph_json(graph, pruned, token_str, slug, scan, node_threshold)
    path = os.path.join(out_dir, f"{slug}.json")
    storage.write_json(path, data)
    index = os.path.join(out_dir, "graph-metadata.json")
    graphs = []
    if os.path.exists(index):
        with open(index) as fh:
            graphs = json.load(fh)["graphs"]
    storage.write_json(index, {"graphs": [g for g in graphs if g.get("slug") != slug] + [data["metadata"]]})
    return path
