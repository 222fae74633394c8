"""How one set of scores agrees with another (a method's with exact patching, a prediction with a
measurement): rank and linear correlation, and R^2 of a prediction."""

from __future__ import annotations

from typing import Dict

import numpy as np
import scipy.stats


def correlations(x, y) -> Dict[str, float]:
    """{'pearson', 'spearman'} of x, y (flattened, equal sizes; NaN where either is constant or n < 2)."""
    x, y = np.asarray(x, np.float64).ravel(), np.asarray(y, np.float64).ravel()
    if len(x) < 2 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return {"pearson": float("nan"), "spearman": float("nan")}
    return {"pearson": float(scipy.stats.pearsonr(x, y)[0]), "spearman": float(scipy.stats.spearmanr(x, y)[0])}


def r_squared(measured, predicted) -> float:
    """1 - sum (m - p)^2 / sum (m - mean m)^2 of predictions `predicted` of `measured` [n] (NaN when
    `measured` is constant)."""
    m, p = np.asarray(measured, np.float64).ravel(), np.asarray(predicted, np.float64).ravel()
    ss = ((m - m.mean()) ** 2).sum()
    return float(1 - ((m - p) ** 2).sum() / ss) if ss > 0 else float("nan")
