"""Benchmark: one RL epoch of the trainer against a plain ddpo-pytorch-style loop, in one process.

    python bench/rl_epoch.py --tiny          # CPU smoke run on a tiny SD-shaped pipeline
    python bench/rl_epoch.py                 # GPU: SD-1.5 shapes, random weights, 64 images x 50 steps

An epoch is sampling N images with DDIM (eta 1) under CFG while recording log-probabilities, then one
PPO pass over every (image, timestep) with LoRA rank 4 on the attention projections. Rewards do not
matter for speed: both loops get the same random advantages.

* plain: the ddpo-pytorch recipe as published (methods.md 2.3): fp32 weights under bf16 autocast,
  sampling batch 8, training batch 8 with the unconditional and conditional halves in one call.
* ours: `rl.sampling` + `rl.train.ppo_update`'s inner step: bf16 base weights with fp32 LoRA
  parameters, sampling batch 64, training batch 32, channels-last.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from rl.advantages import clipped_surrogate
from rl.lora import add_lora
from rl.sampling import sample_trajectories, step_log_prob

TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


def build(tiny: bool, device: str, dtype: torch.dtype):  # noqa: ANN201
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from runner_vs_diffusers import sd15_pipeline

    if not tiny:
        return sd15_pipeline(device, dtype).pipe
    from evalsuite.models import load_model

    return load_model("miniature", device=device).pipe


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def epoch(pipe, n: int, steps: int, sample_batch: int, train_batch: int, autocast: bool, device: str) -> dict:  # noqa: ANN001
    unet = pipe.unet
    params = [p for p in unet.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=3e-4)
    tok = pipe.tokenizer(["a photo of a doctor", ""], padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         return_tensors="pt").input_ids.to(device)
    with torch.no_grad():
        emb = pipe.text_encoder(tok)[0]
    cond, uncond = emb[:1], emb[1:]
    shape = (4, unet.config.sample_size, unet.config.sample_size)
    amp = torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=autocast and device == "cuda")
    sync()
    t0 = time.perf_counter()
    chunks = []
    for k in range(0, n, sample_batch):
        b = min(sample_batch, n - k)
        noise = torch.randn((b, *shape), generator=torch.Generator().manual_seed(k)).to(device, unet.dtype)
        with amp:
            chunks.append(sample_trajectories(unet, pipe.scheduler, cond.expand(b, -1, -1), uncond,
                                              torch.full((b,), 7.5, device=device), noise, steps, 1.0, seed=k))
    latents = torch.cat([c.latents for c in chunks])
    old = torch.cat([c.log_probs for c in chunks])
    timesteps = chunks[0].timesteps
    sync()
    t_sample = time.perf_counter() - t0
    adv = torch.randn(n, generator=torch.Generator().manual_seed(1)).to(device)
    for start in range(0, n, train_batch):
        idx = torch.arange(start, min(start + train_batch, n), device=device)
        for j in range(steps):
            with amp:
                tj = torch.full((len(idx),), j, device=device)
                scales = torch.full((len(idx),), 7.5, device=device)
                logp = step_log_prob(unet, pipe.scheduler, latents[idx, j], latents[idx, j + 1], timesteps[tj],
                                     cond.expand(len(idx), -1, -1), uncond, scales, 1.0)
                loss, _ = clipped_surrogate(logp.float(), old[idx, j], adv[idx], 1e-4, 5.0)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad()
    sync()
    total = time.perf_counter() - t0
    return {"sample_s": round(t_sample, 2), "train_s": round(total - t_sample, 2), "epoch_s": round(total, 2),
            "train_ms_per_img_step": round(1000 * (total - t_sample) / (n * steps), 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--images", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    n = a.images or (8 if a.tiny else 64)
    steps = a.steps or (4 if a.tiny else 50)
    r: dict = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "images": n, "steps": steps}
    runs = {"plain": dict(dtype=torch.float32, sample_batch=8, train_batch=8, autocast=True),
            "ours": dict(dtype=torch.bfloat16 if device == "cuda" else torch.float32, sample_batch=64,
                         train_batch=32, autocast=False)}
    for name, o in runs.items():
        pipe = build(a.tiny, device, o["dtype"])
        from diffusers import DDIMScheduler

        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
        add_lora(pipe.unet, 4, 4.0, TARGETS)
        if name == "ours":
            pipe.unet.to(memory_format=torch.channels_last)
        epoch(pipe, min(n, 8), min(steps, 2), o["sample_batch"], o["train_batch"], o["autocast"], device)  # warm-up
        r[name] = epoch(pipe, n, steps, o["sample_batch"], o["train_batch"], o["autocast"], device)
        print(json.dumps({name: r[name]}), flush=True)
        del pipe
        if device == "cuda":
            torch.cuda.empty_cache()
    r["speedup_epoch"] = round(r["plain"]["epoch_s"] / r["ours"]["epoch_s"], 3)
    print(json.dumps(r, indent=1))
    if a.out:
        a.out.write_text(json.dumps(r, indent=1))


if __name__ == "__main__":
    main()
