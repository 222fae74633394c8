"""A sweep's table of subsets as the stats modules read it and write it.

Subsets of n units as integers: unit i = bit i (`to_bitmask`, `from_bitmask`; the sweeps' encoding
too, `engine.subsets`). Read: subsets as bool rows [N, n] or integer bitmasks [N] (`as_bool`), a metric [N] or [N, P] as
its per-subset mean (`per_subset`), the rows as bitmasks, their sizes, and tables indexed by
bitmask (2^n entries, n <= `DENSE_MAX_UNITS`). Written: JSON-ready Python (`jsonable`) and a
pandas frame with one row per subset (`subsets_frame`).
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from jaxcircuits import checks

DENSE_MAX_UNITS = 24          # tables indexed by bitmask (2^n entries) up to this n


def to_bitmask(bits, dtype=np.int64):
    """bool [n] -> Python int; bool [.., n] (ndim > 1) -> integer array [..] of `dtype`.

    n <= 64; arrays need n <= 63 for int64 (use dtype=np.uint64 for n = 64).
    """
    bits = np.asarray(bits, dtype=bool)
    if bits.ndim == 1:
        return int(to_bitmask(bits[None], np.uint64)[0])
    n = bits.shape[-1]
    if n > np.iinfo(dtype).bits - (np.iinfo(dtype).min < 0):
        raise ValueError(f"{n} units do not fit a {np.dtype(dtype).name} bitmask")
    packed = np.packbits(bits, axis=-1, bitorder="little")          # unit i = bit i
    packed = np.pad(packed, [(0, 0)] * (bits.ndim - 1) + [(0, 8 - packed.shape[-1])])
    return np.ascontiguousarray(packed).view("<u8")[..., 0].astype(dtype)   # any input layout


def from_bitmask(masks, n: int) -> np.ndarray:
    """Bitmask(s) (an int or an integer array [..]) -> bool [.., n]."""
    if np.ndim(masks) == 0:
        masks = int(masks)
        return np.array([(masks >> i) & 1 for i in range(n)], dtype=bool)
    masks = np.asarray(masks, dtype=np.uint64)
    return ((masks[..., None] >> np.arange(n, dtype=np.uint64)) & np.uint64(1)).astype(bool)


def as_bool(subsets) -> np.ndarray:
    """bool [N, n] rows, or integer bitmasks [N] -> bool [N, n]."""
    a = np.asarray(subsets)
    if a.dtype == bool:
        if a.ndim != 2:
            raise ValueError(f"bool subsets must be [N, n], got shape {a.shape}")
        return a
    if a.ndim != 1 or not np.issubdtype(a.dtype, np.integer):
        raise ValueError(f"subsets must be bool [N, n] or integer bitmasks [N], got {a.dtype} {a.shape}")
    n = max(1, int(a.max(initial=0)).bit_length())
    return from_bitmask(a, n)


def sweep_rows(subsets, success=None, metric=None) -> tuple:
    """(bits bool [N, n], success bool [N] or None, metric float64 [N] / [N, P] or None) of a sweep;
    ValueError naming the argument for a sweep with no subsets, a success or metric whose first axis
    is not N (or of another rank), or a metric with NaN or inf."""
    bits = as_bool(subsets)
    if not len(bits):
        raise ValueError("the sweep has no subsets (subsets has shape "
                         f"{np.shape(subsets)}): there is nothing to summarise")
    if success is not None:
        success = np.asarray(success)
        if success.shape != (len(bits),):
            raise ValueError(f"success has shape {success.shape}, expected ({len(bits)},): one per subset")
        success = success.astype(bool)
    if metric is not None:
        metric = np.asarray(metric, dtype=np.float64)
        if metric.ndim not in (1, 2) or metric.shape[0] != len(bits):
            raise ValueError(f"metric has shape {metric.shape}, expected ({len(bits)},) or ({len(bits)}, P): "
                             "one row per subset")
        checks.within("metric", metric)
    return bits, success, metric


def per_subset(x) -> np.ndarray:
    """float [N] or [N, P] -> [N] (mean over prompts)."""
    x = np.asarray(x, dtype=np.float64)
    return x.mean(-1) if x.ndim == 2 else x


def bitmasks(bits: np.ndarray) -> np.ndarray:
    """bool [N, n] -> uint64 bitmasks [N] (n <= 64)."""
    return to_bitmask(bits, np.uint64)


def size_index(bits: np.ndarray):
    """Sizes present (ascending) and each row's index into them."""
    return np.unique(bits.sum(1), return_inverse=True)


def sorted_rows(bits: np.ndarray) -> np.ndarray:
    """Rows ordered by (size, bitmask)."""
    return bits[np.lexsort((bitmasks(bits), bits.sum(1)))] if len(bits) else bits


def dense_table(bits: np.ndarray, values, fill) -> np.ndarray:
    """A table [2^n] indexed by bitmask: values at the given subsets, `fill` elsewhere."""
    n = bits.shape[1]
    if n > DENSE_MAX_UNITS:
        raise ValueError(f"{n} units: bitmask-indexed tables need n <= {DENSE_MAX_UNITS}")
    values = np.asarray(values)
    table = np.full(1 << n, fill, dtype=np.result_type(values.dtype, np.asarray(fill).dtype))
    table[bitmasks(bits)] = values
    return table


def jsonable(x):
    """numpy -> JSON-serialisable Python (lists, ints, floats; NaN and inf -> None)."""
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple, np.ndarray)):
        return [jsonable(v) for v in (x.tolist() if isinstance(x, np.ndarray) else x)]
    if isinstance(x, (bool, np.bool_)):
        return bool(x)
    if isinstance(x, (int, np.integer)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        return float(x) if math.isfinite(x) else None
    return x


def subsets_frame(subsets: np.ndarray, metric: np.ndarray, unit_names: Sequence[str], index=None):
    """A pandas DataFrame, one row per subset (bool [N, n]) of a sweep with metric [N, P]: units (the
    member's unit names, space-separated), size, metric_0 .. metric_{P-1} (per prompt) and metric
    (mean over prompts); `index` (e.g. the sweep's ranks) names the rows."""
    import pandas as pd
    names = np.asarray(unit_names)
    subsets, metric = np.asarray(subsets, bool), np.asarray(metric)
    frame = pd.DataFrame({"units": [" ".join(names[row]) for row in subsets], "size": subsets.sum(1)}, index=index)
    for p in range(metric.shape[1]):
        frame[f"metric_{p}"] = metric[:, p]
    frame["metric"] = metric.mean(1)
    return frame
