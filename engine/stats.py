"""Paired significance tests of per-case metrics (the paper's p-value analysis)."""
from __future__ import annotations

import math

import numpy as np
from scipy import stats

MIN_MEANINGFUL_N = 6     # the exact two-sided test cannot reach p < 0.05 with fewer cases


def paired_wilcoxon(a, b) -> dict:
    """Two-sided Wilcoxon signed-rank test of paired per-case values ``a`` vs ``b``.

    Cases where either value is NaN are left out. Returns {n, median_difference (a - b),
    statistic, p, note}; the note says when the test cannot mean anything (identical
    values, or too few cases to reach p < 0.05).
    """
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"paired_wilcoxon: expected two 1-D arrays of one length, got {a.shape} and {b.shape}")
    keep = np.isfinite(a) & np.isfinite(b)
    a, b = a[keep], b[keep]
    n = int(a.size)
    out = {"n": n, "median_difference": float(np.median(a - b)) if n else math.nan,
           "statistic": math.nan, "p": math.nan, "note": ""}
    if n == 0:
        out["note"] = "no cases with both values"
        return out
    if np.all(a == b):
        out.update(p=1.0, note="identical values in every case")
        return out
    res = stats.wilcoxon(a, b, alternative="two-sided")
    out.update(statistic=float(res.statistic), p=float(res.pvalue))
    if n < MIN_MEANINGFUL_N:
        out["note"] = (f"n={n} is too small: the smallest two-sided p possible is {2.0 / 2 ** n:.3g}, "
                       f"so the test cannot show significance")
    return out


__all__ = ["paired_wilcoxon", "MIN_MEANINGFUL_N"]
