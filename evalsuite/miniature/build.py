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
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DDPMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTextModel

from .captions import vocabulary
from .classifier import load_classifier, save_classifier
from .tokenizer import build_tokenizer
from .train import MiniData, cpu_has_bf16, train_classifier, train_clip, train_unet, train_vae
from .world import OCCUPATIONS

log = logging.getLogger(__name__)
T = TypeVar("T")

BETAS = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000}
# The UNet predicts epsilon, as SD 1.x does. v-prediction (Salimans & Ho, ICLR 2022) was tried for the
# guidance-1 fidelity below and did not help (mean tone TV over six occupations 0.137 against 0.132).
PREDICTION_TYPE = "epsilon"


@dataclass(frozen=True)
class BuildConfig:
    """Step counts of each stage. `quick()` is the shortened build the tests run.

    Tried and not kept, both for the guidance-1 fidelity of `docs/miniature-report.md` (mean tone TV of
    six occupations at guidance 1 with these counts: 0.132, from the noises the report drew then; it now
    draws each occupation's noises by its index in the world, which moved farmer's TV from 0.030 to
    0.063 and the mean to 0.138): v-prediction (0.137), and 1500 CLIP steps
    with 2400 UNet steps (0.177). At 600 steps the CLIP reads the 3×3 occupation badge poorly, so
    occupations sharing a hat style get close text states; 1500 steps separated them (zero-shot
    occupation accuracy 0.47 -> 0.95) without bringing the tone shares closer to the training skew.
    Drawing UNet training timesteps toward high noise, where the tone is decided (t/T = 1 - (1 - u)^2),
    moved the mean / max TV from 0.132 / 0.245 to 0.123 / 0.180 with the default sampler (eta = 0) but
    from 0.077 / 0.137 to 0.085 / 0.182 with eta = 1: within the noise of 200 images per occupation;
    not kept. Training longer helps a little: 3500 UNet steps (40 % more, about 7 more minutes of build)
    gave 0.115 / 0.230 (eta = 0) and 0.072 / 0.122 (eta = 1), still above 0.10 for engineer and nurse
    and over the build's 30-minute budget. A global text path (diffusers' `addition_embed_type="text"`:
    attention-pooled text states added to the timestep embedding, as GLIDE and Imagen condition on both
    the pooled and the per-token text) at the same 2500 steps and the same stage time gave 0.141 / 0.260
    and 0.088 / 0.187: no better; not kept. The shares do not come from the sampler's step count either:
    the shipped UNet with eta = 1 and 50 steps gives 0.084 / 0.142. Nor from the caption mix: 70 % plain
    occupation captions instead of 50 % (the attribute-explicit forms cut in proportion) gave 0.124 / 0.225
    and 0.092 / 0.192. What the probes show instead is leakage between occupations that share a hat:
    fitted as w * own + (1 - w) * hat-mates' mean, the reported occupations at eta = 1 have w = 0.84-0.92
    where the dominant share is 0.7-0.8 and w = 1.0 at 0.9 (lawyer, farmer).
    """

    seed: int = 0
    per_occupation: int = 600
    clip_steps: int = 600
    vae_steps: int = 900
    unet_steps: int = 2500
    classifier_steps: int = 500

    @classmethod
    def quick(cls, seed: int = 0) -> BuildConfig:
        return cls(seed=seed, per_occupation=12, clip_steps=4, vae_steps=4, unet_steps=4, classifier_steps=4)


def build_world(out: Path, config: BuildConfig = BuildConfig(), threads: int | None = None) -> dict:
    """Train every component and save the miniature world to `out` (replaced atomically).

    Each trained stage is kept in `<out>.partial/stages/` as soon as it is done, so a killed build
    started again with the same config resumes after the last finished stage. Every stage draws from
    its own generator seeded by (seed, stage), so a resumed build equals an uninterrupted one.
    """
    if threads:
        torch.set_num_threads(threads)
    tmp = out.with_name(out.name + ".partial")
    stages = tmp / "stages"
    wanted = json.dumps(asdict(config), sort_keys=True)
    if (tmp / "config.json").exists() and (tmp / "config.json").read_text() != wanted:
        shutil.rmtree(tmp)
    stages.mkdir(parents=True, exist_ok=True)
    (tmp / "config.json").write_text(wanted)
    saved = tmp / "timings.json"
    timings: dict[str, float] = json.loads(saved.read_text()) if saved.exists() else {}

    trained_here: list[str] = []

    def stage(name: str, index: int, train: Callable[[np.random.Generator], T], load: Callable[[Path], T],
              save: Callable[[T, Path], None]) -> T:
        folder = stages / name
        if folder.is_dir():
            log.info("%s: reusing the finished stage in %s", name, folder)
            return load(folder)
        t0 = time.perf_counter()
        torch.manual_seed(config.seed * 1000 + index)
        result = train(np.random.default_rng([config.seed, index]))
        save(result, folder.with_suffix(".tmp"))
        folder.with_suffix(".tmp").rename(folder)
        timings[name] = round(time.perf_counter() - t0, 1)
        trained_here.append(name)
        (tmp / "timings.json").write_text(json.dumps(timings))
        log.info("%s done in %.1f s", name, timings[name])
        return result

    t0 = time.perf_counter()
    data = MiniData.make(config.per_occupation, np.random.default_rng([config.seed, 0]))
    tokenizer = build_tokenizer(vocabulary(), tmp / "tokenizer")

    def save_pretrained(model: Any, folder: Path) -> None:
        model.save_pretrained(folder, safe_serialization=True)

    clip = stage("clip", 1, lambda rng: train_clip(data, tokenizer, config.clip_steps, rng),
                 lambda f: CLIPModel.from_pretrained(f, use_safetensors=True).eval(), save_pretrained)
    bf16 = cpu_has_bf16()
    vae = stage("vae", 2, lambda rng: train_vae(data, config.vae_steps, rng, bf16=bf16),
                lambda f: AutoencoderKL.from_pretrained(f, use_safetensors=True).eval(), save_pretrained)
    noise_scheduler = DDPMScheduler(**BETAS, prediction_type=PREDICTION_TYPE)
    unet = stage("unet", 3, lambda rng: train_unet(data, vae, clip, tokenizer, noise_scheduler,
                                                   config.unet_steps, rng, bf16=bf16),
                 lambda f: UNet2DConditionModel.from_pretrained(f, use_safetensors=True).eval(), save_pretrained)
    net = stage("classifier", 4, lambda rng: train_classifier(data, vae, config.classifier_steps, rng),
                load_classifier, save_classifier)
    text_encoder = CLIPTextModel(clip.config.text_config)
    text_encoder.load_state_dict(clip.text_model.state_dict())
    text_encoder.eval()
    final = tmp / "world"
    shutil.rmtree(final, ignore_errors=True)
    final.mkdir()

    scheduler = DDIMScheduler(**BETAS, clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                              prediction_type=PREDICTION_TYPE)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(final / "pipeline", safe_serialization=True)
    processor = CLIPProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                                           image_mean=[0.5] * 3, image_std=[0.5] * 3, do_convert_rgb=True),
        tokenizer=tokenizer)
    clip.save_pretrained(final / "clip", safe_serialization=True)
    processor.save_pretrained(final / "clip")
    save_classifier(net, final / "classifier")
    (final / "words.txt").write_text("\n".join(vocabulary()) + "\n")
    from .report import measure_confusion

    t1 = time.perf_counter()
    quick = config.unet_steps < 100
    measure_confusion(final, n_per=2 if quick else 12, steps=2 if quick else 20,
                      occupations=("doctor", "nurse") if quick else tuple(OCCUPATIONS))
    timings["confusion"] = round(time.perf_counter() - t1, 1)
    trained_here.append("confusion")

    import diffusers
    import transformers

    info = {
        "config": asdict(config),
        "timings_s": timings,
        # every stage's own time (earlier, interrupted runs included) plus this run's data, assembly, saving
        "total_s": round(sum(timings.values()) + time.perf_counter() - t0 - sum(timings[k] for k in trained_here), 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "threads": torch.get_num_threads(),
        "vae_and_unet_autocast": "bfloat16" if bf16 else "float32",
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__,
                     "transformers": transformers.__version__, "python": platform.python_version()},
    }
    (final / "build.json").write_text(json.dumps(info, indent=1))
    shutil.rmtree(out, ignore_errors=True)
    final.rename(out)
    shutil.rmtree(tmp)
    return info
