"""Summary statistics over seeds: mean, standard deviation and a t-based 95% interval."""

from __future__ import annotations

import math
from typing import Dict, List, Optional

__all__ = ["ci95"]


def ci95(values: List[Optional[float]]) -> Dict[str, Optional[float]]:
    """Mean, standard deviation and the half-width of the t-based 95% confidence interval.

    ``None`` and NaN values are left out; ``n`` says how many were used.
    """
    vals = [v for v in values if v is not None and not math.isnan(v)]
    n = len(vals)
    if n == 0:
        return {"mean": None, "std": None, "ci95": None, "n": 0}
    mean = sum(vals) / n
    if n == 1:
        return {"mean": mean, "std": 0.0, "ci95": None, "n": 1}
    from scipy import stats

    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (n - 1))
    return {
        "mean": mean,
        "std": std,
        "ci95": float(stats.t.ppf(0.975, n - 1)) * std / math.sqrt(n),
        "n": n,
    }
