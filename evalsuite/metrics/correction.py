"""Correcting measured class shares for attribute-classifier error.

Model (as in CLEAM; Teo et al., "On Measuring Fairness in Generative Models", NeurIPS 2023): with true
shares p and a confusion matrix C[i, j] = P(classifier predicts j | true class i), the expected measured
shares are p̂ = Cᵀ p. Given p̂ and C estimated on labelled validation images, we recover p.

This is a point-estimate correction inspired by CLEAM; it does not implement CLEAM's full statistical
model or its interval estimates (it does not propagate the uncertainty of C or of p̂).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numpy.typing import ArrayLike, NDArray

FloatArray = NDArray[np.float64]

_SIMPLEX_TOL = 1e-10
# A row of a known confusion matrix must sum to 1 within this. Wider than float rounding because the
# miniature world's classifier/confusion.json stores entries to 6 decimals (K·5e-7 off at worst).
ROW_SUM_TOL = 1e-5


def confusion_matrix(true: ArrayLike, pred: ArrayLike, n_classes: int) -> FloatArray:
    """Row-normalised confusion matrix C[i, j] = #{true = i, pred = j} / #{true = i}.

    Pairs where either label is < 0 (not measured, e.g. no face detected) are skipped.
    Empty-group rule: a true class with no samples gets a row of NaN (its error rates are unknown;
    :func:`corrected_shares` then returns NaN rather than guessing).
    """
    t = np.asarray(true).ravel().astype(np.int64)
    q = np.asarray(pred).ravel().astype(np.int64)
    if t.shape != q.shape:
        raise ValueError(f"true and pred must have the same length, got {t.size} and {q.size}")
    if np.any(t >= n_classes) or np.any(q >= n_classes):
        raise ValueError(f"labels must be < n_classes={n_classes}")
    ok = (t >= 0) & (q >= 0)
    counts = np.zeros((n_classes, n_classes), dtype=np.float64)
    np.add.at(counts, (t[ok], q[ok]), 1.0)
    rows = counts.sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = counts / rows
    out[rows[:, 0] == 0] = np.nan
    return out


def confusion_problems(confusion: ArrayLike, classes: Sequence[str]) -> list[str]:
    """What keeps ``confusion`` from being a confusion matrix over ``classes`` ([] = fine).

    It must be K×K (K = len(classes)) with every row P(predicted j | true class i): entries >= 0 and a
    sum of 1 within ``ROW_SUM_TOL``. A row holding NaN is a true class without validation images (its
    error rates are unknown, so :func:`corrected_shares` gives NaN) and is not checked.
    """
    c = np.asarray(confusion, dtype=np.float64)
    k = len(classes)
    if c.shape != (k, k):
        return [f"must be {k}x{k} (classes {', '.join(classes)}), got shape {c.shape}"]
    problems = []
    for cls, row in zip(classes, c, strict=True):
        if np.all(np.isfinite(row)) and (np.any(row < 0) or abs(row.sum() - 1.0) > ROW_SUM_TOL):
            problems.append(f"row '{cls}' ({', '.join(f'{x:.6g}' for x in row)}) sums to {row.sum():.6g}; "
                            f"each row is P(predicted class | true class) and must be >= 0 and sum to 1")
    return problems


def project_to_simplex(v: ArrayLike) -> FloatArray:
    """Euclidean projection of v onto the probability simplex {x ≥ 0, Σx = 1}.

    Sort-and-threshold algorithm of Held, Wolfe & Crowder (1974); see also Duchi et al., ICML 2008.
    """
    x = np.asarray(v, dtype=np.float64).ravel()
    u = np.sort(x)[::-1]
    css = np.cumsum(u) - 1.0
    ks = np.arange(1, x.size + 1)
    rho = int(np.nonzero(u - css / ks > 0)[0][-1]) + 1
    theta = css[rho - 1] / rho
    return np.maximum(x - theta, 0.0)


def _in_simplex(x: NDArray[np.floating]) -> bool:
    return bool(np.all(x >= -_SIMPLEX_TOL) and abs(x.sum() - 1.0) <= 1e-8)


def _projected_gradient(a: FloatArray, b: FloatArray, x0: FloatArray, max_iter: int = 20000) -> FloatArray:
    """Minimise ½‖a x − b‖² on the simplex by accelerated projected gradient (FISTA; Beck & Teboulle 2009)."""
    lipschitz = float(np.linalg.norm(a, 2) ** 2)
    if lipschitz == 0.0:
        return x0
    step = 1.0 / lipschitz
    x = x0.copy()
    y = x0.copy()
    t = 1.0
    for _ in range(max_iter):
        x_new = project_to_simplex(y - step * (a.T @ (a @ y - b)))
        t_new = (1.0 + np.sqrt(1.0 + 4.0 * t * t)) / 2.0
        y = x_new + ((t - 1.0) / t_new) * (x_new - x)
        if np.max(np.abs(x_new - x)) < 1e-14:
            x = x_new
            break
        x, t = x_new, t_new
    return x


def corrected_shares(measured: ArrayLike, confusion: ArrayLike) -> FloatArray:
    """Estimate true shares p from measured shares p̂ by solving Cᵀ p = p̂ on the probability simplex.

    Method: p = argmin_{p ∈ simplex} ‖Cᵀ p − p̂‖². First the unconstrained least-squares solution
    (``numpy.linalg.lstsq``) is computed; if it lies in the simplex (up to 1e-10) it is returned after
    clipping round-off, so the correction is exact whenever the system is exactly solvable with a
    solution in the simplex and C is invertible. Otherwise (sampling noise pushes p̂ outside the set
    of reachable shares, or C is singular) the constrained problem is solved by accelerated projected
    gradient started from the projection of the least-squares solution; this is the true constrained
    least-squares solution, not a clip-and-renormalise heuristic.

    Model and motivation: CLEAM (Teo et al., NeurIPS 2023); this is a point-estimate correction only.
    Empty-group rule: NaN in ``measured`` or in ``confusion`` (a class without validation samples) -> NaN.
    """
    b = np.asarray(measured, dtype=np.float64).ravel()
    c = np.asarray(confusion, dtype=np.float64)
    k = b.size
    if c.shape != (k, k):
        raise ValueError(f"confusion must be ({k}, {k}) to match measured, got {c.shape}")
    if np.isnan(b).any() or np.isnan(c).any():
        return np.full(k, np.nan)
    a = c.T
    x, *_ = np.linalg.lstsq(a, b, rcond=None)
    if _in_simplex(x):
        x = np.clip(x, 0.0, None)
        return np.asarray(x / x.sum(), dtype=np.float64)
    return _projected_gradient(a, b, project_to_simplex(x))
