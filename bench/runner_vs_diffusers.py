"""Benchmark: the runner's batched generation against plain diffusers on the same work, in one process.

    python bench/runner_vs_diffusers.py                      # CPU, the built-in miniature model
    python bench/runner_vs_diffusers.py --sd15 --dtype bfloat16 --batch 64 --compile   # GPU, SD-1.5 shapes

Plain diffusers makes one pipeline call per (prompt, scale), as users run it; the runner's
`BatchedGenerator` batches across prompts and scales. Both start from the same paired noise, so the
images are compared too (max and mean absolute difference in 8-bit units, PSNR). With `--sd15` the
pipeline has Stable Diffusion 1.5's shapes (UNet, VAE, CLIP-L text encoder) and random weights: the
compute per step is the real checkpoint's, so images/s are real (bench/README.md: the plain-diffusers
baseline measured on the same card).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from evalsuite import models
from evalsuite.generate import BatchedGenerator, initial_noise, latent_shape, unit_seed
from evalsuite.miniature import OCCUPATIONS
from evalsuite.models import DTYPES, LoadedModel, load_model


def sd15_pipeline(device: str, dtype: torch.dtype) -> LoadedModel:
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from evalsuite.miniature.captions import vocabulary
    from evalsuite.miniature.tokenizer import build_tokenizer

    tok = build_tokenizer(vocabulary(), Path(tempfile.mkdtemp()) / "tok", max_length=77)
    torch.manual_seed(0)
    with torch.device(device):
        unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8,
                                    block_out_channels=(320, 640, 1280, 1280), layers_per_block=2)
        vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
        te = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_attention_heads=12,
                                          num_hidden_layers=12, vocab_size=49408, max_position_embeddings=77,
                                          projection_dim=768, hidden_act="quick_gelu",
                                          bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                          pad_token_id=tok.pad_token_id))
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                          set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=tok, unet=unet, scheduler=sched,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.to(device, dtype)
    pipe.set_progress_bar_config(disable=True)
    return LoadedModel(pipe=pipe, model_id="sd15-shaped-random", revision=None,
                       dtype=str(dtype).replace("torch.", ""), device=device)


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def plain(model: LoadedModel, work: list[tuple[str, float, list[int]]], steps: int) -> tuple[np.ndarray, float]:
    pipe, shape = model.pipe, latent_shape(model.pipe)
    out = []
    sync()
    t0 = time.perf_counter()
    for prompt, scale, seeds in work:
        noise = initial_noise(seeds, shape).to(model.device, pipe.unet.dtype)
        images = pipe(prompt=[prompt] * len(seeds), guidance_scale=scale, latents=noise, num_inference_steps=steps,
                      output_type="np").images
        out.append((np.asarray(images) * 255).round().astype(np.uint8))
    sync()
    return np.concatenate(out), time.perf_counter() - t0


def batched(gen: BatchedGenerator, work: list[tuple[str, float, list[int]]], batch: int) -> tuple[np.ndarray, float]:
    units = [(p, g, s) for p, g, seeds in work for s in seeds]
    out = []
    sync()
    t0 = time.perf_counter()
    for k in range(0, len(units), batch):
        chunk = units[k:k + batch]
        out.append(gen.generate([u[0] for u in chunk], [u[1] for u in chunk], [u[2] for u in chunk]))
    sync()
    return np.concatenate(out), time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sd15", action="store_true", help="SD-1.5-shaped pipeline with random weights (512 px)")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--images", type=int, default=8, help="images per prompt and scale")
    ap.add_argument("--scales", default="7.5")
    ap.add_argument("--steps", type=int, default=None, help="default: 50 with --sd15, else 20")
    ap.add_argument("--batch", type=int, default=64, help="the runner's batch size")
    ap.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    ap.add_argument("--compile", action="store_true", help="also time the runner with torch.compile")
    ap.add_argument("--no-eager", action="store_true", help="with --compile: time only the compiled runner")
    ap.add_argument("--attention", default="", help="the runner's attention kernel priority on a GPU, e.g. "
                    "CUDNN_ATTENTION,FLASH_ATTENTION (evalsuite.models.CUDA_ATTENTION_ORDER); default: as shipped")
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = DTYPES[a.dtype]
    steps = a.steps or (50 if a.sd15 else 20)
    model = sd15_pipeline(device, dtype) if a.sd15 else load_model("miniature", dtype=a.dtype, device=device)
    scales = [float(x) for x in a.scales.split(",")]
    names = list(OCCUPATIONS)[: a.prompts]
    work = [(f"a photo of a {o}", g, [unit_seed("bench", o, i) for i in range(a.images)])
            for o in names for g in scales]
    n = a.prompts * len(scales) * a.images
    where = torch.cuda.get_device_name() if device == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    r: dict[str, object] = {"device": where,
                            "model": model.model_id, "dtype": a.dtype, "steps": steps, "images": n,
                            "runner_batch": a.batch, "compile": a.compile, "scales": scales}
    plain(model, work[:1], steps)  # warm-up
    ref, t_plain = plain(model, work, steps)
    r["plain_img_s"] = round(n / t_plain, 3)
    print(json.dumps(r), flush=True)
    if a.attention:
        models.CUDA_ATTENTION_ORDER = tuple(a.attention.split(","))
    r["attention_order"] = list(models.CUDA_ATTENTION_ORDER or ()) or "pytorch"
    variants = [] if a.compile and a.no_eager else [("runner", False)]
    variants += [("runner_compiled", True)] if a.compile else []
    for name, compiled in variants:
        gen = BatchedGenerator(model, steps, compile=compiled)
        t0 = time.perf_counter()
        batched(gen, work, a.batch)  # warm-up (and compilation)
        r[f"{name}_warmup_s"] = round(time.perf_counter() - t0, 1)
        ours, t_ours = batched(gen, work, a.batch)
        r[f"{name}_img_s"] = round(n / t_ours, 3)
        r[f"{name}_ratio_over_plain"] = round(t_plain / t_ours, 3)
        diff = np.abs(ours.astype(np.int16) - ref.astype(np.int16))
        mse = float((diff.astype(np.float64) ** 2).mean())
        r[f"{name}_max_abs_diff_u8"], r[f"{name}_mean_abs_diff_u8"] = int(diff.max()), round(float(diff.mean()), 4)
        r[f"{name}_psnr_db"] = round(10 * np.log10(255**2 / mse), 2) if mse > 0 else float("inf")
        print(json.dumps(r), flush=True)
        if a.out:  # after every variant, so a run cut short keeps what it measured
            a.out.write_text(json.dumps(r, indent=1))
    print(json.dumps(r, indent=1), flush=True)


if __name__ == "__main__":
    main()
