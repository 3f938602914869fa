"""Reinforcement-learning fine-tuning (DDPO-style policy gradient over DDIM steps, LoRA) with set-level
diversity / balance rewards. See rl.ddim, rl.rewards and rl.advantages."""

from rl.advantages import PerPromptStatTracker, clipped_surrogate, group_zscore
from rl.ddim import ddim_step_with_logprob
from rl.rewards import (
    KERNELS,
    REWARDS,
    Kernel,
    RewardSpec,
    alignment_reward,
    balance_reward,
    balanced_reference,
    combine,
    diversity_reward,
    drift_penalty,
    drift_reward,
    get_reward,
    linear_kernel,
    median_bandwidth,
    mmd2_unbiased,
    mmd_loo_credit,
    poly3_kernel,
    rbf_kernel,
    reference_from_target,
    resolve_kernel,
)

__all__ = [
    "KERNELS",
    "REWARDS",
    "Kernel",
    "PerPromptStatTracker",
    "RewardSpec",
    "alignment_reward",
    "balance_reward",
    "balanced_reference",
    "clipped_surrogate",
    "combine",
    "ddim_step_with_logprob",
    "diversity_reward",
    "drift_penalty",
    "drift_reward",
    "get_reward",
    "group_zscore",
    "linear_kernel",
    "median_bandwidth",
    "mmd2_unbiased",
    "mmd_loo_credit",
    "poly3_kernel",
    "rbf_kernel",
    "reference_from_target",
    "resolve_kernel",
]
