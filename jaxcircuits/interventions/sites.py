"""The intervention-site registry: the one place that says what a site is.

A `Mask` mirrors the registry; every leaf is optional and holds blend weights m in [0, 1]
with shape `site.shape(cfg)` = [L, *units]. At a site with the run's own activation x and
replacement s the model computes

    x + m * w_pos * (s - x)

where w_pos [B, T] selects positions (1 = patch this position). Two optional per-site transforms
ride in the source as entries 'subspace:<site>' (orthonormal rows B [L, *units, k, d]: a low-rank
patch x + m * w_pos * B^T B (s - x)) and 'steer:<site>' (v [L, *units, d]: x + m * w_pos * v, no
replacement read); see `TRANSFORMS`. A batch of masks is a `Mask` whose
leaves have a leading axis, so `jax.vmap` runs many interventions in one call and `jax.grad`
with respect to a mask is attribution patching. An all-zero mask leaves the run bit-for-bit
unchanged.

`SITES` lists every site once (L layers, H query heads, K KV heads, NB residual blocks, D model
width, Dh head dim, F MLP width; activations per layer, B batch, T positions, S key slots):

  resid_pre   [L]       the residual stream entering layer l, [B, T, D]
  head_q      [L, H]    per-head queries after RoPE, [B, T, H, Dh]
  head_k      [L, K]    per-KV-head keys after RoPE, [B, T, K, Dh] (GQA: a KV head serves
                        n_heads / n_kv_heads query heads)
  head_v      [L, K]    per-KV-head values, [B, T, K, Dh]
  pattern     [L, H]    attention probabilities of a head, [B, H, T, S]; positions select queries
  head_out    [L, H]    per-head attention output z (the o_proj input), [B, T, H, Dh]: true heads
  attn_block  [L, NB]   NB equal blocks of D/NB dims of the o_proj OUTPUT, [B, T, D]: residual
                        coordinates, not heads (what the original "even heads" code patched);
                        its replacement is the source's `attn_out`
  attn_out    [L]       the whole attention output (after o_proj), [B, T, D]
  mlp_in      [L]       the MLP's normed input h = norm2(x) (what a transcoder reads), [B, T, D]
  mlp_neuron  [L, F]    the MLP hidden activation after the nonlinearity (the down-projection
                        input; act(gate) * up for gated MLPs), [B, T, F]
  mlp_out     [L]       the MLP output, [B, T, D]
  features    [L, Fd]   the feature activations of a spliced dictionary (`ModelConfig.splice`,
                        Fd = cfg.dict_width), [B, T, Fd]; only models with a splice have it, and
                        only its spliced layers may be patched (zeros elsewhere in the cache)

A run can cache every site whose `cache` is itself, plus `EXTRA_CACHE`: 'kv' ((k, v), each
[L, B, S, K, Dh]), 'resid_final' ([B, T, D], the residual stream after the last layer) and
'final_norm' ([B, T, D], the final norm output). Cached activations are
stacked [L, B, ...] and, under a patched run, hold the patched values.

Replacements (`Source`) are cache dicts aligned to the target's positions (`positions.align`).
The public runs check what they read outside jit, where values are concrete (`check_mask`,
`check_pos_w`, `check_source`), and `select_source` zeroes a source outside the footprint its
masks can patch: NaN or inf there is harmless, inside it a ValueError. To add a site: one `Site`
row here and one `io.site(name, x)` call at its place in `models/block.py`; masks,
validation, plans, sweeps, alignment, ablation sources, generation and the binaries read the row.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Dict, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxcircuits import checks
from jaxcircuits.interventions.edges import EdgeGraph, EdgeIO, EdgeMask, check_edge_mask
from jaxcircuits.models.block import LayerIO, check_writes_sum
from jaxcircuits.models.transformer import Tap

Array = jax.Array
Source = Dict[str, Array]


@dataclasses.dataclass(frozen=True)
class Site:
    """One intervention site.

    name:      the `Mask` field and (when `cache == name`) the cache entry.
    units:     `ModelConfig` attributes giving the per-layer unit axes of the mask ('n_blocks':
               a free block count that must divide d_model, default n_heads).
    cache:     the cache entry whose aligned values replace this site's activation.
    before_z:  read before a layer's head outputs z (a patched run touching it at its first layer
               must recompute that layer from its input rather than from the target's z).
    dims:      the axes of the per-layer activation after the batch axis [B, *dims]: 'T' query
               positions, 'S' key positions, else `ModelConfig` attributes; its unit axes are named
               as in `units` (blocked sites: the last axis is split into blocks).
    tag:       letter of unit labels ('L3H5'); None labels units by their coordinates.
    on_layers: a `ModelConfig` attribute listing the layers that have the site (None: every layer);
               a model where it is empty lacks the site (`present`).
    """

    name: str
    units: Tuple[str, ...]
    cache: str
    before_z: bool
    dims: Tuple[str, ...]
    tag: Optional[str] = None
    on_layers: Optional[str] = None

    def layers(self, cfg) -> Tuple[int, ...]:
        """The layers of model `cfg` that have this site."""
        return tuple(range(cfg.n_layers)) if self.on_layers is None else tuple(getattr(cfg, self.on_layers))

    @property
    def pos_axes(self) -> Tuple[int, ...]:
        """Axes of the per-layer activation [B, ...] that index positions: the query axis first (the
        one position weights select), then a key axis if any."""
        return tuple(1 + i for i, d in enumerate(self.dims) if d in ("T", "S"))

    @property
    def unit_axis(self) -> int:
        """Axis of the per-layer activation [B, ...] (blocked: of its `view`) where the mask's unit
        axes start."""
        if self.blocked:
            return len(self.dims)
        return 1 + self.dims.index(self.units[0]) if self.units else 1

    @property
    def blocked(self) -> bool:
        """Units are equal blocks of the activation's last axis (reshaped before blending)."""
        return self.units == ("n_blocks",)

    def shape(self, cfg, n_blocks: Optional[int] = None) -> Tuple[int, ...]:
        """The mask shape [L, *units] of one intervention on model `cfg`."""
        dims = []
        for a in self.units:
            if a == "n_blocks":
                nb = n_blocks or cfg.n_heads
                if nb <= 0 or cfg.d_model % nb:
                    raise ValueError(f"n_blocks={nb} does not divide d_model={cfg.d_model}")
                dims.append(nb)
            else:
                dims.append(getattr(cfg, a))
        return (cfg.n_layers, *dims)

    def check_shape(self, shape: Sequence[int], cfg, where: str = "") -> None:
        """Raise ValueError unless `shape` is a valid mask shape [L, *units] for `cfg` (`where`
        qualifies the shape in the message)."""
        shape = tuple(int(s) for s in shape)
        if self.blocked:
            ok = len(shape) == 2 and shape[0] == cfg.n_layers and shape[1] > 0 and cfg.d_model % shape[1] == 0
            want = f"({cfg.n_layers}, n_blocks) with n_blocks dividing d_model={cfg.d_model}"
        else:
            want = self.shape(cfg)
            ok = shape == want
        if not ok:
            raise ValueError(f"mask site {self.name!r} has shape {shape}{where}, expected {want}")

    def weights(self, m: Array, pos_w: Array, ndim: int) -> Array:
        """Per-element weight m * w_pos, broadcastable against the per-layer activation of rank
        `ndim` (after the block view): m [*units] of one layer, pos_w [B, T]."""
        p = self.pos_axes[0]
        w_pos = pos_w.reshape(pos_w.shape[0], *([1] * (p - 1)), pos_w.shape[1], *([1] * (ndim - p - 1)))
        w_unit = m.reshape(*([1] * self.unit_axis), *m.shape, *([1] * (ndim - self.unit_axis - m.ndim)))
        return w_pos * w_unit

    def view(self, shape: Sequence[int], m: Array) -> Tuple[int, ...]:
        """A per-layer activation shape [B, ...] as the units of mask leaf `m` [..., *units] see
        it: blocked sites split the last axis into m.shape[-1] blocks."""
        shape = tuple(shape)
        return (*shape[:-1], m.shape[-1], shape[-1] // m.shape[-1]) if self.blocked else shape

    def touched(self, units: Array, pos: Array, shape: Sequence[int]) -> Array:
        """bool `shape` (this site's cache entry [L, B, ...]): the elements a mask blends where it is
        nonzero at `units` (bool [L, *units]) and the position weights are nonzero at `pos` (bool [B, T])."""
        view = self.view(shape[1:], units)
        w = jax.vmap(lambda u: self.weights(u, pos, len(view)))(units)
        return jnp.broadcast_to(w, (shape[0], *view)).reshape(shape)


SITES: Tuple[Site, ...] = (
    Site("resid_pre", (), "resid_pre", before_z=True, dims=("T", "d_model")),
    Site("head_q", ("n_heads",), "head_q", before_z=True, dims=("T", "n_heads", "d_head"), tag="Q"),
    Site("head_k", ("n_kv_heads",), "head_k", before_z=True, dims=("T", "n_kv_heads", "d_head"), tag="K"),
    Site("head_v", ("n_kv_heads",), "head_v", before_z=True, dims=("T", "n_kv_heads", "d_head"), tag="V"),
    Site("pattern", ("n_heads",), "pattern", before_z=True, dims=("n_heads", "T", "S")),
    Site("head_out", ("n_heads",), "head_out", before_z=False, dims=("T", "n_heads", "d_head"), tag="H"),
    Site("attn_block", ("n_blocks",), "attn_out", before_z=False, dims=("T", "d_model"), tag="B"),
    Site("attn_out", (), "attn_out", before_z=False, dims=("T", "d_model")),
    Site("mlp_in", (), "mlp_in", before_z=False, dims=("T", "d_model")),
    Site("mlp_neuron", ("d_mlp",), "mlp_neuron", before_z=False, dims=("T", "d_mlp"), tag="N"),
    Site("mlp_out", (), "mlp_out", before_z=False, dims=("T", "d_model")),
    # before_z: conservative (a resid_pre dictionary reads before z; the others after it)
    Site("features", ("dict_width",), "features", before_z=True, dims=("T", "dict_width"), tag="F",
         on_layers="spliced_layers"),
)
BY_NAME: Dict[str, Site] = {s.name: s for s in SITES}
NAMES: Tuple[str, ...] = tuple(BY_NAME)
# Cache entries that are not mask sites.
EXTRA_CACHE = ("kv", "resid_final", "final_norm")
CACHE_SITES: Tuple[str, ...] = tuple(s.name for s in SITES if s.cache == s.name) + EXTRA_CACHE


def present(cfg) -> Tuple[Site, ...]:
    """The `SITES` rows model `cfg` has (every row but those on no layer of it: 'features' without a splice)."""
    return tuple(s for s in SITES if s.layers(cfg))


def cache_entries(cfg) -> Tuple[str, ...]:
    """The `CACHE_SITES` a run of model `cfg` records."""
    return tuple(s.name for s in present(cfg) if s.cache == s.name) + EXTRA_CACHE
# The cache entries an edge-patched run (`jaxcircuits.interventions.edges`) reads its senders' source outputs from:
# the embeddings (`resid_pre` of layer 0), each head's z (times its o_proj slice) and each MLP output.
EDGE_SOURCE = ("resid_pre", "head_out", "mlp_out")
# Transforms of a site's blend, carried as extra source entries "<kind>:<site>" with a leading [L]
# axis (sliced per layer with the source; a site without one blends plainly; see `apply`):
#   'subspace:<site>' [L, *units, k, d] orthonormal rows (zero rows allowed, so ranks pad to one
#                     k): blend only within their span, x + m * w_pos * P (s - x), P = B^T B
#   'steer:<site>'    [L, *units, d]: additive, x + m * w_pos * v (no replacement is read); [L, *units]
#                     at a site of scalar units (mlp_neuron, features: v is the number added)
# d is the activation's last axis (the unit's own width: Dh for heads, D for the residual).
TRANSFORMS = ("subspace", "steer")


def transform_key(kind: str, site: str) -> str:
    """The source key of transform `kind` (a `TRANSFORMS` entry) at site `site`: 'subspace:head_out'."""
    if kind not in TRANSFORMS:
        raise ValueError(f"unknown transform {kind!r}; known: {TRANSFORMS}")
    get(site)
    return f"{kind}:{site}"


def split_key(key: str) -> Optional[Tuple[str, str]]:
    """(kind, site) of a transform key, None for a cache entry."""
    kind, sep, site = key.partition(":")
    return (kind, site) if sep and kind in TRANSFORMS else None


def _transform_shape(key: str, cfg) -> Tuple[str, ...]:
    """The expected axes of transform entry `key` after [L]: units, then ('k', 'd') or ('d',)."""
    kind, name = split_key(key)
    site = get(name)
    units = tuple(str(getattr(cfg, u, u)) for u in site.units)
    if kind == "steer" and site.units and not site.blocked and site.unit_axis + len(site.units) == len(site.dims) + 1:
        return units                                               # scalar units: one number each
    if site.blocked or (site.units and site.unit_axis + len(site.units) != len(site.dims)):
        raise ValueError(f"site {name!r} has no per-unit vector axis: {kind} transforms apply where the units "
                         f"are followed by the activation's last axis (dims {site.dims})")
    return (*units, *(("k",) if kind == "subspace" else ()),
            str(getattr(cfg, site.dims[-1], site.dims[-1])))


def get(name: str) -> Site:
    """The registry row of site `name` (ValueError naming the known sites otherwise)."""
    if name not in BY_NAME:
        raise ValueError(f"unknown site {name!r}; known: {NAMES}")
    return BY_NAME[name]


def source_entry(name: str) -> Site:
    """The registry row describing cache entry `name` (a site that caches itself)."""
    site = BY_NAME.get(name)
    if site is None or site.cache != name:
        raise ValueError(f"{name!r} is not a cache entry with positions; known: {CACHE_SITES[:-len(EXTRA_CACHE)]}")
    return site


def unit_label(site: str, unit: Sequence[int]) -> str:
    """'L3H5' for unit (3, 5) of a site with a tag; else the coordinates, e.g. '(3,)'."""
    tag = get(site).tag
    unit = tuple(int(c) for c in unit)
    if tag is None or len(unit) != 2:
        return str(unit)
    return f"L{unit[0]}{tag}{unit[1]}"


@struct.dataclass
class Mask:
    """Blend weights per site: one optional leaf per `SITES` row, in registry order, each [L, *units]
    (`Site.shape`) or [N, L, *units] for a batch of N masks; `edges`, an `edges.EdgeMask` of edge
    weights ([L, S, R] and [S], with a leading [N] for a batch). `None` leaves a site untouched."""

    resid_pre: Optional[Array] = None
    head_q: Optional[Array] = None
    head_k: Optional[Array] = None
    head_v: Optional[Array] = None
    pattern: Optional[Array] = None
    head_out: Optional[Array] = None
    attn_block: Optional[Array] = None
    attn_out: Optional[Array] = None
    mlp_in: Optional[Array] = None
    mlp_neuron: Optional[Array] = None
    mlp_out: Optional[Array] = None
    features: Optional[Array] = None
    edges: Optional[EdgeMask] = None

    def sites(self) -> Tuple[str, ...]:
        """Names of the node sites this mask touches (leaves that are not None), in registry order."""
        return tuple(n for n in NAMES if getattr(self, n) is not None)

    def nodes(self) -> "Mask":
        """The mask without its edges."""
        return self.replace(edges=None)

    def size(self) -> int:
        """N, the batch size of a batch of masks (leaves [N, ...])."""
        return int(jnp.shape(jax.tree.leaves(self)[0])[0])


if tuple(f.name for f in dataclasses.fields(Mask)) != (*NAMES, "edges"):
    raise AssertionError("Mask's fields must be the SITES rows, in order, then 'edges'")


# Unit levels of circuits and learned masks: a circuit keeps a set of units; every other unit of the
# level is patched. `mask(cfg, w)` puts patch weights w [..., U] (U units, flat in `labels` order) into
# a `Mask` ([..., L, *units]); `source`: the cache entries a problem's source must hold.
@dataclasses.dataclass(frozen=True)
class Level:
    labels: Callable[[object], Tuple[str, ...]]
    mask: Callable[[object, Array], Mask]
    source: Tuple[str, ...]


def _head_mask(cfg, w) -> Mask:
    return Mask(head_out=jnp.reshape(w, (*jnp.shape(w)[:-1], cfg.n_layers, cfg.n_heads)))


def _feature_labels(cfg) -> Tuple[str, ...]:
    F = cfg.dict_width
    return tuple(unit_label("features", (l, f)) for l in cfg.spliced_layers for f in range(F))


def _feature_mask(cfg, w) -> Mask:
    """w [..., n_spliced * F] (spliced layers, layer-major) -> Mask(features=[..., L, F]), 0 elsewhere."""
    w, F, layers = jnp.asarray(w), cfg.dict_width, np.asarray(cfg.spliced_layers)
    per = jnp.reshape(w, (*w.shape[:-1], len(layers), F))
    return Mask(features=jnp.zeros((*w.shape[:-1], cfg.n_layers, F), w.dtype).at[..., layers, :].set(per))


LEVELS: Dict[str, Level] = {
    "head": Level(lambda cfg: tuple(unit_label("head_out", (l, h)) for l in range(cfg.n_layers)
                                    for h in range(cfg.n_heads)), _head_mask, ("head_out",)),
    "feature": Level(_feature_labels, _feature_mask, ("features",)),
    "edge": Level(lambda cfg: tuple(f"{s}->{r}" for s, r in EdgeGraph.of(cfg).edges),
                  lambda cfg, w: Mask(edges=EdgeGraph.of(cfg).unflat(w)), EDGE_SOURCE),
}


def level(name: str) -> Level:
    """The `LEVELS` row `name` (ValueError naming the known levels otherwise)."""
    if name not in LEVELS:
        raise ValueError(f"unknown level {name!r}; known: {sorted(LEVELS)}")
    return LEVELS[name]


# The `Mask` field of the edge level: a name accepted wherever a site is ('edges').
EDGES = "edges"


def every_unit(cfg, site: str, n_blocks: Optional[int] = None) -> Mask:
    """The float32 mask with every unit of `site` at 1: [L, *units] (`Site.shape`; 0 on layers that
    lack the site, `Site.layers`), or every valid edge of `EdgeGraph.of(cfg)` for site 'edges'."""
    if site == EDGES:
        return Mask(edges=jax.tree.map(lambda v: jnp.asarray(v, jnp.float32), EdgeGraph.of(cfg).valid()))
    row = get(site)
    shape = row.shape(cfg, n_blocks)
    on = np.isin(np.arange(cfg.n_layers), row.layers(cfg)).astype(np.float32)
    return Mask(**{site: jnp.asarray(np.broadcast_to(on.reshape(-1, *[1] * (len(shape) - 1)), shape))})


def unit_values(cfg, mask: Mask, site: str):
    """A mask's values of `site`'s units: its leaf [..., L, *units], or for site 'edges' the valid
    edges flat [..., E] (`EdgeGraph.flat` order)."""
    return EdgeGraph.of(cfg).flat(mask.edges) if site == EDGES else getattr(mask, site)


def blend(x: Array, s: Array, w: Array) -> Array:
    """x + w * (s - x), with w broadcast against x. w == 0 returns x exactly."""
    return x + w.astype(x.dtype) * (s.astype(x.dtype) - x)


def _last(a: Array, axis: int, n: int) -> Array:
    """The last n entries of `a` along `axis`."""
    return a[(slice(None),) * axis + (slice(a.shape[axis] - n, None),)]


def apply(name: str, x: Array, mask_l: Mask, source_l: Source, pos_w: Array) -> Array:
    """Blend one layer's activation `x` at site `name` toward its replacement, if the mask has it.

    mask_l: the `Mask` of this layer (leaves [*units]); source_l: this layer's source; pos_w [B, T].
    x may hold only the last positions of the run (a patched suffix, or queries at the last
    positions only): it is matched with the last positions of pos_w and of the source.
    """
    m = getattr(mask_l, name)
    if m is None:
        return x
    site = BY_NAME[name]
    q = site.pos_axes[0]
    n = x.shape[q]
    view = site.view(x.shape, m)
    w = site.weights(m, _last(pos_w, 1, n), len(view))
    steer = source_l.get(f"steer:{name}")
    if steer is not None:
        return x + w.astype(x.dtype) * steer.astype(x.dtype)
    s = _last(source_l[site.cache], q, n).reshape(view)
    basis = source_l.get(f"subspace:{name}")
    if basis is not None:
        xv = x.reshape(view)
        proj = jnp.einsum("...kd,...ke->...de", basis, basis).astype(x.dtype)          # [*units, d, d]
        return (xv + w.astype(x.dtype) * jnp.einsum("...d,...de->...e", s.astype(x.dtype) - xv, proj)).reshape(x.shape)
    return blend(x.reshape(view), s, w).reshape(x.shape)


class NodeIO(LayerIO):
    """One layer of a node-patched run: every site is blended toward its replacement (`apply`), then
    recorded when collected. mask_l, source_l: this layer's slices; pos_w [B, T]."""

    def __init__(self, mask_l: Mask, source_l: Source, pos_w: Array, collect: Sequence[str], carry=None):
        super().__init__(collect, carry)
        self.mask_l, self.source_l, self.pos_w = mask_l, source_l, pos_w

    def site(self, name: str, x: Array) -> Array:
        x = apply(name, x, self.mask_l, self.source_l, self.pos_w)
        self.record(name, x)
        return x


@struct.dataclass
class Intervention(Tap):
    """What one patched run applies (a `models.transformer.Tap`).

    mask:   a `Mask` (node leaves [L, *units] sliced layer by layer; edges [L, S, R] and [S])
    source: replacement activations for the mask's sites, `Source` aligned to the target ([L, B, T, ...])
    pos_w:  [B, T] float position weights of the target run (1 = intervene at this position)
    shift:  with edges, (layers [L, R, B, T, D], final [B, T, D]) added to every receiver's input, or
            None (zero); the gradient with respect to it is the receivers' (`engine.patching`)
    """

    mask: Mask
    source: Source
    pos_w: Array
    shift: Optional[Tuple[Array, Array]] = None

    def _graph(self) -> EdgeGraph:
        L, S, R = jnp.shape(self.mask.edges.layers)
        H = (S - 1) // L - 1
        return EdgeGraph(L, H, (R - 1 - H) // 2)

    def per_layer(self):
        e = self.mask.edges
        edges = None if e is None else (e.layers, jnp.arange(e.layers.shape[0]),
                                        None if self.shift is None else self.shift[0])
        return self.mask.nodes(), self.source, edges

    def init(self, x: Array):
        if self.mask.edges is None:
            return None
        return jnp.zeros((self.mask.edges.final.shape[0], *x.shape), x.dtype)

    def io(self, layer, carry, collect: Sequence[str]) -> LayerIO:
        e = self.mask.edges
        if layer is None:
            inner = LayerIO(collect, carry)
            if e is None:
                return inner
            shift = None if self.shift is None else self.shift[1][None]
            return EdgeIO(self._graph(), inner, e.final[:, None], {"embed": self.source["resid_pre"][0]},
                          self.pos_w.astype(carry.dtype), 0, carry, shift)
        nodes, source, edges = layer
        inner = NodeIO(nodes, source, self.pos_w, collect, carry)
        if edges is None:
            return inner
        m, l, shift = edges
        graph = self._graph()
        return EdgeIO(graph, inner, m, {"heads": source["head_out"], "mlp": source["mlp_out"]},
                      self.pos_w.astype(carry.dtype), 1 + l * (graph.n_heads + 1), carry, shift)

    def checked(self, cfg, batch: int, n_pos: int, name: str = "intervention", per_token: bool = False) -> "Intervention":
        return check_intervention(self, cfg, batch, n_pos, name, per_token)

    def layers(self, start: int, stop: int) -> "Intervention":
        if self.mask.edges is not None:
            raise ValueError("an edge-patched run runs every layer: it has no layer range")
        cut = lambda tree: jax.tree.map(lambda a: a[start:stop], tree)
        return self.replace(mask=cut(self.mask), source=cut(self.source))


# ---- checking what a run reads: outside jit, values only where concrete (tracers: shapes only) ----

def concrete(*trees) -> bool:
    """No leaf of `trees` is a tracer (its values can be checked on the host)."""
    return not any(isinstance(a, jax.core.Tracer) for a in jax.tree.leaves(trees))


def check_mask(mask: Mask, cfg, batched: bool = False) -> None:
    """Raise ValueError unless every node leaf has shape [L, *units] (`Site.check_shape`; [N, L, *units]
    when `batched`) and values in [0, 1], zero on layers that lack the site (`Site.layers`: 'features'
    off the spliced layers), and the edges leaf is a valid edge mask of `cfg`'s graph
    (`edges.check_edge_mask`, on a model whose residual stream is the sum of its writes:
    `block.check_writes_sum`); a batch's leaves share one N."""
    if not mask.sites() and mask.edges is None:
        raise ValueError("the mask touches no site")
    if mask.edges is not None:
        check_writes_sum(cfg, "edges")
        check_edge_mask(mask.edges, EdgeGraph.of(cfg), batched)
    sizes = sorted({jnp.shape(a)[0] for a in jax.tree.leaves(mask)})
    if batched and len(sizes) > 1:
        raise ValueError(f"the masks' leaves disagree on the batch size N: {sizes}")
    for s in mask.sites():
        a = getattr(mask, s)
        get(s).check_shape(jnp.shape(a)[int(batched):], cfg, " after the batch axis" if batched else "")
        v = np.asarray(a, np.float64) if concrete(a) else None
        if v is not None and v.size and not (v.min() >= 0 and v.max() <= 1):          # NaN fails both
            raise ValueError(f"mask site {s!r} has values outside [0, 1] or NaN: min {v.min()}, max {v.max()}")
        layers = get(s).layers(cfg)
        if v is not None and len(layers) < cfg.n_layers:
            nonzero = np.flatnonzero(np.moveaxis(v, int(batched), 0).reshape(cfg.n_layers, -1).any(1))
            off = sorted(set(nonzero.tolist()) - set(layers))
            if off:
                raise ValueError(f"mask site {s!r} is nonzero on layer(s) {off}, which lack it (only layers "
                                 f"{layers} have it: the spliced dictionaries')")


def check_pos_w(pos_w, batch: int, n_pos: int) -> Array:
    """pos_w as float32 [batch, n_pos]; ValueError for another shape, or (where concrete) values that
    are not weights in [0, 1], as masks' are."""
    pos_w = jnp.asarray(pos_w, jnp.float32)
    if pos_w.shape != (batch, n_pos):
        raise ValueError(f"pos_w has shape {tuple(pos_w.shape)}, expected the target's (batch, seq) {(batch, n_pos)}")
    if concrete(pos_w):
        checks.within("pos_w", pos_w, 0, 1)
    return pos_w


def check_source(source: Source, n_layers: int, batch: int, n_pos: int, cfg=None) -> None:
    """Raise ValueError unless every entry has its site's shape [L, B, *dims] (`Site.dims`) for a run
    of `batch` rows and `n_pos` positions; the model's sizes are checked only given `cfg`."""
    for name, a in source.items():
        if split_key(name):
            _check_transform(name, a, n_layers, cfg)
            continue
        axes = ("L", "B", *source_entry(name).dims)
        want = [n_layers, batch, *(n_pos if d in ("T", "S") else getattr(cfg, d, None) for d in axes[2:])]
        shape = tuple(jnp.shape(a))
        if len(shape) != len(want) or any(w is not None and w != n for n, w in zip(shape, want)):
            expected = ", ".join(d if w is None else str(w) for w, d in zip(want, axes))
            raise ValueError(f"source {name!r} has shape {shape}, expected ({expected}) = "
                             f"[{', '.join(axes)}] aligned to the target")


def _check_transform(key: str, a, n_layers: int, cfg) -> None:
    """ValueError unless transform entry `key` has shape [L, *units, (k,) d] (`TRANSFORMS`; the
    model's sizes only given `cfg`) and, where concrete, finite values; a subspace's rows must be
    orthonormal or zero (tolerance 1e-3)."""
    axes = ("L", *_transform_shape(key, cfg))
    want = [n_layers, *(int(d) if d.isdigit() else None for d in axes[1:])]
    shape = tuple(jnp.shape(a))
    if len(shape) != len(want) or any(w is not None and w != n for n, w in zip(shape, want)):
        raise ValueError(f"source {key!r} has shape {shape}, expected ({', '.join(axes)})")
    if not concrete(a):
        return
    v = checks.within(f"source {key!r}", a)
    if split_key(key)[0] == "subspace":
        gram = v @ np.swapaxes(v, -1, -2)                                          # [..., k, k]
        norms = np.diagonal(gram, axis1=-2, axis2=-1)
        want_gram = np.eye(gram.shape[-1]) * (norms > 0.5)[..., None]             # 1 on nonzero rows' diagonal
        err = np.abs(gram - want_gram).max(initial=0.0)
        if err > 1e-3:
            at = tuple(int(i) for i in np.unravel_index(np.argmax(np.abs(gram - want_gram).max((-1, -2))), gram.shape[:-2]))
            raise ValueError(f"source {key!r} rows must be orthonormal (or zero): B B^T differs from the identity on "
                             f"its nonzero rows by {err:.3g} at {at}; orthonormalise them (np.linalg.qr)")


def source_for(source: Source, names: Sequence[str]) -> Source:
    """The entries of `source` that the sites `names` read (ValueError naming the missing ones),
    with their transform entries (`TRANSFORMS`); a steered site reads no replacement."""
    transforms = {k: v for k, v in source.items() if split_key(k) and split_key(k)[1] in names}
    steered = {split_key(k)[1] for k in transforms if split_key(k)[0] == "steer"}
    need = sorted({get(n).cache for n in names if n not in steered})
    missing = [k for k in need if k not in source]
    if missing:
        raise ValueError(f"source lacks {missing} needed by mask sites {tuple(names)}")
    return {**{k: source[k] for k in need}, **transforms}


def footprint(mask: Mask, batched: bool = False) -> Mask:
    """bool leaves [L, *units] (edges: [L, S, R], [S]): where a mask (any mask of a batch
    [N, L, *units]) is nonzero; everywhere a leaf is traced."""
    def units(a):
        if not concrete(a):
            return np.ones(jnp.shape(a)[int(batched):], bool)
        nonzero = np.asarray(a) != 0
        return nonzero.any(0) if batched else nonzero
    return jax.tree.map(units, mask)


@jax.jit
def _select(source: Source, units: Dict[str, Array], pos: Array):
    """Per entry: the source zeroed outside the footprint (the elements the sites of `units`, bool
    [L, *units], blend at positions `pos`, bool [B, T]) and the flat index of its first non-finite
    value inside the footprint (-1: none)."""
    out, bad = {}, {}
    for name, a in source.items():
        inside = functools.reduce(jnp.logical_or, [BY_NAME[s].touched(u, pos, a.shape)
                                                   for s, u in units.items() if BY_NAME[s].cache == name])
        nonfinite = (inside & ~jnp.isfinite(a)).ravel()
        bad[name] = jnp.where(nonfinite.any(), jnp.argmax(nonfinite), -1)
        out[name] = jnp.where(inside, a, jnp.zeros((), a.dtype))
    return out, bad


def select_source(cfg, source: Source, footprint: Mask, pos_w: Array) -> Source:
    """What a patched run reads of `source`: the entries the sites of `footprint` (leaves [L, *units],
    nonzero: may be patched) read, checked (`check_source` for pos_w's [B, T]), and zero outside the
    footprint (its units at the positions where pos_w is nonzero). NaN or inf outside the footprint
    is thus harmless (selected away, never multiplied by a zero weight); inside it, it is a
    ValueError naming the entry and index. Runs once per call, on device; a traced source, pos_w or
    footprint is checked for shape only and returned as is.
    """
    reads = _reads(cfg, footprint)
    src = source_for(source, tuple(reads))
    check_source(src, cfg.n_layers, *jnp.shape(pos_w), cfg)
    if not concrete(src, pos_w, footprint):
        return src
    transforms = {k: v for k, v in src.items() if split_key(k)}
    src = {k: v for k, v in src.items() if not split_key(k)}
    with jax.ensure_compile_time_eval():            # concrete values inside a caller's trace: run now
        out, bad = _select(src, {s: jnp.asarray(u) != 0 for s, u in reads.items()}, jnp.asarray(pos_w) != 0)
        for name, i in jax.device_get(bad).items():
            if i >= 0:
                a = src[name]
                idx = tuple(int(c) for c in np.unravel_index(i, a.shape))
                raise ValueError(f"source {name!r} (shape {tuple(a.shape)}) holds {float(a[idx])} at {idx} "
                                 f"= [L, B, {', '.join(source_entry(name).dims)}], where the mask and pos_w patch it")
    return {**out, **transforms}


def _reads(cfg, footprint: Mask) -> Dict[str, Array]:
    """{node site: bool units [L, *units]} of the source values a mask with `footprint` reads: its node
    sites', and with edges every sender's (`EDGE_SOURCE`: layer 0's resid_pre, every head_out and
    mlp_out), whichever edges are nonzero."""
    reads = {s: getattr(footprint, s) for s in footprint.sites()}
    if footprint.edges is not None:
        L, H = cfg.n_layers, cfg.n_heads
        for s, u in zip(EDGE_SOURCE, (np.arange(L) == 0, np.ones((L, H), bool), np.ones(L, bool))):
            reads[s] = u | np.asarray(reads[s], bool) if s in reads and concrete(reads[s]) else u
    return reads


def check_intervention(iv: Intervention, cfg, batch: int, n_pos: int, name: str = "intervention",
                       per_token: bool = False) -> Intervention:
    """`iv` checked for a run of `batch` rows and `n_pos` positions (`check_mask`, `check_pos_w`), with
    its source cut and selected to the mask's footprint (`select_source`); errors start with `name`.
    per_token: it patches one generated token at a time (no site indexing key positions, no edges)."""
    try:
        keyed = [s for s in iv.mask.sites() if len(get(s).pos_axes) > 1]
        if per_token and (keyed or iv.mask.edges is not None):
            raise ValueError(f"site(s) {keyed + ['edges'] * (iv.mask.edges is not None)} index key positions and "
                             "cannot be patched during decoding")
        check_mask(iv.mask, cfg)
        pos_w = check_pos_w(iv.pos_w, batch, n_pos)
        return iv.replace(source=select_source(cfg, iv.source, footprint(iv.mask), pos_w), pos_w=pos_w)
    except ValueError as e:
        raise ValueError(f"{name}: {e}") from None
