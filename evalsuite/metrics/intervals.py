"""Confidence intervals: the one home of every interval the suite reports (95 %, two-sided).

* :func:`wilson_interval` — one binomial share (independent images).
* :func:`share_intervals` — Wilson interval for every class of a label array.
* :func:`cluster_share_interval` — a share pooled over prompts, with a cluster-robust standard error
  (images of the same prompt are correlated, so the pooled Wilson interval is too narrow).
* :func:`paired_difference_interval` — the change in a share between two runs on paired images.
* :func:`cluster_difference_interval` — that change pooled over prompts, cluster-robust.
* :func:`mean_interval` — the mean of a metric's values (over prompts, or over a group's images) with a
  Student-t interval, kept within the metric's range, and never of zero width for a bounded metric.

Method notes: docs/methods.md, "Confidence intervals". Empty-group rule throughout: no observations ->
NaN bounds.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import numpy as np
from numpy.typing import ArrayLike, NDArray

from evalsuite.metrics.distribution import class_counts

ZERO_RESIDUAL = 1e-9  # |c_g − p̂·n_g| <= this · n_g is rounding, not between-cluster variation
LEVEL = 0.95  # the confidence level of every interval
Z = 1.96  # the two-sided 95 % normal quantile, as the intervals round it


def wilson_interval(count: float, n: float, z: float = Z) -> tuple[float, float]:
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


def share_intervals(labels: ArrayLike, n_classes: int, z: float = Z) -> NDArray[np.float64]:
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
    counts: ArrayLike, totals: ArrayLike, z: float = Z
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


def paired_difference_interval(n10: int, n01: int, n: int, z: float = Z) -> tuple[float, float, float]:
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


def cluster_difference_interval(d: ArrayLike, totals: ArrayLike, per_pair: ArrayLike,
                                z: float = Z) -> tuple[float, float, float]:
    """The change in a share between two runs on paired images, pooled over prompts: Σd/Σn, where
    d_g = B's minus A's count of the class over prompt g's n_g pairs, with a cluster-robust (by prompt)
    normal interval, the variance as in :func:`cluster_share_interval`; clipped to [−1, 1].

    Falls back to the Agresti–Min interval over the pairs (:func:`paired_difference_interval`, from the
    per-pair changes `per_pair` in {−1, 0, 1}) when fewer than 2 prompts have pairs, or when every prompt
    changes by the same share (|d_g − est·n_g| <= 1e-9·n_g), where the sandwich interval collapses to a
    point. Empty-group rule: Σn = 0 -> NaN. Returns (estimate, lo, hi).
    """
    diff = np.asarray(d, dtype=np.float64).ravel()
    n = np.asarray(totals, dtype=np.float64).ravel()
    changes = np.asarray(per_pair, dtype=np.float64).ravel()
    total = n.sum()
    if total == 0:
        return float("nan"), float("nan"), float("nan")
    est = float(diff.sum() / total)
    keep = n > 0
    residuals, g = diff[keep] - est * n[keep], int(np.count_nonzero(keep))
    if g < 2 or np.all(np.abs(residuals) <= ZERO_RESIDUAL * n[keep]):
        _, lo, hi = paired_difference_interval(int(np.sum(changes > 0)), int(np.sum(changes < 0)), changes.size, z)
        return est, lo, hi
    half = z * math.sqrt(g / (g - 1) * float(np.sum(residuals**2)) / total**2)
    return est, max(est - half, -1.0), min(est + half, 1.0)


@functools.lru_cache(maxsize=512)
def t_quantile(q: float, df: int) -> float:
    """Quantile of Student's t with integer ``df`` >= 1 (q in (0.5, 1)), by bisection on the exact CDF:
    P(|T| < t) with θ = atan(t/√df) is, for odd df, (2/π)(θ + sinθ Σ_{k odd < df-1} c_k cos^k θ) and for
    even df sinθ Σ_{k even <= df-2} c_k cos^k θ (Abramowitz & Stegun 26.7.3-4). Accurate to ~1e-12.
    """
    if df < 1 or not 0.5 < q < 1.0:
        raise ValueError(f"need df >= 1 and 0.5 < q < 1, got q={q}, df={df}")

    def two_sided(theta: float) -> float:
        s, c = math.sin(theta), math.cos(theta)
        term, total, k = (1.0, 1.0, 0) if df % 2 == 0 else (c, c if df > 1 else 0.0, 1)
        while k + 2 <= df - 2:
            term *= c * c * (k + 1) / (k + 2)
            total += term
            k += 2
        return s * total if df % 2 == 0 else 2.0 / math.pi * (theta + s * total)

    lo, hi = 0.0, math.pi / 2
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if two_sided(mid) < 2.0 * q - 1.0 else (lo, mid)
    return math.sqrt(df) * math.tan(0.5 * (lo + hi))


def mean_interval(values: Sequence[float] | NDArray[np.float64],
                  bounds: tuple[float, float] | None = None) -> tuple[float, float, float]:
    """(mean, lo, hi) of `values` (NaN skipped) with a Student-t interval, mean ± t_{n−1} · s / √n.

    `bounds` = (a, b), the metric's range (``MetricInfo.bounds``; either end may be infinite):
      * the interval is clipped to [a, b], so a gap whose maximum is 1 never reads 1.07;
      * where a and b are both finite and every value agrees (|x_i − mean| <= 1e-9·(b − a)), including
        a single value, the interval is the score (Wilson) interval of the mean rescaled to [0, 1] over
        the n values: the interval under the largest variance a variable in [a, b] with that mean can
        have, (b − μ)(μ − a) (Bhatia & Davis, "A better bound on the variance", Amer. Math. Monthly 107,
        2000), with z = Z. n prompts that all collapse to one class so say how little n
        prompts show, instead of claiming certainty with a zero-width interval.
    Without finite bounds, fewer than 2 values give NaN bounds, and equal values a zero-width interval.
    An infinite value makes the mean infinite, with NaN bounds. Empty-group rule: no values -> NaN.
    """
    x = np.asarray(values, dtype=np.float64).ravel()
    x = x[~np.isnan(x)]
    if x.size == 0:
        return float("nan"), float("nan"), float("nan")
    mean = float(x.mean())
    if not math.isfinite(mean):
        return mean, float("nan"), float("nan")
    a, b = (float(bounds[0]), float(bounds[1])) if bounds is not None else (-math.inf, math.inf)
    if math.isfinite(a) and math.isfinite(b) and b > a and np.all(np.abs(x - mean) <= ZERO_RESIDUAL * (b - a)):
        share = min(max((mean - a) / (b - a), 0.0), 1.0)
        lo, hi = wilson_interval(share * x.size, float(x.size), Z)
        return mean, a + (b - a) * lo, a + (b - a) * hi
    if x.size < 2:
        return mean, float("nan"), float("nan")
    half = t_quantile(0.5 + LEVEL / 2.0, x.size - 1) * float(x.std(ddof=1)) / math.sqrt(x.size)
    return mean, max(mean - half, a), min(mean + half, b)
