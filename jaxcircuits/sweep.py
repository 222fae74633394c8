"""Combinatorial sweeps: a family of unit subsets, masks built on device, streamed and resumable.

A sweep evaluates a metric for every member of a `subsets.Family` over a `subsets.Pool` of units.
Ranks travel to the device as integers; `unrank` + `Pool.scatter` build the masks inside the
compiled call, so a family of 10^6 subsets never exists as a host list. Chunks of ranks (the last
one padded) go through one compiled function; with several devices each chunk's rank axis is
sharded over them.

On-disk format (one directory per sweep), chosen because numpy writes it with no extra
dependency and a rename makes each file appear atomically:
  spec.json                 what the sweep computes (resuming checks it matches) and its fingerprint
  chunks/chunk_<i>.npz      ranks int64 [c], bitmask uint64 [c], metric float32 [c, P]
  results.npz               the same three arrays for all N members in rank order, written last
A chunk file exists only once complete (written to a temporary name, then renamed), so after a
kill -9 a rerun skips the chunks on disk and recomputes only the missing ones.

Determinism: rerunning the same command gives bit-identical results; other chunk sizes or device
counts give the same values up to float32 rounding (XLA chooses GEMM blockings by batch shape).
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import hashlib
import json
import math
import os
import time
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from jaxcircuits.models.config import ModelConfig
from jaxcircuits.patching import PatchingProblem, Plan, chunking, make_plan, masks_metric_fn, run_masks
from jaxcircuits.sites import Mask
from jaxcircuits.subsets import Family, Pool, from_bitmask, to_bitmask, unrank, unrank_np

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class Sweep:
    """The static part of a sweep (hashable: a jit static argument): members of `family` are
    subsets of `pool`'s units, scattered into masks of `shape` ([L, *units] of the pool's site),
    run with `plan`."""

    family: Family
    pool: Pool
    shape: tuple
    plan: Plan

    @classmethod
    def make(cls, cfg: ModelConfig, pool: Pool, family: Family, pos_w) -> "Sweep":
        """Check the family against the pool and the pool against `cfg`; plan for every layer any
        unit of the pool lies in and the positions pos_w [B, T] selects."""
        if family.n != pool.n:
            raise ValueError(f"family has {family.n} units, pool has {pool.n}")
        shape = pool.site_shape(cfg)
        pool.scatter(np.zeros((pool.n,), bool), shape)       # validates unit coordinates
        return cls(family, pool, shape, make_plan({pool.site: [u[0] for u in pool.units]}, pos_w))


@functools.partial(jax.jit, static_argnames=("cfg", "sweep"))
def family_metric(params, cfg: ModelConfig, problem: PatchingProblem, ranks: Array, sweep: Sweep,
                  weight=1.0) -> Array:
    """Metric [c, B] for the family members `ranks` [c]; masks are built here, on device.

    Each member's mask is `weight` at its units' coordinates of `sweep.pool.site`, 0 elsewhere.
    """
    pool = sweep.pool
    mask = Mask(**{pool.site: pool.scatter(unrank(sweep.family, ranks), sweep.shape) * weight})
    return masks_metric_fn(params, cfg, problem, mask, sweep.plan)


def chunk_metric(params, cfg: ModelConfig, problem: PatchingProblem, sweep: Sweep, lo: int, chunk_size: int,
                 sharding=None) -> np.ndarray:
    """Metric [c, B] (host) for the family members of ranks lo..lo+c-1, c = min(chunk_size, N - lo).

    The call always has chunk_size ranks (padded with rank 0, trimmed), so every chunk of a sweep
    reuses one compilation; `sharding` (from `chunking`) splits them over devices. Raises on NaN/inf.
    """
    hi = min(lo + chunk_size, sweep.family.size())
    ranks = np.zeros(chunk_size, np.int32)
    ranks[:hi - lo] = np.arange(lo, hi)
    if sharding is not None:
        ranks = jax.device_put(ranks, sharding)
    vals = np.asarray(family_metric(params, cfg, problem, ranks, sweep))[:hi - lo]
    if not np.isfinite(vals).all():
        raise FloatingPointError(f"non-finite metric values for ranks {lo}..{hi - 1}")
    return vals


@dataclasses.dataclass
class SweepResult:
    """ranks int64 [N], bitmask uint64 [N], metric float32 [N, P] (P prompts), in rank order."""

    ranks: np.ndarray
    bitmask: np.ndarray
    metric: np.ndarray

    def subsets(self, n: int) -> np.ndarray:
        """bool [N, n]: the members as unit-indicator rows."""
        return from_bitmask(self.bitmask, n)


def _digest(*arrays) -> str:
    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(np.asarray(a))
        h.update(str((a.shape, a.dtype.str)).encode())
        h.update(a.tobytes())
    return h.hexdigest()[:16]


def sweep_spec(cfg: ModelConfig, problem: PatchingProblem, sweep: Sweep, chunk_size: int,
               describe: Optional[dict]) -> dict:
    """What a sweep computes, as JSON: resuming requires an equal spec."""
    family, pool, target = sweep.family, sweep.pool, problem.target
    family_desc = dataclasses.asdict(family)
    if len(family.masks) > 64:
        family_desc["masks"] = f"{len(family.masks)} members, digest {_digest(np.array(family.masks, np.uint64))}"
    return {
        "describe": describe or {},
        "model": dataclasses.asdict(cfg),
        "pool": {"site": pool.site, "units": [list(u) for u in pool.units]},
        "family": family_desc, "size": family.size(), "chunk_size": chunk_size, "site_shape": list(sweep.shape),
        "fingerprint": {
            "target": _digest(target.tokens, target.attn_mask, target.pos_ids),
            "source": _digest(*[problem.source[k] for k in sorted(problem.source)]),
            "positions": _digest(problem.pos_w),
            "metric": f"{type(problem.metric).__name__}:{_digest(*jax.tree.leaves(problem.metric))}",
        },
    }


def _atomic_save(path: str, **arrays) -> None:
    tmp = f"{path}.tmp-{os.getpid()}.npz"
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


def _atomic_json(path: str, obj) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
    os.replace(tmp, path)


def _prepare_dir(out_dir: str, spec: dict, resume: bool) -> None:
    os.makedirs(os.path.join(out_dir, "chunks"), exist_ok=True)
    spec_path = os.path.join(out_dir, "spec.json")
    if os.path.exists(spec_path):
        with open(spec_path) as f:
            old = json.load(f)
        if not resume:
            raise FileExistsError(f"{out_dir} already holds a sweep; pass resume=True to continue it "
                                  "or choose another directory")
        if old != json.loads(json.dumps(spec)):
            diff = sorted(k for k in set(old) | set(spec) if old.get(k) != json.loads(json.dumps(spec)).get(k))
            raise ValueError(f"{out_dir} holds a different sweep (differs in {diff}); "
                             "use another directory to run this one")
    else:
        _atomic_json(spec_path, spec)


class _Progress:
    """Logs done/total, subsets/s and ETA at most every `every_s` seconds."""

    def __init__(self, total: int, done: int, every_s: float):
        self.total, self.start_done, self.every_s = total, done, every_s
        self.t0 = self.last = time.time()
        self.logged = None

    def update(self, done: int, force: bool = False) -> None:
        now = time.time()
        if done == self.logged or (not force and now - self.last < self.every_s):
            return
        self.last, self.logged = now, done
        rate = (done - self.start_done) / max(now - self.t0, 1e-9)
        eta = (self.total - done) / rate if rate > 0 else float("inf")
        logging.info("sweep: %d/%d subsets (%.1f%%), %.1f subsets/s, ETA %s", done, self.total,
                     100.0 * done / max(self.total, 1), rate,
                     "?" if math.isinf(eta) else time.strftime("%H:%M:%S", time.gmtime(eta)))


def run_sweep(params, cfg: ModelConfig, problem: PatchingProblem, pool: Pool, family: Family, out_dir: str, *,
              chunk_size: int = 256, shard: bool = True, resume: bool = True, describe: Optional[dict] = None,
              log_every_s: float = 10.0,
              on_chunk: Optional[Callable[[int, np.ndarray], None]] = None) -> SweepResult:
    """Evaluate `problem`'s metric for every member of `family` over `pool`, streaming chunks to `out_dir`.

    The six positional arguments are the sweep; the keyword-only ones are independent run options
    with defaults (hence more than eight parameters). With shard=True and several devices, each
    chunk's ranks are split over them (chunk_size rounded up to a multiple of the device count).
    resume=True continues a sweep with an equal spec in out_dir; describe is free JSON stored in the
    spec; progress is logged every log_every_s seconds; on_chunk(index, metric_values) runs after
    each chunk is saved. Returns the full `SweepResult` (also written to out_dir/results.npz).
    """
    sweep = Sweep.make(cfg, pool, family, problem.pos_w)
    problem = problem.for_sites((pool.site,))
    n = family.size()
    chunk_size, sharding = chunking(n, chunk_size, shard)
    spec = sweep_spec(cfg, problem, sweep, chunk_size, describe)
    _prepare_dir(out_dir, spec, resume)
    n_chunks = math.ceil(n / chunk_size)
    path = lambda i: os.path.join(out_dir, "chunks", f"chunk_{i:08d}.npz")
    todo = [i for i in range(n_chunks) if not os.path.exists(path(i))]
    if len(todo) < n_chunks:
        logging.info("sweep: resuming %s, %d of %d chunks already done", out_dir, n_chunks - len(todo), n_chunks)
    progress = _Progress(n, (n_chunks - len(todo)) * chunk_size, log_every_s)
    done = progress.start_done
    for i in todo:
        lo, hi = i * chunk_size, min((i + 1) * chunk_size, n)
        vals = chunk_metric(params, cfg, problem, sweep, lo, chunk_size, sharding)
        bits = to_bitmask(unrank_np(family, np.arange(lo, hi)), np.uint64)
        _atomic_save(path(i), ranks=np.arange(lo, hi, dtype=np.int64), bitmask=bits,
                     metric=vals.astype(np.float32))
        done += hi - lo
        progress.update(done)
        if on_chunk is not None:
            on_chunk(i, vals)
    progress.update(n, force=True)
    return _consolidate(out_dir, n_chunks)


def _consolidate(out_dir: str, n_chunks: int) -> SweepResult:
    files = sorted(glob.glob(os.path.join(out_dir, "chunks", "chunk_*.npz")))
    if len(files) != n_chunks:
        raise RuntimeError(f"{out_dir}: expected {n_chunks} chunk files, found {len(files)}")
    parts = [np.load(f) for f in files]
    res = SweepResult(*(np.concatenate([p[k] for p in parts]) for k in ("ranks", "bitmask", "metric")))
    _atomic_save(os.path.join(out_dir, "results.npz"), ranks=res.ranks, bitmask=res.bitmask, metric=res.metric)
    return res


def load_results(out_dir: str) -> SweepResult:
    """Read a finished sweep's results.npz."""
    path = os.path.join(out_dir, "results.npz")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: the sweep has not finished (rerun it to resume)")
    with np.load(path) as z:
        return SweepResult(z["ranks"], z["bitmask"], z["metric"])


# ---- blend-weight sweeps -------------------------------------------------------------------------

def blend_curve(params, cfg: ModelConfig, problem: PatchingProblem, base: Mask, weights, **kw) -> np.ndarray:
    """Metric [G, B] with the mask `base` (leaves [L, ...], weights in [0, 1]) scaled by each of
    `weights` [G]: the blend weight itself as the swept variable. kw go to `run_masks`."""
    w = jnp.asarray(weights, jnp.float32)
    masks = jax.tree.map(lambda a: w.reshape(-1, *([1] * a.ndim)) * a[None], base)
    return run_masks(params, cfg, problem, masks, **kw)


def blend_crossing(params, cfg: ModelConfig, problem: PatchingProblem, base: Mask, *,
                   level: float = 0.0, tol: float = 1e-3, points: int = 8,
                   aggregate: Callable[[np.ndarray], np.ndarray] = lambda v: v.mean(-1), **kw) -> dict:
    """Locate the blend weight where aggregate(metric) crosses `level`, to within `tol`.

    Evaluates `points` weights per round in one batched call (a k-section search), starting from
    [0, 1]; kw go to `run_masks` (the search's own options are keyword-only with defaults, hence
    more than eight parameters). Returns {'low', 'high', 'crossing' (midpoint) or None if no sign change in [0, 1],
    'evaluated': [(weight, value)]}.
    """
    lo, hi = 0.0, 1.0
    evaluated = []
    f = lambda ws: aggregate(blend_curve(params, cfg, problem, base, ws, **kw)) - level
    ends = f(np.array([lo, hi]))
    evaluated += list(zip([lo, hi], (ends + level).tolist()))
    if np.sign(ends[0]) == np.sign(ends[1]):
        return {"low": lo, "high": hi, "crossing": None, "evaluated": evaluated}
    f_lo = ends[0]
    while hi - lo > tol:
        ws = np.linspace(lo, hi, points + 2)[1:-1]
        vals = f(ws)
        evaluated += list(zip(ws.tolist(), (vals + level).tolist()))
        grid = np.concatenate([[lo], ws, [hi]])
        signs = np.sign(np.concatenate([[f_lo], vals]))
        j = int(np.flatnonzero(signs != signs[0])[0]) if (signs != signs[0]).any() else points + 1
        lo, hi = grid[j - 1], grid[j]
        f_lo = f_lo if j == 1 else vals[j - 2]
    return {"low": float(lo), "high": float(hi), "crossing": float((lo + hi) / 2), "evaluated": evaluated}
