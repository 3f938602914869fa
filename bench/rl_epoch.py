"""Benchmark: one RL epoch of the trainer against a plain ddpo-pytorch-style loop, in one process.

    python bench/rl_epoch.py --tiny          # CPU smoke run on the miniature pipeline
    python bench/rl_epoch.py                 # GPU: SD-1.5 shapes, random weights, 64 images x 50 steps
    python bench/rl_epoch.py --model stabilityai/stable-diffusion-3.5-medium --images 16 --steps 10
                                             # GPU: any family the trainer drives, through its policy

An epoch is sampling N images with DDIM (eta 1) under CFG 7.5 while recording log-probabilities, then
one PPO pass over every (image, timestep) with LoRA rank 4 on the attention projections. Rewards do
not matter for speed: every variant gets the same random advantages.

* plain: the ddpo-pytorch recipe as published (docs/methods.md, "Advantages and the PPO update"): fp32
  weights under bf16 autocast, sampling batch 8, training batch 8 with the unconditional and conditional
  halves in one call.
* ours: what `rl.train` does with `mixed_precision: bf16` (the same functions: `add_lora`,
  `cast_frozen`, `sample_trajectories`, `step_log_prob`, `attention_order`): frozen linear and conv
  weights stored in bf16 under bf16 autocast with fp32 LoRA parameters, cuDNN autotuning, the attention kernel order
  of `--attention`, sampling batch 64, training batch 32.
* ours_compiled: the same with `training.compile: true` (the UNet compiled in place, fixed shapes).
* policy (with `--model M`, alone): one epoch of model M (a folder or hub id of any family `rl.families`
  trains: SD 1.x/2.x, SDXL, SD3/SD3.5, Flux) through its policy (`rl.families.policy_for`: DDIM eta 1 for
  UNet models, the flow SDE at noise level 0.7 for flow models), with `rl.train`'s bf16 storage on a GPU;
  sampling batch `--sample-batch`, training batch `--train-batch`. No GPU figure has been taken yet.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from evalsuite.models import attention_order
from rl.advantages import clipped_surrogate
from rl.lora import add_lora, cast_frozen
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


def epoch(pipe, n: int, steps: int, sample_batch: int, train_batch: int, device: str,  # noqa: ANN001
          order: tuple[str, ...] | None, fixed_shape: bool) -> dict:
    unet = pipe.unet
    params = [p for p in unet.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=3e-4)
    tok = pipe.tokenizer(["a photo of a doctor", ""], padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         return_tensors="pt").input_ids.to(device)
    with torch.no_grad():
        emb = pipe.text_encoder(tok)[0]
    cond, uncond = emb[:1], emb[1:]
    shape = (4, unet.config.sample_size, unet.config.sample_size)
    amp = torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=device == "cuda")
    sync()
    t0 = time.perf_counter()
    chunks = []
    with attention_order(device, order):
        for k in range(0, n, sample_batch):
            b = min(sample_batch, n - k)
            noise = torch.randn((b, *shape), generator=torch.Generator().manual_seed(k)).to(device)
            with amp:
                chunks.append(sample_trajectories(unet, pipe.scheduler, cond.expand(b, -1, -1), uncond,
                                                  torch.full((b,), 7.5, device=device), noise, steps, 1.0, seed=k,
                                                  fixed_shape=fixed_shape))
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
                                         cond.expand(len(idx), -1, -1), uncond, scales, 1.0, fixed_shape)
                    loss, _ = clipped_surrogate(logp.float(), old[idx, j], adv[idx], 1e-4, 5.0)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                opt.step()
                opt.zero_grad()
        sync()
    total = time.perf_counter() - t0
    return {"sample_s": round(t_sample, 2), "train_s": round(total - t_sample, 2), "epoch_s": round(total, 2),
            "train_ms_per_img_step": round(1000 * (total - t_sample) / (n * steps), 3)}


def policy_epoch(model: str, n: int, steps: int, sample_batch: int, train_batch: int, device: str) -> dict:
    """One epoch of `model` through its policy (module docstring, "policy"): sample n chains at guidance 4.5,
    then one PPO pass over every (image, step)."""
    from evalsuite.models import load_model
    from rl.families import TRAINABLE, policy_for

    pipe = load_model(model, device=device).pipe
    flow = TRAINABLE[type(pipe).__name__].policy == "flow"
    policy = policy_for(pipe, steps, 0.7 if flow else 1.0, model)
    torch.manual_seed(0)
    params = add_lora(policy.denoiser, 4, 4.0, TARGETS)
    if device == "cuda":
        for module in (policy.denoiser, *policy.text_encoders.values()):
            cast_frozen(module, torch.bfloat16)
    opt = torch.optim.AdamW(params, lr=3e-4)
    amp = torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=device == "cuda")
    with torch.no_grad(), amp:
        cond, uncond = policy.encode(["a photo of a doctor"]), policy.encode_empty()
    sync()
    t0 = time.perf_counter()
    chunks = []
    for k in range(0, n, sample_batch):
        b = min(sample_batch, n - k)
        with amp:
            chunks.append(policy.sample(policy.denoiser, cond.repeat(b), uncond, torch.full((b,), 4.5, device=device),
                                        policy.initial_noise(range(k, k + b)), seed=k))
    latents, old = torch.cat([c.latents for c in chunks]), torch.cat([c.log_probs for c in chunks])
    sync()
    t_sample = time.perf_counter() - t0
    adv = torch.randn(n, generator=torch.Generator().manual_seed(1)).to(device)
    for start in range(0, n, train_batch):
        idx = torch.arange(start, min(start + train_batch, n), device=device)
        for j in range(steps):
            step = torch.full((len(idx),), j)
            with amp:
                x = latents[idx, j]
                out = policy.output(policy.denoiser, x, step, cond.repeat(len(idx)), uncond,
                                    torch.full((len(idx),), 4.5, device=device))
                logp = policy.step_log_prob(out, x, latents[idx, j + 1], step)
                loss, _ = clipped_surrogate(logp.float(), old[idx, j], adv[idx], 1e-4, 5.0)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad()
    sync()
    total = time.perf_counter() - t0
    return {"pipeline": type(pipe).__name__, "sample_s": round(t_sample, 2), "train_s": round(total - t_sample, 2),
            "epoch_s": round(total, 2), "train_ms_per_img_step": round(1000 * (total - t_sample) / (n * steps), 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--images", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--variants", default="plain,ours,ours_compiled")
    ap.add_argument("--attention", default="", help="kernel priority for ours, e.g. CUDNN_ATTENTION,FLASH_ATTENTION")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--model", default=None, help="the policy variant alone, on this model (folder or hub id)")
    ap.add_argument("--sample-batch", type=int, default=8, help="with --model: images sampled together")
    ap.add_argument("--train-batch", type=int, default=4, help="with --model: images per training micro-batch")
    a = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    n = a.images or (8 if a.tiny else 64)
    steps = a.steps or (4 if a.tiny else 50)
    r: dict = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "images": n, "steps": steps}
    if a.model:
        r["policy"] = policy_epoch(a.model, n, steps, min(a.sample_batch, n), min(a.train_batch, n), device)
        print(json.dumps(r, indent=1))
        if a.out:
            a.out.write_text(json.dumps(r, indent=1))
        return
    runs = {"plain": dict(sample_batch=8, train_batch=8, ours=False, compile=False),
            "ours": dict(sample_batch=64, train_batch=32, ours=True, compile=False),
            "ours_compiled": dict(sample_batch=64, train_batch=32, ours=True, compile=True)}
    order = tuple(a.attention.split(",")) if a.attention else None
    r["attention_order"] = list(order) if order else "pytorch"
    for name in a.variants.split(","):
        o = runs[name]
        pipe = build(a.tiny, device, torch.float32)
        from diffusers import DDIMScheduler

        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
        torch.manual_seed(0)
        add_lora(pipe.unet, 4, 4.0, TARGETS)
        if o["ours"] and device == "cuda":  # what rl.train does under mixed_precision: bf16
            pipe.text_encoder.requires_grad_(False)
            for module in (pipe.unet, pipe.text_encoder):
                cast_frozen(module, torch.bfloat16)
            torch.backends.cudnn.benchmark = True
        if o["compile"]:
            pipe.unet.compile(dynamic=False)
        sb, tb = min(o["sample_batch"], n), min(o["train_batch"], n)
        t_warm = time.perf_counter()  # warm-up (and compilation) on the epoch's own shapes, 2 steps
        epoch(pipe, n, min(steps, 2), sb, tb, device, order if o["ours"] else None, o["compile"])
        r[name] = {"warmup_s": round(time.perf_counter() - t_warm, 1),
                   **epoch(pipe, n, steps, sb, tb, device, order if o["ours"] else None, o["compile"])}
        print(json.dumps({name: r[name]}), flush=True)
        if a.out:
            a.out.write_text(json.dumps(r, indent=1))
        del pipe
        if device == "cuda":
            torch.cuda.empty_cache()
    for name in ("ours", "ours_compiled"):
        if "plain" in r and name in r:
            r[f"speedup_epoch_{name}"] = round(r["plain"]["epoch_s"] / r[name]["epoch_s"], 3)
    print(json.dumps(r, indent=1))
    if a.out:
        a.out.write_text(json.dumps(r, indent=1))


if __name__ == "__main__":
    main()
