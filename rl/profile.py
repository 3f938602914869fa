"""Where in the denoising chain an adapter departs from its base model: the per-step KL profile.

    rl kl-profile ADAPTER [--model miniature] [--prompt TEXT ...] [--guidance 7.5] [--images 16]
                          [--steps 20] [--eta 1.0] [--seed 0]

For every step of the adapted model's own stochastic trajectories, the KL divergence between the adapted
model's Gaussian step and the base model's step from the same x_t, as the family's policy computes it
(`rl.policy.Policy.step_kl`: stochastic DDIM for SD 1.x/2.x and SDXL, the flow SDE for SD3/SD3.5 and
Flux): the mean over latent elements of (mu - mu_base)^2 / (2 sigma^2). Times the number of latent
elements and summed over the steps, it bounds the KL between the two models' image distributions (DPOK,
Fan et al., NeurIPS 2023). A LoRA shares its weights across steps, so an adapter trained on some steps
(`training.timestep_window`) acts on the others as well; the profile shows where, and whether
`training.kl_steps` held the untrained steps. The base model is the same pipeline with every adapter
switched off. Reads the model and the adapter; writes nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from peft.tuners.tuners_utils import BaseTunerLayer

from evalsuite.errors import SuiteError

from .lora import adapters_disabled
from .policy import Policy

__all__ = ["StepKL", "kl_profile", "profile_table"]


@dataclass(frozen=True)
class StepKL:
    """One denoising step: its index in the chain (0 = noisiest; `profile_table` prints it from 1), its
    timestep in the family's units (DDIM's integer timestep, a flow model's sigma x 1000) and the mean KL."""

    index: int
    timestep: float
    kl: float


@torch.no_grad()
def kl_profile(policy: Policy, prompts: Sequence[str], guidance: float, images: int, seed: int = 0) -> list[StepKL]:
    """Per-step KL of `policy`'s adapted denoiser to its base, averaged over `images` chains per prompt.

    `policy` is a family's policy (`rl.families.policy_for`) over a pipeline whose denoiser carries PEFT
    adapters (e.g. after `load_lora_weights`). Chain k of a prompt starts from the initial noise of seed
    `seed + k`; the step noise is drawn from `seed`. The base model runs with every adapter off, the text
    encoders' included.
    """
    denoiser, encoders = policy.denoiser, list(policy.text_encoders.values())
    if not any(isinstance(m, BaseTunerLayer) for m in denoiser.modules()):
        raise SuiteError(f"kl-profile: the {policy.denoiser_name} carries no LoRA layers, so it is its own base "
                         f"model; load an adapter that adapts the {policy.denoiser_name}")
    with adapters_disabled(*encoders):  # a text-encoder adapter is part of the adapted model only
        base_uncond = policy.encode_empty()
    uncond = policy.encode_empty()
    per_prompt = []
    for prompt in prompts:
        with adapters_disabled(*encoders):
            base_cond = policy.encode([prompt] * images)
        cond = policy.encode([prompt] * images)
        noise = policy.initial_noise([seed + k for k in range(images)])
        scales = torch.full((images,), float(guidance), device=noise.device)
        chain = policy.sample(denoiser, cond, uncond, scales, noise, seed)
        kls = []
        for j in range(len(chain.timesteps)):
            x = chain.latents[:, j]
            step = torch.full((images,), j, device=x.device, dtype=torch.long)
            out = policy.output(denoiser, x, step, cond, uncond, scales)
            with adapters_disabled(denoiser):
                ref = policy.output(denoiser, x, step, base_cond, base_uncond, scales)
            kls.append(policy.step_kl(out, ref, x, step).float().mean())
        per_prompt.append(torch.stack(kls))
    mean = torch.stack(per_prompt).mean(0)
    return [StepKL(j, float(t), float(v)) for j, (t, v) in enumerate(zip(chain.timesteps, mean))]


def profile_table(profile: list[StepKL]) -> str:
    """A plain-text table, one step per line, with the sum over the chain."""
    lines = ["step  timestep  KL per element"]
    lines += [f"{p.index + 1:4d}  {p.timestep:8.6g}  {p.kl:.4g}" for p in profile]
    lines.append(f"sum over {len(profile)} steps: {sum(p.kl for p in profile):.4g}")
    return "\n".join(lines)
