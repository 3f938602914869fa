"""Confidence intervals for class shares and for changes in them.

* :func:`wilson_interval` — one binomial share (independent images).
* :func:`share_intervals` — Wilson interval for every class of a label array.
* :func:`cluster_share_interval` — a share pooled over prompts, with a cluster-robust standard error
  (images of the same prompt are correlated, so the pooled Wilson interval is too narrow).
* :func:`paired_difference_interval` — the change in a share between two runs on paired images.

Empty-group rule throughout: no observations -> NaN bounds.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike, NDArray

from evalsuite.metrics.distribution import class_counts

ZERO_RESIDUAL = 1e-9  # |c_g − p̂·n_g| <= this · n_g is rounding, not between-cluster variation


def wilson_interval(count: float, n: float, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval for a binomial share count/n.

    With p̂ = count/n: centre = (p̂ + z²/2n) / (1 + z²/n),
    half-width = z/(1 + z²/n) · sqrt(p̂(1 − p̂)/n + z²/4n²).
    Source: Wilson (1927), JASA 22:209; recommended over the Wald interval by Brown, Cai & DasGupta (2001).
    Empty-group rule: n = 0 -> (nan, nan).
    """
    if n < 0 or count < 0 or count > n:
        raise ValueError(f"need 0 <= count <= n, got count={count}, n={n}")
    if n == 0:
        return float("nan"), float("nan")
    p = count / n
    denom = 1.0 + z * z / n
    centre = (p + z * z / (2.0 * n)) / denom
    half = z / denom * np.sqrt(p * (1.0 - p) / n + z * z / (4.0 * n * n))
    lo = 0.0 if count == 0 else max(centre - half, 0.0)  # exact at the ends: rounding leaves e.g. 4e-19
    hi = 1.0 if count == n else min(centre + half, 1.0)
    return float(lo), float(hi)


def share_intervals(labels: ArrayLike, n_classes: int, z: float = 1.96) -> NDArray[np.float64]:
    """Per-class (estimate, lo, hi) as a (K, 3) array, using the Wilson interval on each class count.

    Labels < 0 are excluded from the denominator, as in :func:`class_shares`.
    Empty-group rule: no valid labels -> all NaN.
    """
    counts = class_counts(labels, n_classes)
    n = int(counts.sum())
    out = np.full((n_classes, 3), np.nan)
    if n == 0:
        return out
    for k, c in enumerate(counts):
        lo, hi = wilson_interval(int(c), n, z)
        out[k] = (c / n, lo, hi)
    return out


def cluster_share_interval(
    counts: ArrayLike, totals: ArrayLike, z: float = 1.96
) -> tuple[float, float, float]:
    """Share pooled over clusters (prompts) with a cluster-robust (ratio-estimator / sandwich) interval.

    Estimate p̂ = Σ_g c_g / Σ_g n_g, where cluster g has c_g images of the class among n_g measured images.
    Variance (linearised ratio estimator with the G/(G−1) small-sample factor):
        var(p̂) = G/(G−1) · Σ_g (c_g − p̂·n_g)² / (Σ_g n_g)²,
    interval p̂ ± z·sqrt(var) clipped to [0, 1]. Source: Cameron & Miller (2015), "A Practitioner's Guide
    to Cluster-Robust Inference", J. Human Resources 50(2); Cochran (1977), Sampling Techniques, §6 (ratio
    estimators).

    Clusters with n_g = 0 carry no information and are dropped before counting G.
    Fallbacks to the Wilson interval on the pooled counts (Σc, Σn):
      * G < 2 (no between-cluster variation can be estimated);
      * every cluster has the pooled share, i.e. |c_g − p̂·n_g| <= 1e-9·n_g for all g (floating-point
        rounding leaves residuals like 1e-16 rather than 0, e.g. counts [1, 1] of [49, 49]), where the
        sandwich interval would collapse to a point and overstate certainty.
    Empty-group rule: Σ n_g = 0 -> (nan, nan, nan). Returns (estimate, lo, hi).
    """
    c = np.asarray(counts, dtype=np.float64).ravel()
    n = np.asarray(totals, dtype=np.float64).ravel()
    if c.shape != n.shape:
        raise ValueError(f"counts and totals must have the same length, got {c.size} and {n.size}")
    if np.any(n < 0) or np.any(c < 0) or np.any(c > n):
        raise ValueError("need 0 <= counts <= totals for every cluster")
    keep = n > 0
    c, n = c[keep], n[keep]
    total = n.sum()
    if total == 0:
        return float("nan"), float("nan"), float("nan")
    est = float(c.sum() / total)
    residuals = c - est * n
    g = c.size
    if g < 2 or np.all(np.abs(residuals) <= ZERO_RESIDUAL * n):
        lo, hi = wilson_interval(float(c.sum()), float(total), z)
        return est, lo, hi
    half = z * float(np.sqrt(g / (g - 1) * np.sum(residuals**2) / total**2))
    return est, max(est - half, 0.0), min(est + half, 1.0)


def paired_difference_interval(n10: int, n01: int, n: int, z: float = 1.96) -> tuple[float, float, float]:
    """Change in a share between two paired readings of the same n images, p̂₁₀ − p̂₀₁, with the
    Agresti–Min adjusted Wald interval.

    n10 pairs are in the class only in the second reading, n01 only in the first; the estimate is
    (n10 − n01)/n. Interval: add 1/2 to each cell of the paired 2×2 table, so with m = n + 2,
    p₁₀ = (n10 + ½)/m, p₀₁ = (n01 + ½)/m and d = p₁₀ − p₀₁: d ± z·sqrt((p₁₀ + p₀₁ − d²)/m), clipped to
    [−1, 1]. Unlike the plain Wald interval it does not collapse to a point when no pair changed.
    Source: Agresti & Min (2005), "Simple improved confidence intervals for comparing matched
    proportions", Statistics in Medicine 24:729–740.
    Empty-group rule: n = 0 -> (nan, nan, nan). Returns (estimate, lo, hi).
    """
    if n < 0 or n10 < 0 or n01 < 0 or n10 + n01 > n:
        raise ValueError(f"need n10, n01 >= 0 and n10 + n01 <= n, got n10={n10}, n01={n01}, n={n}")
    if n == 0:
        return float("nan"), float("nan"), float("nan")
    m = n + 2.0
    p10, p01 = (n10 + 0.5) / m, (n01 + 0.5) / m
    d = p10 - p01
    half = z * float(np.sqrt((p10 + p01 - d * d) / m))
    return (n10 - n01) / n, max(d - half, -1.0), min(d + half, 1.0)
