"""Training steps of the miniature world: CLIP, VAE, UNet and the attribute classifier.

Each function trains one component from the synthetic data (`MiniData`) with a progress bar and
returns it. `build.py` runs them in order and saves the results; sizes follow what was measured to
fit two CPU cores (32×32 images, 8×8×4 latents; docs/methods.md, "The miniature world").
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

from ..generate import to_uint8
from .captions import sample_captions
from .classifier import AttributeNet
from .oracle import PALETTE as ORACLE_PALETTE
from .oracle import read_attributes
from .render import Portrait, render_batch, sample_portraits
from .world import AGE_NAMES, AGES, OCCUPATIONS, SKIN_TONES, TONE_NAMES

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
              lr: float = 2e-3, kl_weight: float = 1e-6, bf16: bool = False) -> AutoencoderKL:
    """Reconstruction plus a small KL term. `bf16`: forward passes under bfloat16 autocast (see
    `train_unet`)."""
    vae = new_vae()
    opt = torch.optim.AdamW(vae.parameters(), lr=lr)
    bar = _bar(steps, "vae")
    for step, idx in enumerate(data.batches(batch, steps, rng)):
        x = data.images[idx]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            post = vae.encode(x).latent_dist
            rec = vae.decode(post.sample()).sample
        loss = F.mse_loss(rec.float(), x) + kl_weight * post.kl().float().mean()
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
               lr: float = 1e-3, ema_decay: float = 0.999, bf16: bool = False) -> UNet2DConditionModel:
    """Denoising training on VAE latents with the target of `noise_scheduler`'s prediction type
    (epsilon, v = sqrt(a_t) eps - sqrt(1 - a_t) x0, or x0 itself), conditioned on the frozen CLIP text
    tower's hidden states; captions are redrawn every step (including the empty caption for guidance). Returns the
    EMA weights. `bf16` runs the forward pass under bfloat16 autocast (weights, optimiser and loss stay
    float32); use it only where the CPU has native bfloat16 (`cpu_has_bf16`)."""
    from ..models import use_math_attention

    unet = new_unet(clip.text_model.config.hidden_size)
    use_math_attention(unet)
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
    kind = noise_scheduler.config.prediction_type
    if kind not in ("epsilon", "v_prediction", "sample"):
        raise ValueError(f"train_unet: prediction_type {kind!r} is not one of epsilon, v_prediction, sample")
    gen = torch.Generator().manual_seed(int(rng.integers(2**31)))
    bar = _bar(steps, "unet")
    for step, idx in enumerate(data.batches(batch, steps, rng)):
        it = torch.from_numpy(idx)
        x0 = (mean[it] + std[it] * torch.randn(mean[it].shape, generator=gen)) * scale
        cond = embed(sample_captions([data.portraits[i] for i in idx], rng))
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, n_train, (len(idx),), generator=gen)
        xt = noise_scheduler.add_noise(x0, noise, t)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            pred = unet(xt, t, cond).sample
        if kind == "v_prediction":
            target = noise_scheduler.get_velocity(x0, noise, t)
        else:
            target = noise if kind == "epsilon" else x0
        loss = F.mse_loss(pred.float(), target)
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
    ema.set_default_attn_processor()  # saved and shipped with diffusers' default attention
    return ema.eval()


def cpu_has_bf16() -> bool:
    """True where the CPU computes bfloat16 natively (AVX512-BF16 or AMX); elsewhere autocast to
    bfloat16 is emulated and slower than float32."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


# ---------------------------------------------------------------- classifier


def _palette(colours: dict[str, tuple[int, int, int]]) -> torch.Tensor:
    return torch.tensor(list(colours.values()), dtype=torch.float32) / 127.5 - 1


def _safe_blend(colours: dict[str, tuple[int, int, int]], margin: float = 0.9) -> torch.Tensor:
    """(K, K) table: how far (as a fraction of the way) colour i may move toward colour j while the
    oracle's nearest-palette reading stays i, times `margin`."""
    names = list(colours)
    rgb = np.asarray(list(colours.values()), dtype=np.float32)
    own_index = [int(np.argmin(((ORACLE_PALETTE - c) ** 2).sum(1))) for c in rgb]
    fractions = np.linspace(0, 1, 201, dtype=np.float32)
    table = torch.zeros(len(names), len(names))
    for i in range(len(names)):
        for j in range(len(names)):
            if i != j:
                path = rgb[i] + fractions[:, None] * (rgb[j] - rgb[i])
                nearest = np.argmin(((path[:, None] - ORACLE_PALETTE[None]) ** 2).sum(-1), axis=1)
                table[i, j] = margin * float(fractions[np.argmax(nearest != own_index[i])])
    return table


def blend_colours(images: torch.Tensor, tone: torch.Tensor, age: torch.Tensor, gen: torch.Generator,
                  max_noise: float = 0.08) -> torch.Tensor:
    """Renders made to look like generated images, whose skin and hair colours fall between palette
    entries: each face moves a random part of the way to an adjacent skin tone, the hair likewise
    toward the other hair colour, at most 90 % of the way to where the oracle's nearest-palette reading
    would change (`_safe_blend`); every pixel then gets Gaussian noise (standard deviation up to
    `max_noise`, in [-1, 1] units). Labels for the result are read by the oracle."""
    skin, hair = _palette(SKIN_TONES), _palette(AGES)
    n = len(images)
    out = images.clone()
    step = torch.where(torch.rand(n, generator=gen) < 0.5, -1, 1)
    neighbour = torch.where(tone == 0, 1, torch.where(tone == len(skin) - 1, len(skin) - 2, tone + step))
    for pal, limit, own, other in ((skin, _safe_blend(SKIN_TONES), tone, neighbour),
                                   (hair, _safe_blend(AGES), age, 1 - age)):
        mask = (images - pal[own][:, :, None, None]).abs().amax(1, keepdim=True) < 1e-3
        shift = (pal[other] - pal[own]) * (torch.rand(n, generator=gen) * limit[own, other])[:, None]
        out = out + mask * shift[:, :, None, None]
    sigma = torch.rand(n, 1, 1, 1, generator=gen) * max_noise
    return (out + sigma * torch.randn(out.shape, generator=gen)).clamp(-1, 1)


def oracle_labels(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The oracle's tone and age reading of images in [-1, 1] (-1 where it finds no person)."""
    tone, age = read_attributes(to_uint8(images))
    return torch.from_numpy(tone), torch.from_numpy(age)


def train_classifier(data: MiniData, vae: AutoencoderKL, steps: int, rng: np.random.Generator,
                     batch: int = 128, lr: float = 3e-3) -> AttributeNet:
    """Supervised tone/age classifier. Each batch is half renders with fresh colour blending and noise
    (`blend_colours`), half VAE reconstructions of one fixed blended copy of the data, so it reads
    clean, decoded and generated-looking images alike. Targets are the oracle's reading of the very
    image the classifier sees, so the classifier learns the oracle's decision rule (the truth the
    suite measures against), including on colours between palette entries."""
    net = AttributeNet()
    gen = torch.Generator().manual_seed(int(rng.integers(2**31)))
    with torch.no_grad():
        blended = blend_colours(data.images, data.tone, data.age, gen)
        recon = torch.cat([vae.decode(vae.encode(blended[i:i + 512]).latent_dist.mean).sample
                           for i in range(0, len(blended), 512)]).clamp(-1, 1)
    recon_tone, recon_age = oracle_labels(recon)
    opt = torch.optim.AdamW(net.parameters(), lr=lr)
    bar = _bar(steps, "classifier")
    for step, idx in enumerate(data.batches(batch, steps, rng)):
        half = len(idx) // 2
        it, ir = torch.from_numpy(idx[:half]), torch.from_numpy(idx[half:])
        fresh = blend_colours(data.images[it], data.tone[it], data.age[it], gen)
        fresh_tone, fresh_age = oracle_labels(fresh)
        x = torch.cat([fresh, recon[ir]])
        tone = torch.cat([fresh_tone, recon_tone[ir]])
        age = torch.cat([fresh_age, recon_age[ir]])
        tone_logits, age_logits = net(x)
        loss = (F.cross_entropy(tone_logits, tone, ignore_index=-1)
                + F.cross_entropy(age_logits, age, ignore_index=-1))
        _cosine_lr(opt, step, steps, lr)
        opt.zero_grad()
        loss.backward()
        opt.step()
        bar.update()
        bar.set_postfix(loss=f"{loss.item():.4f}")
    bar.close()
    return net.eval()
