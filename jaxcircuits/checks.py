"""Argument checks that every layer shares, each a ValueError naming the argument and what it takes.

  count(name, value, minimum)      an integer (3 or 3.0, not 2.5, not True) >= minimum, as int
  within(name, values, lo, hi)     numbers (a scalar or an array, host values) that are finite and
                                   lie in [lo, hi], as a float64 array
"""

from __future__ import annotations

import math
import numbers

import numpy as np


def count(name: str, value, minimum: int = 1) -> int:
    """`value` as an int; ValueError unless it is an integral number >= minimum."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value != int(value) or int(value) < minimum:
        raise ValueError(f"{name}={value!r}: expected an integer >= {minimum}")
    return int(value)


def within(name: str, values, lo: float = -math.inf, hi: float = math.inf) -> np.ndarray:
    """`values` as a float64 array; ValueError unless every entry is finite and in [lo, hi]."""
    v = np.asarray(values, np.float64)
    if v.size and not (np.isfinite(v).all() and v.min() >= lo and v.max() <= hi):
        span = "" if (lo, hi) == (-math.inf, math.inf) else f" in [{lo:g}, {hi:g}]"
        if v.ndim == 0:
            raise ValueError(f"{name}={float(v)}: expected a finite number{span}")
        bad = ~(np.isfinite(v) & (v >= lo) & (v <= hi))
        what = "NaN or inf" + (f", or outside [{lo:g}, {hi:g}]" if span else "")
        raise ValueError(f"{name} (shape {v.shape}) has {int(bad.sum())} value(s) that are {what}: first "
                         f"{v[bad][0]} at {tuple(int(i) for i in np.argwhere(bad)[0])}")
    return v
