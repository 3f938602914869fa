"""The policy of UNet models (SD 1.x/2.x, SDXL): stochastic DDIM under classifier-free guidance, each step
a Gaussian with the log-density of `rl.ddim` (DDPO; docs/methods.md, "The denoising MDP and its step
log-probability").

SD 1.x/2.x: one CLIP, the context its last hidden states (`rl.sampling.encode_prompts`). SDXL (Podell et
al., "SDXL", 2023, section 2.2): two CLIPs, the context their penultimate states side by side, and the UNet's
added `text_time` embedding of the second CLIP's pooled projection and six size numbers (original size,
crop corner, target size), here (H, W, 0, 0, H, W) for the H x W pixels rendered, as
StableDiffusionXLPipeline does by default; prompts are encoded by the pipeline's own `encode_prompt`, and
the unconditional input is the pipeline's too (zeros where its `force_zeros_for_empty_prompt` says so,
as for SDXL base). The pipeline's scheduler is replaced by a DDIMScheduler of the same config.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from evalsuite.generate import initial_noise, latent_shape, to_uint8

from .ddim import ddim_step_kl, ddim_step_with_logprob
from .policy import Conditioning, Trajectories, guided_output
from .sampling import encode_prompts, sample_ddim, unet_forward

__all__ = ["UNetPolicy"]


class UNetPolicy:
    """`rl.policy.Policy` of SD 1.x/2.x and SDXL pipelines: DDIM with `eta` over `steps` steps."""

    denoiser_name = "unet"

    def __init__(self, pipe: Any, steps: int, eta: float) -> None:
        from diffusers import DDIMScheduler

        self.pipe, self.steps, self.eta = pipe, steps, eta
        # the last step goes to a_0' = final_alpha_cumprod; set_alpha_to_one (DDIMScheduler's default, where a
        # config such as an Euler one does not name it) makes that 1, the step variance 0 and the step
        # without a density, so the final a_0' is alphas_cumprod[0], as SD 1.x's and SDXL's configs say; and
        # x0_hat is not clipped to [-1, 1] (a pixel-space default) unless the config asks for it
        config = pipe.scheduler.config
        pipe.scheduler = DDIMScheduler.from_config(config, set_alpha_to_one=False,
                                                   clip_sample=bool(config.get("clip_sample", False)))
        pipe.scheduler.set_timesteps(steps, device=pipe.device)
        self.timesteps = pipe.scheduler.timesteps.clone()
        self.denoiser: nn.Module = pipe.unet
        self.xl = getattr(pipe, "text_encoder_2", None) is not None
        self.text_encoders: dict[str, nn.Module] = {
            name: getattr(pipe, name) for name in ("text_encoder", "text_encoder_2") if getattr(pipe, name, None)}
        self.frozen: list[nn.Module] = [pipe.vae]
        self.time_ids: Tensor | None = None
        if self.xl:
            side = float(latent_shape(pipe)[1] * int(pipe.vae_scale_factor))
            self.time_ids = torch.tensor([[side, side, 0.0, 0.0, side, side]], device=pipe.device)

    @property
    def sampler(self) -> str:
        return f"DDIM eta={self.eta}, {self.steps} steps"

    def encode(self, prompts: Sequence[str]) -> Conditioning:
        if not self.xl:
            return Conditioning(encode_prompts(self.pipe, list(prompts)))
        states, _, pooled, _ = self.pipe.encode_prompt(list(prompts), device=self.pipe.device,
                                                       num_images_per_prompt=1, do_classifier_free_guidance=False)
        return Conditioning(states, pooled)

    def encode_empty(self) -> Conditioning:
        if not self.xl:
            return Conditioning(encode_prompts(self.pipe, [""]))
        _, states, _, pooled = self.pipe.encode_prompt([""], device=self.pipe.device, num_images_per_prompt=1,
                                                       do_classifier_free_guidance=True)
        return Conditioning(states, pooled)

    def initial_noise(self, seeds: Sequence[int]) -> Tensor:
        return initial_noise(seeds, latent_shape(self.pipe)).to(self.pipe.device)

    def sample(self, denoiser: nn.Module, cond: Conditioning, uncond: Conditioning, scales: Tensor, noise: Tensor,
               seed: int, fixed_shape: bool = False) -> Trajectories:
        return sample_ddim(unet_forward(denoiser, self.time_ids), self.pipe.scheduler, cond, uncond, scales, noise,
                           self.steps, self.eta, seed, fixed_shape)

    def output(self, denoiser: nn.Module, x: Tensor, step: Tensor, cond: Conditioning, uncond: Conditioning,
               scales: Tensor, fixed_shape: bool = False) -> Tensor:
        return guided_output(unet_forward(denoiser, self.time_ids), x, self._t(step, x), cond, uncond, scales,
                             fixed_shape)

    def step_log_prob(self, output: Tensor, x_t: Tensor, x_prev: Tensor, step: Tensor) -> Tensor:
        _, logp = ddim_step_with_logprob(self.pipe.scheduler, output, self._t(step, x_t), x_t, self.eta,
                                         prev_sample=x_prev)
        return logp

    def step_kl(self, output: Tensor, ref_output: Tensor, x_t: Tensor, step: Tensor) -> Tensor:
        return ddim_step_kl(self.pipe.scheduler, output, ref_output.detach(), self._t(step, x_t), x_t, self.eta)

    @torch.no_grad()
    def decode(self, latents: Tensor) -> np.ndarray:
        """In float32 whatever the autocast around, as the evaluation does (SD's VAE overflows in fp16)."""
        vae = self.pipe.vae
        with torch.autocast(latents.device.type, enabled=False):
            return to_uint8(vae.decode(latents.float() / vae.config.scaling_factor).sample)

    def _t(self, step: Tensor, x: Tensor) -> Tensor:
        """The DDIM timesteps of chain steps `step` (B,), on the device of `x`."""
        return self.timesteps[step.to(self.timesteps.device)].to(x.device)
