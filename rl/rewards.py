"""Set-level rewards for one prompt's group of G images, with one per-image credit each.

Policy-gradient RL needs one scalar per trajectory, but diversity and balance are properties of a SET.
Every set reward here is turned into per-image credits by leave-one-out (LOO): the credit of image m is
how much the set's score drops when m is removed, ``credit_m = S(G) - S(G \\ {m})``; positive means the
image helps the set. Conventions: every registered reward is "higher is better"; ``drift`` is registered
as the NEGATIVE distance to the base model's same-noise image, so with its non-negative weight it acts
as a penalty. ``REWARDS`` holds the names a config may give (rl.config) and the function each names;
the trainer (rl.train.compute_rewards) computes each term per group, centres it within its group and
scales it by its pooled within-group spread (rl.advantages.pooled_group_scores), then sums the scaled
terms with their config weights.

Diversity reward (Miao et al., "Training Diffusion Models Towards Diverse Image Generation with
Reinforcement Learning", CVPR 2024). The authors never released code; this is the reconstruction of
shared/reference/methods.md section 1.3: set reward R_set(G) = -MMD^2_u(G, R) against a reference set R,
per-image LOO credit computed in closed form in O(M^2 + MN). Features may be attribute-classifier class
probabilities or their one-hot labels (:func:`hard_labels`; reference: :func:`balanced_reference` /
:func:`reference_from_target`) or image embeddings
(CLIP, DINOv2; reference: embeddings of a balanced image set). Kernel, features and credit rule are our
choices, not verified as Miao's. A fully collapsed group (all features identical) yields identical credits,
so after per-prompt normalisation it carries no learning signal (methods.md 6.3).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor

from evalsuite.errors import SuiteError, did_you_mean

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
    """Unbiased squared MMD (Gretton et al., JMLR 2012), methods.md 1.3:

    1/(M(M-1)) sum_{i!=j} k(g_i,g_j) + 1/(N(N-1)) sum_{a!=b} k(r_a,r_b) - 2/(MN) sum_{i,a} k(g_i,r_a)."""
    kgg, krr, kgr = _blocks(gen, ref, kernel, 2)
    m, n = kgg.shape[0], krr.shape[0]
    return (
        (kgg.sum() - kgg.trace()) / (m * (m - 1))
        + (krr.sum() - krr.trace()) / (n * (n - 1))
        - 2.0 * kgr.sum() / (m * n)
    )


def mmd_loo_credit(gen: Tensor, ref: Tensor, kernel: str | Kernel = "rbf") -> Tensor:
    """r_m = MMD^2_u(G \\ {m}, R) - MMD^2_u(G, R), shape (M,), closed form of methods.md 1.3 (M >= 3).

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


def diversity_reward(
    features: Tensor, reference: Tensor, kernel: str | Kernel = "rbf", bandwidth: float | None = None
) -> Tensor:
    """Per-image credit for R_set = -MMD^2_u(G, R): credit_m = R_set(G) - R_set(G\\{m})
    = MMD^2_u(G\\{m}, R) - MMD^2_u(G, R). Positive: image m pulls the set toward the reference (fills an
    under-represented mode); negative: it is redundant. ``bandwidth`` applies to the rbf kernel only."""
    if bandwidth is not None and kernel != "rbf":
        raise SuiteError(f"diversity_reward: bandwidth applies to kernel 'rbf' only, got '{kernel}'")
    k = partial(rbf_kernel, bandwidth=bandwidth) if bandwidth is not None else kernel
    return mmd_loo_credit(features, reference, k)


def hard_labels(probs: Tensor) -> Tensor:
    """One-hot rows of each image's most probable class, shape of ``probs`` (M, K): the "labels" features
    of the diversity reward. A row of zeros (no measurement, e.g. no person) stays all zero; ties go to the
    lower class index.

    Why: with soft class probabilities an image painted between two classes sits between two one-hot
    reference points, and the MMD credits it as partly of the rare class. With labels it counts only as
    the class it is read as, so the reward pays for images read as a rare class and nothing for drifting
    toward one. The cost: a collapsed group's identical labels give identical credits, so no signal at
    all after normalisation. Our design, not Miao et al.'s; measured on the miniature model it cost
    validity and hats (docs/rl-miniature-comparison.md)."""
    if probs.ndim != 2:
        raise SuiteError(f"hard_labels: need (M, K) probabilities, got {tuple(probs.shape)}")
    onehot = F.one_hot(probs.argmax(1), probs.shape[1]).to(probs.dtype)
    return onehot * (probs.sum(1, keepdim=True) > 0).to(probs.dtype)


def _one_hot_rows(counts: Sequence[int], smoothing: float) -> Tensor:
    k = len(counts)
    if not 0.0 <= smoothing < 1.0:
        raise SuiteError(f"reference: smoothing must be in [0, 1), got {smoothing}")
    labels = torch.repeat_interleave(torch.arange(k), torch.tensor(list(counts), dtype=torch.long))
    return F.one_hot(labels, k).double() * (1.0 - smoothing) + smoothing / k


def balanced_reference(n_classes: int, per_class: int, smoothing: float = 0.0) -> Tensor:
    """(n_classes * per_class, n_classes) float64 probability rows: per_class one-hot rows per class,
    label-smoothed as (1 - s) one_hot + s / K. Reference set for class-probability features."""
    if n_classes < 2 or per_class < 1:
        raise SuiteError(
            f"balanced_reference: need n_classes >= 2, per_class >= 1, got {n_classes}, {per_class}"
        )
    return _one_hot_rows([per_class] * n_classes, smoothing)


def reference_from_target(target: Sequence[float], n: int, smoothing: float = 0.0) -> Tensor:
    """(n, K) probability rows allocating n points to classes in proportion to ``target`` (normalised),
    rounding by the largest-remainder method (ties to the lower class index)."""
    p = torch.tensor([float(v) for v in target], dtype=torch.float64)
    if p.numel() < 2 or bool((p < 0).any()) or float(p.sum()) <= 0 or n < 2:
        raise SuiteError(
            f"reference_from_target: need >= 2 weights >= 0, sum > 0, n >= 2; got {list(target)}, {n}"
        )
    quota = p / p.sum() * n
    counts = quota.floor().long()
    order = sorted(range(len(counts)), key=lambda i: (-(float(quota[i]) - int(counts[i])), i))
    for i in order[: n - int(counts.sum())]:
        counts[i] += 1
    return _one_hot_rows(counts.tolist(), smoothing)


def _balance_score(h: Tensor, target: Tensor, mode: str) -> Tensor:
    """Score of histogram(s) h (..., K): -KL(h || target) or H(h); 0 log 0 = 0."""
    neg_entropy = torch.xlogy(h, h).sum(-1)
    if mode == "entropy":
        return -neg_entropy
    return -(neg_entropy - torch.xlogy(h, target).sum(-1))


def balance_reward(probs: Tensor, target: Tensor, mode: str = "kl") -> Tensor:
    """LOO credit of a group's soft attribute histogram h = mean_m probs_m, shape (M,).

    Group score S = -KL(h || target) (mode "kl"; target is normalised and clamped to >= 1e-12) or the
    entropy H(h) (mode "entropy", target ignored); credit_m = S(G) - S(G\\{m}), where the LOO histogram is
    h_{-m} = (M h - p_m) / (M - 1). Positive: image m moves the histogram toward the target."""
    if mode not in ("kl", "entropy"):
        raise SuiteError(f"balance_reward: unknown mode '{mode}'{did_you_mean(mode, ['kl', 'entropy'])}")
    if probs.ndim != 2 or probs.shape[0] < 2 or target.shape != (probs.shape[1],):
        raise SuiteError(
            f"balance_reward: need probs (M>=2,K), target (K,); got {probs.shape}, {target.shape}"
        )
    m = probs.shape[0]
    tgt = target.to(probs.dtype).clamp(min=0)
    tgt = (tgt / tgt.sum()).clamp(min=1e-12)
    h = probs.mean(0)
    loo = (m * h.unsqueeze(0) - probs) / (m - 1)
    return _balance_score(h, tgt, mode) - _balance_score(loo, tgt, mode)


def alignment_reward(image_emb: Tensor, text_emb: Tensor) -> Tensor:
    """Cosine similarity of each image embedding (M, d) with the text embedding (d,) or (M, d)."""
    return F.cosine_similarity(image_emb, text_emb.expand_as(image_emb), dim=-1)


def confidence_reward(probs: Sequence[Tensor]) -> Tensor:
    """The reward classifier's confidence in each image, shape (M,): min over attributes of the top class
    probability, ``c_m = min_a max_k p_a[m, k]`` (each ``p_a`` is (M, K_a) with rows summing to 1).

    The continuous counterpart of the validity gate: the soft MMD of the diversity reward credits a face
    painted between two classes (its probability row sits between two one-hot reference points), and a
    gate only acts below its threshold; this term pays for clear images at every confidence level. Our
    design, not Miao et al.'s; the confidence line it serves is that of the evaluation (Shen et al.,
    ICLR 2024, count predictions below 0.8 as unreliable). Per image, so no leave-one-out credit."""
    if not probs or any(p.ndim != 2 or p.shape[0] != probs[0].shape[0] for p in probs):
        shapes = [tuple(p.shape) for p in probs]
        raise SuiteError(f"confidence_reward: need (M, K) probabilities per attribute, got {shapes}")
    return torch.stack([p.max(1).values for p in probs]).min(0).values


def drift_penalty(emb: Tensor, base_emb: Tensor) -> Tensor:
    """1 - cos(emb_i, base_emb_i), shape (M,): distance to the base model's image from the same noise.
    Non-negative; subtract it with a weight (the registered "drift" reward is its negative)."""
    if emb.shape != base_emb.shape:
        raise SuiteError(f"drift_penalty: shapes differ: {tuple(emb.shape)} vs {tuple(base_emb.shape)}")
    return 1.0 - F.cosine_similarity(emb, base_emb, dim=-1)


def drift_reward(emb: Tensor, base_emb: Tensor) -> Tensor:
    """-drift_penalty (higher is better), the registered "drift" reward."""
    return -drift_penalty(emb, base_emb)


# The reward names a config may give, and the function each names (rl.train.compute_rewards calls them).
REWARDS: dict[str, Callable[..., Tensor]] = {
    "diversity": diversity_reward,  # (features (M,d), reference (N,d), kernel=..., bandwidth=...)
    "balance": balance_reward,  # (probs (M,K), target (K,), mode="kl" | "entropy")
    "alignment": alignment_reward,  # (image_emb (M,d), text_emb (d,) or (M,d))
    "drift": drift_reward,  # (emb (M,d), base_emb (M,d)); returns the negative distance
    "confidence": confidence_reward,  # ([probs (M,K_a) per attribute]); the top probability, min over attributes
}
