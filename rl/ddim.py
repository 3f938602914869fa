"""One stochastic DDIM step with the Gaussian log-density of the step (the DDPO policy).

The reverse step x_t -> x_{t'} (t' = t - num_train_timesteps // num_inference_steps) of DDIM
(Song et al., ICLR 2021, eqs. 12 and 16) is Gaussian. From the model output m, by the scheduler's
``prediction_type``:

    epsilon:       eps = m,                                    x0_hat = (x_t - sqrt(1 - a_t) eps) / sqrt(a_t)
    v_prediction:  eps = sqrt(a_t) m + sqrt(1 - a_t) x_t,      x0_hat = sqrt(a_t) x_t - sqrt(1 - a_t) m
    sample:        x0_hat = m,                                 eps = (x_t - sqrt(a_t) x0_hat) / sqrt(1 - a_t)

(v = sqrt(a_t) eps - sqrt(1 - a_t) x0: Salimans & Ho, "Progressive Distillation", ICLR 2022, used by
SD 2.x at 768 px); x0_hat is optionally clipped, and then

    sigma  = eta * sqrt((1 - a_t') / (1 - a_t) * (1 - a_t / a_t'))
    mu     = sqrt(a_t') x0_hat + sqrt(1 - a_t' - sigma^2) eps
    x_t'   = mu + sigma z,   z ~ N(0, I)

with a_t the cumulative product of alphas (``scheduler.alphas_cumprod``) and a_t' replaced by
``scheduler.final_alpha_cumprod`` when t' < 0. sigma^2 <= 1 - a_t' for every eta <= 1 (as a_t' <= 1);
an eta > 1 that makes sigma^2 exceed 1 - a_t' raises ValueError (the square root in mu has no value).
DDPO (Black et al., ICLR 2024) treats this kernel as the policy pi(x_t' | x_t, c) and uses the MEAN over
all non-batch dimensions of its log-density as log-prob (docs/methods.md, "The denoising MDP and its
step log-probability"), which is what :func:`ddim_step_with_logprob` returns.

Timesteps may differ per sample (a tensor of shape (B,)), which lets a trainer evaluate a shuffled
batch of (sample, timestep) pairs in one UNet call.

:func:`ddim_step_kl` is the KL divergence between two such steps from the same x_t, e.g. the tuned and
the base model's. Both have the same sigma, so (Fan et al., "DPOK: Reinforcement Learning for
Fine-tuning Text-to-Image Diffusion Models", NeurIPS 2023, who bound the KL between the two models'
image distributions by the sum over steps of these per-step terms, each summed over the elements)

    KL(N(mu_1, sigma^2 I) || N(mu_2, sigma^2 I)) = ||mu_1 - mu_2||^2 / (2 sigma^2),

returned, like the log-probability, as the MEAN over the non-batch dimensions (the sum divided by
their number).
"""

from __future__ import annotations

import math

import torch
from diffusers.schedulers.scheduling_ddim import DDIMScheduler
from diffusers.utils.torch_utils import randn_tensor
from torch import Tensor

from evalsuite.errors import SuiteError

__all__ = ["ddim_step_kl", "ddim_step_with_logprob"]

_LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def _per_sample(values: Tensor, ndim: int) -> Tensor:
    """Reshape a (B,) tensor to (B, 1, ..., 1) so that it broadcasts against an ndim-dimensional sample."""
    return values.reshape(values.shape[0], *([1] * (ndim - 1)))


def _check_config(scheduler: DDIMScheduler, eta: float, who: str) -> int:
    if eta <= 0:
        raise SuiteError(
            f"{who}: eta must be > 0 (got {eta}); with eta = 0 the DDIM step is deterministic "
            "and has no log-density (DDPO uses eta = 1.0)"
        )
    config = scheduler.config
    if config["prediction_type"] not in PREDICTION_TYPES:
        raise SuiteError(
            f"{who}: prediction_type '{config['prediction_type']}' is not supported; "
            f"allowed: {', '.join(PREDICTION_TYPES)}"
        )
    if config.get("thresholding", False):
        raise SuiteError(
            f"{who}: dynamic thresholding is not supported; set thresholding=False "
            "(clip_sample with clip_sample_range is supported)"
        )
    if scheduler.num_inference_steps is None:
        raise SuiteError(f"{who}: call scheduler.set_timesteps(n) before stepping")
    return int(config["num_train_timesteps"]) // int(scheduler.num_inference_steps)


def _step_moments(scheduler: DDIMScheduler, noise_pred: Tensor, timestep: int | Tensor, sample: Tensor,
                  eta: float, who: str) -> tuple[Tensor, Tensor]:
    """Mean (B, ...) and standard deviation (B, 1, ..., 1) of the step's Gaussian, in at least float32."""
    step = _check_config(scheduler, eta, who)
    if noise_pred.shape != sample.shape:
        raise SuiteError(
            f"{who}: noise_pred shape {tuple(noise_pred.shape)} != sample shape "
            f"{tuple(sample.shape)}"
        )
    if sample.ndim < 2:
        raise SuiteError(
            f"{who}: sample must be batched (B, ...), got {tuple(sample.shape)}"
        )
    batch, device = sample.shape[0], sample.device
    dtype = torch.promote_types(sample.dtype, torch.float32)

    t = torch.as_tensor(timestep, device=device).long().reshape(-1)
    if t.numel() == 1:
        t = t.expand(batch)
    if t.shape != (batch,):
        raise SuiteError(
            f"{who}: timestep must be a scalar or shape ({batch},), got {tuple(t.shape)}"
        )
    n_train = int(scheduler.config["num_train_timesteps"])
    if bool(((t < 0) | (t >= n_train)).any()):
        raise SuiteError(f"{who}: timesteps must lie in [0, {n_train}), got {t.tolist()}")
    prev_t = t - step

    alphas = scheduler.alphas_cumprod.to(device=device, dtype=dtype)
    final = torch.as_tensor(scheduler.final_alpha_cumprod, device=device, dtype=dtype)
    alpha_t = _per_sample(alphas[t], sample.ndim)
    alpha_prev = _per_sample(torch.where(prev_t >= 0, alphas[prev_t.clamp(min=0)], final), sample.ndim)
    beta_t = 1 - alpha_t
    beta_prev = 1 - alpha_prev

    x_t = sample.to(dtype)
    out = noise_pred.to(dtype)
    kind = scheduler.config["prediction_type"]
    if kind == "epsilon":
        eps = out
        pred_x0 = (x_t - beta_t**0.5 * eps) / alpha_t**0.5
    elif kind == "v_prediction":
        eps = alpha_t**0.5 * out + beta_t**0.5 * x_t
        pred_x0 = alpha_t**0.5 * x_t - beta_t**0.5 * out
    else:
        pred_x0 = out
        eps = (x_t - alpha_t**0.5 * pred_x0) / beta_t**0.5
    if scheduler.config["clip_sample"]:
        bound = float(scheduler.config["clip_sample_range"])
        pred_x0 = pred_x0.clamp(-bound, bound)

    variance = (beta_prev / beta_t) * (1 - alpha_t / alpha_prev)
    std = eta * variance**0.5
    # sigma^2 <= 1 - a_t' holds for every eta <= 1 (as a_t' <= 1), so only eta > 1 is checked (the
    # check synchronises with the device); the clamp absorbs rounding at eta = 1 when a_t is ~0
    if eta > 1 and bool((std**2 > beta_prev).any()):
        i = int((std**2 - beta_prev).flatten().argmax())
        raise ValueError(
            f"{who}: eta {eta:g} gives a step variance sigma^2 = {float(std.flatten()[i] ** 2):.6g} above "
            f"1 - a_t' = {float(beta_prev.flatten()[i]):.6g} at timestep {int(t[i])}; DDIM needs eta in (0, 1]"
        )
    direction = (1 - alpha_prev - std**2).clamp(min=0) ** 0.5 * eps
    mean = alpha_prev**0.5 * pred_x0 + direction

    return mean, std


def ddim_step_with_logprob(
    scheduler: DDIMScheduler,
    noise_pred: Tensor,
    timestep: int | Tensor,
    sample: Tensor,
    eta: float,
    prev_sample: Tensor | None = None,
    generator: torch.Generator | None = None,
    variance_noise: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """One DDIM step x_t -> x_{t-1}; returns ``(prev_sample, log_prob)``.

    Args:
        scheduler: a ``DDIMScheduler`` after ``set_timesteps``; its ``prediction_type`` (epsilon,
            v_prediction or sample) says what ``noise_pred`` is. ``clip_sample`` (with
            ``clip_sample_range``) is honoured, thresholding is refused.
        noise_pred: the (guided) model output, same shape as ``sample`` (B, ...).
        timestep: the current timestep t, an int, a 0-d tensor or a (B,) tensor of per-sample timesteps.
        sample: x_t, shape (B, ...).
        eta: DDIM eta, in (0, 1] (sigma = 0 has no density; a larger eta whose sigma^2 exceeds 1 - a_t'
            raises ValueError).
        prev_sample: if given, x_{t-1} is not sampled; its log-prob under the step is computed instead
            (training: the stored action). It is detached, so gradients reach only ``noise_pred``.
        generator: RNG for the step noise (mutually exclusive with ``variance_noise``).
        variance_noise: the standard-normal z to use instead of drawing one.

    Returns:
        ``prev_sample`` (dtype of ``sample``) and ``log_prob`` of shape (B,): the mean over all non-batch
        dimensions of the elementwise Gaussian log-density, computed in at least float32.
    """
    if variance_noise is not None and generator is not None:
        raise SuiteError("ddim_step_with_logprob: pass either generator or variance_noise, not both")
    mean, std = _step_moments(scheduler, noise_pred, timestep, sample, eta, "ddim_step_with_logprob")
    dtype = mean.dtype

    if prev_sample is None:
        if variance_noise is None:
            variance_noise = randn_tensor(
                sample.shape, generator=generator, device=sample.device, dtype=sample.dtype
            )
        if variance_noise.shape != sample.shape:
            raise SuiteError(
                f"ddim_step_with_logprob: variance_noise shape {tuple(variance_noise.shape)} != sample shape "
                f"{tuple(sample.shape)}"
            )
        # round to the sample dtype first, so that re-scoring the returned sample reproduces log_prob
        x_prev = (mean + std * variance_noise.to(dtype)).to(sample.dtype).to(dtype)
    else:
        if prev_sample.shape != sample.shape:
            raise SuiteError(
                f"ddim_step_with_logprob: prev_sample shape {tuple(prev_sample.shape)} != sample shape "
                f"{tuple(sample.shape)}"
            )
        x_prev = prev_sample.detach().to(dtype)

    log_density = -((x_prev.detach() - mean) ** 2) / (2 * std**2) - torch.log(std) - _LOG_SQRT_2PI
    log_prob = log_density.mean(dim=tuple(range(1, sample.ndim)))
    return x_prev.to(sample.dtype), log_prob


def ddim_step_kl(scheduler: DDIMScheduler, noise_pred: Tensor, ref_pred: Tensor, timestep: int | Tensor,
                 sample: Tensor, eta: float) -> Tensor:
    """KL(policy step || reference step) from the same x_t, per sample: shape (B,), float32 or wider.

    ``noise_pred`` and ``ref_pred`` are two models' (guided) outputs at ``sample`` = x_t, e.g. the tuned and
    the base model's; the other arguments are as in :func:`ddim_step_with_logprob`. The value is
    ``mean((mu - mu_ref)^2) / (2 sigma^2)`` over the non-batch dimensions (module docstring; DPOK, Fan et
    al. 2023). Gradients flow through ``noise_pred``; pass ``ref_pred`` detached.
    """
    mean, std = _step_moments(scheduler, noise_pred, timestep, sample, eta, "ddim_step_kl")
    ref_mean, _ = _step_moments(scheduler, ref_pred, timestep, sample, eta, "ddim_step_kl")
    per_element = (mean - ref_mean) ** 2 / (2 * std**2)
    return per_element.mean(dim=tuple(range(1, sample.ndim)))
