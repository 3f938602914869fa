"""The policy of flow-matching models (SD3/SD3.5, Flux): the flow SDE of `rl.flow_sde` over the pipeline's
own sigma schedule, each step a Gaussian with an exact log-density (Flow-GRPO; docs/methods.md, "The flow
SDE policy").

The schedule, the text encoding and the decoding mirror the pipelines' ``__call__`` (diffusers 0.42):

* SD3 (StableDiffusion3Pipeline): ``scheduler.set_timesteps(steps)`` (with ``mu`` from `calculate_shift`
  of the latent's patch count where the scheduler shifts dynamically); the transformer takes the latent,
  ``timestep`` = sigma x 1000, the joint CLIP-L/CLIP-G/T5 context and the two CLIPs' pooled projections;
  classifier-free guidance with the empty prompt (two passes where g > 1). Without its T5 (``drop_t5``)
  the T5 part of the context is zeros, as in the pipeline.
* Flux (FluxPipeline): sigmas ``linspace(1, 1/steps, steps)`` shifted by ``mu`` = `calculate_shift` of the
  packed sequence length; the latent is packed in 2x2 patches (`evalsuite.generate.pack_noise`), with
  position ids (0, row, column) per patch and zeros per text token; ``timestep`` = sigma. FLUX.1 [dev]
  is guidance-distilled: the guidance scale is an input of the transformer (``guidance``), so each
  sample's scale is fed there in ONE pass, with no unconditional pass and no extrapolation; a model
  without ``guidance_embeds`` (FLUX.1 [schnell]) ignores the scale.

Decoding: latents / ``scaling_factor`` + ``shift_factor`` (Flux: unpacked first), by the VAE in float32.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from evalsuite.generate import initial_noise, latent_shape, pack_noise, to_uint8

from .flow_sde import flow_sde_kl, flow_sde_step
from .policy import Conditioning, Trajectories, guided_output

__all__ = ["FlowPolicy"]


class FlowPolicy:
    """`rl.policy.Policy` of SD3 and Flux pipelines: the flow SDE with noise level `noise_level` (a in
    sigma_t = a sqrt(t / (1 - t))) over `steps` steps."""

    denoiser_name = "transformer"

    def __init__(self, pipe: Any, steps: int, noise_level: float) -> None:
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        self.pipe, self.steps, self.noise_level = pipe, steps, noise_level
        self.flux = type(pipe).__name__ == "FluxPipeline"
        self.denoiser: nn.Module = pipe.transformer
        self.text_encoders: dict[str, nn.Module] = {  # frozen: a LoRA on the transformer only (rl.families)
            name: getattr(pipe, name) for name in ("text_encoder", "text_encoder_2", "text_encoder_3")
            if getattr(pipe, name, None) is not None}
        self.frozen: list[nn.Module] = [pipe.vae]
        self.shape = latent_shape(pipe)  # (C, h, w), unpacked
        _, h, w = self.shape
        config, kwargs = pipe.scheduler.config, {}
        if self.flux:
            seq = (h // 2) * (w // 2)
            kwargs["mu"] = calculate_shift(seq, config.get("base_image_seq_len", 256),
                                           config.get("max_image_seq_len", 4096), config.get("base_shift", 0.5),
                                           config.get("max_shift", 1.15))
            if not config.get("use_flow_sigmas"):
                kwargs["sigmas"] = np.linspace(1.0, 1 / steps, steps)
            # position ids of the packed latent: (0, row, column) per 2x2 patch
            rows, cols = torch.meshgrid(torch.arange(h // 2), torch.arange(w // 2), indexing="ij")
            self.img_ids = torch.stack([torch.zeros_like(rows), rows, cols], -1).reshape(-1, 3).float()
            self.img_ids = self.img_ids.to(pipe.device)
        elif config.get("use_dynamic_shifting"):
            patch = int(pipe.transformer.config.patch_size)
            kwargs["mu"] = calculate_shift((h // patch) * (w // patch), config.get("base_image_seq_len", 256),
                                           config.get("max_image_seq_len", 4096), config.get("base_shift", 0.5),
                                           config.get("max_shift", 1.16))
        if "sigmas" in kwargs:
            pipe.scheduler.set_timesteps(device=pipe.device, **kwargs)
        else:
            pipe.scheduler.set_timesteps(steps, device=pipe.device, **kwargs)
        self.sigmas = pipe.scheduler.sigmas.clone()  # (steps + 1,), from 1 to 0
        self.timesteps = pipe.scheduler.timesteps.clone()  # sigma x num_train_timesteps
        self.distilled = self.flux and bool(pipe.transformer.config.guidance_embeds)

    @property
    def sampler(self) -> str:
        return f"flow SDE noise_level={self.noise_level}, {self.steps} steps"

    def encode(self, prompts: Sequence[str]) -> Conditioning:
        device = self.pipe.device
        if self.flux:
            states, pooled, _ = self.pipe.encode_prompt(list(prompts), None, device=device, num_images_per_prompt=1)
        else:
            states, _, pooled, _ = self.pipe.encode_prompt(list(prompts), None, None, device=device,
                                                           num_images_per_prompt=1, do_classifier_free_guidance=False)
        return Conditioning(states, pooled)

    def encode_empty(self) -> Conditioning:
        """The empty prompt encoded, as SD3's pipeline encodes its default negative prompt (Flux never
        runs an unconditional pass: `output`)."""
        return self.encode([""])

    def initial_noise(self, seeds: Sequence[int]) -> Tensor:
        return pack_noise(self.pipe, initial_noise(seeds, self.shape)).to(self.pipe.device)

    @torch.no_grad()
    def sample(self, denoiser: nn.Module, cond: Conditioning, uncond: Conditioning, scales: Tensor, noise: Tensor,
               seed: int, fixed_shape: bool = False) -> Trajectories:
        gen = torch.Generator("cpu").manual_seed(seed)
        x, latents, log_probs = noise, [noise], []
        for i in range(self.steps):
            step = torch.full((len(x),), i, dtype=torch.long)
            v = self.output(denoiser, x, step, cond, uncond, scales, fixed_shape)
            z = torch.randn(x.shape, generator=gen).to(x.device, x.dtype)
            x, logp = flow_sde_step(self.sigmas, step, v, x, self.noise_level, variance_noise=z)
            latents.append(x)
            log_probs.append(logp)
        return Trajectories(torch.stack(latents, 1), torch.stack(log_probs, 1), self.timesteps.clone())

    def output(self, denoiser: nn.Module, x: Tensor, step: Tensor, cond: Conditioning, uncond: Conditioning,
               scales: Tensor, fixed_shape: bool = False) -> Tensor:
        """The velocity: Flux's in one pass with the scales as its distilled-guidance input (module
        docstring), SD3's under classifier-free guidance (`rl.policy.guided_output`)."""
        t = self.timesteps[step.to(self.timesteps.device)].to(x.device)
        if not self.flux:
            def forward(x_in: Tensor, t_in: Tensor, c: Conditioning) -> Tensor:
                return denoiser(hidden_states=x_in, timestep=t_in, encoder_hidden_states=c.states,
                                pooled_projections=c.pooled, return_dict=False)[0]
            return guided_output(forward, x, t, cond, uncond, scales, fixed_shape)
        guidance = scales.to(device=x.device, dtype=torch.float32) if self.distilled else None
        txt_ids = torch.zeros(cond.states.shape[1], 3, device=x.device, dtype=self.img_ids.dtype)
        return denoiser(hidden_states=x, timestep=t / 1000, guidance=guidance, pooled_projections=cond.pooled,
                        encoder_hidden_states=cond.states, txt_ids=txt_ids, img_ids=self.img_ids,
                        return_dict=False)[0]

    def step_log_prob(self, output: Tensor, x_t: Tensor, x_prev: Tensor, step: Tensor) -> Tensor:
        return flow_sde_step(self.sigmas, step, output, x_t, self.noise_level, prev_sample=x_prev)[1]

    def step_kl(self, output: Tensor, ref_output: Tensor, x_t: Tensor, step: Tensor) -> Tensor:
        return flow_sde_kl(self.sigmas, step, output, ref_output.detach(), x_t, self.noise_level)

    @torch.no_grad()
    def decode(self, latents: Tensor) -> np.ndarray:
        vae = self.pipe.vae
        z = latents.float()
        if self.flux:  # (n, h/2 x w/2, 4 C) -> (n, C, h, w): the inverse of the 2x2 packing
            c, h, w = self.shape
            z = z.view(len(z), h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(len(z), c, h, w)
        with torch.autocast(latents.device.type, enabled=False):
            return to_uint8(vae.decode(z / vae.config.scaling_factor + vae.config.shift_factor).sample)
