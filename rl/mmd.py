"""Kernels and the unbiased squared MMD with its leave-one-out credit, the maths of the diversity reward.

The set-level diversity reward (Miao et al., "Training Diffusion Models Towards Diverse Image Generation
with Reinforcement Learning", CVPR 2024; reconstructed in docs/methods.md, "The set-level diversity
reward") scores a group G of M generated feature vectors against a reference set R of N points by the
unbiased squared maximum mean discrepancy (Gretton et al., "A Kernel Two-Sample Test", JMLR 2012), and
credits each image with how much the set's score drops without it. :func:`mmd_loo_credit` computes
all M credits in closed form in O(M^2 + MN). `rl.rewards.diversity_reward` wraps it as a reward.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from evalsuite.errors import SuiteError, did_you_mean

__all__ = [
    "KERNELS", "Kernel", "linear_kernel", "median_bandwidth", "mmd2_unbiased", "mmd_loo_credit", "poly3_kernel",
    "rbf_kernel", "resolve_kernel",
]

Kernel = Callable[[Tensor, Tensor], Tensor]


def _sq_dists(x: Tensor, y: Tensor) -> Tensor:
    return torch.cdist(x, y, compute_mode="donot_use_mm_for_euclid_dist").pow(2)


def median_bandwidth(points: Tensor) -> float:
    """Median heuristic h = sqrt(median / 2) over the squared distances of all pairs i < j of ``points``,
    so exp(-d^2 / (2 h^2)) = exp(-d^2 / median); 1.0 if the median is 0 (collapsed pool) or n < 2."""
    rows, cols = torch.triu_indices(points.shape[0], points.shape[0], offset=1)
    median = float(_sq_dists(points, points)[rows, cols].median()) if rows.numel() else 0.0
    return math.sqrt(median / 2.0) if median > 0 else 1.0


def rbf_kernel(x: Tensor, y: Tensor, bandwidth: float | None = None) -> Tensor:
    """Gaussian kernel exp(-||x - y||^2 / (2 h^2)), shape (len(x), len(y)). With ``bandwidth=None``, h is
    :func:`median_bandwidth` of the pooled points: ``x`` alone if ``y is x`` (the MMD functions call the
    kernel once on cat(gen, ref), so one h serves all blocks), else cat(x, y)."""
    h = bandwidth if bandwidth is not None else median_bandwidth(x if y is x else torch.cat([x, y]))
    if h <= 0:
        raise SuiteError(f"rbf_kernel: bandwidth must be > 0, got {h}")
    return torch.exp(-_sq_dists(x, y) / (2.0 * h * h))


def poly3_kernel(x: Tensor, y: Tensor) -> Tensor:
    """KID cubic polynomial kernel (x^T y / d + 1)^3 (Binkowski et al., ICLR 2018)."""
    return (x @ y.T / x.shape[-1] + 1.0) ** 3


def linear_kernel(x: Tensor, y: Tensor) -> Tensor:
    """x^T y; MMD^2_u is then an unbiased estimate of ||mean(G) - mean(R)||^2."""
    return x @ y.T


KERNELS: dict[str, Kernel] = {"rbf": rbf_kernel, "poly3": poly3_kernel, "linear": linear_kernel}


def resolve_kernel(kernel: str | Kernel) -> Kernel:
    """A kernel function by name (see KERNELS), or the callable itself."""
    if not isinstance(kernel, str):
        return kernel
    if kernel not in KERNELS:
        raise SuiteError(f"unknown kernel '{kernel}'{did_you_mean(kernel, KERNELS)}")
    return KERNELS[kernel]


def _blocks(gen: Tensor, ref: Tensor, kernel: str | Kernel, min_m: int) -> tuple[Tensor, Tensor, Tensor]:
    if gen.ndim != 2 or ref.ndim != 2 or gen.shape[1] != ref.shape[1]:
        raise SuiteError(f"MMD: need gen (M,d) and ref (N,d), got {tuple(gen.shape)} and {tuple(ref.shape)}")
    m, n = gen.shape[0], ref.shape[0]
    if m < min_m or n < 2:
        raise SuiteError(f"MMD: need at least {min_m} generated and 2 reference points, got M={m}, N={n}")
    pooled = torch.cat([gen, ref.to(gen.dtype)])
    k = resolve_kernel(kernel)(pooled, pooled)
    return k[:m, :m], k[m:, m:], k[:m, m:]


def mmd2_unbiased(gen: Tensor, ref: Tensor, kernel: str | Kernel = "rbf") -> Tensor:
    """Unbiased squared MMD (Gretton et al., JMLR 2012):

    1/(M(M-1)) sum_{i!=j} k(g_i,g_j) + 1/(N(N-1)) sum_{a!=b} k(r_a,r_b) - 2/(MN) sum_{i,a} k(g_i,r_a)."""
    kgg, krr, kgr = _blocks(gen, ref, kernel, 2)
    m, n = kgg.shape[0], krr.shape[0]
    return (
        (kgg.sum() - kgg.trace()) / (m * (m - 1))
        + (krr.sum() - krr.trace()) / (n * (n - 1))
        - 2.0 * kgr.sum() / (m * n)
    )


def mmd_loo_credit(gen: Tensor, ref: Tensor, kernel: str | Kernel = "rbf") -> Tensor:
    """r_m = MMD^2_u(G \\ {m}, R) - MMD^2_u(G, R), shape (M,), closed form (M >= 3).

    With S_m = sum_{j!=m} k(g_m,g_j), T_m = sum_a k(g_m,r_a), Gs = sum_m S_m, C = sum_m T_m:
    MMD^2_u(G\\{m},R) = (Gs - 2 S_m)/((M-1)(M-2)) + R_term - 2 (C - T_m)/((M-1) N); R_term cancels."""
    kgg, krr, kgr = _blocks(gen, ref, kernel, 3)
    m, n = kgg.shape[0], krr.shape[0]
    s = kgg.sum(1) - kgg.diagonal()
    t = kgr.sum(1)
    gs, c = s.sum(), t.sum()
    full = gs / (m * (m - 1)) - 2.0 * c / (m * n)
    loo = (gs - 2.0 * s) / ((m - 1) * (m - 2)) - 2.0 * (c - t) / ((m - 1) * n)
    return loo - full
