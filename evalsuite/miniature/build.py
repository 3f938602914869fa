"""Rebuild the whole miniature world from one seed: data, tokenizer, CLIP, VAE, UNet, classifier.

    evalsuite miniature build [--out DIR] [--seed 0] [--quick]

The output folder holds `pipeline/` (a `StableDiffusionPipeline` saved with `save_pretrained` in
safetensors: plain `DiffusionPipeline.from_pretrained(folder / "pipeline")` loads it offline),
`clip/` (the full miniature `CLIPModel` with its processor), `classifier/` and `build.json` (seed,
step counts, timings, versions). The folder is written under a temporary name and renamed at the end,
so an interrupted build leaves nothing half-written.
"""

from __future__ import annotations

import json
import logging
import platform
import resource
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import DDIMScheduler, DDPMScheduler, StableDiffusionPipeline
from transformers import CLIPImageProcessor, CLIPProcessor, CLIPTextModel

from .captions import vocabulary
from .classifier import save_classifier
from .tokenizer import build_tokenizer
from .train import MiniData, train_classifier, train_clip, train_unet, train_vae

log = logging.getLogger(__name__)

BETAS = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000}


@dataclass(frozen=True)
class BuildConfig:
    """Step counts of each stage. `quick()` is the shortened build the tests run."""

    seed: int = 0
    per_occupation: int = 600
    clip_steps: int = 600
    vae_steps: int = 900
    unet_steps: int = 2400
    classifier_steps: int = 400

    @classmethod
    def quick(cls, seed: int = 0) -> BuildConfig:
        return cls(seed=seed, per_occupation=12, clip_steps=4, vae_steps=4, unet_steps=4, classifier_steps=4)


def build_world(out: Path, config: BuildConfig = BuildConfig(), threads: int | None = None) -> dict:
    """Train every component and save the miniature world to `out` (replaced atomically)."""
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()

    def lap(name: str) -> None:
        timings[name] = round(time.perf_counter() - t0 - sum(timings.values()), 1)
        log.info("%s done in %.1f s", name, timings[name])

    data = MiniData.make(config.per_occupation, rng)
    tokenizer = build_tokenizer(vocabulary(), tmp / "tokenizer")
    lap("data")
    clip = train_clip(data, tokenizer, config.clip_steps, rng)
    lap("clip")
    vae = train_vae(data, config.vae_steps, rng)
    lap("vae")
    text_encoder = CLIPTextModel(clip.config.text_config)
    text_encoder.load_state_dict(clip.text_model.state_dict())
    text_encoder.eval()
    unet = train_unet(data, vae, clip, tokenizer, DDPMScheduler(**BETAS), config.unet_steps, rng)
    lap("unet")
    net = train_classifier(data, vae, config.classifier_steps, rng)
    lap("classifier")

    scheduler = DDIMScheduler(**BETAS, clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(tmp / "pipeline", safe_serialization=True)
    processor = CLIPProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                                           image_mean=[0.5] * 3, image_std=[0.5] * 3, do_convert_rgb=True),
        tokenizer=tokenizer)
    clip.save_pretrained(tmp / "clip", safe_serialization=True)
    processor.save_pretrained(tmp / "clip")
    save_classifier(net, tmp / "classifier")
    shutil.rmtree(tmp / "tokenizer")
    (tmp / "words.txt").write_text("\n".join(vocabulary()) + "\n")
    lap("save")

    import diffusers
    import transformers

    info = {
        "config": asdict(config),
        "timings_s": timings,
        "total_s": round(time.perf_counter() - t0, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "threads": torch.get_num_threads(),
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__,
                     "transformers": transformers.__version__, "python": platform.python_version()},
    }
    (tmp / "build.json").write_text(json.dumps(info, indent=1))
    from .report import measure_confusion

    measure_confusion(tmp, n_per=2 if config.unet_steps < 100 else 24)
    info["timings_s"]["confusion"] = round(time.perf_counter() - t0 - info["total_s"], 1)
    (tmp / "build.json").write_text(json.dumps(info, indent=1))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return info
