"""Image generation with paired seeds, batched across prompts and guidance scales.

`unit_seed` derives every image's seed from (battery, prompt, image index) alone, so the same initial
noise is used at every guidance scale and for every model compared (paired seeds).

Two generators share one interface, `generate(prompts, scales, seeds) -> uint8 images`:

* `BatchedGenerator`, for UNet pipelines with one CLIP text encoder (Stable Diffusion 1.x/2.x and the
  miniature model): one denoising loop for a whole batch that mixes prompts and guidance scales. Text
  embeddings are computed once per prompt; the conditional and unconditional passes run in one UNet
  call, and images at guidance 1 skip the unconditional pass (as diffusers does for scale <= 1).
  Its arithmetic is the one of `StableDiffusionPipeline.__call__` (ε̂ = ε_u + g·(ε_c − ε_u), the
  pipeline's scheduler, `latents * init_noise_sigma`, the same decode), so images equal plain
  diffusers' from the same noise up to floating-point batching effects (a test checks this).
* `PipelineGenerator`, for the other families of `evalsuite.models.PIPELINE_FAMILIES` (SDXL, SD3, Flux,
  PixArt-Σ): one pipeline call per (prompt, scale) within a batch, with the paired noise passed as
  `latents` and the size it was drawn for as `height` and `width`. The noise is drawn per seed in the
  unpacked layout (C, h, w) of `latent_shape`, as diffusers draws it; Flux's transformer reads its latent
  as 2x2 patches, so for Flux the same draw goes in packed (`pack_noise`, FluxPipeline's own
  `_pack_latents`): an image's noise is the same at every guidance scale, and equals what FluxPipeline
  draws itself from a CPU generator seeded with the image's seed. For Flux the guidance scale is
  distilled guidance, an input of the transformer (`evalsuite.models.guidance_kind`).

`--compile` compiles the denoiser (`torch.compile(..., dynamic=False)`) in both generators, and the VAE
decoder in the batched one; `check_compile` refuses it where it cannot work (the CPU without a C++
compiler).

Both take the battery's DDIM `eta` (0 = deterministic, the default). With eta > 0 every image draws its
per-step noise from its own generator (`step_noise_stream`, seeded by the image's seed alone), so
stochastic sampling stays paired across scales and models and does not depend on batching;
`check_eta` refuses eta > 0 for schedulers that would ignore it.

A LoRA loaded with `--lora-window W` < 1 acts on the first ceil(passes x W) passes of the sampler loop
only (passes = steps for DDIM); both generators switch the denoiser's adapter layers off for the rest of
the chain (`lora_steps`), so the base denoiser finishes each image from the adapted chain's latent. A
text-encoder part of the adapter keeps acting through the prompt encoding.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import os
import shutil
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol

import numpy as np
import torch

from .errors import SuiteError
from .models import PIPELINE_FAMILIES, WINDOW_WITH_COMPILE, LoadedModel, adapter_steps, attention_order


def unit_seed(battery_name: str, prompt: str, image_index: int) -> int:
    """A 63-bit seed from SHA-256 of 'battery|prompt|index' (independent of scale and model)."""
    digest = hashlib.sha256(f"{battery_name}|{prompt}|{image_index}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def latent_shape(pipe: Any) -> tuple[int, int, int]:
    """(channels, height, width) of the initial noise of a pipeline at its default (square) size, in the
    unpacked layout in which diffusers draws it.

    The side is the pipeline's `default_sample_size` (SDXL, SD3: the denoiser's `sample_size`), else the
    denoiser's `sample_size` (SD 1.x/2.x, PixArt-Σ). Flux (packed latents) renders `default_sample_size x
    vae_scale_factor` pixels by default, and its latent side is that over the VAE factor, rounded down to
    an even number (2x2 patches); its transformer's `in_channels` count the 4 pixels of a patch, so the
    latent has a quarter of them (FluxPipeline's `prepare_latents`)."""
    net = getattr(pipe, "unet", None) or getattr(pipe, "transformer", None)
    if net is None:
        raise ValueError(f"{type(pipe).__name__} has neither a unet nor a transformer")
    if _packs_latents(pipe):
        factor = int(pipe.vae_scale_factor)
        side = 2 * (int(pipe.default_sample_size) * factor // (2 * factor))
        return int(net.config.in_channels) // 4, side, side
    size = getattr(pipe, "default_sample_size", None) or net.config.sample_size
    return int(net.config.in_channels), int(size), int(size)


def _packs_latents(pipe: Any) -> bool:
    """Whether `pipe`'s denoiser reads its latent as 2x2 patches (Flux)."""
    family = PIPELINE_FAMILIES.get(type(pipe).__name__)
    return family is not None and family.packed_latents


def pack_noise(pipe: Any, noise: torch.Tensor) -> torch.Tensor:
    """The initial noise (n, C, h, w) as `pipe` takes it as `latents`: unchanged, or for Flux packed in
    2x2 patches, (n, h/2 x w/2, 4 C), by the pipeline's own `_pack_latents` (the layout of its
    `prepare_latents`, which packs what it draws in the same way)."""
    if not _packs_latents(pipe):
        return noise
    n, c, h, w = noise.shape
    return pipe._pack_latents(noise, n, c, h, w)


def initial_noise(seeds: Sequence[int], shape: tuple[int, int, int]) -> torch.Tensor:
    """Standard normal noise per seed, drawn on the CPU in float32 (identical on every device)."""
    out = torch.empty((len(seeds), *shape))
    for i, seed in enumerate(seeds):
        out[i] = torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seed))
    return out


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """Decoder output in [-1, 1] (n, 3, H, W) -> uint8 (n, H, W, 3), rounded as diffusers' numpy_to_pil."""
    x = (images.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()
    return (x * 255).round().astype(np.uint8)


class Generator(Protocol):
    def generate(self, prompts: Sequence[str], scales: Sequence[float], seeds: Sequence[int]) -> np.ndarray: ...


class BatchedGenerator:
    """One denoising loop for a batch mixing prompts and guidance scales (SD 1.x/2.x-shaped pipelines)."""

    def __init__(self, loaded: LoadedModel, steps: int, eta: float = 0.0, compile: bool = False) -> None:
        self.pipe = loaded.pipe
        self.device = torch.device(loaded.device)
        self.dtype = self.pipe.unet.dtype
        self.steps = steps
        self.eta = eta
        check_eta(self.pipe, eta)
        self.shape = latent_shape(self.pipe)
        self._cache: dict[str, torch.Tensor] = {}
        self.unet = self.pipe.unet
        self.decoder = self.pipe.vae.decode
        self.fixed_batch: int | None = None  # compiled graphs want one shape: pad to the first batch size
        self.lora_window = check_lora_window(loaded, self.pipe.unet, compile)
        if compile:
            check_compile(self.device)
            if self.device.type == "cuda":  # compiled batches have one shape: let cuDNN time its conv kernels
                torch.backends.cudnn.benchmark = True
            self.pipe.unet.to(memory_format=torch.channels_last)
            self.pipe.vae.to(memory_format=torch.channels_last)
            self.unet = torch.compile(self.pipe.unet, dynamic=False)
            self.decoder = torch.compile(self.pipe.vae.decode, dynamic=False)

    @staticmethod
    def supports(pipe: Any) -> bool:
        from diffusers import StableDiffusionPipeline

        return isinstance(pipe, StableDiffusionPipeline)

    @torch.inference_mode()
    def embed(self, prompts: Sequence[str]) -> torch.Tensor:
        new = [p for p in dict.fromkeys(prompts) if p not in self._cache]
        if new:
            emb = self.pipe.encode_prompt(list(new), self.device, 1, False)[0]
            self._cache.update(zip(new, emb))
        return torch.stack([self._cache[p] for p in prompts])

    @torch.inference_mode()
    def generate(self, prompts: Sequence[str], scales: Sequence[float], seeds: Sequence[int]) -> np.ndarray:
        n = len(prompts)
        if self.unet is not self.pipe.unet:  # compiled: one shape for every batch
            self.fixed_batch = self.fixed_batch or n
            pad = self.fixed_batch - n
            prompts, scales, seeds = (list(prompts) + [prompts[-1]] * pad, list(scales) + [scales[-1]] * pad,
                                      list(seeds) + [seeds[-1]] * pad)
        sched = self.pipe.scheduler
        cond = self.embed(prompts)
        uncond = self.embed([""])
        g = torch.tensor(scales, device=self.device, dtype=self.dtype).view(-1, 1, 1, 1)
        guided = torch.tensor([s > 1.0 for s in scales], device=self.device)
        # compiled graphs run the unconditional pass for every image, so every call has one shape
        with_u = torch.ones_like(guided) if self.fixed_batch else guided
        n_u = int(with_u.sum())
        emb = torch.cat([uncond.expand(n_u, -1, -1), cond])
        sched.set_timesteps(self.steps, device=self.device)
        switch_at = lora_steps(self.lora_window, len(sched.timesteps))
        latents = initial_noise(seeds, self.shape).to(self.device, self.dtype) * sched.init_noise_sigma
        step_kwargs: dict[str, Any] = {"eta": self.eta} if self.eta > 0 else {}  # check_eta: step takes it
        # eta > 0 (DDIM): each image's step noise comes from its own stream, seeded by its seed alone, so
        # stochastic sampling is as paired and batch-independent as the initial noise
        streams = [step_noise_stream(s) for s in seeds] if self.eta > 0 else []
        with attention_order(self.device), _adapter_switch(self.pipe.unet) as switch_off:
            for i, t in enumerate(sched.timesteps):
                if i == switch_at:
                    switch_off()
                if streams:
                    z = torch.stack([torch.randn(self.shape, generator=g) for g in streams])
                    step_kwargs["variance_noise"] = z.to(self.device, self.dtype)
                x = sched.scale_model_input(torch.cat([latents[with_u], latents]), t)
                out = self.unet(x, t, encoder_hidden_states=emb).sample
                eps_u, eps_c = out[:n_u][guided[with_u]], out[n_u:]
                eps = eps_c.clone()
                eps[guided] = eps_u + g[guided] * (eps_c[guided] - eps_u)
                latents = sched.step(eps, t, latents, **step_kwargs).prev_sample
            images = self.decoder(latents / self.pipe.vae.config.scaling_factor).sample
        return to_uint8(images[:n])


class PipelineGenerator:
    """A pipeline of `PIPELINE_FAMILIES`: one call per (prompt, scale) group, paired noise as latents.

    With `compile` the denoiser is compiled for fixed shapes: a group size or a guided/unguided batch not
    seen before compiles once more (torch's recompile limit bounds how often)."""

    def __init__(self, loaded: LoadedModel, steps: int, eta: float = 0.0, compile: bool = False) -> None:
        self.pipe = loaded.pipe
        self.device = torch.device(loaded.device)
        self.steps = steps
        self.eta = eta
        self.shape = latent_shape(self.pipe)
        self.size = self.shape[1] * int(self.pipe.vae_scale_factor)  # pixels: the pipeline's default size
        check_eta(self.pipe, eta)
        self.slot = "unet" if getattr(self.pipe, "unet", None) is not None else "transformer"
        self.denoiser = getattr(self.pipe, self.slot)
        self.dtype = self.denoiser.dtype
        self.lora_window = check_lora_window(loaded, self.denoiser, compile)
        if self.lora_window < 1.0 and not _takes(self.pipe.__call__, "callback_on_step_end"):
            raise SuiteError(f"--lora-window: {type(self.pipe).__name__} takes no step callback "
                             "(callback_on_step_end), so its adapter cannot be switched off part-way")
        # PixArt maps a requested size to the nearest of its trained aspect-ratio bins; the default square is
        # itself a bin of every released model, so no binning keeps the size and lets any sample_size run
        self.call_kwargs: dict[str, Any] = {"height": self.size, "width": self.size}
        if _takes(self.pipe.__call__, "use_resolution_binning"):
            self.call_kwargs["use_resolution_binning"] = False
        if compile:
            check_compile(self.device)
            setattr(self.pipe, self.slot, torch.compile(self.denoiser, dynamic=False))  # what the pipeline calls

    @property
    def called_denoiser(self) -> Any:
        """The denoiser the pipeline calls: `denoiser`, or its `torch.compile` wrapper under `compile`."""
        return getattr(self.pipe, self.slot)

    @torch.no_grad()
    def generate(self, prompts: Sequence[str], scales: Sequence[float], seeds: Sequence[int]) -> np.ndarray:
        out: list[np.ndarray | None] = [None] * len(prompts)
        groups: dict[tuple[str, float], list[int]] = {}
        for i, key in enumerate(zip(prompts, scales)):
            groups.setdefault(key, []).append(i)
        for (prompt, scale), idx in groups.items():
            noise = pack_noise(self.pipe, initial_noise([seeds[i] for i in idx], self.shape))
            noise = noise.to(self.device, self.dtype)
            # eta > 0: one generator per image (its step-noise stream), so images stay paired across calls
            extra: dict[str, Any] = {"eta": self.eta, "generator": [step_noise_stream(seeds[i]) for i in idx]} \
                if self.eta else {}
            with _adapter_switch(self.denoiser) as switch_off:
                if self.lora_window < 1.0:
                    extra["callback_on_step_end"] = _switch_after(self.lora_window, switch_off)
                result = self.pipe(prompt=[prompt] * len(idx), guidance_scale=scale, latents=noise,
                                   num_inference_steps=self.steps, output_type="np", **self.call_kwargs, **extra)
            images = (np.asarray(result.images) * 255).round().astype(np.uint8)
            for k, i in enumerate(idx):
                out[i] = images[k]
        return np.stack([o for o in out if o is not None])


def check_lora_window(loaded: LoadedModel, denoiser: Any, compile: bool) -> float:
    """The window of the loaded adapter (1.0: every step), refused where it cannot act: a compiled
    denoiser (its graph would keep the adapter on), or an adapter with no denoiser layers (its
    text-encoder part acts through the prompt encoding, made once before the first step)."""
    if not loaded.lora or loaded.lora_window >= 1.0:
        return 1.0
    if compile:
        raise SuiteError(WINDOW_WITH_COMPILE)
    if not hasattr(denoiser, "disable_lora"):
        raise SuiteError(f"--lora-window: the denoiser {type(denoiser).__name__} cannot switch LoRA layers off")
    if not getattr(denoiser, "peft_config", None):
        raise SuiteError(f"--lora-window: adapter '{loaded.lora}' has no layers in the denoiser, only in the text "
                         "encoder, which encodes the prompt once before the first step; a window cannot limit it")
    return loaded.lora_window


def lora_steps(window: float, passes: int) -> int | None:
    """The index of the first denoiser pass (0-based) that runs without the adapter under `--lora-window
    window`, for a sampler loop of `passes` passes (`len(scheduler.timesteps)`: the steps for DDIM, more
    for multistep and second-order schedulers), or None where the adapter acts on every pass."""
    if window >= 1.0:
        return None
    k = adapter_steps(passes, window)
    return k if k < passes else None


@contextlib.contextmanager
def _adapter_switch(denoiser: Any) -> Iterator[Callable[[], None]]:
    """Yield a function that switches the LoRA layers of `denoiser` off; on leaving the block they are on
    again (if they were switched off), even on error. Only the denoiser: a text-encoder adapter has
    encoded the prompt before the first step and keeps acting through that encoding."""
    switched = False

    def switch_off() -> None:
        nonlocal switched
        denoiser.disable_lora()
        switched = True

    try:
        yield switch_off
    finally:
        if switched:
            denoiser.enable_lora()


def _switch_after(window: float, switch_off: Callable[[], None]) -> Callable[..., dict[str, Any]]:
    """A diffusers `callback_on_step_end` that calls `switch_off` once pass k - 1 (0-based) has run, k =
    `lora_steps(window, len(pipe.scheduler.timesteps))`, so passes k, k + 1, ... run without the adapter."""
    def callback(pipe: Any, step: int, timestep: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
        k = lora_steps(window, len(pipe.scheduler.timesteps))
        if k is not None and step == k - 1:
            switch_off()
        return {}
    return callback


def step_noise_stream(seed: int) -> torch.Generator:
    """The CPU generator of one image's per-step sampler noise (eta > 0), derived from its seed alone."""
    return torch.Generator("cpu").manual_seed(int(np.random.SeedSequence([seed, 1]).generate_state(1)[0]))


def _takes(fn: Any, *names: str) -> bool:
    """Whether callable `fn` has every parameter in `names` (its signature, as diffusers' pipelines check)."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return all(name in params for name in names)


def check_eta(pipe: Any, eta: float) -> None:
    """Refuse eta > 0 where it would be ignored or could not be seeded per image.

    The batched loop needs a scheduler step taking `eta` and `variance_noise` (DDIM); the pipeline-call
    generator needs `eta` in the scheduler step and `eta` and `generator` in the pipeline call."""
    if eta <= 0:
        return
    step = pipe.scheduler.step
    if BatchedGenerator.supports(pipe):
        ok = _takes(step, "eta", "variance_noise")
    else:
        ok = _takes(step, "eta") and _takes(pipe.__call__, "eta", "generator")
    if not ok:
        raise SuiteError(f"eta {eta:g} needs a DDIM-style scheduler whose step takes eta and per-image noise; "
                         f"this model's scheduler is {type(pipe.scheduler).__name__}. Set eta: 0 (or drop "
                         "--eta) for this model")


def check_compile(device: torch.device) -> None:
    """Refuse `--compile` where torch.compile cannot work. On the CPU its backend (inductor) builds C++
    kernels with the compiler of `$CXX`, else g++ (clang++ on macOS): the default of
    `torch._inductor.config.cpp.cxx`; without it the first batch would fail after the model loaded."""
    if device.type != "cpu":
        return
    compiler = os.environ.get("CXX") or ("clang++" if sys.platform == "darwin" else "g++")
    if shutil.which(compiler) is None:
        raise SuiteError(f"--compile: on the CPU torch.compile builds C++ kernels with '{compiler}' ($CXX), which "
                         "was not found; install a C++ compiler, point CXX at one, or drop --compile")


def make_generator(loaded: LoadedModel, steps: int, eta: float = 0.0, compile: bool = False) -> Generator:
    """The batched generator for SD 1.x/2.x-shaped pipelines, the pipeline-call generator for the others."""
    if BatchedGenerator.supports(loaded.pipe):
        return BatchedGenerator(loaded, steps, eta=eta, compile=compile)
    return PipelineGenerator(loaded, steps, eta=eta, compile=compile)
