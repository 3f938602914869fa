"""Where in the denoising chain an adapter departs from its base model: the per-step KL profile.

    rl kl-profile ADAPTER [--model miniature] [--prompt TEXT ...] [--guidance 7.5] [--images 16]
                          [--steps 20] [--eta 1.0] [--seed 0]

For every DDIM step of the adapted model's own trajectories (stochastic, eta > 0), the KL divergence
between the adapted model's Gaussian step and the base model's step from the same x_t, as
`rl.ddim.ddim_step_kl` computes it: the mean over latent elements of (mu - mu_base)^2 / (2 sigma^2).
Times the number of latent elements and summed over the steps, it bounds the KL between the two
models' image distributions (DPOK, Fan et al., NeurIPS 2023). A LoRA shares its weights across steps,
so an adapter trained on some steps (`training.timestep_window`) acts on the others as well; the
profile shows where, and whether `training.kl_steps` held the untrained steps. The base model is the
same pipeline with every adapter switched off. Reads the model and the adapter; writes nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from peft.tuners.tuners_utils import BaseTunerLayer

from evalsuite.errors import SuiteError
from evalsuite.generate import initial_noise, latent_shape

from .ddim import ddim_step_kl
from .lora import adapters_disabled
from .sampling import SDPipeline, encode_base_prompts, encode_prompts, guided_eps, sample_trajectories

__all__ = ["StepKL", "kl_profile", "profile_table"]


@dataclass(frozen=True)
class StepKL:
    """One denoising step: its index in the chain (0 = noisiest; `profile_table` prints it from 1), its
    timestep and the mean KL."""

    index: int
    timestep: int
    kl: float


@torch.no_grad()
def kl_profile(pipe: SDPipeline, prompts: Sequence[str], guidance: float, images: int, steps: int, eta: float = 1.0,
               seed: int = 0) -> list[StepKL]:
    """Per-step KL of `pipe`'s adapted UNet to its base, averaged over `images` chains per prompt.

    `pipe` is a Stable Diffusion-style pipeline whose UNet carries PEFT adapters (e.g. after
    `load_lora_weights`) and whose scheduler is a DDIMScheduler. Chain k of a prompt starts from the
    initial noise of seed `seed + k` (`evalsuite.generate.initial_noise`); the step noise is drawn from
    `seed`. The base model runs with every adapter off, the text encoder's included.
    """
    unet, scheduler = pipe.unet, pipe.scheduler
    if not any(isinstance(m, BaseTunerLayer) for m in unet.modules()):
        raise SuiteError("kl-profile: the UNet carries no LoRA layers, so it is its own base model; load an adapter "
                         "that adapts the UNet")
    base_uncond = encode_base_prompts(pipe, [""])  # a text-encoder adapter is part of the adapted model only
    uncond = encode_prompts(pipe, [""])
    per_prompt = []
    for prompt in prompts:
        base_cond = encode_base_prompts(pipe, [prompt] * images)
        cond = encode_prompts(pipe, [prompt] * images)
        scales = torch.full((images,), float(guidance), device=pipe.device)
        noise = initial_noise([seed + k for k in range(images)], latent_shape(pipe)).to(pipe.device)
        chain = sample_trajectories(unet, scheduler, cond, uncond, scales, noise, steps, eta, seed)
        kls = []
        for j, t in enumerate(chain.timesteps):
            x = chain.latents[:, j]
            tt = torch.full((images,), int(t), device=pipe.device, dtype=torch.long)
            eps = guided_eps(unet, x, tt, cond, uncond, scales)
            with adapters_disabled(unet):
                ref = guided_eps(unet, x, tt, base_cond, base_uncond, scales)
            kls.append(ddim_step_kl(scheduler, eps, ref, tt, x, eta).mean())
        per_prompt.append(torch.stack(kls))
    mean = torch.stack(per_prompt).mean(0)
    return [StepKL(j, int(t), float(v)) for j, (t, v) in enumerate(zip(chain.timesteps, mean))]


def profile_table(profile: list[StepKL]) -> str:
    """A plain-text table, one step per line, with the sum over the chain."""
    lines = ["step  timestep  KL per element"]
    lines += [f"{p.index + 1:4d}  {p.timestep:8d}  {p.kl:.4g}" for p in profile]
    lines.append(f"sum over {len(profile)} steps: {sum(p.kl for p in profile):.4g}")
    return "\n".join(lines)
