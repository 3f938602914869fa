"""Mode-collapse / diversity metrics over image embeddings.

``emb`` is an (n, d) array of embeddings of one prompt's images (e.g. CLIP or DINOv2). Rows are
L2-normalised inside every function, so the kernel is cosine similarity with k(x, x) = 1.
Zero or non-finite rows are rejected with ``ValueError`` (their direction is undefined).
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike, NDArray

from evalsuite.metrics.registry import register_metric

FloatArray = NDArray[np.float64]
NEAR_DUPLICATE_COSINE = 0.95  # two images of a group with cosine similarity above this are near duplicates


def l2_normalize(emb: ArrayLike, name: str = "emb") -> FloatArray:
    """Rows of a 2-D array scaled to unit L2 norm; zero or non-finite rows raise ``ValueError``."""
    arr = np.asarray(emb, dtype=np.float64)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be a 2-D (n, d) array, got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} contains NaN or inf")
    norms = np.linalg.norm(arr, axis=1, keepdims=True)
    if np.any(norms == 0):
        raise ValueError(f"{name} has zero rows, which have no direction")
    return arr / norms


def cosine_gram(emb: ArrayLike) -> FloatArray:
    """Cosine-similarity matrix G[i, j] = cos(e_i, e_j) (n × n, unit diagonal, entries in [−1, 1])."""
    x = l2_normalize(emb)
    g = np.clip(x @ x.T, -1.0, 1.0)
    np.fill_diagonal(g, 1.0)
    return g


@register_metric("vendi", higher_is_better=True, kind="diversity", bounds=lambda n: (1.0, float(max(n, 1))))
def vendi_score(emb: ArrayLike, q: float = 1.0) -> float:
    """Vendi score: effective number of distinct samples, VS_q = exp(H_q(λ)).

    λ = eigenvalues of K/n with the cosine kernel K[i, j] = cos(e_i, e_j) (they sum to 1; round-off
    negatives are clipped to 0). H_q is the order-q Rényi entropy:
    q = 1: H = −Σ λ_i log λ_i (Shannon, 0·log 0 = 0); q = inf: H = −log max λ (so VS = 1/max λ);
    otherwise H = log(Σ λ_i^q) / (1 − q) over λ_i > 0.
    Source: Friedman & Dieng, "The Vendi Score: A Diversity Evaluation Metric for Machine Learning",
    TMLR 2023. Range [1, n]; higher is better (more diverse). n identical rows -> 1, n orthogonal -> n.
    Empty-group rule: n = 0 -> NaN; n = 1 -> 1.0.
    """
    if q < 0:
        raise ValueError(f"q must be >= 0, got {q}")
    x = l2_normalize(emb)
    n = x.shape[0]
    if n == 0:
        return float("nan")
    if n == 1:
        return 1.0
    lam = np.clip(np.linalg.eigvalsh(cosine_gram(x) / n), 0.0, None)
    lam = lam / lam.sum()
    if np.isinf(q):
        return float(1.0 / lam.max())
    pos = lam[lam > 1e-15]
    if q == 1.0:
        return float(np.exp(-(pos * np.log(pos)).sum()))
    return float(np.exp(np.log((pos**q).sum()) / (1.0 - q)))


@register_metric("mean_pairwise_cosine", higher_is_better=False, kind="diversity", bounds=(-1.0, 1.0))
def mean_pairwise_cosine(emb: ArrayLike) -> float:
    """Mean off-diagonal cosine similarity, Σ_{i≠j} cos(e_i, e_j) / (n(n−1)).

    In-batch similarity (docs/methods.md, "Diversity metrics"). Lower is better (more diverse).
    Empty-group rule: n < 2 -> NaN.
    """
    g = cosine_gram(emb)
    n = g.shape[0]
    if n < 2:
        return float("nan")
    return float((g.sum() - np.trace(g)) / (n * (n - 1)))


def near_duplicate_pairs(emb: ArrayLike, threshold: float = NEAR_DUPLICATE_COSINE) -> list[tuple[int, int, float]]:
    """Unordered pairs (i, j, cos) with i < j and cos(e_i, e_j) > threshold, in row-major (i, j) order."""
    g = cosine_gram(emb)
    i, j = np.triu_indices(g.shape[0], k=1)
    sims = g[i, j]
    hit = sims > threshold
    return [(int(a), int(b), float(s)) for a, b, s in zip(i[hit], j[hit], sims[hit], strict=True)]


@register_metric("near_duplicate_rate", higher_is_better=False, kind="diversity", bounds=(0.0, 1.0))
def near_duplicate_rate(emb: ArrayLike, threshold: float = NEAR_DUPLICATE_COSINE) -> float:
    """Fraction of the n(n−1)/2 unordered pairs with cosine similarity > threshold.

    Embedding-similarity filtering of near-duplicate generations, after the generate-and-filter attack
    of Carlini et al., "Extracting Training Data from Diffusion Models", USENIX Security 2023.
    Lower is better. Empty-group rule: n < 2 -> NaN.
    """
    g = cosine_gram(emb)
    n = g.shape[0]
    if n < 2:
        return float("nan")
    i, j = np.triu_indices(n, k=1)
    return float(np.count_nonzero(g[i, j] > threshold) / i.size)
