"""Timing shared by the single-call benchmarks."""

from __future__ import annotations

import time
from typing import Callable, Tuple

import jax
import numpy as np


def first_and_median(run: Callable[[], object], reps: int) -> Tuple[object, float, float]:
    """(the first call's result, its seconds after jax.clear_caches(): compile + run, the median
    seconds of `reps` further calls)."""
    jax.clear_caches()
    t = time.perf_counter()
    out = run()
    first = time.perf_counter() - t
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        run()
        times.append(time.perf_counter() - t)
    return out, first, float(np.median(times))
