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
                            their members' bitmask uint64 [c], metric float32 [c, P], spec (the
                            `spec_fingerprint` of the sweep that wrote it: read only by that sweep)
  results.npz               the same arrays for all N members in rank order, written last
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
from jaxcircuits.engine import memory
from jaxcircuits.engine.patching import Plan, PlanLayers, make_plan, masks_metric_fn, plan_layers, run_masks, signature
from jaxcircuits.engine.runner import ChunkCall, Items, RunOptions, run_chunks
from jaxcircuits.engine.subsets import MAX_RANK, Family, Pool, from_bitmask, to_bitmask, unrank, unrank_np
from jaxcircuits.interventions.problem import PatchingProblem
from jaxcircuits.interventions.sites import Mask
from jaxcircuits.models.config import ModelConfig

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


def sweep_call(params, cfg: ModelConfig, problem: PatchingProblem, sweep: Sweep) -> ChunkCall:
    """The compiled call of a sweep's chunks: ranks int32 [c] -> metric [c, B] (`family_metric`), with
    the plan's layer params cut once (`patching.plan_layers`)."""
    layers = plan_layers(params, cfg, sweep.plan, problem.metric.n_positions)
    return ChunkCall(family_metric, dict(params=params, problem=problem, layers=layers), dict(cfg=cfg, sweep=sweep),
                     "ranks", key=(cfg, sweep, signature((params, problem, layers))),
                     made=memory.tree_bytes((problem.source, layers)))


def rank_items(family: Family) -> Items:
    """The members of `family` as items: chunks of ranks int32 [c] (padded with rank 0)."""
    n = family.size()

    def take(lo: int, c: int) -> np.ndarray:
        ranks = np.zeros(c, np.int32)
        ranks[:max(0, min(c, n - lo))] = np.arange(lo, min(lo + c, n))
        return ranks
    return Items(n, take, "subset")


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


def sweep_spec(params, cfg: ModelConfig, problem: PatchingProblem, sweep: Sweep, chunk_size: int,
               describe: Optional[dict]) -> dict:
    """What a sweep computes, as JSON: resuming requires an equal spec. The fingerprint digests the
    bytes, shapes and dtypes of every params leaf and of the problem's arrays (one hashing pass)."""
    family, pool, target = sweep.family, sweep.pool, problem.target
    family_desc = dataclasses.asdict(family)
    if len(family.bitmasks) > 64:
        bits = np.array(family.bitmasks, np.uint64)
        family_desc["bitmasks"] = f"{len(bits)} members, digest {storage.fingerprint(bits)}"
    return {
        "describe": describe or {},
        "model": dataclasses.asdict(cfg),
        "pool": {"site": pool.site, "units": [list(u) for u in pool.units]},
        "family": family_desc, "size": family.size(), "chunk_size": chunk_size, "site_shape": list(sweep.shape),
        "fingerprint": {
            "params": storage.fingerprint(params),
            "target": storage.fingerprint(target.tokens, target.attn_mask, target.pos_ids),
            "source": storage.fingerprint(problem.source),
            "positions": storage.fingerprint(problem.pos_w),
            "metric": f"{type(problem.metric).__name__}:{storage.fingerprint(problem.metric)}",
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


def spec_fingerprint(spec: dict) -> str:
    """The fingerprint of a spec as spec.json holds it (`storage.fingerprint` of its sorted JSON):
    every chunk and results.npz carries the one of the sweep that wrote it."""
    return storage.fingerprint(json.dumps(json.loads(json.dumps(spec)), sort_keys=True))


def _read(path: str, spec: str) -> SweepResult:
    """The ranks, bitmask and metric arrays of the npz file `path`; ValueError unless it was written by
    the sweep of spec fingerprint `spec`."""
    with open(path, "rb") as f, np.load(f) as z:
        got = str(z["spec"]) if "spec" in z.files else "none"
        if got != spec:
            raise ValueError(f"it was written by another sweep (spec fingerprint {got}, this sweep's {spec})")
        return SweepResult(z["ranks"], z["bitmask"], z["metric"])


def _write(path: str, res: SweepResult, spec: str) -> None:
    """`res` to the npz file `path` with the spec fingerprint of its sweep, atomic and checksummed."""
    def write(tmp):
        with open(tmp, "wb") as f:
            np.savez(f, ranks=res.ranks, bitmask=res.bitmask, metric=res.metric, spec=np.str_(spec))
    storage.write_atomic(path, write)


def _read_chunk(path: str, family: Family, lo: int, hi: int, batch: int, spec: str) -> SweepResult:
    """The chunk file `path`, which must match its checksum, come from the sweep of spec fingerprint
    `spec` and hold the members of ranks lo..hi-1 with a finite float32 metric [hi - lo, batch];
    DamagedFileError naming it and why otherwise."""
    def read(p):
        got, (ranks, bits) = _read(p, spec), _members(family, lo, hi)
        if got.ranks.dtype != np.int64 or not np.array_equal(got.ranks, ranks):
            raise ValueError(f"its ranks are not {lo}..{hi - 1}")
        if got.bitmask.dtype != np.uint64 or not np.array_equal(got.bitmask, bits):
            raise ValueError("its bitmasks are not its ranks' members")
        if got.metric.dtype != np.float32 or got.metric.shape != (hi - lo, batch) or not np.isfinite(got.metric).all():
            raise ValueError(f"its metric is not finite float32 [{hi - lo}, {batch}]")
        return got
    return storage.read_verified(path, read)


@dataclasses.dataclass
class _SweepStore:
    """A sweep directory as the run engine's `runner.Store` (format in the module doc): process 0
    checks and writes it; the other processes compute the same chunks and read the ones it kept."""

    out_dir: str
    spec: Callable[[int], dict]
    family: Family
    batch: int
    resume: bool
    fingerprint: str = ""          # of the spec, set by `open`

    @property
    def writer(self) -> bool:
        return jax.process_index() == 0

    def _path(self, i: int) -> str:
        return os.path.join(self.out_dir, "chunks", f"chunk_{i:08d}.npz")

    def chunk_size(self) -> Optional[int]:
        return _spec_chunk_size(self.out_dir)

    def open(self, chunk_size: int, bounds: list) -> dict:
        parts, spec = {}, self.spec(chunk_size)
        self.fingerprint = spec_fingerprint(spec)
        read = lambda i: _read_chunk(self._path(i), self.family, *bounds[i], self.batch, self.fingerprint).metric
        if self.writer:
            _prepare_dir(self.out_dir, spec, self.resume)
            for i in [i for i in range(len(bounds)) if os.path.exists(self._path(i))]:
                try:
                    parts[i] = read(i)
                except storage.DamagedFileError as e:
                    logging.warning("sweep: %s; recomputing it", e)
                    storage.discard(self._path(i))
        todo = np.array([i not in parts for i in range(len(bounds))])
        todo = np.asarray(multihost_utils.broadcast_one_to_all(todo), bool)     # process 0's choice
        parts.update({i: read(i) for i in np.flatnonzero(~todo).tolist() if i not in parts})   # processes other than 0
        if parts:
            logging.info("sweep: resuming %s, %d of %d chunks already done", self.out_dir, len(parts), len(bounds))
        return parts

    def save(self, i: int, lo: int, hi: int, values: np.ndarray) -> None:
        if not np.isfinite(values).all():
            raise FloatingPointError(f"non-finite metric values for ranks {lo}..{hi - 1}")
        if self.writer:
            _write(self._path(i), SweepResult(*_members(self.family, lo, hi), values.astype(np.float32)), self.fingerprint)

    def finish(self, values: np.ndarray) -> None:
        if self.writer:
            _write(os.path.join(self.out_dir, "results.npz"), self.result(values), self.fingerprint)

    def result(self, values: np.ndarray) -> SweepResult:
        return SweepResult(*_members(self.family, 0, self.family.size()), values.astype(np.float32))


def run_sweep(params, cfg: ModelConfig, problem: PatchingProblem, pool: Pool, family: Family, out_dir: str,
              opts: RunOptions = RunOptions(), **options) -> SweepResult:
    """Evaluate `problem`'s metric for every member of `family` over `pool`, streaming chunks to `out_dir`.

    opts (or its fields as keywords, `runner.RunOptions`): chunk_size None or 0: the one in out_dir's
    spec when resuming, else the size that fits the free memory; shard: each chunk's ranks split over
    the devices; resume=True continues a sweep with an equal spec in out_dir; describe: free JSON
    stored in the spec; on_chunk(start, metric_values) runs after each chunk is saved. A progress
    bar (`logs.progress`: rate, ETA) counts subsets. Returns the full `SweepResult` (also written to
    out_dir/results.npz). The whole run holds `storage.DirLock(out_dir)` (LockedError if another
    process holds it). Chunks on disk that are damaged or hold other members are reported and
    recomputed.
    """
    opts = dataclasses.replace(opts, **options)
    sweep = Sweep.make(cfg, pool, family, problem.pos_w)
    problem = problem.for_footprint(cfg, Mask(**{pool.site: pool.scatter(np.ones(pool.n, bool), sweep.shape)}))
    store = _SweepStore(out_dir, lambda c: sweep_spec(params, cfg, problem, sweep, c, opts.describe), family,
                        problem.target.tokens.shape[0], opts.resume)
    label = "sweep " + os.path.join(*os.path.normpath(out_dir).split(os.sep)[-2:])
    with storage.DirLock(out_dir) if store.writer else contextlib.nullcontext():
        values = run_chunks(sweep_call(params, cfg, problem, sweep), rank_items(family), opts, label, store)
    return store.result(values)


def load_results(out_dir: str) -> SweepResult:
    """Read a finished sweep's results.npz (DamagedFileError if it or spec.json does not match its
    checksum, or if it was written by a sweep other than the one spec.json describes)."""
    path, spec_path = os.path.join(out_dir, "results.npz"), os.path.join(out_dir, "spec.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: the sweep has not finished (rerun it to resume)")
    spec = storage.read_verified(spec_path, _read_json, advice=f"it no longer tells which sweep {out_dir} holds")
    return storage.read_verified(path, functools.partial(_read, spec=spec_fingerprint(spec)),
                                 advice="rerun the sweep to rebuild it from its chunks")


# ---- blend-weight sweeps -------------------------------------------------------------------------

def blend_curve(params, cfg: ModelConfig, problem: PatchingProblem, base: Mask, weights, **kw) -> np.ndarray:
    """Metric [G, B] with the mask `base` (leaves [L, ...], weights in [0, 1]) scaled by each of
    `weights` [G]: the blend weight itself as the swept variable. kw go to `run_masks`."""
    w = jnp.asarray(weights, jnp.float32)
    masks = jax.tree.map(lambda a: w.reshape(-1, *([1] * a.ndim)) * a[None], base)
    return run_masks(params, cfg, problem, masks, **kw)


# Weights per round of `blend_crossing`'s search (one batched call each).
CROSSING_POINTS = 8


def blend_crossing(params, cfg: ModelConfig, problem: PatchingProblem, base: Mask, level: float = 0.0,
                   tol: float = 1e-3, aggregate: Callable[[np.ndarray], np.ndarray] = lambda v: v.mean(-1),
                   **kw) -> dict:
    """Locate the blend weight where aggregate(metric) crosses `level`, to within `tol`.

    Evaluates `CROSSING_POINTS` weights per round in one batched call (a k-section search), starting
    from [0, 1], under a progress bar of the rounds; kw go to `run_masks`. Returns {'low', 'high',
    'crossing' (midpoint) or None if no sign change in [0, 1], 'evaluated': [(weight, value)]}.
    """
    points = CROSSING_POINTS
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
