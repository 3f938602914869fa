"""Set-level rewards for one prompt's group of M images, with one per-image credit each, and their registry.

Policy-gradient RL needs one scalar per trajectory, but diversity and balance are properties of a SET.
Every set reward here is turned into per-image credits by leave-one-out (LOO): the credit of image m is
how much the set's score drops when m is removed, ``credit_m = S(G) - S(G \\ {m})``; positive means the
image helps the set. Conventions: every registered reward is "higher is better"; ``drift`` is registered
as the NEGATIVE distance to the base model's same-noise image, so with its non-negative weight it acts
as a penalty.

The reward contract. A reward is registered once, with :func:`register_reward`: its name (what a config's
``rewards[i].name`` gives), its options (option -> allowed values, the first the default; what
``rl.config`` accepts), whether it needs the base model's images from the same noise, and its function.
The function takes one group's :class:`GroupInputs` and its options as keyword arguments and returns the
group's (M,) float64 credits. The trainer (`rl.train.compute_rewards`) calls each reward of weight > 0
on every group, centres the credits within their group and scales them by their pooled within-group
spread (`rl.advantages.pooled_group_scores`), then sums the scaled terms with their config weights.
Adding a reward is one decorated function in this module (or in any module imported before the config
is read).

Diversity reward (Miao et al., "Training Diffusion Models Towards Diverse Image Generation with
Reinforcement Learning", CVPR 2024). The authors never released code; this is our reconstruction
(docs/methods.md, "The set-level diversity reward"): set reward R_set(G) = -MMD^2_u(G, R) against a
reference set R, per-image LOO credit computed in closed form in O(M^2 + MN) (`rl.mmd`). The features
are the reward classifier's class probabilities or their one-hot labels (:func:`hard_labels`); the
reference is :func:`joint_reference` (:func:`balanced_reference` / :func:`reference_from_target` for one
attribute). Kernel, features and credit rule are our choices, not verified as Miao's. A fully collapsed
group (all features identical) yields identical credits, so after per-prompt normalisation it carries
no learning signal (the same section, "Why a collapsed group teaches nothing").
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from types import MappingProxyType
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor

from evalsuite.battery import AttributeSpec
from evalsuite.errors import SuiteError, did_you_mean

from .mmd import KERNELS, Kernel, mmd_loo_credit, rbf_kernel

__all__ = [
    "REFERENCE_POINTS_PER_CLASS", "REWARDS", "GroupInputs", "RewardFn", "RewardSpec", "alignment_reward",
    "balance_reward", "balanced_reference", "confidence_reward", "diversity_reward", "drift_penalty", "drift_reward",
    "hard_labels", "joint_reference", "min_cost_assignment", "quota_counts", "quota_reward", "reference_from_target",
    "register_reward", "reward_spec", "target_shares", "unregister_reward",
]

# ---------------------------------------------------------------- the contract

RewardFn = Callable[..., Tensor]
"""A reward: ``fn(group: GroupInputs, **options: str) -> (M,) float64 credits`` (higher is better)."""

F_ = TypeVar("F_", bound=RewardFn)


@dataclass(frozen=True)
class GroupInputs:
    """What a reward sees of one group: M images of one prompt at one guidance scale.

    ``probs``: per rewarded attribute (in ``attributes`` order), the reward classifier's (M, K_a) float64
    class probabilities, with all-zero rows for images it could not read; ``attributes``: the battery's
    specs of the rewarded attributes (classes, target shares); ``image_emb``: (M, d) image embeddings, as
    the embedder gives them (float32 for CLIP); ``text_emb``: (d,) the prompt's text embedding, same space;
    ``base_emb``: (M, d) embeddings of the base model's images from the same noises, or None where no
    active reward needs them; ``confidence``: (M,) float64, each image's lowest top class probability over
    the attributes (:func:`confidence_reward`), what the validity gate reads.
    """

    probs: tuple[Tensor, ...]
    attributes: tuple[AttributeSpec, ...]
    image_emb: Tensor
    text_emb: Tensor
    base_emb: Tensor | None
    confidence: Tensor

    @property
    def size(self) -> int:
        """M, the number of images of the group."""
        return int(self.confidence.shape[0])


@dataclass(frozen=True)
class RewardSpec:
    """A registered reward: its name, its options (option -> allowed values, the first the default), its
    function (:data:`RewardFn`) and whether it needs the base model's same-noise images (the trainer then
    renders them, which doubles sampling time)."""

    name: str
    options: Mapping[str, tuple[str, ...]]
    fn: RewardFn = field(compare=False)
    needs_base_images: bool = False

    @property
    def defaults(self) -> dict[str, str]:
        """Each option's default: its first allowed value."""
        return {option: allowed[0] for option, allowed in self.options.items()}

    def credits(self, group: GroupInputs, options: Mapping[str, str] | None = None) -> Tensor:
        """The group's (M,) float64 credits with `options` (over the defaults); a SuiteError names an
        unknown option or value, or a function that breaks the contract."""
        given = dict(options or {})
        for option, value in given.items():
            if option not in self.options:
                raise SuiteError(f"reward {self.name!r}: unknown option {option!r}"
                                 f"{did_you_mean(option, self.options) if self.options else '; it takes no options'}")
            if value not in self.options[option]:
                raise SuiteError(f"reward {self.name!r}: option {option}={value!r} is not allowed"
                                 f"{did_you_mean(str(value), self.options[option])}")
        values = self.fn(group, **{**self.defaults, **given})
        if not isinstance(values, Tensor) or tuple(values.shape) != (group.size,):
            shape = tuple(values.shape) if isinstance(values, Tensor) else type(values).__name__
            raise SuiteError(f"reward {self.name!r} returned {shape} for a group of {group.size} images; a reward "
                             f"returns one credit per image, shape ({group.size},)")
        return values.double()


REWARDS: dict[str, RewardSpec] = {}
"""Every registered reward by name: what a config may name and what the trainer calls."""

_RESERVED = ("name", "weight")  # keys of a config's reward entry besides the options


def register_reward(name: str, *, needs_base_images: bool = False,
                    **options: Sequence[str]) -> Callable[[F_], F_]:
    """Decorator that registers ``fn`` as the reward ``name`` with its ``options`` (option -> allowed
    values, the first the default) and returns ``fn`` unchanged.

    A name that is taken by another function, an option named ``name`` or ``weight``, or an option
    without allowed values (or with repeated or non-str ones) raises ValueError (a programming error);
    registering the same function again (e.g. after ``importlib.reload``) replaces the entry.
    """
    checked: dict[str, tuple[str, ...]] = {}
    for option, allowed in options.items():
        values = tuple(allowed)
        if option in _RESERVED or not values or len(set(values)) != len(values) \
                or not all(isinstance(v, str) and v for v in values):
            raise ValueError(f"register_reward({name!r}): option {option!r} needs unique non-empty str values, "
                             f"and may not be called {' or '.join(_RESERVED)}; got {values!r}")
        checked[option] = values

    def record(fn: F_) -> F_:
        old = REWARDS.get(name)
        if old is not None and _origin(old.fn) != _origin(fn):
            raise ValueError(f"register_reward: {name!r} is already registered to {_origin(old.fn)}")
        REWARDS[name] = RewardSpec(name, MappingProxyType(checked), fn, needs_base_images)
        return fn
    return record


def unregister_reward(name: str) -> RewardSpec:
    """Remove the reward ``name`` from the registry and return it (KeyError if it is not registered)."""
    return REWARDS.pop(name)


def reward_spec(name: str) -> RewardSpec:
    """The registered reward ``name``; SuiteError "unknown reward ... (did you mean ...)" otherwise."""
    if name not in REWARDS:
        raise SuiteError(f"unknown reward {name!r}{did_you_mean(name, REWARDS)}")
    return REWARDS[name]


def _origin(fn: Callable[..., object]) -> tuple[str, str]:
    return (getattr(fn, "__module__", ""), getattr(fn, "__qualname__", repr(fn)))


# ---------------------------------------------------------------- the maths of each reward


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
    validity and hats (docs/notes/rl-miniature-comparison.md)."""
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


def quota_counts(target: Sequence[float], n: int) -> list[int]:
    """n points allocated to classes in proportion to ``target`` (normalised): the largest-remainder
    method (Hamilton's), ties to the lower class index. The counts sum to n."""
    p = torch.tensor([float(v) for v in target], dtype=torch.float64)
    if p.numel() < 2 or bool((p < 0).any()) or float(p.sum()) <= 0 or n < 0:
        raise SuiteError(f"quota_counts: need >= 2 weights >= 0, sum > 0, n >= 0; got {list(target)}, {n}")
    quota = p / p.sum() * n
    counts = quota.floor().long()
    order = sorted(range(len(counts)), key=lambda i: (-(float(quota[i]) - int(counts[i])), i))
    for i in order[: n - int(counts.sum())]:
        counts[i] += 1
    return [int(c) for c in counts]


def reference_from_target(target: Sequence[float], n: int, smoothing: float = 0.0) -> Tensor:
    """(n, K) probability rows allocating n points to classes in proportion to ``target`` (normalised),
    rounded by :func:`quota_counts`."""
    if n < 2:
        raise SuiteError(f"reference_from_target: need n >= 2; got {n}")
    return _one_hot_rows(quota_counts(target, n), smoothing)


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


def min_cost_assignment(cost: Tensor) -> Tensor:
    """The assignment of rows to columns of a square (n, n) cost matrix with the least total cost: (n,)
    long, the column of each row. The Hungarian method in its shortest-augmenting-path form (Kuhn 1955,
    Munkres 1957; O(n^3)), with dual potentials u, v kept so that cost[i, j] - u[i] - v[j] >= 0."""
    if cost.ndim != 2 or cost.shape[0] != cost.shape[1]:
        raise SuiteError(f"min_cost_assignment: need a square cost matrix, got {tuple(cost.shape)}")
    n = cost.shape[0]
    a = torch.zeros(n + 1, n + 1, dtype=torch.float64)
    a[1:, 1:] = cost.double()  # 1-based rows and columns; column 0 is the virtual start
    u, v = torch.zeros(n + 1, dtype=torch.float64), torch.zeros(n + 1, dtype=torch.float64)
    owner = [0] * (n + 1)  # owner[j]: the row assigned to column j (0: none)
    for i in range(1, n + 1):
        owner[0], j0 = i, 0
        slack = torch.full((n + 1,), math.inf, dtype=torch.float64)
        came_from = [0] * (n + 1)
        used = torch.zeros(n + 1, dtype=torch.bool)
        while owner[j0] != 0:
            used[j0] = True
            i0 = owner[j0]
            reduced = a[i0] - u[i0] - v
            better = ~used & (reduced < slack)
            slack = torch.where(better, reduced, slack)
            for j in better.nonzero().flatten().tolist():
                came_from[j] = j0
            free = torch.where(used, torch.full_like(slack, math.inf), slack)
            free[0] = math.inf
            j1 = int(free.argmin())
            delta = float(free[j1])
            for j in used.nonzero().flatten().tolist():
                u[owner[j]] += delta
            v[used] -= delta
            slack[~used] -= delta
            j0 = j1
        while j0:  # flip the augmenting path
            j1 = came_from[j0]
            owner[j0] = owner[j1]
            j0 = j1
    column = torch.zeros(n, dtype=torch.long)
    for j in range(1, n + 1):
        column[owner[j] - 1] = j - 1
    return column


QUOTA_FLOOR = 1e-6
"""Probabilities are read as max(p, QUOTA_FLOOR) in the quota reward, so log p stays finite (>= -13.8)."""


def quota_reward(probs: Tensor, target: Tensor, baseline: str = "slot") -> Tensor:
    """Per-image distribution reward of one group for one attribute, shape (M,): each image's
    log-probability of the class it is assigned to when the group is matched to the target's quotas.

    After Shen et al.'s distributional alignment (ICLR 2024), which matches generated images to a
    target distribution by optimal transport and trains each image toward its matched class, and the
    per-image log-ratio rewards of HoloFair's Fair-GRPO (ICML 2026). The images the classifier read (rows
    that are not all zero) get quotas q_k, their count M' split by ``target`` (:func:`quota_counts`); the
    assignment a minimises sum_m -log p[m, a(m)] with exactly q_k images in class k
    (:func:`min_cost_assignment` on the classes repeated q_k times); image m earns
    r_m = log max(p[m, a(m)], QUOTA_FLOOR).

    Properties: at balance each image is matched to its own class and earns its log-confidence, so a
    clean face outscores an ambiguous one; in a collapsed group the quota sends most images to rarer
    classes, where each earns more the more probability its face gives that class, so the group still
    ranks its images (unlike hard labels, or a log-ratio of the group's class shares, which is 0 at
    balance). ``baseline``: ``slot`` subtracts from each r_m the mean of the images matched to the same
    class, so an image is compared with those asked to be the same class (a majority face matched to the
    majority's one slot in four does not outscore every face matched to a rare class, which would
    reinforce the majority); ``group`` leaves r_m as it is (the trainer centres it within the group).
    Unread images get the lowest value of the group (the validity gate rules them out anyway). Ours, as
    a reward for policy-gradient RL; the matching is Shen et al.'s."""
    if baseline not in ("slot", "group"):
        raise SuiteError(f"quota_reward: unknown baseline {baseline!r}{did_you_mean(baseline, ('slot', 'group'))}")
    if probs.ndim != 2 or target.shape != (probs.shape[1],):
        raise SuiteError(f"quota_reward: need probs (M, K), target (K,); got {tuple(probs.shape)}, "
                         f"{tuple(target.shape)}")
    read = probs.sum(1) > 0
    out = torch.full((probs.shape[0],), math.log(QUOTA_FLOOR), dtype=torch.float64)
    if not bool(read.any()):
        return out
    logp = probs[read].double().clamp(min=QUOTA_FLOOR).log()
    slots = torch.repeat_interleave(torch.arange(probs.shape[1]), torch.tensor(quota_counts(target.tolist(),
                                                                                           int(read.sum()))))
    assigned = slots[min_cost_assignment(-logp[:, slots])]  # the class each read image is matched to
    value = logp.gather(1, assigned[:, None]).squeeze(1)
    if baseline == "slot":
        for k in assigned.unique():
            value[assigned == k] -= value[assigned == k].mean()
    out[read] = value
    out[~read] = float(value.min())
    return out


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
    """-drift_penalty (higher is better), the credit of the "drift" reward."""
    return -drift_penalty(emb, base_emb)



def target_shares(attribute: AttributeSpec, reference: str) -> Tensor:
    """(K,) float64 class shares to aim at for one attribute: ``uniform`` (1/K each) or ``target`` (the
    battery's target distribution)."""
    if reference not in ("uniform", "target"):
        hint = did_you_mean(reference, ("uniform", "target"))
        raise SuiteError(f"target_shares: unknown reference {reference!r}{hint}")
    k = len(attribute.classes)
    if reference == "uniform":
        return torch.full((k,), 1.0 / k, dtype=torch.float64)
    return torch.tensor(attribute.target).double()


def joint_reference(attributes: Sequence[AttributeSpec], reference: str, n: int) -> Tensor:
    """The diversity reward's reference set: n points, each the one-hot class vectors of every attribute
    concatenated (shape (n, sum K_a)), drawn in proportion to the joint target, the product of the
    per-attribute :func:`target_shares` (rounded by :func:`reference_from_target`)."""
    targets = [target_shares(a, reference) for a in attributes]
    joint = targets[0]
    for t in targets[1:]:
        joint = torch.outer(joint, t).flatten()
    rows = reference_from_target(joint.tolist(), n)  # (n, prod K) one-hot over joint classes
    sizes = [len(a.classes) for a in attributes]
    decode = torch.zeros(int(math.prod(sizes)), sum(sizes), dtype=torch.float64)
    for j in range(decode.shape[0]):  # joint class j -> its class per attribute, first attribute most significant
        rem, offset, digits = j, 0, []
        for size in reversed(sizes):
            digits.append(rem % size)
            rem //= size
        for size, d in zip(sizes, reversed(digits)):
            decode[j, offset + d] = 1.0
            offset += size
    return rows.double() @ decode


# ---------------------------------------------------------------- the registered rewards

REFERENCE_POINTS_PER_CLASS = 16
"""Reference points of the diversity reward per class of the rewarded attribute with the most classes."""


@register_reward("diversity", kernel=tuple(KERNELS), features=("probs", "labels"), reference=("uniform", "target"))
def diversity_term(group: GroupInputs, *, kernel: str, features: str, reference: str) -> Tensor:
    """:func:`diversity_reward` of the group's features against :func:`joint_reference`.

    features: ``probs``, the class probabilities concatenated over the attributes, or ``labels``, their
    one-hot :func:`hard_labels` (an image painted between two classes then counts only as the class it is
    read as). reference: ``uniform`` (balanced over the classes) or ``target`` (the battery's target)."""
    rows = [hard_labels(p) for p in group.probs] if features == "labels" else list(group.probs)
    n = REFERENCE_POINTS_PER_CLASS * max(len(a.classes) for a in group.attributes)
    ref = joint_reference(group.attributes, reference, n)
    return diversity_reward(torch.cat(rows, 1).double(), ref, kernel=kernel).double()


@register_reward("balance", mode=("kl", "entropy"), reference=("uniform", "target"))
def balance_term(group: GroupInputs, *, mode: str, reference: str) -> Tensor:
    """:func:`balance_reward` summed over the attributes: mode ``kl`` (-KL of the group's histogram to
    the reference shares) or ``entropy``; reference ``uniform`` or ``target`` (:func:`target_shares`)."""
    total = torch.zeros(group.size, dtype=torch.float64)
    for attribute, probs in zip(group.attributes, group.probs, strict=True):
        total = total + balance_reward(probs.double(), target_shares(attribute, reference), mode=mode)
    return total


@register_reward("quota", baseline=("slot", "group"), reference=("uniform", "target"))
def quota_term(group: GroupInputs, *, baseline: str, reference: str) -> Tensor:
    """:func:`quota_reward` summed over the attributes: each image's log-probability of the class the
    target's quotas match it to. baseline: ``slot`` (centred among the images matched to the same class)
    or ``group``; reference: ``uniform`` or ``target`` (:func:`target_shares`)."""
    total = torch.zeros(group.size, dtype=torch.float64)
    for attribute, probs in zip(group.attributes, group.probs, strict=True):
        total = total + quota_reward(probs.double(), target_shares(attribute, reference), baseline=baseline)
    return total


@register_reward("alignment")
def alignment_term(group: GroupInputs) -> Tensor:
    """:func:`alignment_reward` of the images to their prompt (penalises drifting off-prompt)."""
    return alignment_reward(group.image_emb, group.text_emb).double()


@register_reward("drift", needs_base_images=True, features=("embedding",))
def drift_term(group: GroupInputs, *, features: str) -> Tensor:
    """:func:`drift_reward`: minus the embedding distance to the base model's image from the same noise.
    features: ``embedding`` (the image embedder's), the only one built."""
    if group.base_emb is None:
        raise SuiteError("reward 'drift' needs the base model's images from the same noise; none were rendered")
    return drift_reward(group.image_emb, group.base_emb).double()


@register_reward("confidence")
def confidence_term(group: GroupInputs) -> Tensor:
    """The reward classifier's confidence in each image (:func:`confidence_reward`)."""
    return group.confidence.double()
