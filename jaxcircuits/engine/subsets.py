"""Families of subsets of a pool of n units, unranked on device.

A subset of units {0..n-1} is a bool vector [n] or a bitmask (unit i = bit i). A `Family` is an
ordered collection of subsets addressed by rank 0..size()-1; `unrank` maps ranks to bool rows with
pure jnp ops, so a sweep can jit/vmap over rank ranges of families far too large to list on the
host (e.g. all 2^24 subsets, or C(64, 8) 8-subsets).

Rank order:
  all       rank r is the subset with bitmask r.
  size_k    colex order of each size, which is ascending bitmask order; with several sizes
            (`of_sizes`), the sizes' blocks are concatenated in the order given:
            rank = offset(k) + sum_t C(c_t, t) over the members c_1 < ... < c_k (t = 1..k).
  explicit  the given list, in order (bitmasks stored as a tuple of Python ints).
A complemented family (`complement`) has the same ranks with every subset complemented.

Limits: n <= 64. `unrank_np` works on uint64 (any family). `unrank` works in the integer dtype
of `ranks`: with jax's default int32 a family may have at most 2^31 members (so 'all' needs
n <= 31); enable x64 (int64 ranks) for up to 2^63, or use `sampled_per_size`.

A `Pool` maps units to coordinates of an intervention site (see `jaxcircuits.interventions.sites`):
`Pool.scatter` turns selected units [.., n] into mask weights [.., *site_shape].
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Iterable, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxcircuits import checks
from jaxcircuits.interventions import sites
from jaxcircuits.stats.tables import from_bitmask, to_bitmask

MAX_UNITS = 64
MAX_RANK = 2 ** 31 - 1            # the largest rank of jax's default int32 (see "Limits" above)
FAMILY_KINDS = ("all", "size_k", "explicit")


@dataclasses.dataclass(frozen=True)
class Family:
    """An ordered family of subsets of n units; hashable, so usable as a static jit argument.

    kind: 'all' | 'size_k' | 'explicit' (rank order in the module doc).
    ks: for 'size_k', the subset sizes whose blocks are concatenated, in rank order.
    bitmasks: for 'explicit', the members' bitmasks, in rank order (no duplicates).
    complemented: every member is the complement of the base family's member of the same rank.
    """

    kind: str
    n: int
    ks: Tuple[int, ...] = ()
    bitmasks: Tuple[int, ...] = ()
    complemented: bool = False

    def __post_init__(self):
        if self.kind not in FAMILY_KINDS:
            raise ValueError(f"kind must be one of {FAMILY_KINDS}, got {self.kind!r}")
        if not 1 <= checks.count("n", self.n) <= MAX_UNITS:
            raise ValueError(f"n must be in [1, {MAX_UNITS}], got {self.n}")
        object.__setattr__(self, "ks", tuple(checks.count("k", k, 0) for k in self.ks))
        if self.kind == "size_k":
            if not self.ks or any(not 0 <= k <= self.n for k in self.ks) or len(set(self.ks)) < len(self.ks):
                raise ValueError(f"ks must be distinct sizes in [0, {self.n}], got {self.ks}")
        if self.kind == "explicit":
            if any(not 0 <= m < 1 << self.n for m in self.bitmasks):
                raise ValueError(f"explicit bitmasks must be in [0, 2^{self.n})")
            if len(set(self.bitmasks)) < len(self.bitmasks):
                raise ValueError("explicit family has duplicate subsets")

    @property
    def k(self):
        """The size shared by all members when it is known statically (one-size 'size_k'), else None."""
        if self.kind != "size_k" or len(self.ks) != 1:
            return None
        return self.n - self.ks[0] if self.complemented else self.ks[0]

    def size(self) -> int:
        """Number of members (a Python int; may exceed any machine integer's range for n = 64)."""
        if self.kind == "all":
            return 1 << self.n
        if self.kind == "size_k":
            return sum(math.comb(self.n, k) for k in self.ks)
        return len(self.bitmasks)


# ----------------------------------------------------------------------------- constructors

def all_subsets(n: int) -> Family:
    """All 2^n subsets; rank r is bitmask r."""
    return Family("all", n)


def of_size(n: int, k: int) -> Family:
    """All C(n, k) subsets of size k, in colex (= ascending bitmask) order."""
    return of_sizes(n, (k,))


def of_sizes(n: int, ks: Iterable[int]) -> Family:
    """The size-k families for each k in `ks`, concatenated in that order."""
    return Family("size_k", n, ks=tuple(ks))


def explicit(n: int, subsets) -> Family:
    """A user list of subsets, each a bool vector [n] or a collection of unit indices."""
    return Family("explicit", n, bitmasks=tuple(_bitmask_of(n, s) for s in subsets))


def _bitmask_of(n: int, subset) -> int:
    a = np.asarray(subset)
    if a.dtype == bool:
        if a.shape != (n,):
            raise ValueError(f"bool subset must have shape ({n},), got {a.shape}")
        return to_bitmask(a)
    units = [int(u) for u in a.reshape(-1)]
    if any(not 0 <= u < n for u in units):
        raise ValueError(f"unit indices must be in [0, {n}), got {units}")
    return sum(1 << u for u in set(units))


def sampled_per_size(n: int, sizes: Iterable[int], samples_per_size: int, seed: int) -> Family:
    """A stratified sample: for each k in `sizes`, `samples_per_size` distinct k-subsets.

    Ranks of the size-k family are drawn without replacement (never enumerating it), sorted, and
    unranked; a layer with C(n, k) <= samples_per_size is taken whole. Each layer's draw depends
    only on (seed, n, k), so it is deterministic and unchanged by which other sizes are asked
    for. Returns an 'explicit' family ordered by the given sizes, then by colex rank.
    """
    masks, samples_per_size = [], checks.count("samples_per_size", samples_per_size)
    for k in sizes:
        total = math.comb(n, checks.count("k", k, 0))
        if samples_per_size >= total:
            ranks = np.arange(total, dtype=np.uint64)
        else:
            rng = np.random.default_rng([seed, n, k])
            ranks = np.sort(rng.choice(total, samples_per_size, replace=False)).astype(np.uint64)
        masks += [int(m) for m in to_bitmask(unrank_np(of_size(n, k), ranks), dtype=np.uint64)]
    return Family("explicit", n, bitmasks=tuple(masks))


def strided(n: int, stride: int, offset: int = 0) -> Family:
    """One subset: units offset, offset + stride, ... (< n)."""
    return explicit(n, [range(checks.count("offset", offset, 0), n, checks.count("stride", stride))])


def even(n: int) -> Family:
    """One subset: the even units 0, 2, 4, ..."""
    return strided(n, 2, 0)


def odd(n: int) -> Family:
    """One subset: the odd units 1, 3, 5, ..."""
    return strided(n, 2, 1)


def contiguous(n: int, length: int) -> Family:
    """All windows {s, ..., s + length - 1}, s = 0..n - length, in order of s."""
    if not 1 <= length <= n:
        raise ValueError(f"length must be in [1, {n}], got {length}")
    return explicit(n, [range(s, s + length) for s in range(n - length + 1)])


def grouped(keys: Sequence) -> Family:
    """One subset per distinct key: the units whose keys [n] (hashable) are equal, in order of first
    appearance; e.g. keys (layer, head // G) for the KV groups of a head pool over several layers."""
    keys = list(keys)
    return explicit(len(keys), [[i for i, k in enumerate(keys) if k == key] for key in dict.fromkeys(keys)])


def kv_group_size(n_heads: int, n_kv_heads: int) -> int:
    """G, the query heads per key/value head (GQA; 1 for MHA); head h reads KV head h // G."""
    if n_kv_heads < 1 or n_heads % n_kv_heads:
        raise ValueError(f"n_heads={n_heads} is not a multiple of n_kv_heads={n_kv_heads}")
    return n_heads // n_kv_heads


def kv_groups(n_heads: int, n_kv_heads: int) -> Family:
    """One subset per KV group g: heads g*G .. g*G + G - 1, the query heads sharing key/value head g
    (`kv_group_size`; SmolLM2-135M, 9 heads / 3 KV heads: {0, 1, 2}, {3, 4, 5}, {6, 7, 8})."""
    return grouped(np.arange(n_heads) // kv_group_size(n_heads, n_kv_heads))


def group_positions(n_heads: int, n_kv_heads: int) -> Family:
    """One subset per position p within the KV groups: heads p, G + p, 2G + p, ... (Llama-3.1-8B,
    G = 4: position 0 = heads 0, 4, ..., 28, all even; SmolLM2-135M, G = 3: {0, 3, 6}, parity mixed)."""
    return grouped(np.arange(n_heads) % kv_group_size(n_heads, n_kv_heads))


def complement(family: Family) -> Family:
    """The family of complements, rank for rank (complementing twice gives the family back)."""
    return dataclasses.replace(family, complemented=not family.complemented)


# ----------------------------------------------------------------------------- unranking

@functools.lru_cache(maxsize=None)
def _binom(n: int, kmax: int) -> np.ndarray:
    """uint64 [n, kmax + 1]: entry [c, i] = C(c, i), exact for n <= 64."""
    return np.array([[math.comb(c, i) for i in range(kmax + 1)] for c in range(n)], dtype=np.uint64)


@functools.lru_cache(maxsize=64)
def _explicit_bits(family: Family) -> np.ndarray:
    return from_bitmask(np.array(family.bitmasks, dtype=np.uint64), family.n).reshape(-1, family.n)


def _unrank(xp, family: Family, ranks, rdtype):
    """Shared numpy/jnp unranking of integer `ranks` [..] (dtype `rdtype`) -> bool [.., n]."""
    n = family.n
    if family.kind == "all":
        bits = ((ranks[..., None] >> xp.arange(n, dtype=rdtype)) & 1) != 0
    elif family.kind == "explicit":
        bits = xp.asarray(_explicit_bits(family))[ranks]
    else:
        top = np.iinfo(rdtype).max
        ks = np.array(family.ks)
        sizes = [math.comb(n, k) for k in family.ks]
        starts = xp.asarray(np.array([sum(sizes[:j]) for j in range(len(ks))], dtype=np.uint64).astype(rdtype))
        which = (ranks[..., None] >= starts[1:]).sum(-1)
        r = ranks - starts[which]
        k = xp.asarray(ks)[which]
        # Entries may exceed the rank dtype (when k > n/2); saturating keeps `C <= r` exact.
        table = xp.asarray(np.minimum(_binom(n, int(ks.max())), np.uint64(top)).astype(rdtype))
        units = xp.arange(n)
        bits = xp.zeros(ranks.shape + (n,), dtype=bool)
        for i in range(int(ks.max()), 0, -1):   # greedy colex: largest c with C(c, i) <= r
            col = table[:, i]
            c = (col <= r[..., None]).sum(-1) - 1
            active = k >= i
            bits = bits | (active[..., None] & (units == c[..., None]))
            r = r - xp.where(active, col[c], xp.zeros((), rdtype))
    return bits ^ family.complemented


@functools.partial(jax.jit, static_argnums=0)
def unrank(family: Family, ranks) -> jax.Array:
    """Members of `family` at integer `ranks` [..] -> bool [.., n]; pure jnp, jit/vmap-able.

    Jitted with `family` static (one compilation per family and rank shape); ranks must lie in
    [0, family.size()). Computed in the dtype of `ranks`, which must hold family.size() - 1
    (int32: 2^31 members at most; see the module doc).
    """
    ranks = jnp.asarray(ranks)
    if not jnp.issubdtype(ranks.dtype, jnp.integer):
        raise TypeError(f"ranks must be integers, got {ranks.dtype}")
    if family.size() - 1 > jnp.iinfo(ranks.dtype).max:
        raise ValueError(f"family of {family.size()} members cannot be addressed by {ranks.dtype} ranks; "
                         "enable jax x64 (int64 ranks) or sample it with sampled_per_size")
    return _unrank(jnp, family, ranks, ranks.dtype)


def unrank_np(family: Family, ranks) -> np.ndarray:
    """Host (numpy, uint64) version of `unrank`: ranks [..] -> bool [.., n]."""
    return _unrank(np, family, np.asarray(ranks, dtype=np.uint64), np.uint64)


def rank_of(family: Family, subset) -> int:
    """The rank of `subset` (bool [n]) in `family`; inverse of `unrank`. ValueError if absent."""
    bits = np.asarray(subset, dtype=bool)
    if bits.shape != (family.n,):
        raise ValueError(f"subset must have shape ({family.n},), got {bits.shape}")
    bits = bits ^ family.complemented
    mask = to_bitmask(bits)
    if family.kind == "all":
        return mask
    if family.kind == "explicit":
        try:
            return family.bitmasks.index(mask)
        except ValueError:
            raise ValueError(f"subset {np.flatnonzero(bits).tolist()} is not in the family") from None
    members = np.flatnonzero(bits)
    if len(members) not in family.ks:
        raise ValueError(f"subset of size {len(members)} is not in a family of sizes {family.ks}")
    j = family.ks.index(len(members))
    offset = sum(math.comb(family.n, k) for k in family.ks[:j])
    return offset + sum(math.comb(int(c), t + 1) for t, c in enumerate(members))


# ----------------------------------------------------------------------------- pools

@dataclasses.dataclass(frozen=True)
class Pool:
    """The units of a sweep: unit i is the coordinate `units[i]` of a mask leaf of `site`
    (e.g. (layer, head)); n_blocks: the block count of an 'attn_block' pool (default n_heads).
    """

    site: str
    units: Tuple[Tuple[int, ...], ...]
    n_blocks: Optional[int] = None

    def __post_init__(self):
        sites.get(self.site)
        units = tuple(tuple(int(c) for c in u) for u in self.units)
        if not units or len({len(u) for u in units}) != 1:
            raise ValueError("a pool needs at least one unit, all with coordinates of one length")
        if len(set(units)) < len(units):
            raise ValueError("a pool has duplicate units")
        object.__setattr__(self, "units", units)

    @property
    def n(self) -> int:
        return len(self.units)

    @classmethod
    def heads(cls, layer: int, n_heads: int) -> "Pool":
        """The heads of one layer at 'head_out': unit h = (layer, h)."""
        return cls.heads_of_layers((layer,), n_heads)

    @classmethod
    def heads_of_layers(cls, layers: Sequence[int], n_heads: int) -> "Pool":
        """All heads of `layers` at 'head_out', layer-major: unit i = (layers[i // H], i % H)."""
        return cls("head_out", tuple((l, h) for l in layers for h in range(n_heads)))

    @classmethod
    def blocks(cls, layer: int, n_blocks: int) -> "Pool":
        """The residual blocks of one layer's attention output at 'attn_block': unit b = (layer, b)."""
        return cls("attn_block", tuple((layer, b) for b in range(n_blocks)), n_blocks)

    def site_shape(self, cfg) -> Tuple[int, ...]:
        """The mask shape [L, *units] of the pool's site on model `cfg`."""
        return sites.get(self.site).shape(cfg, self.n_blocks)

    def labels(self) -> Tuple[str, ...]:
        """Short unit names for reports: 'L3H5' (head_out), 'L3B1' (attn_block), ... (`sites.unit_label`)."""
        return tuple(sites.unit_label(self.site, u) for u in self.units)

    def scatter(self, selected, site_shape: Sequence[int], dtype=jnp.float32) -> jax.Array:
        """bool [.., n] -> `dtype` [.., *site_shape]: 1 at each selected unit's coordinate, else 0.

        Pure jnp (jit/vmap-able); e.g. a head-subset batch [B, n] -> a 'head_out' mask [B, L, H].
        """
        site_shape = tuple(int(s) for s in site_shape)
        coords = np.array(self.units).T                      # [ndim, n]
        if len(coords) != len(site_shape) or np.any(coords >= np.array(site_shape)[:, None]) or np.any(coords < 0):
            raise ValueError(f"pool units {self.units} do not fit site shape {site_shape}")
        selected = jnp.asarray(selected)
        if selected.shape[-1:] != (self.n,):
            raise ValueError(f"selected must have shape [.., {self.n}], got {selected.shape}")
        out = jnp.zeros(selected.shape[:-1] + site_shape, dtype)
        return out.at[(Ellipsis, *coords)].set(selected.astype(dtype))
