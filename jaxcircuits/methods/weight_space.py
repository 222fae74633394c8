"""Weight space of attention heads: factored OV / QK matrices, composition scores, weight edits and
Q/K massive-value profiles.

Row-vector convention, as the forward (`models/transformer.py`): a residual vector x [D] gives the
head's value x W_V and writes x W_V W_O, so per head (L layers, H query heads, D model width, Dh
head dim; GQA: query head h reads KV head h // (H / K))

    OV[l, h] = W_V[l, :, kv(h)] W_O[l, h]        [D, D] = [D, Dh] @ [Dh, D]
    QK[l, h] = W_Q[l, :, h] W_K[l, :, kv(h)]^T   [D, D]   (score = x_q QK x_k^T, before 1/sqrt(Dh))

Both are held as `Factored(left [..., D, Dh], right [..., Dh, D])`; norms, SVDs and products are
computed from the factors (small Dh x Dh cores), never from the D x D matrix unless `dense` is
called. Biases are not part of the matrices. For LN-folded weights pass params through
`folding.fold_norms` first.

Composition (Elhage et al. 2021), head A writing (layer l_A) and head B reading (l_B > l_A):
    Q: ||OV_A QK_B||_F,  K: ||OV_A QK_B^T||_F,  V: ||OV_A OV_B||_F,  each / (||OV_A||_F ||M_B||_F).

Edits (`scale_directions`, `project_out`, `zero_top_dims`) are pure jnp functions returning new
params in the same layout, traceable, so `jax.vmap` runs them over strengths. Low-rank patches and
steering are source transforms of the site registry ('subspace:<site>', 'steer:<site>':
`sites.TRANSFORMS`); `rank_bases` and `transform_metric` run them over a vmapped axis of ranks,
direction sets or vectors.
"""

from __future__ import annotations

from typing import Callable, Dict, NamedTuple, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxcircuits import checks
from jaxcircuits.models import transformer
from jaxcircuits.models.config import ModelConfig
from jaxcircuits.models.params import Params
from jaxcircuits.interventions.problem import PatchingProblem
from jaxcircuits.engine.patching import patched_metric
from jaxcircuits.interventions.sites import Mask

Array = jax.Array
HEAD_MATRICES = ("ov", "qk")
COMPOSITIONS = ("q", "k", "v")


class Factored(NamedTuple):
    """A batch of low-rank matrices M = left @ right: left [..., D, r], right [..., r, D2]."""

    left: Array
    right: Array

    def dense(self) -> Array:
        """M [..., D, D2] (materialised)."""
        return self.left @ self.right

    @property
    def T(self) -> "Factored":
        """M^T as factors."""
        return Factored(jnp.swapaxes(self.right, -1, -2), jnp.swapaxes(self.left, -1, -2))


def _kv_per_head(w: Array, cfg: ModelConfig) -> Array:
    """A KV leaf [L, D, K, Dh] repeated to its query heads: [L, D, H, Dh] (head h reads KV h // groups)."""
    return jnp.repeat(w, cfg.n_heads // cfg.n_kv_heads, axis=2)


def head_factors(params: Params, cfg: ModelConfig, kind: str) -> Factored:
    """OV ('ov') or QK ('qk') of every head as factors: left [L, H, D, Dh], right [L, H, Dh, D]
    (float32). See the module docstring for the matrices."""
    lay = params["layers"]
    f32 = lambda a: jnp.asarray(a, jnp.float32)
    if kind == "ov":
        return Factored(f32(_kv_per_head(lay["v"]["w"], cfg)).transpose(0, 2, 1, 3), f32(lay["o"]["w"]))
    if kind == "qk":
        return Factored(f32(lay["q"]["w"]).transpose(0, 2, 1, 3),
                        f32(_kv_per_head(lay["k"]["w"], cfg)).transpose(0, 2, 3, 1))
    raise ValueError(f"unknown head matrix kind {kind!r}; known: {HEAD_MATRICES}")


def frobenius(f: Factored) -> Array:
    """||left @ right||_F [...] via tr((L^T L)(R R^T)) (Dh x Dh Gram matrices)."""
    gl = jnp.swapaxes(f.left, -1, -2) @ f.left
    gr = f.right @ jnp.swapaxes(f.right, -1, -2)
    return jnp.sqrt(jnp.maximum(jnp.sum(gl * gr, axis=(-1, -2)), 0.0))


def svd(f: Factored) -> Tuple[Array, Array, Array]:
    """Thin SVD of M = left @ right from its factors: U [..., D, r], S [..., r] (descending),
    Vh [..., r, D2], with M = U diag(S) Vh. QR of both factors, then SVD of the r x r core."""
    ql, rl = jnp.linalg.qr(f.left)
    qr_, rr = jnp.linalg.qr(jnp.swapaxes(f.right, -1, -2))
    u, s, vh = jnp.linalg.svd(rl @ jnp.swapaxes(rr, -1, -2))
    return ql @ u, s, vh @ jnp.swapaxes(qr_, -1, -2)


def product(a: Factored, b: Factored) -> Factored:
    """A @ B as factors (left of A, (right_A left_B) right_B): [..., D, r], [..., r, D2]."""
    return Factored(a.left, (a.right @ b.left) @ b.right)


def writer_form(f: Factored) -> Array:
    """R_l @ right [..., r, D2] with left = Q_l R_l (QR): ||M Y||_F = ||writer_form Y||_F for any Y."""
    return jnp.linalg.qr(f.left)[1] @ f.right


def reader_form(f: Factored) -> Array:
    """left @ R_r^T [..., D, r] with right^T = Q_r R_r (QR): ||Y M||_F = ||Y reader_form||_F for any Y."""
    return f.left @ jnp.swapaxes(jnp.linalg.qr(jnp.swapaxes(f.right, -1, -2))[1], -1, -2)


def composition_score(a: Factored, b: Factored) -> Array:
    """||A B||_F / (||A||_F ||B||_F) [...] from factors (Elhage et al.'s composition score):
    ||writer_form(A) reader_form(B)||_F over the norms of the two forms (r x D2 @ D x r work)."""
    w, x = writer_form(a), reader_form(b)
    fro = lambda m: jnp.sqrt(jnp.sum(m * m, axis=(-1, -2)))
    return fro(w @ x) / (fro(w) * fro(x))


def composition_scores(params: Params, cfg: ModelConfig, batch_size: int = 8) -> Array:
    """Q/K/V composition of every head pair: [3, L, H, L, H] (type, writer layer, writer head,
    reader layer, reader head), NaN where the reader's layer is not after the writer's.

    Every writer's OV `writer_form` [Dh, D] multiplies every reader's `reader_form` [D, Dh] (QK for
    Q, QK^T for K, OV for V) in one batched matmul per block of `batch_size` writer heads (a
    `lax.map` over blocks, vmapped inside), each block [b, Dh, D] @ [D, 3 L H Dh]. Traceable; jit
    with cfg static (`jax.jit(composition_scores, static_argnums=(1, 2))`) for one compiled call.
    Weights only, as Elhage et al.'s scores: no norm enters them (pre-norms, and also q/k norms and
    norms after the sublayers where a family has them)."""
    L, H, Dh = cfg.n_layers, cfg.n_heads, cfg.d_head
    ov, qk = head_factors(params, cfg, "ov"), head_factors(params, cfg, "qk")
    w = writer_form(ov).reshape(L * H, Dh, -1)                                          # [N, Dh, D]
    x = jnp.stack([reader_form(f) for f in (qk, qk.T, ov)]).reshape(3 * L * H, -1, Dh)  # [3N, D, Dh]
    sq = lambda m: jnp.sum(m * m, axis=(-1, -2))
    x_flat = x.transpose(1, 0, 2).reshape(x.shape[1], -1)                              # [D, 3N Dh]
    num = jax.lax.map(lambda wa: sq((wa @ x_flat).reshape(Dh, 3 * L * H, Dh).transpose(1, 0, 2)),
                      w, batch_size=batch_size)                                         # [N, 3N]
    out = jnp.sqrt(num) / (jnp.sqrt(sq(w))[:, None] * jnp.sqrt(sq(x))[None, :])
    out = out.reshape(L, H, 3, L, H).transpose(2, 0, 1, 3, 4)
    later = jnp.arange(L)[None, :] > jnp.arange(L)[:, None]                     # [writer l, reader l]
    return jnp.where(later[None, :, None, :, None], out, jnp.nan)


def random_baseline(key: Array, cfg: ModelConfig, n: int = 256) -> Array:
    """Composition scores of `n` pairs of Gaussian matrices of the heads' shapes and ranks
    (OV [D, Dh] @ [Dh, D]; QK likewise): [3, n] (Q, K, V). The level a score must exceed to mean
    more than chance alignment."""
    D, Dh = cfg.d_model, cfg.d_head
    k = jax.random.split(key, 4)
    fac = lambda kk: Factored(jax.random.normal(kk[0], (n, D, Dh)), jax.random.normal(kk[1], (n, Dh, D)))
    a, b = fac(k[:2]), fac(k[2:])
    return jnp.stack([jax.vmap(composition_score)(a, r) for r in (b, b.T, b)])


def top_pairs(scores: Array, baseline: Array, k: int = 10) -> list:
    """The `k` highest scores of each type, as dicts {type, writer (l, h), reader (l, h), score,
    z (in std units of the baseline)}; scores [3, L, H, L, H], baseline [3, n]."""
    s, b, k = np.asarray(scores), np.asarray(baseline), checks.count("k", k)
    rows = []
    for i, c in enumerate(COMPOSITIONS):
        flat = np.where(np.isnan(s[i]), -np.inf, s[i]).ravel()
        for j in np.argsort(-flat)[:k]:
            if not np.isfinite(flat[j]):
                break
            la, ha, lb, hb = np.unravel_index(j, s[i].shape)
            rows.append({"type": c, "writer": (int(la), int(ha)), "reader": (int(lb), int(hb)),
                         "score": float(flat[j]), "z": float((flat[j] - b[i].mean()) / b[i].std())})
    return rows


# ---- weight edits: pure functions returning new params ----

def _set(params: Params, leaf: str, w: Array) -> Params:
    """params with layers[leaf]['w'] replaced by w."""
    layers = dict(params["layers"])
    layers[leaf] = {**layers[leaf], "w": w.astype(params["layers"][leaf]["w"].dtype)}
    return {**params, "layers": layers}


def scale_directions(params: Params, cfg: ModelConfig, kind: str, layer, head, scales: Array) -> Params:
    """params with head (layer, head)'s OV or QK singular values multiplied by `scales` [Dh]
    (descending order of S; 1 keeps a direction, 0 removes it): M' = U diag(S * scales) Vh.

    Only the head's own factor changes, so GQA's shared K/V weights are untouched: OV edits W_O[h]
    (right' = right + pinv(left) U diag(S (scales - 1)) Vh), QK edits W_Q[h]
    (left' = left + U diag(S (scales - 1)) Vh pinv(right)). layer, head and scales may be traced."""
    f = head_factors(params, cfg, kind)
    one = Factored(f.left[layer, head], f.right[layer, head])
    u, s, vh = svd(one)
    delta = (u * (s * (scales - 1.0))) @ vh                                            # [D, D]
    if kind == "ov":
        new = one.right + jnp.linalg.pinv(one.left) @ delta                            # [Dh, D]
        w = params["layers"]["o"]["w"]
        return _set(params, "o", w.at[layer, head].set(new.astype(w.dtype)))
    new = one.left + delta @ jnp.linalg.pinv(one.right)                                # [D, Dh]
    w = params["layers"]["q"]["w"]
    return _set(params, "q", w.at[layer, :, head].set(new.astype(w.dtype)))


def remove_directions(params: Params, cfg: ModelConfig, kind: str, layer, head, n: Array) -> Params:
    """`scale_directions` removing the top `n` singular directions (n may be traced)."""
    return scale_directions(params, cfg, kind, layer, head, (jnp.arange(cfg.d_head) >= n).astype(jnp.float32))


def project_out(w: Array, basis: Array, axis: int, strength=1.0) -> Array:
    """w with `strength` times its component along the orthonormal rows of `basis` [k, n] removed on
    axis `axis` (size n): w - strength * P w with P = basis^T basis applied on that axis. E.g. a
    residual subspace out of what heads write: project_out(o.w [L, H, Dh, D], basis [k, D], -1)."""
    wm = jnp.moveaxis(w.astype(jnp.float32), axis, -1)
    out = wm - strength * (wm @ basis.T) @ basis
    return jnp.moveaxis(out, -1, axis).astype(w.dtype)


# ---- Q/K massive values ----

def qk_profile(params: Params, cfg: ModelConfig, tokens, attn_mask=None) -> Dict[str, Array]:
    """Mean |value| per head dimension of queries and keys over the real tokens of a batch:
    {'q', 'q_rope': [L, H, Dh], 'k', 'k_rope': [L, K, Dh]} (without / with RoPE: the run's 'head_q' and
    'head_k', and the same rotated back by the inverse rotation)."""
    tokens, attn_mask, pos_ids = transformer.check_inputs(cfg, tokens, attn_mask)
    _, cache = transformer.forward(params, cfg, tokens, attn_mask, pos_ids, collect=("head_q", "head_k"),
                                   return_logits=False)
    return _profile(cfg, cache, pos_ids, attn_mask)


@jax.jit
def _mean_abs(x: Array, w: Array) -> Array:
    """Mean over batch and positions of |x| [L, B, T, n, Dh], weighted by w [B, T]: [L, n, Dh]."""
    return jnp.einsum("lbtne,bt->lne", jnp.abs(x.astype(jnp.float32)), w) / w.sum()


def _profile(cfg: ModelConfig, cache: dict, pos_ids: Array, attn_mask: Array) -> Dict[str, Array]:
    """`qk_profile` from a cache with head_q, head_k [L, B, T, n, Dh] and the run's positions [B, T]."""
    inverse = lambda r: None if r is None else (r[0], -r[1])
    unrotate = lambda x: jax.vmap(lambda a, i: transformer.rotate(a, inverse(transformer.rope_tables(cfg, pos_ids, i))))(
        x, jnp.arange(x.shape[0]))
    w = jnp.asarray(attn_mask, jnp.float32)
    return {"q": _mean_abs(unrotate(cache["head_q"]), w), "k": _mean_abs(unrotate(cache["head_k"]), w),
            "q_rope": _mean_abs(cache["head_q"], w), "k_rope": _mean_abs(cache["head_k"], w)}


def top_dims(profile: Array) -> Array:
    """Rank of each head dimension by magnitude, 0 = largest: [..., Dh] int from profile [..., Dh]."""
    return jnp.argsort(jnp.argsort(-profile, axis=-1), axis=-1)


def zero_top_dims(params: Params, ranks: Dict[str, Array], n) -> Params:
    """params with the `n` largest dimensions (per layer and head, `ranks` = {'q': [L, H, Dh],
    'k': [L, K, Dh]} from `top_dims`) of queries and keys zeroed before RoPE: those columns of
    W_Q / W_K (and their biases) set to 0. With RoPE, dims i and i + R/2 rotate together (R = Dh,
    or the rotating part of a partial RoPE, `RopeConfig.dims`): rank
    on a profile of pairs if both must go. n may be traced (vmap over it)."""
    layers = dict(params["layers"])
    for leaf, r in ranks.items():
        keep = (r >= n)
        layers[leaf] = {name: a * keep.reshape(keep.shape[0], *([1] * (a.ndim - 3)), *keep.shape[1:]).astype(a.dtype)
                        for name, a in layers[leaf].items()}
    return {**params, "layers": layers}


def zeroed_metric(params: Params, ranks: Dict[str, Array], ns: Array, metric: Callable[[Params], Array]) -> Array:
    """metric(zero_top_dims(params, ranks, n)) for every n of `ns` [N], vmapped: [N, ...].
    metric: params -> array (e.g. a task's mean logit difference of a forward run)."""
    return jax.vmap(lambda n: metric(zero_top_dims(params, ranks, n)))(jnp.asarray(ns))


# ---- subspace and additive interventions over a vmapped axis ----

def rank_bases(directions: Array, ranks) -> Array:
    """Bases [len(ranks), k, d] from orthonormal `directions` [k, d] (best first): row i kept where
    i < rank, else zero, so every rank shares one shape (a 'subspace:<site>' transform per unit)."""
    keep = jnp.arange(directions.shape[-2])[None, :] < jnp.asarray(ranks)[:, None]
    return directions[None] * keep[..., None].astype(directions.dtype)


def transform_metric(params: Params, cfg: ModelConfig, problem: PatchingProblem, mask: Mask, key: str,
                     values: Array) -> Array:
    """Mean metric [N] of `problem` patched by `mask` with source entry `key` (a transform,
    `sites.transform_key`, e.g. 'subspace:head_out' [L, *units, k, d]) set to each of `values`
    [N, L, ...], vmapped: low-rank patches over ranks or direction sets, steering vectors."""
    run = lambda v: patched_metric(params, cfg, problem.replace(source={**problem.source, key: v}), mask).mean()
    return jax.jit(jax.vmap(run))(values)
