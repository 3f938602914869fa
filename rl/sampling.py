"""Sampling the denoising MDP: DDIM with eta > 0 under classifier-free guidance, recording every latent
and every step's log-probability (DDPO, Black et al., ICLR 2024; docs/methods.md, "The denoising MDP and
its step log-probability").

The policy is the *guided* kernel: ε̂ = ε_u + g·(ε_c − ε_u) with the group's guidance scale g (g = 1
uses the conditional prediction alone), then the stochastic DDIM step of `rl.ddim`. The per-step
noise comes from one seeded generator per call, so the same call with the adapters switched off gives
the base model's image from the same noise (the drift reward's reference). :class:`SDPipeline` names
the parts of a Stable-Diffusion-like pipeline that sampling and training drive; `rl.unet_policy` drives
SD 1.x/2.x and SDXL through these functions.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
from diffusers.schedulers.scheduling_ddim import DDIMScheduler
from torch import Tensor

from .ddim import ddim_step_with_logprob
from .policy import Conditioning, Forward, Trajectories, guided_output

__all__ = [
    "SDPipeline", "Tokenizer", "Trajectories", "encode_prompts", "guided_eps", "sample_ddim",
    "sample_trajectories", "step_log_prob", "unet_forward",
]


class Tokenizer(Protocol):
    """A Hugging Face tokenizer as the pipeline's text encoder needs it: called on prompts, padded to
    ``model_max_length``, it returns an encoding with ``input_ids`` (N, L)."""

    model_max_length: int

    def __call__(self, text: list[str], *, padding: str, max_length: int, truncation: bool,
                 return_tensors: str) -> Any: ...


class VAE(Protocol):
    """The pipeline's autoencoder: ``decode(z).sample`` gives images in [-1, 1]; latents are scaled by
    ``config.scaling_factor``."""

    config: Any

    def decode(self, z: Tensor) -> Any: ...

    def requires_grad_(self, requires_grad: bool = True) -> Any: ...


class SDPipeline(Protocol):
    """The parts of a diffusers Stable-Diffusion-like pipeline (e.g. StableDiffusionPipeline) that the
    trainer drives: a conditional UNet, a text encoder with its tokenizer, a VAE, a DDIM scheduler (the
    trainer swaps one in) and the device they run on."""

    unet: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: Tokenizer
    vae: VAE
    scheduler: DDIMScheduler

    @property
    def device(self) -> torch.device: ...


def encode_prompts(pipe: SDPipeline, prompts: list[str]) -> Tensor:
    """The text encoder's last hidden states (N, L, D) for `prompts`, padded to the tokenizer's length."""
    tok = pipe.tokenizer(prompts, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         truncation=True, return_tensors="pt")
    return pipe.text_encoder(tok.input_ids.to(pipe.device))[0]


def guided_eps(unet: torch.nn.Module, x: Tensor, t: Tensor, cond: Tensor, uncond: Tensor, scales: Tensor,
               fixed_shape: bool = False) -> Tensor:
    """Guided model output (noise or v, per the scheduler's prediction type: guidance is linear in
    either) of an SD 1.x/2.x UNet for a batch with per-sample timesteps `t` (B,) and scales (B,), by
    `rl.policy.guided_output`: one UNet call on [uncond for guided samples; cond for all]."""
    return guided_output(unet_forward(unet), x, t, Conditioning(cond), Conditioning(uncond), scales, fixed_shape)


def unet_forward(unet: torch.nn.Module, time_ids: Tensor | None = None) -> Forward:
    """The UNet as `guided_output` calls it: ``unet(x, t, encoder_hidden_states=states).sample``; with
    `time_ids` (1, 6) (SDXL) also ``added_cond_kwargs`` = the pooled text embedding and the size
    conditioning of every sample."""
    def forward(x: Tensor, t: Tensor, c: Conditioning) -> Tensor:
        if time_ids is None:
            return unet(x, t, encoder_hidden_states=c.states).sample
        added = {"text_embeds": c.pooled, "time_ids": time_ids.expand(len(x), -1)}
        return unet(x, t, encoder_hidden_states=c.states, added_cond_kwargs=added).sample
    return forward


@torch.no_grad()
def sample_ddim(forward: Forward, scheduler: DDIMScheduler, cond: Conditioning, uncond: Conditioning,
                scales: Tensor, noise: Tensor, steps: int, eta: float, seed: int,
                fixed_shape: bool = False) -> Trajectories:
    """Sample N chains of stochastic DDIM from initial `noise` (N, C, H, W) with conditioning `cond` (N
    rows), the denoiser called through `forward` (`unet_forward`)."""
    scheduler.set_timesteps(steps, device=noise.device)
    timesteps = scheduler.timesteps
    gen = torch.Generator("cpu").manual_seed(seed)
    x = noise * scheduler.init_noise_sigma
    latents, log_probs = [x], []
    for t in timesteps:
        tt = torch.full((len(x),), int(t), device=x.device, dtype=torch.long)
        eps = guided_output(forward, x, tt, cond, uncond, scales, fixed_shape)
        z = torch.randn(x.shape, generator=gen).to(x.device, x.dtype)
        x, logp = ddim_step_with_logprob(scheduler, eps, tt, x, eta, variance_noise=z)
        latents.append(x)
        log_probs.append(logp)
    return Trajectories(torch.stack(latents, 1), torch.stack(log_probs, 1), timesteps.clone())


def sample_trajectories(unet: torch.nn.Module, scheduler: DDIMScheduler, cond: Tensor, uncond: Tensor,
                        scales: Tensor, noise: Tensor, steps: int, eta: float, seed: int,
                        fixed_shape: bool = False) -> Trajectories:
    """`sample_ddim` of an SD 1.x/2.x UNet with conditioning `cond` (N, L, D)."""
    return sample_ddim(unet_forward(unet), scheduler, Conditioning(cond), Conditioning(uncond), scales, noise,
                       steps, eta, seed, fixed_shape)


def step_log_prob(unet: torch.nn.Module, scheduler: DDIMScheduler, x_t: Tensor, x_prev: Tensor, t: Tensor,
                  cond: Tensor, uncond: Tensor, scales: Tensor, eta: float, fixed_shape: bool = False) -> Tensor:
    """Log-probability under the current policy of the recorded step x_t -> x_prev (with gradients)."""
    eps = guided_eps(unet, x_t, t, cond, uncond, scales, fixed_shape)
    _, logp = ddim_step_with_logprob(scheduler, eps, t, x_t, eta, prev_sample=x_prev)
    return logp
