"""Advantage normalisation and the PPO clipped surrogate used by DDPO_IS.

* :class:`PerPromptStatTracker`: DDPO's per-prompt normalisation (Black et al., ICLR 2024;
  ``ddpo_pytorch/stat_tracking.py``; docs/methods.md, "Advantages and the PPO update"). Each prompt
  keeps a deque of its last ``buffer_size`` rewards; after adding the current batch,
  A = (r - mean) / (std + 1e-6) with the prompt's buffer statistics once it holds >= ``min_count``
  values, else with the whole batch's.
* :func:`group_zscore`: GRPO-style within-group z-scores (Shao et al., 2024).
* :func:`pooled_group_scores`: rewards centred within their group and scaled by the batch's pooled
  within-group spread (ours; see its docstring for why set-level rewards need it).
* :func:`clipped_surrogate`: PPO's clipped objective (Schulman et al., 2017) with DDPO's advantage clip
  and diagnostics.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from evalsuite.errors import SuiteError

__all__ = ["PerPromptStatTracker", "clipped_surrogate", "group_zscore", "pooled_group_scores"]


class PerPromptStatTracker:
    """Per-prompt running reward statistics (DDPO's rule); see the module docstring."""

    def __init__(self, buffer_size: int, min_count: int):
        if buffer_size < 1 or min_count < 1 or min_count > buffer_size:
            raise SuiteError(
                f"PerPromptStatTracker: need 1 <= min_count <= buffer_size, got buffer_size={buffer_size}, "
                f"min_count={min_count}"
            )
        self.buffer_size = int(buffer_size)
        self.min_count = int(min_count)
        self.buffers: dict[str, deque[float]] = {}

    def update(self, prompts: Sequence[str], rewards: np.ndarray) -> np.ndarray:
        """Add this batch's rewards to the per-prompt buffers; return float64 advantages of shape (B,)."""
        r = np.asarray(rewards, dtype=np.float64)
        if r.ndim != 1 or r.shape[0] != len(prompts) or r.shape[0] == 0:
            raise SuiteError(
                f"PerPromptStatTracker.update: need one reward per prompt, got {len(prompts)} prompts and "
                f"rewards of shape {r.shape}"
            )
        names = np.asarray(list(prompts), dtype=object)
        batch_mean, batch_std = float(r.mean()), float(r.std())
        advantages = np.empty_like(r)
        for prompt in dict.fromkeys(prompts):  # unique, first-seen order
            mask = names == prompt
            buffer = self.buffers.setdefault(prompt, deque(maxlen=self.buffer_size))
            buffer.extend(float(v) for v in r[mask])
            if len(buffer) < self.min_count:
                mean, std = batch_mean, batch_std
            else:
                mean, std = float(np.mean(buffer)), float(np.std(buffer))
            advantages[mask] = (r[mask] - mean) / (std + 1e-6)
        return advantages

    def stats(self) -> dict[str, dict[str, float]]:
        """Per prompt: count, mean and std of its buffer (for logging)."""
        return {
            p: {"count": float(len(b)), "mean": float(np.mean(b)), "std": float(np.std(b))}
            for p, b in self.buffers.items()
            if len(b) > 0
        }

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable state (plain ints, floats, lists) for exact resume."""
        return {
            "buffer_size": self.buffer_size,
            "min_count": self.min_count,
            "buffers": {p: [float(v) for v in b] for p, b in self.buffers.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from :meth:`state_dict` output (settings included)."""
        try:
            buffer_size, min_count = int(state["buffer_size"]), int(state["min_count"])
            buffers = {str(p): [float(v) for v in vals] for p, vals in state["buffers"].items()}
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise SuiteError(f"PerPromptStatTracker.load_state_dict: malformed state ({err!r})") from err
        fresh = PerPromptStatTracker(buffer_size, min_count)  # validates the settings
        self.buffer_size, self.min_count = fresh.buffer_size, fresh.min_count
        self.buffers = {p: deque(vals, maxlen=buffer_size) for p, vals in buffers.items()}


def _group_centred(rewards: Tensor, group_ids: Tensor, name: str) -> tuple[Tensor, Tensor, Tensor]:
    """(r - group mean, inverse group index, group sizes) for rewards and integer group ids of shape (B,)."""
    if rewards.ndim != 1 or group_ids.shape != rewards.shape:
        raise SuiteError(
            f"{name}: need rewards (B,) and group_ids (B,), got {tuple(rewards.shape)} and "
            f"{tuple(group_ids.shape)}"
        )
    _, inverse, counts = torch.unique(group_ids, return_inverse=True, return_counts=True)
    n = counts.to(rewards.dtype)
    sums = torch.zeros(n.shape, dtype=rewards.dtype, device=rewards.device).index_add(0, inverse, rewards)
    return rewards - (sums / n)[inverse], inverse, n


def pooled_group_scores(rewards: Tensor, group_ids: Tensor, eps: float = 1e-8) -> Tensor:
    """(r - group mean) / s, with s = sqrt(sum of all squared deviations from the group means / B), the
    batch's pooled within-group standard deviation; all zeros if s <= eps.

    Why not per-group z-scores: a set-level reward of a fully collapsed group (every image the same
    class) differs between images only by rounding-sized amounts. Dividing by that group's own tiny
    standard deviation blows these up to advantages of size 1, a random signal that pushes the policy
    toward whatever makes the classifier slightly less sure (degraded images). With the pooled scale a
    collapsed group gets advantages near 0, and a group that holds a few minority images passes their
    credit on at full strength. Groups are still centred on their own mean, so set rewards are only
    compared inside their group."""
    centred, _, _ = _group_centred(rewards, group_ids, "pooled_group_scores")
    pooled = float((centred**2).mean().sqrt())
    return centred / pooled if pooled > eps else torch.zeros_like(centred)


def group_zscore(rewards: Tensor, group_ids: Tensor, eps: float = 1e-8) -> Tensor:
    """(r - group mean) / group std within each group (population std); groups with std <= eps get 0.

    ``rewards`` and ``group_ids`` (integer labels) have shape (B,)."""
    centred, inverse, n = _group_centred(rewards, group_ids, "group_zscore")
    var = torch.zeros_like(n).index_add(0, inverse, centred**2) / n
    std = var.sqrt()[inverse]
    safe = torch.where(std > eps, std, torch.ones_like(std))
    return torch.where(std > eps, centred / safe, torch.zeros_like(centred))


def clipped_surrogate(
    log_prob: Tensor, old_log_prob: Tensor, advantages: Tensor, clip_range: float, adv_clip: float
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO clipped loss mean(max(-A rho, -A clip(rho, 1 - eps, 1 + eps))), rho = exp(logp - old_logp).

    A is clipped to [-adv_clip, adv_clip]; ``old_log_prob`` and ``advantages`` are detached. Diagnostics
    (detached): ``approx_kl`` = 0.5 mean((logp - old_logp)^2), ``clipfrac`` = mean(|rho - 1| > eps)."""
    if clip_range <= 0 or adv_clip <= 0:
        raise SuiteError(
            f"clipped_surrogate: need clip_range > 0 and adv_clip > 0, got {clip_range}, {adv_clip}"
        )
    if log_prob.shape != old_log_prob.shape:
        raise SuiteError(
            f"clipped_surrogate: log_prob {tuple(log_prob.shape)} and old_log_prob "
            f"{tuple(old_log_prob.shape)} differ in shape"
        )
    adv = advantages.detach().to(log_prob.dtype).clamp(-adv_clip, adv_clip)
    delta = log_prob - old_log_prob.detach()
    ratio = torch.exp(delta)
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1.0 - clip_range, 1.0 + clip_range)
    loss = torch.maximum(unclipped, clipped).mean()
    diagnostics = {
        "approx_kl": 0.5 * (delta.detach() ** 2).mean(),
        "clipfrac": ((ratio.detach() - 1.0).abs() > clip_range).to(log_prob.dtype).mean(),
    }
    return loss, diagnostics
