"""Attention-output SAEs read head by head (`dictionaries.attention`), against numpy by hand."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcircuits.dictionaries import attention, core


def _sae(kind="relu", subtract_b_dec=True, H=3, Dh=4, F=10, seed=0):
    dc = core.DictConfig(kind, H * Dh, F, subtract_b_dec=subtract_b_dec)
    p = core.init(dc, jax.random.PRNGKey(seed))
    p["b_dec"] = jax.random.normal(jax.random.PRNGKey(seed + 1), (H * Dh,))
    p["b_enc"] = jax.random.normal(jax.random.PRNGKey(seed + 2), (F,)) * 0.1
    return dc, p


@pytest.mark.parametrize("subtract_b_dec", [True, False])
def test_head_parts_sum_to_the_pre_activation_head_by_head(subtract_b_dec):
    dc, p = _sae(subtract_b_dec=subtract_b_dec)
    z = np.asarray(jax.random.normal(jax.random.PRNGKey(5), (2, 6, 3, 4)))
    parts, const = attention.head_parts(dc, p, jnp.asarray(z))
    w = np.asarray(p["w_enc"])
    for h in range(3):                                    # by hand: head h's z times its block of rows
        np.testing.assert_allclose(parts[..., h, :], z[..., h, :] @ w[4 * h:4 * h + 4], rtol=1e-5, atol=1e-6)
    bias = np.asarray(p["b_enc"]) - (np.asarray(p["b_dec"]) @ w if subtract_b_dec else 0)
    np.testing.assert_allclose(const, bias, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(parts.sum(-2) + const, core.pre_acts(dc, p, jnp.asarray(z).reshape(2, 6, 12)),
                               rtol=1e-5, atol=1e-5)


def test_head_feature_map_finds_the_head_a_feature_reads():
    """Feature f reads only head f % H: its share is 1 on that head wherever it fires."""
    H, Dh, F = 3, 4, 6
    dc = core.DictConfig("relu", H * Dh, F)
    w = np.zeros((H * Dh, F), np.float32)
    for f in range(F):
        w[(f % H) * Dh + f % Dh, f] = 1.0
    p = {"w_enc": jnp.asarray(w), "b_enc": jnp.zeros(F), "w_dec": jnp.asarray(w.T), "b_dec": jnp.zeros(H * Dh)}
    z = jnp.abs(jax.random.normal(jax.random.PRNGKey(0), (2, 5, H, Dh)))
    valid = jnp.ones((2, 5), bool).at[1, :2].set(False)
    shares, fires = attention.head_feature_map(dc, p, z, valid)
    np.testing.assert_array_equal(fires, np.full(F, 8))
    np.testing.assert_allclose(shares, np.eye(H)[np.arange(F) % H], atol=1e-6)


def test_z_that_does_not_fit_the_sae_is_refused():
    dc, p = _sae()
    with pytest.raises(ValueError, match="H \\* Dh"):
        attention.head_parts(dc, p, jnp.zeros((2, 6, 4, 4)))
