"""Combinatorial sweeps: a family of unit subsets, masks built on device, streamed and resumable.

A sweep evaluates a metric for every member of a `subsets.Family` over a `subsets.Pool` of units.
Ranks travel to the device as integers; `unrank` + `Pool.scatter` build the masks inside the
compiled call, so a family of 10^6 subsets never exists as a host list. Chunks of ranks (the last
one padded) go through one compiled function; with several devices each chunk's rank axis is
sharded over them.

On-disk format (one directory per sweep), chosen because numpy writes it with no extra
dependency. Every file is written by `storage.write_atomic` (a temporary name, then a rename, so it
appears complete or not at all) with its SHA-256 in a sidecar `<file>.sha256`, verified on read:
  spec.json                 what the sweep computes and its fingerprint (digests of the model's
                            params, target, source, positions, metric); resuming needs an equal spec
  chunks/chunk_<i>.npz      i in 8 digits: ranks int64 [c] (i*c0 .. i*c0+c-1 for chunk size c0),
                            their members' bitmask uint64 [c], metric float32 [c, P]
  results.npz               the same three arrays for all N members in rank order, written last
  .lock                     `storage.DirLock`: one writer per directory (it names the writer's pid)
A rerun (after a kill -9, a full disk, damage) deletes temporary files, keeps each chunk whose
checksum and contents (ranks, their bitmasks, a finite metric of the right shape) check out,
warns naming any other one and recomputes it with the missing ones, then rewrites results.npz.
With several processes (hosts) only process 0 locks and writes; the others compute the same
chunks and read the ones process 0 kept.

Determinism: rerunning the same command gives bit-identical results; other chunk sizes or device
counts give the same values up to float32 rounding (XLA chooses GEMM blockings by batch shape).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import math
import os
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from jaxcircuits import logs, storage
from jaxcircuits.models.config import ModelConfig
from jaxcircuits.engine.patching import (PatchingProblem, Plan, PlanLayers, chunk_from_memory, chunking, make_plan,
                                  masks_metric_fn, plan_layers, run_masks, to_host)
from jaxcircuits.interventions.sites import Mask
from jaxcircuits.engine.subsets import MAX_RANK, Family, Pool, from_bitmask, to_bitmask, unrank, unrank_np

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
        if family.size() > MAX_RANK:
            raise ValueError(f"the family has {family.size()} members; a sweep addresses at most {MAX_RANK} "
                             "(int32 ranks): sample it (`subsets.sampled_per_size`) or use fewer units")
        shape = pool.site_shape(cfg)
        pool.scatter(np.zeros((pool.n,), bool), shape)       # validates unit coordinates
        return cls(family, pool, shape, make_plan({pool.site: [u[0] for u in pool.units]}, pos_w))


@functools.partial(jax.jit, static_argnames=("cfg", "sweep"))
def family_metric(params, cfg: ModelConfig, problem: PatchingProblem, ranks: Array, sweep: Sweep,
                  weight=1.0, layers: Optional[PlanLayers] = None) -> Array:
    """Metric [c, B] for the family members `ranks` [c]; masks are built here, on device.

    Each member's mask is `weight` at its units' coordinates of `sweep.pool.site`, 0 elsewhere.
    `layers`: the plan's layer params (`patching.plan_layers`; cut inside when None).
    """
    pool = sweep.pool
    mask = Mask(**{pool.site: pool.scatter(unrank(sweep.family, ranks), sweep.shape) * weight})
    return masks_metric_fn(params, cfg, problem, mask, sweep.plan, layers)


def chunk_metric(params, cfg: ModelConfig, problem: PatchingProblem, sweep: Sweep, lo: int, chunk_size: int,
                 sharding=None, layers: Optional[PlanLayers] = None) -> np.ndarray:
    """Metric [c, B] (host) for the family members of ranks lo..lo+c-1, c = min(chunk_size, N - lo).

    The call always has chunk_size ranks (padded with rank 0, trimmed), so every chunk of a sweep
    reuses one compilation; `sharding` (from `chunking`) splits them over devices. Raises on NaN/inf.
    `layers`: the plan's layer params, cut once per sweep (`patching.plan_layers`).
    """
    hi = min(lo + chunk_size, sweep.family.size())
    ranks = np.zeros(chunk_size, np.int32)
    ranks[:hi - lo] = np.arange(lo, hi)
    if sharding is not None:
        ranks = jax.device_put(ranks, sharding)
    vals = to_host(family_metric(params, cfg, problem, ranks, sweep, layers=layers))[:hi - lo]
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

    def to_frame(self, pool: Optional[Pool] = None, *, success="metric>0", baselines: Optional[tuple] = None):
        """The sweep as a pandas DataFrame, one row per member, indexed by rank.

        Columns: units (the member's unit labels, space-separated, e.g. 'L3H5 L3H7': `pool.labels()`,
        or unit indices without a pool), size (units in the member), metric_0 .. metric_{P-1} (per
        prompt), metric (mean over prompts), success (the criterion `success`, a
        `stats.criteria.Criterion` or its string, e.g. 'metric>0' (default), 'fraction>=1',
        'recovery>=0.5' with baselines (source [P], target [P])) and success_fraction (the fraction
        of prompts on which it holds, each prompt judged alone).
        """
        import pandas as pd
        from jaxcircuits.stats.criteria import Criterion
        from jaxcircuits.stats.tables import subsets_frame
        n = pool.n if pool is not None else max(int(self.bitmask.max(initial=0)).bit_length(), 1)
        labels = pool.labels() if pool is not None else [str(i) for i in range(n)]
        criterion, (source, target) = Criterion.of(success), baselines or (None, None)
        frame = subsets_frame(self.subsets(n), self.metric, labels, pd.Index(self.ranks, name="rank"))
        frame["success"] = criterion.success(self.metric, source, target)
        frame["success_fraction"] = criterion.success_fraction(self.metric, source, target)
        return frame


def _digest(*arrays) -> str:
    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(np.asarray(a))
        h.update(str((a.shape, a.dtype.str)).encode())
        h.update(a.reshape(-1).view(np.uint8))
    return h.hexdigest()[:16]


def sweep_spec(params, cfg: ModelConfig, problem: PatchingProblem, sweep: Sweep, chunk_size: int,
               describe: Optional[dict]) -> dict:
    """What a sweep computes, as JSON: resuming requires an equal spec. The fingerprint digests the
    bytes, shapes and dtypes of every params leaf and of the problem's arrays (one hashing pass)."""
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
            "params": _digest(*jax.tree.leaves(params)),
            "target": _digest(target.tokens, target.attn_mask, target.pos_ids),
            "source": _digest(*[problem.source[k] for k in sorted(problem.source)]),
            "positions": _digest(problem.pos_w),
            "metric": f"{type(problem.metric).__name__}:{_digest(*jax.tree.leaves(problem.metric))}",
        },
    }


def _differing(a: dict, b: dict, prefix: str = "") -> list:
    """Dotted keys where the JSON objects a and b differ."""
    out = []
    for k in sorted(set(a) | set(b)):
        x, y = a.get(k), b.get(k)
        if isinstance(x, dict) and isinstance(y, dict):
            out += _differing(x, y, f"{prefix}{k}.")
        elif x != y:
            out.append(prefix + k)
    return out


def _read_json(path: str):
    with open(path) as f:
        return json.load(f)


def _prepare_dir(out_dir: str, spec: dict, resume: bool) -> None:
    """Delete temporary files; check out_dir's spec.json against `spec`, or write it into a
    directory that holds no sweep. Call it holding the directory's lock."""
    chunks, spec_path = os.path.join(out_dir, "chunks"), os.path.join(out_dir, "spec.json")
    os.makedirs(chunks, exist_ok=True)
    for d in (out_dir, chunks):
        if stale := storage.remove_temps(d):
            logging.info("sweep: deleted %d temporary files of interrupted writes in %s", len(stale), d)
    spec = json.loads(json.dumps(spec))
    if not os.path.exists(spec_path):
        if os.listdir(chunks) or os.path.exists(os.path.join(out_dir, "results.npz")):
            raise storage.DamagedFileError(spec_path, f"missing, yet {out_dir} holds sweep files; "
                                           "delete the directory or choose another")
        storage.write_json(spec_path, spec)
        return
    old = storage.read_verified(spec_path, _read_json, advice=f"it no longer tells which sweep {out_dir} holds: "
                                "delete the directory or choose another")
    if not resume:
        raise FileExistsError(f"{out_dir} already holds a sweep; pass resume=True to continue it "
                              "or choose another directory")
    if old != spec:
        raise ValueError(f"{out_dir} holds a different sweep (differs in {_differing(old, spec)}); "
                         "use another directory to run this one")


def _spec_chunk_size(out_dir: str) -> Optional[int]:
    """The chunk size in out_dir's spec.json, if it holds one that checks out (else None)."""
    path = os.path.join(out_dir, "spec.json")
    if not os.path.exists(path):
        return None
    try:
        return int(storage.read_verified(path, _read_json)["chunk_size"])
    except (storage.DamagedFileError, KeyError, TypeError, ValueError):
        return None


def _members(family: Family, lo: int, hi: int) -> tuple:
    """(ranks int64 [c], bitmask uint64 [c]) of the family members of ranks lo..hi-1."""
    ranks = np.arange(lo, hi, dtype=np.int64)
    return ranks, to_bitmask(unrank_np(family, ranks), np.uint64)


def _read(path: str) -> SweepResult:
    """The ranks, bitmask and metric arrays of the npz file `path`."""
    with open(path, "rb") as f, np.load(f) as z:
        return SweepResult(z["ranks"], z["bitmask"], z["metric"])


def _write(path: str, res: SweepResult) -> None:
    """`res` to the npz file `path`, atomic and checksummed."""
    def write(tmp):
        with open(tmp, "wb") as f:
            np.savez(f, ranks=res.ranks, bitmask=res.bitmask, metric=res.metric)
    storage.write_atomic(path, write)


def _read_chunk(path: str, family: Family, lo: int, hi: int, batch: int) -> SweepResult:
    """The chunk file `path`, which must match its checksum and hold the members of ranks lo..hi-1
    with a finite float32 metric [hi - lo, batch]; DamagedFileError naming it and why otherwise."""
    def read(p):
        got, (ranks, bits) = _read(p), _members(family, lo, hi)
        if got.ranks.dtype != np.int64 or not np.array_equal(got.ranks, ranks):
            raise ValueError(f"its ranks are not {lo}..{hi - 1}")
        if got.bitmask.dtype != np.uint64 or not np.array_equal(got.bitmask, bits):
            raise ValueError("its bitmasks are not its ranks' members")
        if got.metric.dtype != np.float32 or got.metric.shape != (hi - lo, batch) or not np.isfinite(got.metric).all():
            raise ValueError(f"its metric is not finite float32 [{hi - lo}, {batch}]")
        return got
    return storage.read_verified(path, read)


def run_sweep(params, cfg: ModelConfig, problem: PatchingProblem, pool: Pool, family: Family, out_dir: str, *,
              chunk_size: Optional[int] = None, shard: bool = True, resume: bool = True, describe: Optional[dict] = None,
              on_chunk: Optional[Callable[[int, np.ndarray], None]] = None) -> SweepResult:
    """Evaluate `problem`'s metric for every member of `family` over `pool`, streaming chunks to `out_dir`.

    The six positional arguments are the sweep; the keyword-only ones are independent run options
    with defaults (hence more than eight parameters). chunk_size None or 0: the one in out_dir's
    spec when resuming, else the size that fits the free memory (`patching.chunk_from_memory`).
    With shard=True and several devices, each chunk's ranks are split over them (chunk_size
    rounded up to a multiple of the device count).
    resume=True continues a sweep with an equal spec in out_dir; describe is free JSON stored in the
    spec; a progress bar (`logs.progress`: rate, ETA) counts subsets; on_chunk(index, metric_values)
    runs after each chunk is saved. Returns the full `SweepResult` (also written to out_dir/results.npz).
    The whole run holds `storage.DirLock(out_dir)` (LockedError if another process holds it).
    Chunks on disk that are damaged or hold other members are reported and recomputed.
    """
    sweep = Sweep.make(cfg, pool, family, problem.pos_w)
    problem = problem.for_footprint(cfg, Mask(**{pool.site: pool.scatter(np.ones(pool.n, bool), sweep.shape)}))
    n, batch = family.size(), problem.target.tokens.shape[0]
    chunk_size = chunk_size or (resume and _spec_chunk_size(out_dir)) or chunk_from_memory(
        params, cfg, problem, sweep.plan, shard)
    chunk_size, sharding = chunking(n, chunk_size, shard)
    n_chunks = math.ceil(n / chunk_size)
    bounds = lambda i: (i * chunk_size, min((i + 1) * chunk_size, n))
    path = lambda i: os.path.join(out_dir, "chunks", f"chunk_{i:08d}.npz")
    writer = jax.process_index() == 0
    with storage.DirLock(out_dir) if writer else contextlib.nullcontext():
        parts = {}
        if writer:
            _prepare_dir(out_dir, sweep_spec(params, cfg, problem, sweep, chunk_size, describe), resume)
            for i in [i for i in range(n_chunks) if os.path.exists(path(i))]:
                try:
                    parts[i] = _read_chunk(path(i), family, *bounds(i), batch)
                except storage.DamagedFileError as e:
                    logging.warning("sweep: %s; recomputing it", e)
                    storage.discard(path(i))
        todo = np.array([i not in parts for i in range(n_chunks)])
        todo = np.asarray(multihost_utils.broadcast_one_to_all(todo), bool)     # process 0's choice
        parts.update({i: _read_chunk(path(i), family, *bounds(i), batch)       # processes other than 0
                      for i in np.flatnonzero(~todo).tolist() if i not in parts})
        if parts:
            logging.info("sweep: resuming %s, %d of %d chunks already done", out_dir, len(parts), n_chunks)
        done = sum(len(p.ranks) for p in parts.values())
        layers = plan_layers(params, cfg, sweep.plan, problem.metric.n_positions)
        with logs.progress(n, "sweep " + os.path.join(*os.path.normpath(out_dir).split(os.sep)[-2:]), "subset", done) as bar:
            for i in np.flatnonzero(todo).tolist():
                lo, hi = bounds(i)
                vals = chunk_metric(params, cfg, problem, sweep, lo, chunk_size, sharding, layers)
                parts[i] = SweepResult(*_members(family, lo, hi), vals.astype(np.float32))
                if writer:
                    _write(path(i), parts[i])
                bar.update(hi - lo)
                if on_chunk is not None:
                    on_chunk(i, vals)
        res = SweepResult(*(np.concatenate([getattr(parts[i], k) for i in range(n_chunks)])
                            for k in ("ranks", "bitmask", "metric")))
        if writer:
            _write(os.path.join(out_dir, "results.npz"), res)
    return res


def load_results(out_dir: str) -> SweepResult:
    """Read a finished sweep's results.npz (DamagedFileError if it does not match its checksum)."""
    path = os.path.join(out_dir, "results.npz")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: the sweep has not finished (rerun it to resume)")
    return storage.read_verified(path, _read, advice="rerun the sweep to rebuild it from its chunks")


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
    [0, 1], under a progress bar of the rounds; kw go to `run_masks` (the search's own options are keyword-only with defaults, hence
    more than eight parameters). Returns {'low', 'high', 'crossing' (midpoint) or None if no sign change in [0, 1],
    'evaluated': [(weight, value)]}.
    """
    lo, hi = 0.0, 1.0
    evaluated = []
    f = lambda ws: aggregate(blend_curve(params, cfg, problem, base, ws, **kw)) - level
    rounds = 1 + max(0, math.ceil(math.log(1 / tol) / math.log(points + 1))) if 0 < tol < 1 else 1
    with logs.progress(rounds, "blend crossing", "round", leave=False) as bar:
        ends = f(np.array([lo, hi]))
        bar.update()
        evaluated += list(zip([lo, hi], (ends + level).tolist()))
        if np.sign(ends[0]) == np.sign(ends[1]):
            return {"low": lo, "high": hi, "crossing": None, "evaluated": evaluated}
        f_lo = ends[0]
        while hi - lo > tol:
            ws = np.linspace(lo, hi, points + 2)[1:-1]
            vals = f(ws)
            bar.update()
            evaluated += list(zip(ws.tolist(), (vals + level).tolist()))
            grid = np.concatenate([[lo], ws, [hi]])
            signs = np.sign(np.concatenate([[f_lo], vals]))
            j = int(np.flatnonzero(signs != signs[0])[0]) if (signs != signs[0]).any() else points + 1
            lo, hi = grid[j - 1], grid[j]
            f_lo = f_lo if j == 1 else vals[j - 2]
    return {"low": float(lo), "high": float(hi), "crossing": float((lo + hi) / 2), "evaluated": evaluated}
