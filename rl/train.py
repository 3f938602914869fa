"""The RL fine-tuning recipe: DDPO-IS over the denoising chain with LoRA and set-level rewards.

Reads top to bottom: config -> build -> evaluate the base model -> loop over epochs {sample groups,
reward, advantage, PPO update, log, checkpoint} -> save the adapter -> evaluate the tuned model.

Sources: DDPO (Black et al., ICLR 2024) for the MDP, the per-step log-probability, the clipped
importance ratio and the per-prompt statistics; Miao et al. (CVPR 2024) for the set-level diversity
reward, reconstructed as the leave-one-out credit of an unbiased MMD² to a balanced reference
(../shared/reference/methods.md 1.3; their code was never released).

Choices made here (documented in rl/configs/miniature.yaml too):
* Each group is G images of one prompt at one guidance scale drawn from the training schedule; the
  set rewards are computed inside the group.
* Every reward component is centred within its group and divided by its pooled within-group spread
  over the batch (`pooled_group_scores`) before weighting, so weights compare components in common
  units (raw LOO credits are ~1e-3, CLIP cosines ~0.3) while a collapsed group, whose credits differ
  only by rounding, contributes next to nothing instead of amplified noise.
* Validity gating: an image whose reward-classifier confidence is below `validity_threshold` gets
  its group's lowest reward minus one, so degenerate images never pay.
* Seeds of epoch e on process r derive from (seed, e, r) alone, so a resumed run draws exactly the
  samples the uninterrupted run drew.
* Several processes (``accelerate launch``): each normalises the rewards of its own samples (the pooled
  within-group spread of `pooled_group_scores`, or its own per-prompt tracker); nothing is gathered, so
  P processes give the advantages of P independent batches. (DDPO gathers the rewards of all processes
  before its per-prompt statistics.) Each process checkpoints its own tracker and RNG states and
  resumes them. Every process takes part in the evaluations, which `evalsuite.runner.run_battery`
  shares out between them; the main process alone writes the shared files (config.json, log.jsonl,
  checkpoints, adapters, comparison.md).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from tqdm.auto import tqdm

from evalsuite.battery import Battery, battery_from_dict, load_battery
from evalsuite.classifiers import ClassifierContext, get_classifier, get_embedder
from evalsuite.errors import SuiteError
from evalsuite.generate import initial_noise, latent_shape, to_uint8
from evalsuite.models import attention_order, load_model

from .advantages import PerPromptStatTracker, clipped_surrogate, group_zscore, pooled_group_scores
from .checkpoint import (
    capture_rng,
    latest_checkpoint,
    load_checkpoint,
    load_process_state,
    restore_rng,
    save_checkpoint,
)
from .compare import class_table, compare_runs, to_markdown, validity_by_class
from .config import TrainConfig, config_from_dict
from .ddim import ddim_step_kl
from .lora import adapters_disabled, add_lora, cast_frozen, lora_named_parameters, save_adapter
from .rewards import (
    alignment_reward,
    balance_reward,
    confidence_reward,
    diversity_reward,
    drift_reward,
    hard_labels,
    reference_from_target,
)
from .sampling import (
    encode_base_prompts,
    encode_prompts,
    guided_eps,
    sample_trajectories,
    step_log_prob,
    step_log_prob_and_kl,
)

log = logging.getLogger("rl")


@dataclass
class Batch:
    """One epoch's samples on this process: N = prompts_per_epoch x group_size."""

    prompts: list[str]  # per sample
    group: torch.Tensor  # (N,) group id
    scales: torch.Tensor  # (N,)
    latents: torch.Tensor  # (N, T+1, C, H, W)
    log_probs: torch.Tensor  # (N, T)
    timesteps: torch.Tensor  # (T,)
    images: np.ndarray  # (N, H, W, 3) uint8
    base_images: np.ndarray | None


class Rewards(NamedTuple):
    """What `compute_rewards` returns for one epoch's batch of N images."""

    total: torch.Tensor  # (N,) float32: the weighted sum of the normalised terms, validity-gated
    parts: dict[str, torch.Tensor]  # reward name -> (N,) float64 raw term values (weight > 0 only)
    valid: torch.Tensor  # (N,) bool: reward-classifier confidence >= validity_threshold
    outputs: dict[str, Any]  # the reward classifier's output per attribute name (ClassifierOutput)


def train(cfg: TrainConfig, *, evaluate: bool = True) -> Path:
    """Run the recipe (module docstring) on every process of the launch; return the output folder."""
    from accelerate import Accelerator
    from accelerate.utils import gather_object

    # ------------------------------------------------------------ build
    acc = Accelerator(mixed_precision=cfg.training.mixed_precision, cpu=not torch.cuda.is_available(),
                      gradient_accumulation_steps=cfg.training.gradient_accumulation_steps * cfg.train_timesteps)
    rank, world = acc.process_index, acc.num_processes
    out = Path(cfg.output_dir)
    battery = load_battery(cfg.battery)
    train_prompts = [p.text for p in battery.prompts() if not p.heldout]
    if not train_prompts:
        raise SuiteError(f"{cfg.battery}: every prompt is held out; nothing to train on")
    arithmetic = cfg.batch_arithmetic(world)
    if acc.is_main_process:
        print(arithmetic)
    n = cfg.sampling.prompts_per_epoch * cfg.sampling.group_size
    assert n % cfg.sampling.batch_size == 0
    assert n % (cfg.training.batch_size * cfg.training.gradient_accumulation_steps) == 0

    model = load_model(cfg.model, device=str(acc.device))
    pipe = model.pipe
    from diffusers import DDIMScheduler

    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    unet, text_encoder = pipe.unet, pipe.text_encoder
    torch.manual_seed(cfg.seed)  # the LoRA initialisation
    params = add_lora(unet, cfg.lora.rank, cfg.lora.alpha, cfg.lora.targets,
                      text_encoder=text_encoder if cfg.lora.text_encoder_rank else None,
                      text_rank=cfg.lora.text_encoder_rank or None)
    pipe.vae.requires_grad_(False)
    if not cfg.lora.text_encoder_rank:
        text_encoder.requires_grad_(False)
    half = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.training.mixed_precision)
    if half is not None:  # autocast casts these weights to `half` on every call anyway: store them so
        for module in (unet, text_encoder):  # (the VAE decodes in fp32: fp16 overflows in SD's VAE)
            cast_frozen(module, half)
    if acc.device.type == "cuda":  # let cuDNN time its conv kernels (GPU runs then vary in the last bits)
        torch.backends.cudnn.benchmark = True
    if cfg.training.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    if cfg.training.compile:
        unet.compile(dynamic=False)  # in place: the sampling (unwrapped) and training (prepared) calls share it
    optimizer = torch.optim.AdamW(params, lr=cfg.training.learning_rate, weight_decay=cfg.training.weight_decay)
    unet, optimizer = acc.prepare(unet, optimizer)

    def trainable() -> dict[str, Any]:
        return lora_named_parameters(acc.unwrap_model(unet), text_encoder if cfg.lora.text_encoder_rank else None)

    ctx = ClassifierContext(device=str(acc.device), miniature=model.is_miniature)
    reward_clf = get_classifier(cfg.reward_classifier, ctx)
    embedder = get_embedder("clip", ctx)
    attrs = [battery.attribute(a) for a in cfg.reward_attributes]
    problems = reward_clf.check(attrs)
    if problems:
        raise SuiteError(f"reward_classifier '{cfg.reward_classifier}': " + "; ".join(problems))
    monitor = get_classifier(cfg.evaluation.classifier, ctx) if model.is_miniature else None
    tracker = PerPromptStatTracker(cfg.training.tracker_buffer, cfg.training.tracker_min_count)
    text_emb = dict(zip(train_prompts, torch.from_numpy(embedder.embed_texts(train_prompts))))

    # ------------------------------------------------------------ resume
    start, log_lines = 0, 0  # a fresh start (no checkpoint yet) begins an empty log
    ckpt_dir = out / "checkpoints"
    if (ckpt := latest_checkpoint(ckpt_dir)) is not None:  # every process reads the same files before any is
        _check_same_run(cfg, out / "config.json")  # written, so a refusal ends them all
        start, extra = load_checkpoint(ckpt, params=trainable(), optimizer=optimizer, rng=False, scaler=acc.scaler)
        own = load_process_state(ckpt, rank, world)
        restore_rng(own["rng"])
        tracker.load_state_dict(own["tracker"])
        log_lines = extra["log_lines"]
        log.info("resumed from %s (epoch %d)", ckpt, start)
    acc.wait_for_everyone()
    if acc.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        _truncate_log(out / "log.jsonl", log_lines)
        (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=1))
    acc.wait_for_everyone()
    if ckpt is None and evaluate:
        _evaluate(cfg, battery, out / "eval" / "base", lora=None)

    # ------------------------------------------------------------ loop
    bar = tqdm(range(start, cfg.training.epochs), desc="rl", unit="epoch", disable=not acc.is_main_process)
    for epoch in bar:
        t0 = time.perf_counter()
        with acc.autocast(), attention_order(acc.device):
            batch = sample_epoch(cfg, pipe, acc.unwrap_model(unet), train_prompts, epoch, rank)
        rewards = compute_rewards(cfg, batch, reward_clf, embedder, attrs, text_emb)
        if cfg.training.advantage == "pooled":
            adv = pooled_group_scores(rewards.total, batch.group)
        elif cfg.training.advantage == "group":
            adv = group_zscore(rewards.total, batch.group)
        else:
            keys = [f"{p}|g={s:g}" for p, s in zip(batch.prompts, batch.scales.tolist())]
            adv = torch.from_numpy(tracker.update(keys, rewards.total.numpy())).float()
        with attention_order(acc.device):
            stats = ppo_update(cfg, acc, pipe, unet, optimizer, batch, adv, epoch, rank)
        row = log_row(epoch, batch, rewards, stats, monitor, attrs)
        row["epoch_s"] = round(time.perf_counter() - t0, 2)  # sample + reward + update on this process
        if acc.is_main_process:
            with open(out / "log.jsonl", "a") as fh:
                fh.write(json.dumps(row) + "\n")
            bar.set_postfix(reward=f"{row['reward_mean']:.3f}", kl=f"{row['approx_kl']:.2e}",
                            share=row["reward_dominant_share"])
        if (epoch + 1) % cfg.checkpoint_every == 0 or epoch + 1 == cfg.training.epochs:
            rng_state = capture_rng()
            processes = gather_object([{"rng": rng_state, "tracker": tracker.state_dict()}])  # in rank order
            if acc.is_main_process:
                lines = (out / "log.jsonl").read_text().count("\n")
                save_checkpoint(ckpt_dir, step=epoch + 1, trainable=trainable(), optimizer=optimizer,
                                rng=rng_state, extra={"log_lines": lines}, keep=cfg.keep_checkpoints,
                                processes=processes,
                                scaler=acc.scaler.state_dict() if acc.scaler is not None else None)
        if evaluate and cfg.evaluation.every and (epoch + 1) % cfg.evaluation.every == 0:
            adapter = out / "eval" / f"adapter-{epoch + 1:04d}"
            if acc.is_main_process:
                save_adapter(pipe, adapter, unet=acc.unwrap_model(unet), metadata=_adapter_metadata(cfg))
            acc.wait_for_everyone()
            _evaluate(cfg, battery, out / "eval" / f"epoch-{epoch + 1:04d}", lora=adapter)

    # ------------------------------------------------------------ save and evaluate
    acc.wait_for_everyone()
    # every process records a digest of its LoRA weights: equal digests show synchronised gradients
    digest = hashlib.sha256(b"".join(p.detach().cpu().numpy().tobytes() for p in trainable().values()))
    record = {"rank": rank, "world": world, "lora_sha256": digest.hexdigest()}
    (out / f"process-{rank}.json").write_text(json.dumps(record))
    if acc.is_main_process:
        save_adapter(pipe, out / "adapter", unet=acc.unwrap_model(unet), metadata=_adapter_metadata(cfg))
    if evaluate:
        acc.wait_for_everyone()
        _evaluate(cfg, battery, out / "eval" / "final", lora=out / "adapter")
        acc.wait_for_everyone()  # the main process has written eval/final: the other processes end here
        if acc.is_main_process and (out / "eval" / "base" / "run.json").exists():
            table = compare_runs(out / "eval" / "base", out / "eval" / "final", cfg.evaluation.classifier,
                                 cfg.reward_attributes[0], cfg.reward_classifier)
            names = (cfg.evaluation.classifier, cfg.reward_attributes[0], cfg.reward_classifier)
            by_class = validity_by_class(out / "eval" / "base", out / "eval" / "final", *names)
            (out / "eval" / "comparison.md").write_text(to_markdown(table, *names) + "\n"
                                                        + class_table(by_class, *names))
    return out


# ---------------------------------------------------------------- the steps of one epoch


@torch.no_grad()
def sample_epoch(cfg: TrainConfig, pipe: Any, unet: Any, prompts: list[str], epoch: int,
                 rank: int) -> Batch:
    s = cfg.sampling
    rng = np.random.default_rng([cfg.seed, epoch, rank])
    chosen = rng.choice(len(prompts), size=s.prompts_per_epoch, replace=len(prompts) < s.prompts_per_epoch)
    scales = rng.choice(np.asarray(s.guidance_scales, dtype=float), size=s.prompts_per_epoch)
    per_sample = [prompts[i] for i in chosen for _ in range(s.group_size)]
    g = torch.tensor(np.repeat(scales, s.group_size), dtype=torch.float32)
    seeds = rng.integers(0, 2**62, size=len(per_sample)).tolist()
    batch_seeds = rng.integers(0, 2**62, size=len(per_sample) // s.batch_size).tolist()
    noise = initial_noise(seeds, latent_shape(pipe)).to(pipe.device)
    uncond = encode_prompts(pipe, [""])
    drift = any(r.name == "drift" and r.weight > 0 for r in cfg.rewards)
    if drift:  # the base model's image: its own text encoder too
        base_uncond = encode_base_prompts(pipe, [""])
    chunks, base = [], []
    for k in range(0, len(per_sample), s.batch_size):
        sl = slice(k, k + s.batch_size)
        cond = encode_prompts(pipe, per_sample[sl])
        rest = (g[sl].to(pipe.device), noise[sl], s.steps, s.eta, batch_seeds[k // s.batch_size], cfg.training.compile)
        chunks.append(sample_trajectories(unet, pipe.scheduler, cond, uncond, *rest))
        if drift:
            base_cond = encode_base_prompts(pipe, per_sample[sl])
            with adapters_disabled(unet):
                base.append(sample_trajectories(unet, pipe.scheduler, base_cond, base_uncond, *rest).final)
    latents = torch.cat([c.latents for c in chunks])

    def decode(z: torch.Tensor) -> np.ndarray:  # in fp32 whatever the autocast around: as the evaluation does
        with torch.autocast(pipe.device.type, enabled=False):
            return to_uint8(pipe.vae.decode(z.float() / pipe.vae.config.scaling_factor).sample)

    return Batch(prompts=per_sample, group=torch.arange(s.prompts_per_epoch).repeat_interleave(s.group_size),
                 scales=g, latents=latents, log_probs=torch.cat([c.log_probs for c in chunks]),
                 timesteps=chunks[0].timesteps, images=decode(latents[:, -1]),
                 base_images=decode(torch.cat(base)) if base else None)


def compute_rewards(cfg: TrainConfig, batch: Batch, clf: Any, embedder: Any, attrs: list[Any],
                    text_emb: dict[str, torch.Tensor]) -> Rewards:
    """Total reward per image (higher is better), the raw components, the validity mask and the reward
    classifier's outputs (`Rewards`). Each term with weight > 0 is computed per group by its function in
    rl.rewards, centred within its group and scaled by its pooled within-group spread
    (`pooled_group_scores`), then weighted and summed; invalid images get their group's lowest total - 1."""
    outputs = clf.classify(batch.images, attrs)
    probs = [torch.from_numpy(np.nan_to_num(outputs[a.name].probs, nan=0.0)) for a in attrs]
    conf = confidence_reward(probs)
    valid = conf >= cfg.validity_threshold
    emb = torch.from_numpy(embedder.embed_images(batch.images))
    base_emb = torch.from_numpy(embedder.embed_images(batch.base_images)) if batch.base_images is not None else None
    feats = torch.cat(probs, 1).double()
    parts: dict[str, torch.Tensor] = {}
    active = [r for r in cfg.rewards if r.weight > 0]  # a zero weight switches a term off (drift: no base images)
    for r in active:
        opts = r.options_dict
        values = torch.zeros(len(batch.prompts), dtype=torch.float64)
        if r.name == "diversity":
            labels = opts.get("features") == "labels"
            features = torch.cat([hard_labels(p) for p in probs], 1).double() if labels else feats
            ref = _reference(attrs, opts.get("reference", "uniform"), 16 * max(len(a.classes) for a in attrs))
        for gid in batch.group.unique():
            m = batch.group == gid
            if r.name == "diversity":
                values[m] = diversity_reward(features[m], ref, kernel=opts.get("kernel", "rbf")).double()
            elif r.name == "balance":
                values[m] = sum(balance_reward(p[m].double(), _target(a, opts.get("reference", "uniform")),
                                               mode=opts.get("mode", "kl")) for a, p in zip(attrs, probs))
            elif r.name == "alignment":
                values[m] = alignment_reward(emb[m], text_emb[batch.prompts[int(m.nonzero()[0])]]).double()
            elif r.name == "drift":
                assert base_emb is not None
                values[m] = drift_reward(emb[m], base_emb[m]).double()
            elif r.name == "confidence":
                values[m] = conf[m].double()
        parts[r.name] = values
    total = torch.zeros(len(batch.prompts), dtype=torch.float64)
    for r in active:
        total += r.weight * pooled_group_scores(parts[r.name], batch.group)
    for gid in batch.group.unique():
        m = batch.group == gid
        if (m & ~valid).any():
            total[m & ~valid] = total[m].min() - 1.0
    return Rewards(total.float(), parts, valid, outputs)


def _target(attr: Any, mode: str) -> torch.Tensor:
    k = len(attr.classes)
    return torch.full((k,), 1.0 / k, dtype=torch.float64) if mode == "uniform" else torch.tensor(attr.target).double()


def _reference(attrs: list[Any], mode: str, n: int) -> torch.Tensor:
    """Reference points for the MMD: one-hot class vectors (concatenated over attributes) drawn in
    proportion to the joint target (the product of the per-attribute targets)."""
    targets = [_target(a, mode) for a in attrs]
    joint = targets[0]
    for t in targets[1:]:
        joint = torch.outer(joint, t).flatten()
    rows = reference_from_target(joint.tolist(), n)  # (n, prod K) one-hot over joint classes
    sizes = [len(a.classes) for a in attrs]
    decode = torch.zeros(int(math.prod(sizes)), sum(sizes), dtype=torch.float64)
    for j in range(decode.shape[0]):
        rem, offset, digits = j, 0, []
        for size in reversed(sizes):
            digits.append(rem % size)
            rem //= size
        for size, d in zip(sizes, reversed(digits)):
            decode[j, offset + d] = 1.0
            offset += size
    return rows.double() @ decode


def ppo_update(cfg: TrainConfig, acc: Any, pipe: Any, unet: torch.nn.Module, optimizer: Any, batch: Batch,
               adv: torch.Tensor, epoch: int, rank: int) -> dict[str, float]:
    """Inner PPO epochs over (sample, timestep) pairs; the guided policy is re-run on stored steps.

    With ``training.kl_coef`` = beta > 0 the loss adds beta times the KL of the policy's step to the base
    model's step at the same x_t (DPOK, Fan et al. 2023; `rl.ddim.ddim_step_kl`) for each penalised step:
    the trained step of the term (``kl_steps`` trained or chain) and a step drawn from outside the window
    (chain or untrained; the KL alone, no policy-gradient term: one more policy pass). The base model's
    outputs come from the same UNet with the adapters switched off, one pass without gradients per
    penalised step, before the policy's passes.

    With a LoRA on the text encoder (``lora.text_encoder_rank`` > 0) the prompt and the empty prompt are
    encoded again for every trained step, with gradients (each backward frees its graph), so both reach
    the text adapter as they shape the sampled step; the base model's encodings have the text adapter
    off. The text encoder is not wrapped for several processes: its LoRA gradients are averaged across
    them in one all-reduce when the accumulated gradients are synchronised, then clipped together with
    the UNet's.
    """
    t = cfg.training
    n, k, window, m = batch.log_probs.shape[0], cfg.train_timesteps, cfg.window_timesteps, cfg.kl_only_timesteps
    gen = torch.Generator().manual_seed(int(np.random.default_rng([cfg.seed, epoch, rank, 1]).integers(2**62)))
    text_lora = pipe.text_encoder if cfg.lora.text_encoder_rank else None
    base = acc.unwrap_model(unet)  # the base model is this UNet with its adapters switched off
    kl_on_trained = t.kl_coef > 0 and t.kl_steps != "untrained"
    with acc.autocast():  # the embeddings of sampling (which runs under autocast), so the ratio starts at 1
        if t.kl_coef > 0:
            with torch.no_grad():
                base_uncond = encode_base_prompts(pipe, [""])
        if text_lora is None:  # with a text LoRA, encoded again for every trained step (below)
            with torch.no_grad():
                uncond = encode_prompts(pipe, [""])
    # every LoRA weight, UNet and text encoder: clipped together; the text encoder is not wrapped for
    # several processes, so its gradients are averaged across them here
    params = [p for group in optimizer.param_groups for p in group["params"]]
    text_params = [p for p in text_lora.parameters() if p.requires_grad] if text_lora is not None else []
    losses, kls, clips, to_base = [], [], [], []
    unet.train()
    for _ in range(t.inner_epochs):
        order = torch.randperm(n, generator=gen)
        ts = torch.stack([torch.randperm(window, generator=gen) for _ in range(n)])[:, :k]
        if m:  # kl_steps chain or untrained: steps outside the window, penalised by the KL alone, one per trained step
            late = window + torch.stack([torch.randperm(len(batch.timesteps) - window, generator=gen)
                                         for _ in range(n)])[:, :m]
        for start in range(0, n, t.batch_size):
            idx = order[start:start + t.batch_size]
            prompts = [batch.prompts[i] for i in idx.tolist()]
            if t.kl_coef > 0:  # adapters off and on again before the policy's graph exists (adapters_disabled)
                with torch.no_grad(), acc.autocast():
                    base_cond = encode_base_prompts(pipe, prompts)
            if text_lora is None:
                with torch.no_grad(), acc.autocast():  # as when sampling
                    cond = encode_prompts(pipe, prompts)
            scales = batch.scales[idx].to(acc.device)
            for j in range(k):
                if text_lora is not None:  # each backward frees its graph: the text encoder runs again per step
                    with acc.autocast():
                        cond, uncond = encode_prompts(pipe, prompts), encode_prompts(pipe, [""])
                tj = ts[idx, j]  # the trained step of each sample; then the steps the KL penalises
                penalised = ([tj] if kl_on_trained else []) + ([late[idx, j]] if j < m else [])
                with acc.accumulate(unet), acc.autocast():
                    x_t, x_prev = batch.latents[idx, tj].to(acc.device), batch.latents[idx, tj + 1].to(acc.device)
                    step_t, eta = batch.timesteps[tj].to(acc.device), cfg.sampling.eta
                    kl_x = [batch.latents[idx, s].to(acc.device) for s in penalised]
                    kl_t = [batch.timesteps[s].to(acc.device) for s in penalised]
                    if penalised:  # the base model's passes come before the policy's (adapters_disabled)
                        with torch.no_grad(), adapters_disabled(base):
                            ref = [guided_eps(base, x, s, base_cond, base_uncond, scales, t.compile)
                                   for x, s in zip(kl_x, kl_t)]
                    if kl_on_trained:
                        logp, kl = step_log_prob_and_kl(unet, pipe.scheduler, x_t, x_prev, step_t, cond, uncond,
                                                        scales, eta, ref[0], t.compile)
                    else:
                        logp = step_log_prob(unet, pipe.scheduler, x_t, x_prev, step_t, cond, uncond, scales, eta,
                                             t.compile)
                        kl = torch.zeros_like(logp)
                    if j < m:  # a step outside the window: the KL alone
                        eps = guided_eps(unet, kl_x[-1], kl_t[-1], cond, uncond, scales, t.compile)
                        kl = kl + ddim_step_kl(pipe.scheduler, eps, ref[-1], kl_t[-1], kl_x[-1], eta)
                    loss, info = clipped_surrogate(logp.float(), batch.log_probs[idx, tj].to(acc.device),
                                                   adv[idx].to(acc.device), t.clip_range, t.adv_clip_max)
                    if penalised:  # per sample: the sum of its penalised steps' KLs
                        loss = loss + t.kl_coef * kl.float().mean()
                        to_base.append(float(kl.detach().mean()))
                    acc.backward(loss)
                    if acc.sync_gradients:
                        if text_params and acc.num_processes > 1:  # one all-reduce of every text LoRA gradient
                            flat = acc.reduce(torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p))
                                                         .flatten() for p in text_params]), "mean")
                            for p, part in zip(text_params, flat.split([p.numel() for p in text_params]),
                                               strict=True):
                                p.grad = part.view_as(p).clone()
                        acc.clip_grad_norm_(params, t.max_grad_norm)
                    optimizer.step()
                    optimizer.zero_grad()
                losses.append(loss.item())
                kls.append(float(info["approx_kl"]))
                clips.append(float(info["clipfrac"]))
    unet.eval()
    stats = {"loss": float(np.mean(losses)), "approx_kl": float(np.mean(kls)), "clipfrac": float(np.mean(clips))}
    if to_base:
        stats["kl_to_base"] = float(np.mean(to_base))  # over terms with a penalised step: the sum of their KLs
    return stats


def log_row(epoch: int, batch: Batch, rewards: Rewards, stats: dict[str, float], monitor: Any,
            attrs: list[Any]) -> dict[str, Any]:
    """One line of log.jsonl. Class shares come from the reward classifier's outputs of `compute_rewards`
    and, if given, the `monitor` classifier's reading of the same images."""
    groups, valid, parts = batch.group.unique(), rewards.valid, rewards.parts
    scale_of = [float(batch.scales[batch.group == g][0]) for g in groups]
    total = rewards.total
    row: dict[str, Any] = {"epoch": epoch + 1, "reward_mean": float(total.mean()), "reward_std": float(total.std()),
                           "within_group_std": float(np.mean([float(total[batch.group == g].std()) for g in groups])),
                           "valid_rate": float(valid.float().mean()), **stats,
                           "guidance": sorted(set(batch.scales.tolist())), "prompts": sorted(set(batch.prompts))}
    for name, values in parts.items():
        row[f"{name}_mean"] = float(values.mean())
        row[f"{name}_within_group_std"] = float(np.mean([float(values[batch.group == g].std()) for g in groups]))
    readings = [("reward", rewards.outputs)]
    if monitor is not None:
        readings.append(("monitor", monitor.classify(batch.images, attrs)))
    for label, outputs in readings:
        out = outputs[attrs[0].name]
        ok = ~np.isnan(out.probs).any(1)
        shares = np.bincount(out.probs[ok].argmax(1), minlength=len(attrs[0].classes)) / max(ok.sum(), 1)
        row[f"{label}_shares"] = dict(zip(attrs[0].classes, np.round(shares, 4).tolist()))
        masks = [(batch.group == g).numpy() & ok for g in groups]
        per_group = [np.bincount(out.probs[m].argmax(1), minlength=len(attrs[0].classes)).max() / max(m.sum(), 1)
                     for m in masks]
        row[f"{label}_dominant_share"] = round(float(np.mean(per_group)), 4)
        row[f"{label}_dominant_share_by_guidance"] = {
            f"{s:g}": round(float(np.mean([d for d, g in zip(per_group, scale_of) if g == s])), 4)
            for s in sorted(set(scale_of))}
    return row


def _check_same_run(cfg: TrainConfig, saved: Path) -> None:
    """A checkpoint resumes only the run that wrote it: everything but the epoch count, evaluation and
    checkpoint cadence must match."""
    if not saved.exists():
        return

    def essence(d: dict[str, Any]) -> dict[str, Any]:
        d = json.loads(json.dumps(d))
        for key in ("evaluation", "checkpoint_every", "keep_checkpoints"):
            d.pop(key, None)
        for key in ("epochs", "compile"):  # compiling changes speed, not the run
            d.get("training", {}).pop(key, None)
        return d

    before = json.loads(saved.read_text())
    try:
        before = config_from_dict(before, str(saved)).to_dict()
    except SuiteError:  # not readable as a config any more: compare what is there
        pass
    if essence(before) != essence(cfg.to_dict()):
        raise SuiteError(f"{saved.parent} holds checkpoints of a run with another configuration; "
                         "choose another output_dir or delete its checkpoints/")


def _truncate_log(path: Path, lines: int) -> None:
    if path.exists():
        kept = path.read_text().splitlines(keepends=True)[:lines]
        path.write_text("".join(kept))


def _adapter_metadata(cfg: TrainConfig) -> dict[str, Any]:
    return {"base_model": cfg.model, "training_guidance_scales": list(cfg.sampling.guidance_scales),
            "sampler": f"DDIM eta={cfg.sampling.eta}, {cfg.sampling.steps} steps", "lora_rank": cfg.lora.rank,
            "lora_alpha": cfg.lora.alpha, "lora_targets": list(cfg.lora.targets),
            "rewards": [{"name": r.name, "weight": r.weight, **r.options_dict} for r in cfg.rewards],
            "reward_classifier": cfg.reward_classifier, "reward_attributes": list(cfg.reward_attributes)}


def _evaluate(cfg: TrainConfig, battery: Battery, out: Path, lora: Path | None) -> Path:
    """Run the battery (all prompts: training and held-out) with the evaluation classifier first."""
    from evalsuite.runner import RunOptions, run_battery

    e = cfg.evaluation
    data = battery.to_dict()
    data.update(images_per_prompt=e.images_per_prompt, guidance_scales=list(e.guidance_scales), steps=e.steps,
                eta=e.eta)
    eval_battery = battery_from_dict(data, source=f"{cfg.battery} (evaluation)")
    options = RunOptions(results_dir=out.parent, name=out.name, model=cfg.model, lora=str(lora) if lora else None,
                         classifiers=(e.classifier, cfg.reward_classifier))
    return run_battery(eval_battery, options)
