"""Training steps of the miniature world: CLIP, VAE, UNet and the attribute classifier.

Each function trains one component from the synthetic data (`MiniData`) with a progress bar and
returns it. `build.py` runs them in order and saves the results; sizes follow the feasibility notes
in ../shared/reference/miniature-notes.md (32×32 images, 8×8×4 latents).
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from tqdm.auto import tqdm
from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPTokenizer, CLIPVisionConfig

from .captions import sample_captions
from .classifier import AttributeNet
from .render import Portrait, render_batch, sample_portraits
from .world import AGE_NAMES, OCCUPATIONS, TONE_NAMES

log = logging.getLogger(__name__)


@dataclass
class MiniData:
    """A fixed set of rendered portraits with their attributes (captions are drawn per step)."""

    portraits: list[Portrait]
    images: torch.Tensor  # (n, 3, 32, 32) in [-1, 1]
    tone: torch.Tensor  # (n,) index into TONE_NAMES
    age: torch.Tensor  # (n,) index into AGE_NAMES

    @classmethod
    def make(cls, per_occupation: int, rng: np.random.Generator) -> MiniData:
        names = [n for n in OCCUPATIONS for _ in range(per_occupation)]
        portraits = sample_portraits(names, rng)
        # contiguous: a permuted NHWC array is channels-last, which runs ~10x slower on CPU convolutions
        pix = (torch.from_numpy(render_batch(portraits)).permute(0, 3, 1, 2).float() / 127.5 - 1.0).contiguous()
        tone = torch.tensor([TONE_NAMES.index(p.tone) for p in portraits])
        age = torch.tensor([AGE_NAMES.index(p.age) for p in portraits])
        return cls(portraits, pix, tone, age)

    def batches(self, batch: int, steps: int, rng: np.random.Generator) -> Iterator[np.ndarray]:
        for _ in range(steps):
            yield rng.integers(0, len(self.portraits), size=batch)


def _cosine_lr(opt: torch.optim.Optimizer, step: int, total: int, base: float, warmup: int = 50) -> None:
    lr = base * min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(step / max(total, 1), 1.0)))
    for group in opt.param_groups:
        group["lr"] = max(lr, base * 0.02)


def _bar(total: int, desc: str) -> tqdm:
    return tqdm(total=total, desc=desc, unit="step", dynamic_ncols=True, leave=False)


# ---------------------------------------------------------------- CLIP


def new_clip(tokenizer: CLIPTokenizer) -> CLIPModel:
    vocab = len(tokenizer)
    text = CLIPTextConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, max_position_embeddings=tokenizer.model_max_length,
                          bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                          pad_token_id=tokenizer.pad_token_id, projection_dim=64)
    vision = CLIPVisionConfig(image_size=32, patch_size=4, hidden_size=64, intermediate_size=128,
                              num_hidden_layers=2, num_attention_heads=4, projection_dim=64)
    return CLIPModel(CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=64))


def tokenize(tokenizer: CLIPTokenizer, texts: list[str]) -> torch.Tensor:
    return tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


def train_clip(data: MiniData, tokenizer: CLIPTokenizer, steps: int, rng: np.random.Generator,
               batch: int = 128, lr: float = 2e-3) -> CLIPModel:
    """Contrastive training with multiple positives: images whose captions are equal are all matches
    (many images share "a photo of a doctor"), so the target of each row is uniform over equal captions.
    Empty captions are not used here."""
    model = new_clip(tokenizer)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    bar = _bar(steps, "clip")
    for step, idx in enumerate(data.batches(batch, steps, rng)):
        caps = sample_captions([data.portraits[i] for i in idx], rng)
        caps = [c or f"a photo of a {data.portraits[i].occupation}" for c, i in zip(caps, idx)]
        ids = tokenize(tokenizer, caps)
        same = torch.tensor([[a == b for b in caps] for a in caps], dtype=torch.float32)
        target = same / same.sum(1, keepdim=True)
        out = model(input_ids=ids, pixel_values=data.images[idx])
        logits = out.logits_per_image
        loss = 0.5 * (torch.sum(-target * F.log_softmax(logits, 1), 1).mean()
                      + torch.sum(-target * F.log_softmax(logits.T, 1), 1).mean())
        _cosine_lr(opt, step, steps, lr)
        opt.zero_grad()
        loss.backward()
        opt.step()
        bar.update()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    return model.eval()


# ---------------------------------------------------------------- VAE


def new_vae() -> AutoencoderKL:
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 32, 64),
                         down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                         layers_per_block=1, norm_num_groups=8, sample_size=32, mid_block_add_attention=False)


def train_vae(data: MiniData, steps: int, rng: np.random.Generator, batch: int = 64,
              lr: float = 2e-3, kl_weight: float = 1e-6) -> AutoencoderKL:
    vae = new_vae()
    opt = torch.optim.AdamW(vae.parameters(), lr=lr)
    bar = _bar(steps, "vae")
    for step, idx in enumerate(data.batches(batch, steps, rng)):
        x = data.images[idx]
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample()).sample
        loss = F.mse_loss(rec, x) + kl_weight * post.kl().mean()
        _cosine_lr(opt, step, steps, lr)
        opt.zero_grad()
        loss.backward()
        opt.step()
        bar.update()
        bar.set_postfix(loss=f"{loss.item():.4f}")
    bar.close()
    vae.eval()
    with torch.no_grad():
        lat = torch.cat([vae.encode(data.images[i:i + 512]).latent_dist.mean for i in range(0, 2048, 512)])
    vae.register_to_config(scaling_factor=float(1.0 / lat.std()))
    return vae


@torch.no_grad()
def encode_latents(vae: AutoencoderKL, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    means, stds = [], []
    for i in range(0, len(images), 512):
        dist = vae.encode(images[i:i + 512]).latent_dist
        means.append(dist.mean)
        stds.append(dist.std)
    return torch.cat(means).contiguous(), torch.cat(stds).contiguous()


# ---------------------------------------------------------------- UNet


def new_unet(cross_dim: int = 64) -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(64, 128), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_dim, attention_head_dim=8, norm_num_groups=16)


def train_unet(data: MiniData, vae: AutoencoderKL, clip: CLIPModel, tokenizer: CLIPTokenizer,
               noise_scheduler: DDPMScheduler, steps: int, rng: np.random.Generator, batch: int = 128,
               lr: float = 1e-3, ema_decay: float = 0.999) -> UNet2DConditionModel:
    """Epsilon-prediction training on VAE latents, conditioned on the frozen CLIP text tower's hidden
    states; captions are redrawn every step (including the empty caption for guidance). Returns the
    EMA weights."""
    unet = new_unet(clip.text_model.config.hidden_size)
    ema = copy.deepcopy(unet).requires_grad_(False)
    mean, std = encode_latents(vae, data.images)
    scale = vae.config.scaling_factor
    cache: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def embed(caps: list[str]) -> torch.Tensor:
        new = sorted({c for c in caps if c not in cache})
        if new:
            hidden = clip.text_model(input_ids=tokenize(tokenizer, new)).last_hidden_state
            cache.update(zip(new, hidden))
        return torch.stack([cache[c] for c in caps])

    opt = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=0.0)
    n_train = noise_scheduler.config.num_train_timesteps
    gen = torch.Generator().manual_seed(int(rng.integers(2**31)))
    bar = _bar(steps, "unet")
    for step, idx in enumerate(data.batches(batch, steps, rng)):
        it = torch.from_numpy(idx)
        x0 = (mean[it] + std[it] * torch.randn(mean[it].shape, generator=gen)) * scale
        cond = embed(sample_captions([data.portraits[i] for i in idx], rng))
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, n_train, (len(idx),), generator=gen)
        xt = noise_scheduler.add_noise(x0, noise, t)
        loss = F.mse_loss(unet(xt, t, cond).sample, noise)
        _cosine_lr(opt, step, steps, lr, warmup=100)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        decay = min(ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, pu in zip(ema.parameters(), unet.parameters()):
                pe.lerp_(pu, 1 - decay)
        bar.update()
        bar.set_postfix(loss=f"{loss.item():.4f}")
    bar.close()
    return ema.eval()


# ---------------------------------------------------------------- classifier


def train_classifier(data: MiniData, vae: AutoencoderKL, steps: int, rng: np.random.Generator,
                     batch: int = 128, lr: float = 3e-3) -> AttributeNet:
    """Supervised tone/age classifier on renders and their VAE reconstructions (half each), so it reads
    decoded images as well as clean ones."""
    net = AttributeNet()
    with torch.no_grad():
        recon = torch.cat([vae.decode(vae.encode(data.images[i:i + 512]).latent_dist.mean).sample
                           for i in range(0, len(data.images), 512)]).clamp(-1, 1)
    opt = torch.optim.AdamW(net.parameters(), lr=lr)
    bar = _bar(steps, "classifier")
    for step, idx in enumerate(data.batches(batch, steps, rng)):
        half = len(idx) // 2
        x = torch.cat([data.images[idx[:half]], recon[idx[half:]]])
        x = x + 0.03 * torch.randn_like(x)
        tone_logits, age_logits = net(x)
        loss = F.cross_entropy(tone_logits, data.tone[idx]) + F.cross_entropy(age_logits, data.age[idx])
        _cosine_lr(opt, step, steps, lr)
        opt.zero_grad()
        loss.backward()
        opt.step()
        bar.update()
        bar.set_postfix(loss=f"{loss.item():.4f}")
    bar.close()
    return net.eval()
