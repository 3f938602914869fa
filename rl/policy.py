"""The policy the trainer drives: one interface over the families it trains (docs/methods.md, "The policy
interface").

A text-to-image model is a policy over its sampler's steps: each step x_t -> x_t' is a Gaussian whose
mean the (guided) denoiser sets. The trainer (`rl.train`) needs only what :class:`Policy` names: encode
prompts, draw initial noise, sample chains with their per-step log-probabilities, re-run the guided
denoiser on recorded steps and score them (log-probability, KL to the base model's step), decode
latents. Each family implements it once: `rl.unet_policy` (stochastic DDIM for UNet models: SD 1.x/2.x,
SDXL), `rl.flow_policy` (the flow SDE for SD3/SD3.5 and Flux); `rl.families.policy_for` picks one by
the pipeline's class.

Steps are named by their index in the chain (0 = the noisiest), so a trainer never handles a family's
timestep units (DDIM's integer timesteps, flow sigmas).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from torch import Tensor, nn

__all__ = ["Conditioning", "Policy", "Trajectories", "guided_output"]


@dataclass(frozen=True)
class Conditioning:
    """A batch of text conditioning: the denoiser's context `states` (N, L, D) and, for the families that
    take one, a pooled embedding `pooled` (N, P) (SDXL's second CLIP, SD3's two CLIPs, Flux's CLIP)."""

    states: Tensor
    pooled: Tensor | None = None

    def __len__(self) -> int:
        return len(self.states)

    def repeat(self, n: int) -> Conditioning:
        """A one-row conditioning (the empty prompt's) for n samples (a view, as `Tensor.expand`)."""
        pooled = self.pooled.expand(n, -1) if self.pooled is not None else None
        return Conditioning(self.states.expand(n, -1, -1), pooled)

    def __add__(self, other: Conditioning) -> Conditioning:
        """The two batches one after the other."""
        pooled = torch.cat([self.pooled, other.pooled]) if self.pooled is not None and other.pooled is not None \
            else None
        return Conditioning(torch.cat([self.states, other.states]), pooled)


@dataclass
class Trajectories:
    """N sampled chains: latents x_T..x_0 (N, T+1, ...), log-probs (N, T), timesteps (T,) in the family's
    units (what its denoiser is called with; recorded for the log)."""

    latents: Tensor
    log_probs: Tensor
    timesteps: Tensor

    @property
    def final(self) -> Tensor:
        return self.latents[:, -1]


class Policy(Protocol):
    """A family's denoising chain as a policy (module docstring). `denoiser` is the module that gets the
    LoRA, named `denoiser_name` in the pipeline ("unet" or "transformer"); `text_encoders` every text
    encoder of the pipeline by component name (a text LoRA adapts them all, in the families that take one:
    `rl.families`); `frozen` the other modules (the VAE). Methods that take a `denoiser` run the one given
    (the trainer's, possibly wrapped for several processes), not necessarily `denoiser`; `encode` and
    `encode_empty` run the text encoders as they are (the trainer switches their adapters off for the base
    model: `rl.lora.adapters_disabled`)."""

    denoiser: nn.Module
    denoiser_name: str
    text_encoders: dict[str, nn.Module]
    frozen: list[nn.Module]
    steps: int

    @property
    def sampler(self) -> str:
        """The sampler in words, for the adapter's metadata."""
        ...

    def encode(self, prompts: Sequence[str]) -> Conditioning:
        """The prompts' conditioning (with gradients where the caller records them: a text LoRA)."""
        ...

    def encode_empty(self) -> Conditioning:
        """The unconditional input of classifier-free guidance, one row."""
        ...

    def initial_noise(self, seeds: Sequence[int]) -> Tensor:
        """x_T per seed, in the layout the denoiser takes, on the pipeline's device."""
        ...

    def sample(self, denoiser: nn.Module, cond: Conditioning, uncond: Conditioning, scales: Tensor,
               noise: Tensor, seed: int, fixed_shape: bool = False) -> Trajectories:
        """N chains from `noise` at guidance `scales` (N,); the step noise from one generator seeded `seed`."""
        ...

    def output(self, denoiser: nn.Module, x: Tensor, step: Tensor, cond: Conditioning, uncond: Conditioning,
               scales: Tensor, fixed_shape: bool = False) -> Tensor:
        """The guided model output at latents `x` of chain steps `step` (B,)."""
        ...

    def step_log_prob(self, output: Tensor, x_t: Tensor, x_prev: Tensor, step: Tensor) -> Tensor:
        """(B,) log-probability of the recorded step x_t -> x_prev under the step that `output` sets."""
        ...

    def step_kl(self, output: Tensor, ref_output: Tensor, x_t: Tensor, step: Tensor) -> Tensor:
        """(B,) KL of the step that `output` sets to the one `ref_output` sets, from the same x_t."""
        ...

    def decode(self, latents: Tensor) -> np.ndarray:
        """Final latents -> uint8 images (N, H, W, 3), in float32."""
        ...


Forward = Callable[[Tensor, Tensor, Conditioning], Tensor]


def guided_output(forward: Forward, x: Tensor, t: Tensor, cond: Conditioning, uncond: Conditioning,
                  scales: Tensor, fixed_shape: bool = False) -> Tensor:
    """Classifier-free guidance for a batch with per-sample timesteps `t` (B,) and scales (B,):
    out = out_u + g (out_c - out_u) (Ho & Salimans 2022), linear in whatever the model predicts (noise,
    v or a flow velocity); g = 1 uses the conditional output alone.

    One `forward(x, t, conditioning)` call on [uncond for guided samples; cond for all]; samples at scale 1
    skip the unconditional pass, unless `fixed_shape` (a compiled denoiser: every call then has the batch
    shape 2B, whatever the mix of scales; the unused unconditional outputs are dropped).
    """
    guided = scales > 1.0
    with_u = torch.ones_like(guided) if fixed_shape else guided
    n_u = int(with_u.sum())
    out = forward(torch.cat([x[with_u], x]), torch.cat([t[with_u], t]), uncond.repeat(n_u) + cond)
    out_u, out_c = out[:n_u][guided[with_u]], out[n_u:]
    g = scales.view(-1, *([1] * (out.ndim - 1))).to(out.dtype)
    result = out_c.clone()
    result[guided] = out_u + g[guided] * (out_c[guided] - out_u)
    return result
