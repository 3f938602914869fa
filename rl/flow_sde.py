"""One stochastic step of a rectified-flow sampler, with the Gaussian log-density of the step (the policy
of flow-matching models: SD3/SD3.5, Flux).

Rectified flow (SD3, Flux) interpolates x_t = (1 - t) x_0 + t eps, t in [0, 1], and the denoiser predicts
the velocity v = dx_t/dt = eps - x_0; diffusers' FlowMatchEulerDiscreteScheduler integrates the ODE
dx = v dt with Euler steps over its sigma schedule t_0 = 1 > t_1 > ... > t_T = 0. That ODE has no
density. Flow-GRPO (Liu et al., "Flow-GRPO: Training Flow Matching Models via Online RL", NeurIPS 2025,
arXiv 2505.05470, eqs. 7-9 and appendix A) replaces it by the reverse-time SDE with the same marginals:
from x_t = (1 - t) x0_hat + t eps_hat and v = eps_hat - x0_hat the score is
grad log p_t(x) = -eps_hat / t = -(x + (1 - t) v) / t, and the SDE

    dx = [v + (sigma_t^2 / (2 t)) (x + (1 - t) v)] dt + sigma_t dw,    sigma_t = a sqrt(t / (1 - t))

with noise level a (Flow-GRPO uses a = 0.7), run from t = 1 to 0 (dt < 0). One Euler-Maruyama step from
t to the next sigma t' < t, with h = t - t' > 0, is the Gaussian

    mean = x + (t' - t) [v + (sigma_t^2 / (2 t)) (x + (1 - t) v)]
    std  = sigma_t sqrt(h)
    x_t' = mean + std z,   z ~ N(0, I)

With a = 0 the step is the Euler step x + (t' - t) v of the scheduler (std 0: no density, so training
needs a > 0). At t = 1 (the first sigma of every SD3 and Flux schedule) sigma_t = a sqrt(t / (1 - t)) is
infinite; as in Flow-GRPO's code the 1 - t under the root is then taken at the schedule's first sigma
below 1 (its second sigma), so the first step's std is a sqrt(1 / (1 - t_1)) sqrt(h). The final step
(t' = 0) keeps its noise, std = sigma_t sqrt(t_{T-1}), so every step has a density.

:func:`flow_sde_step` returns the step and its log-probability as the MEAN over the non-batch elements of
the Gaussian log-density (as `rl.ddim` does for DDPO, and as Flow-GRPO does), in at least float32;
:func:`flow_sde_kl` the KL between two such steps from the same x_t (same std):
||mu_1 - mu_2||^2 / (2 std^2), also as the mean over the elements (DPOK's per-step bound, as
`rl.ddim.ddim_step_kl`).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from evalsuite.errors import SuiteError

__all__ = ["flow_sde_kl", "flow_sde_moments", "flow_sde_step"]

_LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)


def _column(values: Tensor, ndim: int) -> Tensor:
    """(B,) -> (B, 1, ..., 1), broadcasting against an ndim-dimensional sample."""
    return values.reshape(values.shape[0], *([1] * (ndim - 1)))


def flow_sde_moments(sigmas: Tensor, index: Tensor, velocity: Tensor, sample: Tensor,
                     noise_level: float) -> tuple[Tensor, Tensor]:
    """Mean (B, ...) and standard deviation (B, 1, ..., 1) of the step from sigma ``sigmas[index]`` to
    ``sigmas[index + 1]`` (module docstring), in at least float32.

    Args:
        sigmas: the scheduler's sigma schedule, (T + 1,), decreasing from at most 1 to 0.
        index: (B,) the step of each sample (0 = the first, noisiest).
        velocity: the (guided) model output v, shape of ``sample``.
        sample: x_t, shape (B, ...).
        noise_level: a >= 0 (0: the deterministic Euler step, std 0).
    """
    if velocity.shape != sample.shape or sample.ndim < 2:
        raise SuiteError(f"flow_sde_step: velocity {tuple(velocity.shape)} and sample {tuple(sample.shape)} "
                         "must have one batched shape (B, ...)")
    if noise_level < 0:
        raise SuiteError(f"flow_sde_step: noise_level must be >= 0, got {noise_level}")
    dtype = torch.promote_types(sample.dtype, torch.float32)
    sigmas = sigmas.to(device=sample.device, dtype=dtype)
    index = index.to(sample.device).long().reshape(-1).expand(sample.shape[0])
    t, t_next = _column(sigmas[index], sample.ndim), _column(sigmas[index + 1], sample.ndim)
    below_one = sigmas[sigmas < 1]
    cap = below_one[0] if len(below_one) else sigmas[0]  # the first sigma below 1 stands for t = 1 under the root
    ratio = t / (1 - torch.where(t >= 1, cap, t))
    sigma_t = noise_level * ratio.sqrt()
    x, v = sample.to(dtype), velocity.to(dtype)
    drift = v + sigma_t**2 / (2 * t) * (x + (1 - t) * v)
    mean = x + (t_next - t) * drift
    return mean, sigma_t * (t - t_next).sqrt()


def flow_sde_step(sigmas: Tensor, index: Tensor, velocity: Tensor, sample: Tensor, noise_level: float,
                  prev_sample: Tensor | None = None, variance_noise: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """One SDE step x_t -> x_t'; returns ``(prev_sample, log_prob)``.

    Draws x_t' = mean + std z with ``variance_noise`` z (standard normal, shape of ``sample``), or, given
    ``prev_sample`` (training: the recorded action), scores it instead; gradients then reach only
    ``velocity``. ``log_prob`` (B,) is the mean over the non-batch elements of the Gaussian log-density
    (module docstring). The drawn sample is rounded to ``sample.dtype`` before it is scored, so scoring
    it again reproduces ``log_prob``. Needs ``noise_level`` > 0.
    """
    if noise_level <= 0:
        raise SuiteError(f"flow_sde_step: noise_level must be > 0 for a step with a density, got {noise_level}")
    mean, std = flow_sde_moments(sigmas, index, velocity, sample, noise_level)
    if prev_sample is None:
        if variance_noise is None or variance_noise.shape != sample.shape:
            raise SuiteError("flow_sde_step: give prev_sample, or variance_noise of the sample's shape")
        x_prev = (mean + std * variance_noise.to(mean.dtype)).to(sample.dtype).to(mean.dtype)
    else:
        if prev_sample.shape != sample.shape:
            raise SuiteError(f"flow_sde_step: prev_sample {tuple(prev_sample.shape)} != sample "
                             f"{tuple(sample.shape)}")
        x_prev = prev_sample.detach().to(mean.dtype)
    log_density = -((x_prev - mean) ** 2) / (2 * std**2) - torch.log(std) - _LOG_SQRT_2PI
    return x_prev.to(sample.dtype), log_density.mean(dim=tuple(range(1, sample.ndim)))


def flow_sde_kl(sigmas: Tensor, index: Tensor, velocity: Tensor, ref_velocity: Tensor, sample: Tensor,
                noise_level: float) -> Tensor:
    """KL(policy step || reference step) from the same x_t, per sample (B,): the mean over the elements of
    (mu - mu_ref)^2 / (2 std^2) (both steps share std). Gradients flow through ``velocity``; pass
    ``ref_velocity`` detached."""
    if noise_level <= 0:
        raise SuiteError(f"flow_sde_kl: noise_level must be > 0, got {noise_level}")
    mean, std = flow_sde_moments(sigmas, index, velocity, sample, noise_level)
    ref_mean, _ = flow_sde_moments(sigmas, index, ref_velocity, sample, noise_level)
    return ((mean - ref_mean) ** 2 / (2 * std**2)).mean(dim=tuple(range(1, sample.ndim)))
