"""Reinforcement-learning fine-tuning (DDPO-style policy gradient over the sampler's steps, LoRA) with
distribution rewards (the per-image quota reward, the set-level diversity and balance rewards), for SD
1.x/2.x, SDXL, SD3/SD3.5 and Flux.

The recipe is `rl.train`; its parts: `rl.config` (YAML config), `rl.policy` (the policy interface the
recipe drives) with `rl.families` (which pipeline classes it trains, `policy_for`), `rl.unet_policy`,
`rl.sampling` and `rl.ddim` (stochastic DDIM for UNet models), `rl.flow_policy` and `rl.flow_sde` (the
flow SDE for SD3 and Flux), `rl.rewards` (the reward registry, the per-image quota reward and the set-level
rewards with leave-one-out credit; their MMD maths in `rl.mmd`), `rl.advantages` (normalisation and the
PPO surrogate), `rl.lora` (adapters and their export), `rl.checkpoint` (exact resume)."""

from rl.advantages import PerPromptStatTracker, clipped_surrogate, group_zscore, pooled_group_scores
from rl.checkpoint import (
    capture_rng,
    latest_checkpoint,
    load_checkpoint,
    load_process_state,
    restore_rng,
    save_checkpoint,
)
from rl.config import (
    EvaluationConfig,
    LoraConfigSpec,
    RewardConfig,
    SamplingConfig,
    TrainConfig,
    TrainingConfig,
    config_from_dict,
    load_config,
    with_reward,
)
from rl.ddim import ddim_step_kl, ddim_step_with_logprob
from rl.families import TRAINABLE, TrainableFamily, policy_for, trainable_problems
from rl.flow_policy import FlowPolicy
from rl.flow_sde import flow_sde_kl, flow_sde_moments, flow_sde_step
from rl.lora import add_lora, cast_frozen, kohya_key, kohya_state_dict, load_kohya, lora_named_parameters, save_adapter
from rl.mmd import (
    KERNELS,
    Kernel,
    linear_kernel,
    median_bandwidth,
    mmd2_unbiased,
    mmd_loo_credit,
    poly3_kernel,
    rbf_kernel,
    resolve_kernel,
)
from rl.policy import Conditioning, Policy, Trajectories
from rl.rewards import (
    REWARDS,
    GroupInputs,
    RewardFn,
    RewardSpec,
    alignment_reward,
    balance_reward,
    balanced_reference,
    confidence_reward,
    diversity_reward,
    drift_penalty,
    drift_reward,
    hard_labels,
    joint_reference,
    min_cost_assignment,
    quota_counts,
    quota_reward,
    reference_from_target,
    register_reward,
    reward_spec,
    target_shares,
    unregister_reward,
)
from rl.sampling import SDPipeline
from rl.unet_policy import UNetPolicy

__all__ = [
    "EvaluationConfig", "LoraConfigSpec", "RewardConfig", "SamplingConfig", "TrainConfig",
    "TrainingConfig", "add_lora", "capture_rng", "cast_frozen", "config_from_dict", "kohya_key", "kohya_state_dict",
    "latest_checkpoint", "load_checkpoint", "load_config", "load_kohya", "load_process_state", "lora_named_parameters",
    "restore_rng",
    "save_adapter", "save_checkpoint", "with_reward",
    "TRAINABLE", "Conditioning", "FlowPolicy", "Policy", "TrainableFamily", "Trajectories", "UNetPolicy",
    "flow_sde_kl", "flow_sde_moments", "flow_sde_step", "policy_for", "trainable_problems",
    "KERNELS",
    "REWARDS",
    "GroupInputs",
    "Kernel",
    "PerPromptStatTracker",
    "RewardFn",
    "RewardSpec",
    "SDPipeline",
    "alignment_reward",
    "balance_reward",
    "balanced_reference",
    "clipped_surrogate",
    "confidence_reward",
    "ddim_step_kl",
    "ddim_step_with_logprob",
    "diversity_reward",
    "drift_penalty",
    "drift_reward",
    "group_zscore",
    "hard_labels",
    "joint_reference",
    "min_cost_assignment",
    "quota_counts",
    "quota_reward",
    "linear_kernel",
    "median_bandwidth",
    "mmd2_unbiased",
    "mmd_loo_credit",
    "poly3_kernel",
    "pooled_group_scores",
    "rbf_kernel",
    "reference_from_target",
    "register_reward",
    "resolve_kernel",
    "reward_spec",
    "target_shares",
    "unregister_reward",
]
