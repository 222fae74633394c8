"""Subset families: exact coverage, device/host agreement, inverses, sampling, pools."""

import itertools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcircuits.engine import subsets as S

FAMILIES = [
    S.all_subsets(6),
    S.of_size(7, 3),
    S.of_size(5, 0),
    S.of_sizes(6, (4, 1, 6)),
    S.contiguous(8, 3),
    S.explicit(5, [(0, 4), (), (1, 2, 3)]),
    S.complement(S.of_size(6, 2)),
    S.sampled_per_size(9, (2, 5), 7, seed=1),
]


def _all_rows(family):
    return S.unrank_np(family, np.arange(family.size()))


def test_all_subsets_rank_is_bitmask():
    rows = _all_rows(S.all_subsets(5))
    np.testing.assert_array_equal(S.to_bitmask(rows), np.arange(32))


@pytest.mark.parametrize("n,k", [(1, 0), (1, 1), (5, 2), (6, 3), (7, 5), (6, 6)])
def test_size_k_covers_each_subset_once_in_colex_order(n, k):
    family = S.of_size(n, k)
    rows = _all_rows(family)
    assert family.size() == math.comb(n, k) == len(rows) and family.k == k
    got = [tuple(np.flatnonzero(r)) for r in rows]
    assert sorted(got) == sorted(itertools.combinations(range(n), k))      # each exactly once
    masks = S.to_bitmask(rows)
    assert np.all(np.diff(masks) > 0)                                      # colex = ascending bitmask


def test_of_sizes_concatenates_blocks_in_given_order():
    rows = _all_rows(S.of_sizes(6, (4, 1)))
    np.testing.assert_array_equal(rows[:15], _all_rows(S.of_size(6, 4)))
    np.testing.assert_array_equal(rows[15:], _all_rows(S.of_size(6, 1)))


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f"{f.kind}-{f.n}-{f.ks}-{f.complemented}")
def test_unrank_jit_and_vmap_match_numpy_and_rank_of_inverts(family):
    ranks = np.arange(family.size())
    expected = S.unrank_np(family, ranks)
    chex.assert_shape(expected, (family.size(), family.n))
    jitted = jax.jit(S.unrank, static_argnums=0)(family, jnp.asarray(ranks, jnp.int32))
    mapped = jax.jit(jax.vmap(lambda r: S.unrank(family, r)))(jnp.asarray(ranks, jnp.int32))
    np.testing.assert_array_equal(np.asarray(jitted), expected)
    np.testing.assert_array_equal(np.asarray(mapped), expected)
    assert [S.rank_of(family, row) for row in expected] == ranks.tolist()
    assert len({S.to_bitmask(r) for r in expected}) == family.size()       # no duplicates


def test_unrank_keeps_rank_array_shape():
    family = S.of_size(6, 2)
    ranks = np.array([[0, 1, 2], [12, 13, 14]])
    out = S.unrank(family, ranks)
    chex.assert_shape(out, (2, 3, 6))
    np.testing.assert_array_equal(np.asarray(out), S.unrank_np(family, ranks))


def test_rank_dtype_limits_and_x64():
    ranks = jnp.array([0, 2**31 - 1], jnp.int32)
    np.testing.assert_array_equal(S.unrank(S.all_subsets(31), ranks), S.unrank_np(S.all_subsets(31), ranks))
    with pytest.raises(ValueError, match="x64"):
        S.unrank(S.all_subsets(32), ranks)
    big = S.of_size(40, 20)
    with pytest.raises(ValueError, match="x64"):
        S.unrank(big, ranks)
    picks = [0, 123456789012, big.size() - 1]
    with jax.enable_x64(True):
        out = jax.jit(S.unrank, static_argnums=0)(big, jnp.asarray(picks, jnp.int64))
    np.testing.assert_array_equal(np.asarray(out), S.unrank_np(big, picks))


def test_host_unrank_handles_64_units():
    family = S.of_size(64, 32)
    last = S.unrank_np(family, [family.size() - 1])[0]
    np.testing.assert_array_equal(last, np.arange(64) >= 32)               # colex: the top 32 units
    assert S.rank_of(family, last) == family.size() - 1
    assert S.rank_of(S.all_subsets(64), np.ones(64, bool)) == 2**64 - 1
    np.testing.assert_array_equal(S.unrank_np(S.all_subsets(64), [2**64 - 1]), np.ones((1, 64), bool))


def test_rank_of_rejects_non_members():
    with pytest.raises(ValueError):
        S.rank_of(S.of_size(5, 2), np.array([1, 1, 1, 0, 0], bool))
    with pytest.raises(ValueError):
        S.rank_of(S.even(4), np.array([1, 1, 0, 0], bool))


def test_bitmask_round_trip():
    rows = _all_rows(S.all_subsets(4))
    np.testing.assert_array_equal(S.from_bitmask(S.to_bitmask(rows), 4), rows)
    assert S.to_bitmask(np.array([1, 0, 1], bool)) == 5
    np.testing.assert_array_equal(S.from_bitmask(5, 4), [True, False, True, False])
    np.testing.assert_array_equal(S.from_bitmask(2**63, 64), np.arange(64) == 63)


def test_sampled_per_size_is_deterministic_stratified_without_replacement():
    n, sizes, m = 12, (1, 3, 6), 20
    a = S.sampled_per_size(n, sizes, m, seed=0)
    assert a == S.sampled_per_size(n, sizes, m, seed=0)
    assert a != S.sampled_per_size(n, sizes, m, seed=1)
    rows = _all_rows(a)
    assert len(set(a.bitmasks)) == len(a.bitmasks)                               # without replacement
    np.testing.assert_array_equal(rows.sum(1), [1] * 12 + [3] * 20 + [6] * 20)   # k=1 taken whole
    np.testing.assert_array_equal(rows[:12], _all_rows(S.of_size(n, 1)))
    alone = S.sampled_per_size(n, (6,), m, seed=0)                         # a layer ignores the others
    assert alone.bitmasks == a.bitmasks[32:]


def test_sampled_per_size_never_enumerates_huge_layers():
    family = S.sampled_per_size(64, (8, 32), 50, seed=3)
    rows = _all_rows(family)
    np.testing.assert_array_equal(rows.sum(1), [8] * 50 + [32] * 50)
    assert len(set(family.bitmasks)) == 100


def test_structured_families():
    assert _all_rows(S.even(5)).tolist() == [[True, False, True, False, True]]
    assert _all_rows(S.odd(5)).tolist() == [[False, True, False, True, False]]
    assert [np.flatnonzero(r).tolist() for r in _all_rows(S.strided(10, 3, 1))] == [[1, 4, 7]]
    windows = [np.flatnonzero(r).tolist() for r in _all_rows(S.contiguous(5, 2))]
    assert windows == [[0, 1], [1, 2], [2, 3], [3, 4]]
    fam = S.of_size(5, 2)
    np.testing.assert_array_equal(_all_rows(S.complement(fam)), ~_all_rows(fam))
    assert S.complement(fam).k == 3 and S.complement(S.complement(fam)) == fam


def test_explicit_accepts_bool_rows_or_unit_lists_and_rejects_duplicates():
    rows = np.array([[1, 0, 1], [0, 1, 0]], bool)
    assert S.explicit(3, rows) == S.explicit(3, [(0, 2), [1]])
    with pytest.raises(ValueError, match="duplicate"):
        S.explicit(3, [(0,), (0,)])
    with pytest.raises(ValueError):
        S.explicit(3, [(3,)])
    hash(S.explicit(3, rows))                                              # usable as a static arg


def test_pool_scatter_places_ones_at_unit_coordinates():
    pool = S.Pool.heads_of_layers([1, 3], 4)
    assert pool.site == "head_out" and pool.n == 8 and pool.units[5] == (3, 1)
    selected = np.zeros((2, 8), bool)
    selected[0, [0, 7]] = True
    selected[1, 5] = True
    out = np.asarray(pool.scatter(selected, (4, 4)))
    chex.assert_shape(out, (2, 4, 4))
    expected = np.zeros((2, 4, 4))
    expected[0, 1, 0] = expected[0, 3, 3] = expected[1, 3, 1] = 1.0
    np.testing.assert_array_equal(out, expected)
    scatter = jax.jit(jax.vmap(lambda s: pool.scatter(s, (4, 4))))
    np.testing.assert_array_equal(np.asarray(scatter(jnp.asarray(selected))), expected)


def test_pool_constructors_labels_and_checks():
    assert S.Pool.heads(2, 3).units == ((2, 0), (2, 1), (2, 2))
    blocks = S.Pool.blocks(1, 4)
    assert blocks.site == "attn_block" and blocks.labels() == ("L1B0", "L1B1", "L1B2", "L1B3")
    np.testing.assert_array_equal(blocks.scatter(np.array([0, 0, 1, 0], bool), (2, 4)),
                                  [[0, 0, 0, 0], [0, 0, 1, 0]])
    with pytest.raises(ValueError):
        blocks.scatter(np.ones(4, bool), (1, 4))                           # layer 1 out of range
    with pytest.raises(ValueError):
        S.Pool("head_out", ((0, 1), (0, 1)))


def test_to_bitmask_accepts_non_contiguous_rows():
    bits = np.random.RandomState(0).rand(64, 9) > 0.5
    view = bits[bits[:, 1]][:, [0, 2, 4, 6, 8]]            # fancy indexing: Fortran-ordered
    assert not view.flags["C_CONTIGUOUS"]
    np.testing.assert_array_equal(S.to_bitmask(view), S.to_bitmask(np.ascontiguousarray(view)))


def members(family):
    return [np.flatnonzero(S.from_bitmask(m, family.n)).tolist() for m in family.bitmasks]


def test_gqa_families_kv_groups_and_positions_within_them():
    assert members(S.kv_groups(9, 3)) == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]           # SmolLM2-135M
    assert members(S.group_positions(9, 3)) == [[0, 3, 6], [1, 4, 7], [2, 5, 8]]     # parity mixed
    llama8b = members(S.group_positions(32, 8))
    assert llama8b[0] == list(range(0, 32, 4)) and all(h % 2 == 0 for h in llama8b[0] + llama8b[2])
    assert members(S.kv_groups(4, 4)) == [[0], [1], [2], [3]] and members(S.group_positions(4, 4)) == [[0, 1, 2, 3]]
    assert S.kv_groups(9, 3).kind == "explicit" and S.kv_group_size(32, 8) == 4
    with pytest.raises(ValueError, match="not a multiple"):
        S.kv_groups(9, 2)
    # Over a pool of several layers: one member per (layer, group), in order of first appearance.
    assert members(S.grouped([(0, 0), (0, 0), (1, 0), (0, 1)])) == [[0, 1], [2], [3]]
