"""Timing and machine load shared by the benchmarks."""

from __future__ import annotations

import importlib.metadata
import json
import os
import sys
import platform
import time
from typing import Callable, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np


def first_and_reps(run: Callable[[], object], reps: int) -> Tuple[object, Tuple[float, float], np.ndarray]:
    """(the first call's result, its (wall, CPU) seconds after jax.clear_caches(): compile + run,
    [reps, 2] (wall, CPU) seconds of further calls); CPU: this process's, all threads."""
    def timed():
        w, c = time.perf_counter(), time.process_time()
        out = run()
        return out, (time.perf_counter() - w, time.process_time() - c)

    jax.clear_caches()
    out, first = timed()
    return out, first, np.array([timed()[1] for _ in range(reps)]).reshape(reps, 2)


def first_and_median(run: Callable[[], object], reps: int) -> Tuple[object, float, float]:
    """(the first call's result, its seconds after jax.clear_caches(): compile + run, the median
    seconds of `reps` further calls)."""
    out, first, times = first_and_reps(run, reps)
    return out, first[0], float(np.median(times[:, 0]))


QUIET_LOAD = 0.5       # 1-minute load average (whole machine) at or below which a run starts quiet


def machine_load() -> dict:
    """The machine's load now: {'loadavg': [1, 5, 15 min], 'cores', 'quiet': 1-min load <= QUIET_LOAD}."""
    load = [round(x, 2) for x in os.getloadavg()]
    return {"loadavg": load, "cores": os.cpu_count(), "quiet": load[0] <= QUIET_LOAD}


def load_line(start: dict, end: Optional[dict] = None) -> str:
    """The header line of a benchmark's load: measured at its start and (when given) its end, never a
    fixed phrase; a loaded start says at the top that its ratios are not to be quoted (README and
    RESULTS quote quiet runs only)."""
    at_end = "" if end is None else (f", {end['loadavg']} at the end (which includes this benchmark's own "
                                     "load)")
    measured = f"load average (1, 5, 15 min) {start['loadavg']} at the start{at_end}, {start['cores']} cores"
    if start["quiet"]:
        return f"Machine load: quiet at the start (1-min load average <= {QUIET_LOAD}): {measured}."
    return (f"**LOADED MACHINE**: other processes ran at the start (1-min load average above {QUIET_LOAD}): "
            f"{measured}. Wall times and ratios of this run are inflated or skewed by the contention; quote "
            "quiet runs only.")


def matmul_gflops(n: int = 2048, reps: int = 7) -> float:
    """Best float32 matmul rate of this machine under jax (GFLOP/s): the floor benchmarks compare to."""
    k1, k2 = jax.random.split(jax.random.PRNGKey(0))
    a, b = jax.random.normal(k1, (n, n)), jax.random.normal(k2, (n, n))
    f = jax.jit(jnp.dot)
    f(a, b).block_until_ready()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        f(a, b).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best / 1e9


def environment(packages: Sequence[str]) -> dict:
    """The machine (CPU, cores, platform, torch threads, jax devices) and the versions of `packages`
    (None where not installed), for a benchmark's JSON."""
    def version(pkg):
        try:
            return importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            return None

    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")),
               platform.processor())
    import torch
    return {"cpu": cpu, "cores": len(os.sched_getaffinity(0)), "platform": platform.platform(),
            "python": platform.python_version(), "torch_threads": torch.get_num_threads(),
            "jax_devices": [str(d) for d in jax.devices()], "versions": {p: version(p) for p in packages}}


def finish(result: dict, name: str, md: str, out_dir: str, results_md: str) -> None:
    """Write `result` to out_dir/<name>-<date>.json and the report `md` to results_md ('' skips it),
    print both, and exit with the agreement failures listed in result['failures'], if any."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{name}-{result['date']}.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    if results_md:
        with open(results_md, "w") as f:
            f.write(md)
    print(md)
    print(f"wrote {path}")
    if result["failures"]:
        sys.exit("agreement failed: " + "; ".join(result["failures"]))
