"""Confidence intervals for class shares and for arbitrary statistics.

* :func:`wilson_interval` — one binomial share (independent images).
* :func:`share_intervals` — Wilson interval for every class of a label array.
* :func:`cluster_share_interval` — a share pooled over prompts, with a cluster-robust standard error
  (images of the same prompt are correlated, so the pooled Wilson interval is too narrow).
* :func:`bootstrap_interval` — percentile bootstrap over rows for any statistic.

Empty-group rule throughout: no observations -> NaN bounds.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from numpy.typing import ArrayLike, NDArray

from evalsuite.metrics.distribution import class_counts


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
      * the cluster-robust variance is exactly 0 (every cluster has the same share, e.g. the class never
        appears), where the sandwich interval would collapse to a point and overstate certainty.
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
    g = c.size
    var = 0.0
    if g >= 2:
        var = float(g / (g - 1) * np.sum((c - est * n) ** 2) / total**2)
    if g < 2 or var <= 0.0:
        lo, hi = wilson_interval(float(c.sum()), float(total), z)
        return est, lo, hi
    half = z * float(np.sqrt(var))
    return est, max(est - half, 0.0), min(est + half, 1.0)


def bootstrap_interval(
    stat: Callable[[np.ndarray], float],
    data: ArrayLike,
    n_boot: int = 1000,
    alpha: float = 0.05,
    *,
    rng: np.random.Generator,
) -> tuple[float, float]:
    """Percentile bootstrap (1 − alpha) interval for ``stat(data)``, resampling rows of ``data``.

    Draws ``n_boot`` resamples of the n rows with replacement and returns the alpha/2 and 1 − alpha/2
    quantiles of ``stat`` over them (Efron & Tibshirani, 1993, "An Introduction to the Bootstrap", ch. 13).
    Resamples on which ``stat`` is NaN (e.g. no measured image drawn) are ignored.
    Empty-group rule: no rows, or ``stat`` NaN on every resample -> (nan, nan).
    ``rng`` is required so that intervals are reproducible.
    """
    arr = np.asarray(data)
    if arr.ndim == 0:
        raise ValueError("data must have at least one dimension (rows are resampled)")
    if n_boot < 1 or not 0.0 < alpha < 1.0:
        raise ValueError(f"need n_boot >= 1 and 0 < alpha < 1, got n_boot={n_boot}, alpha={alpha}")
    n = arr.shape[0]
    if n == 0:
        return float("nan"), float("nan")
    idx = rng.integers(0, n, size=(n_boot, n))
    values = np.array([float(stat(arr[row])) for row in idx], dtype=np.float64)
    values = values[~np.isnan(values)]
    if values.size == 0:
        return float("nan"), float("nan")
    lo, hi = np.quantile(values, [alpha / 2.0, 1.0 - alpha / 2.0])
    return float(lo), float(hi)
