"""The RL fine-tuning recipe: DDPO-IS over the denoising chain with LoRA and distribution rewards.

Reads top to bottom: config -> build (the model's policy, `rl.families.policy_for`: stochastic DDIM for
SD 1.x/2.x and SDXL, the flow SDE for SD3/SD3.5 and Flux; the recipe sees only `rl.policy.Policy`) ->
evaluate the base model -> loop over epochs {sample groups, reward, advantage, PPO update, log,
checkpoint} -> save the adapter -> evaluate the tuned model.

Sources: DDPO (Black et al., ICLR 2024) for the MDP, the per-step log-probability, the clipped
importance ratio and the per-prompt statistics (docs/methods.md, "The denoising MDP and its step
log-probability" and "Advantages and the PPO update"); Flow-GRPO (Liu et al., NeurIPS 2025) for the
flow models' stochastic policy (docs/methods.md, "The flow SDE policy"); Miao et al. (CVPR 2024) for the set-level
diversity reward, reconstructed as the leave-one-out credit of an unbiased MMD² to a balanced reference
(docs/methods.md, "The set-level diversity reward"; their code was never released); DPOK (Fan et al.,
NeurIPS 2023) for the per-step KL to the base model (docs/methods.md, "KL to the base model"); Shen et
al. (ICLR 2024) for matching a group to its target shares, the per-image quota reward of the shipped
config (docs/methods.md, "The per-image quota reward").

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

import contextlib
import hashlib
import json
import logging
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, cast

import numpy as np
import torch
from tqdm.auto import tqdm

from evalsuite.battery import AttributeSpec, Battery, battery_from_dict, load_battery
from evalsuite.classifiers import (
    AttributeClassifier,
    AttributeOutput,
    ClassifierContext,
    FaceDetector,
    ImageEmbedder,
    classify_faces,
    get_classifier,
    get_detector,
    get_embedder,
    uses_faces,
)
from evalsuite.errors import SuiteError
from evalsuite.metrics import class_counts
from evalsuite.models import attention_order, load_model
from evalsuite.results.schema import dominant_class, label_index

from .advantages import PerPromptStatTracker, clipped_surrogate, group_zscore, pooled_group_scores
from .checkpoint import (
    capture_rng,
    latest_checkpoint,
    load_checkpoint,
    load_process_state,
    restore_rng,
    save_checkpoint,
)
from .compare import comparison_markdown
from .config import TrainConfig, config_from_dict
from .families import check_trainable, family_of, policy_for
from .lora import adapters_disabled, add_lora, cast_frozen, lora_named_parameters, save_adapter
from .output import claim_output, on_main
from .policy import Conditioning, Policy
from .rewards import REWARDS, GroupInputs, confidence_reward

if TYPE_CHECKING:
    from accelerate import Accelerator

log = logging.getLogger("rl")


@dataclass
class Batch:
    """One epoch's samples on this process: N = prompts_per_epoch x group_size."""

    prompts: list[str]  # per sample
    group: torch.Tensor  # (N,) group id
    scales: torch.Tensor  # (N,)
    latents: torch.Tensor  # (N, T+1, ...): the chain, in the layout the denoiser takes
    log_probs: torch.Tensor  # (N, T)
    timesteps: torch.Tensor  # (T,) in the family's units (step j of the chain is index j everywhere else)
    images: np.ndarray  # (N, H, W, 3) uint8
    base_images: np.ndarray | None


class Rewards(NamedTuple):
    """What `compute_rewards` returns for one epoch's batch of N images."""

    total: torch.Tensor  # (N,) float32: the weighted sum of the normalised terms, validity-gated
    parts: dict[str, torch.Tensor]  # reward name -> (N,) float64 raw term values (weight > 0 only)
    valid: torch.Tensor  # (N,) bool: reward-classifier confidence >= validity_threshold
    outputs: dict[str, AttributeOutput]  # the reward classifier's output per attribute name


def train(cfg: TrainConfig, *, evaluate: bool = True) -> Path:
    """Run the recipe (module docstring) on every process of the launch; return the output folder.

    Before anything loads, the main process claims the output folder (`rl.output.claim_output`: a new,
    empty or RL output folder, marked and locked for the whole training); a refusal ends every process."""
    from accelerate import Accelerator

    acc = Accelerator(mixed_precision=cfg.training.mixed_precision, cpu=not torch.cuda.is_available(),
                      gradient_accumulation_steps=cfg.training.gradient_accumulation_steps * cfg.train_timesteps)
    out = Path(cfg.output_dir)
    with contextlib.ExitStack() as stack:
        on_main(acc, lambda: claim_output(out, stack))
        return _train(cfg, acc, out, evaluate)


def _train(cfg: TrainConfig, acc: Accelerator, out: Path, evaluate: bool) -> Path:
    """The recipe, in the claimed output folder `out`."""
    from accelerate.utils import gather_object

    # ------------------------------------------------------------ build
    rank, world = acc.process_index, acc.num_processes
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

    check_trainable(cfg.model, cfg.lora.text_encoder_rank)  # a hub id's model_index.json, before its weights
    model = load_model(cfg.model, device=str(acc.device), drop_t5=cfg.drop_t5)
    pipe = model.pipe
    # the family's policy (rl.families): DDIM over a UNet, or the flow SDE over a transformer
    policy = policy_for(pipe, cfg.sampling.steps, cfg.sampling.eta, cfg.model, cfg.lora.text_encoder_rank)
    unet = policy.denoiser  # the denoiser: a UNet, or the transformer of SD3 and Flux
    text_encoders = policy.text_encoders if cfg.lora.text_encoder_rank else {}
    torch.manual_seed(cfg.seed)  # the LoRA initialisation
    params = add_lora(unet, cfg.lora.rank, cfg.lora.alpha, cfg.lora.targets,
                      text_encoder=list(text_encoders.values()) or None, text_rank=cfg.lora.text_encoder_rank or None)
    for module in policy.frozen + [m for m in policy.text_encoders.values() if m not in text_encoders.values()]:
        module.requires_grad_(False)
    half = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.training.mixed_precision)
    if half is not None:  # autocast casts these weights to `half` on every call anyway: store them so
        for module in (unet, *policy.text_encoders.values()):  # (the VAE decodes in fp32: fp16 overflows in SD's)
            cast_frozen(module, half)
    if acc.device.type == "cuda":  # let cuDNN time its conv kernels (GPU runs then vary in the last bits)
        torch.backends.cudnn.benchmark = True
    if cfg.training.gradient_checkpointing:
        cast(Any, unet).enable_gradient_checkpointing()  # a diffusers ModelMixin method
    if cfg.training.compile:
        unet.compile(dynamic=False)  # in place: the sampling (unwrapped) and training (prepared) calls share it
    metadata = _adapter_metadata(cfg, policy, family_of(pipe).metadata)  # of every adapter saved
    optimizer = torch.optim.AdamW(params, lr=cfg.training.learning_rate, weight_decay=cfg.training.weight_decay)
    unet, optimizer = acc.prepare(unet, optimizer)

    def trainable() -> dict[str, torch.nn.Parameter]:
        return lora_named_parameters({policy.denoiser_name: acc.unwrap_model(unet), **text_encoders})

    ctx = ClassifierContext(device=str(acc.device), profile=model.profile)
    reward_clf = get_classifier(cfg.reward_classifier, ctx)
    embedder = get_embedder(cfg.embedder, ctx)
    # the battery's face detector for the model's domain runs first, as in an audit: an image with no face
    # is invalid, and a reward classifier that reads faces gets the boxes
    setup = battery.setup_for(model.profile.domain)
    detector = get_detector(setup.detector, ctx) if setup.detector else None
    if uses_faces(reward_clf) and getattr(reward_clf, "needs_faces", False) and detector is None:
        raise SuiteError(f"reward_classifier '{cfg.reward_classifier}' reads detected faces, and the battery "
                         f"{cfg.battery} names no face detector for {model.profile.domain} images")
    attrs = [battery.attribute(a) for a in cfg.reward_attributes]
    problems = reward_clf.check(attrs)
    if problems:
        raise SuiteError(f"reward_classifier '{cfg.reward_classifier}': " + "; ".join(problems))
    # the evaluation classifier reads every epoch's images too where it is one of the model's exact readers
    # (`ModelProfile.exact_readers`, such as the miniature world's oracle): cheap, and exact
    exact = cfg.evaluation.classifier in model.profile.exact_readers
    monitor = get_classifier(cfg.evaluation.classifier, ctx) if exact else None
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
            batch = sample_epoch(cfg, policy, acc.unwrap_model(unet), train_prompts, epoch, rank)
        rewards = compute_rewards(cfg, batch, reward_clf, embedder, attrs, text_emb, detector)
        adv = compute_advantages(cfg, batch, rewards, tracker)
        with attention_order(acc.device):
            stats = ppo_update(cfg, acc, policy, unet, optimizer, batch, adv, epoch, rank)
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
                save_adapter(pipe, adapter, unet=acc.unwrap_model(unet), metadata=metadata)
            acc.wait_for_everyone()
            _evaluate(cfg, battery, out / "eval" / f"epoch-{epoch + 1:04d}", lora=adapter)

    # ------------------------------------------------------------ save and evaluate
    acc.wait_for_everyone()
    # every process records a digest of its LoRA weights: equal digests show synchronised gradients
    digest = hashlib.sha256(b"".join(p.detach().cpu().numpy().tobytes() for p in trainable().values()))
    record = {"rank": rank, "world": world, "lora_sha256": digest.hexdigest()}
    (out / f"process-{rank}.json").write_text(json.dumps(record))
    if acc.is_main_process:
        save_adapter(pipe, out / "adapter", unet=acc.unwrap_model(unet), metadata=metadata)
    if evaluate:
        acc.wait_for_everyone()
        _evaluate(cfg, battery, out / "eval" / "final", lora=out / "adapter")
        acc.wait_for_everyone()  # the main process has written eval/final: the other processes end here
        if acc.is_main_process and (out / "eval" / "base" / "run.json").exists():
            # a resumed run may evaluate with other evaluation settings than its base evaluation had (they
            # are not part of the run): then the two are compared on the images they share, and it says so
            runs = (out / "eval" / "base", out / "eval" / "final")
            names = (cfg.evaluation.classifier, cfg.reward_attributes[0], cfg.reward_classifier)
            (out / "eval" / "comparison.md").write_text(comparison_markdown(*runs, *names, overlap=True))
    return out


# ---------------------------------------------------------------- the steps of one epoch


@torch.no_grad()
def sample_epoch(cfg: TrainConfig, policy: Policy, unet: torch.nn.Module, prompts: list[str], epoch: int,
                 rank: int) -> Batch:
    """Draw the epoch's groups (a prompt and a guidance scale each) and sample their trajectories with the
    `policy`'s sampler, `unet` its denoiser; with a reward that needs them, the base model's images from
    the same noises too (adapters off)."""
    s = cfg.sampling
    rng = np.random.default_rng([cfg.seed, epoch, rank])
    chosen = rng.choice(len(prompts), size=s.prompts_per_epoch, replace=len(prompts) < s.prompts_per_epoch)
    scales = rng.choice(np.asarray(s.guidance_scales, dtype=float), size=s.prompts_per_epoch)
    per_sample = [prompts[i] for i in chosen for _ in range(s.group_size)]
    g = torch.tensor(np.repeat(scales, s.group_size), dtype=torch.float32)
    seeds = rng.integers(0, 2**62, size=len(per_sample)).tolist()
    batch_seeds = rng.integers(0, 2**62, size=len(per_sample) // s.batch_size).tolist()
    noise = policy.initial_noise(seeds)
    uncond = policy.encode_empty()
    encoders = policy.text_encoders.values()
    with_base = cfg.needs_base_images
    if with_base:  # the base model's image: its own text encoder too
        with adapters_disabled(*encoders):
            base_uncond = policy.encode_empty()
    chunks, base = [], []
    for k in range(0, len(per_sample), s.batch_size):
        sl = slice(k, k + s.batch_size)
        cond = policy.encode(per_sample[sl])
        scale, start, seed = g[sl].to(noise.device), noise[sl], batch_seeds[k // s.batch_size]
        chunks.append(policy.sample(unet, cond, uncond, scale, start, seed, cfg.training.compile))
        if with_base:
            with adapters_disabled(*encoders):
                base_cond = policy.encode(per_sample[sl])
            with adapters_disabled(unet):
                base.append(policy.sample(unet, base_cond, base_uncond, scale, start, seed, cfg.training.compile).final)
    latents = torch.cat([c.latents for c in chunks])
    return Batch(prompts=per_sample, group=torch.arange(s.prompts_per_epoch).repeat_interleave(s.group_size),
                 scales=g, latents=latents, log_probs=torch.cat([c.log_probs for c in chunks]),
                 timesteps=chunks[0].timesteps, images=policy.decode(latents[:, -1]),
                 base_images=policy.decode(torch.cat(base)) if base else None)


def compute_rewards(cfg: TrainConfig, batch: Batch, clf: AttributeClassifier, embedder: ImageEmbedder,
                    attrs: Sequence[AttributeSpec], text_emb: Mapping[str, torch.Tensor],
                    detector: FaceDetector | None = None) -> Rewards:
    """Total reward per image (higher is better), the raw components, the validity mask and the reward
    classifier's outputs (`Rewards`). Each reward of weight > 0 gives every group its credits (its
    registered function on the group's `GroupInputs`, `rl.rewards.REWARDS`); each term is centred within
    its group and scaled by its pooled within-group spread (`pooled_group_scores`), then weighted and
    summed; invalid images get their group's lowest total - 1. Given a face `detector`, an image with no
    face is "no_person" (probabilities 0, hence invalid) and a classifier that reads faces gets the boxes."""
    faces = detector.detect(batch.images) if detector is not None else None
    outputs = classify_faces(clf, batch.images, attrs, faces)
    probs = [torch.from_numpy(np.nan_to_num(outputs[a.name].probs, nan=0.0)).double() for a in attrs]
    conf = confidence_reward(probs)
    valid = conf >= cfg.validity_threshold
    emb = torch.from_numpy(embedder.embed_images(batch.images))
    base_emb = torch.from_numpy(embedder.embed_images(batch.base_images)) if batch.base_images is not None else None
    active = [r for r in cfg.rewards if r.weight > 0]  # a zero weight switches a term off (drift: no base images)
    parts = {r.name: torch.zeros(len(batch.prompts), dtype=torch.float64) for r in active}
    for gid in batch.group.unique():
        m = batch.group == gid
        group = GroupInputs(probs=tuple(p[m] for p in probs), attributes=tuple(attrs), image_emb=emb[m],
                            text_emb=text_emb[batch.prompts[int(m.nonzero()[0])]],
                            base_emb=base_emb[m] if base_emb is not None else None, confidence=conf[m])
        for r in active:
            parts[r.name][m] = REWARDS[r.name].credits(group, r.options_dict)
    total = torch.zeros(len(batch.prompts), dtype=torch.float64)
    for r in active:
        total += r.weight * pooled_group_scores(parts[r.name], batch.group)
    for gid in batch.group.unique():
        m = batch.group == gid
        if (m & ~valid).any():
            total[m & ~valid] = total[m].min() - 1.0
    return Rewards(total.float(), parts, valid, outputs)


def compute_advantages(cfg: TrainConfig, batch: Batch, rewards: Rewards,
                       tracker: PerPromptStatTracker) -> torch.Tensor:
    """(N,) float32 advantages of `training.advantage`: pooled (`pooled_group_scores`), group
    (`group_zscore`) or tracker (DDPO's per-prompt statistics, a prompt at each guidance scale apart)."""
    advantage = cfg.training.advantage
    if advantage == "pooled":
        return pooled_group_scores(rewards.total, batch.group)
    if advantage == "group":
        return group_zscore(rewards.total, batch.group)
    keys = [f"{p}|g={s:g}" for p, s in zip(batch.prompts, batch.scales.tolist())]
    return torch.from_numpy(tracker.update(keys, rewards.total.numpy())).float()


# ---------------------------------------------------------------- the PPO update and its steps


@dataclass(frozen=True)
class _MicroBatch:
    """One training micro-batch: its samples and, per sample, the steps of its trained terms."""

    idx: torch.Tensor  # (B,) sample indices into the batch
    prompts: list[str]  # (B,)
    scales: torch.Tensor  # (B,) guidance scales, on the device
    steps: torch.Tensor  # (B, train_timesteps): term j trains step steps[:, j] of each chain
    late: torch.Tensor | None  # (B, kl_only_timesteps): term j < kl_only_timesteps also penalises late[:, j]


@dataclass
class _Text:
    """The text conditioning of a micro-batch: the policy's and (with a KL penalty) the base model's."""

    cond: Conditioning | None = None
    uncond: Conditioning | None = None
    base_cond: Conditioning | None = None
    base_uncond: Conditioning | None = None


@dataclass(frozen=True)
class _Update:
    """What one epoch's PPO update works on; its methods are the steps of one trained term."""

    cfg: TrainConfig
    acc: Accelerator
    policy: Policy
    unet: torch.nn.Module  # the policy's denoiser, as prepared by accelerate (wrapped for several processes)
    batch: Batch
    adv: torch.Tensor  # (N,)

    @property
    def text_lora(self) -> bool:
        return bool(self.cfg.lora.text_encoder_rank)

    @property
    def kl_on_trained(self) -> bool:
        """Whether the trained step of each term is KL-penalised too (kl_steps trained or chain)."""
        t = self.cfg.training
        return t.kl_coef > 0 and t.kl_steps != "untrained"

    def micro_batches(self, gen: torch.Generator) -> Iterator[_MicroBatch]:
        """Every inner epoch: a fresh order of the samples, and per sample a random subset of the window's
        steps to train (and, for kl_steps chain or untrained, of the steps outside it), from `gen`."""
        cfg, batch, t = self.cfg, self.batch, self.cfg.training
        n, k, window, m = batch.log_probs.shape[0], cfg.train_timesteps, cfg.window_timesteps, cfg.kl_only_timesteps
        for _ in range(t.inner_epochs):
            order = torch.randperm(n, generator=gen)
            steps = torch.stack([torch.randperm(window, generator=gen) for _ in range(n)])[:, :k]
            late = (window + torch.stack([torch.randperm(len(batch.timesteps) - window, generator=gen)
                                          for _ in range(n)])[:, :m]) if m else None
            for start in range(0, n, t.batch_size):
                idx = order[start:start + t.batch_size]
                yield _MicroBatch(idx, [batch.prompts[i] for i in idx.tolist()], batch.scales[idx].to(self.acc.device),
                                  steps[idx], late[idx] if late is not None else None)

    def empty_prompts(self) -> _Text:
        """The empty prompt's encodings, once per update (with a text LoRA the policy's is encoded again
        for every term, with gradients). Under autocast, as in sampling, so the ratio starts at 1."""
        text = _Text()
        with self.acc.autocast(), torch.no_grad():
            if self.cfg.training.kl_coef > 0:
                with adapters_disabled(*self.policy.text_encoders.values()):
                    text.base_uncond = self.policy.encode_empty()
            if not self.text_lora:
                text.uncond = self.policy.encode_empty()
        return text

    def encode(self, mb: _MicroBatch, empty: _Text) -> _Text:
        """The micro-batch's prompts, without gradients: the base model's (with a KL penalty) before the
        policy's graph exists (`adapters_disabled`), and the policy's unless a text LoRA needs them with
        gradients (`encode_with_grad`)."""
        text = _Text(uncond=empty.uncond, base_uncond=empty.base_uncond)
        with torch.no_grad(), self.acc.autocast():
            if self.cfg.training.kl_coef > 0:
                with adapters_disabled(*self.policy.text_encoders.values()):
                    text.base_cond = self.policy.encode(mb.prompts)
            if not self.text_lora:
                text.cond = self.policy.encode(mb.prompts)
        return text

    def encode_with_grad(self, mb: _MicroBatch, text: _Text) -> _Text:
        """With a text LoRA: the policy's prompt and empty prompt encoded again, with gradients, for one
        term (each backward frees its graph), so both reach the text adapter as they shape the step."""
        with self.acc.autocast():
            cond, uncond = self.policy.encode(mb.prompts), self.policy.encode_empty()
        return _Text(cond, uncond, text.base_cond, text.base_uncond)

    def penalised(self, mb: _MicroBatch, j: int) -> list[torch.Tensor]:
        """The steps term j's KL penalises, per sample: its trained step (kl_steps trained or chain), then
        its step from outside the window (chain or untrained)."""
        late = mb.late[:, j] if mb.late is not None and j < mb.late.shape[1] else None
        return ([mb.steps[:, j]] if self.kl_on_trained else []) + ([late] if late is not None else [])

    def base_passes(self, mb: _MicroBatch, j: int, text: _Text) -> list[torch.Tensor]:
        """The base model's guided outputs at term j's penalised steps: the same denoiser with its adapters
        off, without gradients, before the policy's passes (`adapters_disabled`)."""
        steps = self.penalised(mb, j)
        if not steps:
            return []
        dev, batch, fixed = self.acc.device, self.batch, self.cfg.training.compile
        base = self.acc.unwrap_model(self.unet)  # the base model is this denoiser with its adapters switched off
        assert text.base_cond is not None and text.base_uncond is not None
        with torch.no_grad(), adapters_disabled(base):
            return [self.policy.output(base, batch.latents[mb.idx, s].to(dev), s, text.base_cond, text.base_uncond,
                                       mb.scales, fixed)
                    for s in steps]

    def loss(self, mb: _MicroBatch, j: int, text: _Text,
             refs: list[torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor], float | None]:
        """Term j's loss: the PPO clipped surrogate of its trained step's log-probability, plus kl_coef
        times the summed KL of its penalised steps to the base model's (`refs`: their base outputs), and
        that KL (None where nothing is penalised)."""
        t, batch, dev, policy = self.cfg.training, self.batch, self.acc.device, self.policy
        fixed = t.compile
        assert text.cond is not None and text.uncond is not None
        tj = mb.steps[:, j]
        x_t, x_prev = batch.latents[mb.idx, tj].to(dev), batch.latents[mb.idx, tj + 1].to(dev)
        out = policy.output(self.unet, x_t, tj, text.cond, text.uncond, mb.scales, fixed)
        logp = policy.step_log_prob(out, x_t, x_prev, tj)
        kl = policy.step_kl(out, refs[0], x_t, tj) if self.kl_on_trained else torch.zeros_like(logp)
        if mb.late is not None and j < mb.late.shape[1]:  # a step outside the window: the KL alone
            late = mb.late[:, j]
            x = batch.latents[mb.idx, late].to(dev)
            kl = kl + policy.step_kl(policy.output(self.unet, x, late, text.cond, text.uncond, mb.scales, fixed),
                                     refs[-1], x, late)
        loss, info = clipped_surrogate(logp.float(), batch.log_probs[mb.idx, tj].to(dev), self.adv[mb.idx].to(dev),
                                       t.clip_range, t.adv_clip_max)
        if not refs:
            return loss, info, None
        return loss + t.kl_coef * kl.float().mean(), info, float(kl.detach().mean())  # per sample: the sum


def ppo_update(cfg: TrainConfig, acc: Accelerator, policy: Policy, unet: torch.nn.Module,
               optimizer: torch.optim.Optimizer, batch: Batch, adv: torch.Tensor, epoch: int,
               rank: int) -> dict[str, float]:
    """Inner PPO epochs over (sample, timestep) pairs; the guided policy is re-run on stored steps
    (`Policy.output`) and scored (`Policy.step_log_prob`).

    With ``training.kl_coef`` = beta > 0 the loss adds beta times the KL of the policy's step to the base
    model's step at the same x_t (DPOK, Fan et al. 2023; `Policy.step_kl`; docs/methods.md, "KL to
    the base model") for each penalised step: the trained step of the term (``kl_steps`` trained or
    chain) and a step drawn from outside the window (chain or untrained; the KL alone, no policy-gradient
    term: one more policy pass). The base model's outputs come from the same denoiser with the adapters
    switched off, one pass without gradients per penalised step, before the policy's passes.

    With a LoRA on the text encoder (``lora.text_encoder_rank`` > 0) the prompt and the empty prompt are
    encoded again for every trained step, with gradients (each backward frees its graph), so both reach
    the text adapter as they shape the sampled step; the base model's encodings have the text adapter
    off. The text encoder is not wrapped for several processes: its LoRA gradients are averaged across
    them in one all-reduce when the accumulated gradients are synchronised, then clipped together with
    the denoiser's (`_optimizer_step`).
    """
    update = _Update(cfg, acc, policy, unet, batch, adv)
    gen = torch.Generator().manual_seed(int(np.random.default_rng([cfg.seed, epoch, rank, 1]).integers(2**62)))
    empty = update.empty_prompts()
    # every LoRA weight, UNet and text encoder: clipped together
    params = [p for group in optimizer.param_groups for p in group["params"]]
    text_params = [p for encoder in policy.text_encoders.values() for p in encoder.parameters()
                   if p.requires_grad] if update.text_lora else []
    losses, kls, clips, to_base = [], [], [], []
    unet.train()
    for mb in update.micro_batches(gen):
        text = update.encode(mb, empty)
        for j in range(cfg.train_timesteps):
            if update.text_lora:
                text = update.encode_with_grad(mb, text)
            with acc.accumulate(unet), acc.autocast():
                refs = update.base_passes(mb, j, text)
                loss, info, kl = update.loss(mb, j, text, refs)
                acc.backward(loss)
                _optimizer_step(acc, optimizer, params, text_params, cfg.training.max_grad_norm)
            losses.append(loss.item())
            kls.append(float(info["approx_kl"]))
            clips.append(float(info["clipfrac"]))
            if kl is not None:
                to_base.append(kl)
    unet.eval()
    stats = {"loss": float(np.mean(losses)), "approx_kl": float(np.mean(kls)), "clipfrac": float(np.mean(clips))}
    if to_base:
        stats["kl_to_base"] = float(np.mean(to_base))  # over terms with a penalised step: the sum of their KLs
    return stats


def _optimizer_step(acc: Accelerator, optimizer: torch.optim.Optimizer, params: Sequence[torch.Tensor],
                    text_params: Sequence[torch.Tensor], max_grad_norm: float) -> None:
    """At the end of an accumulation (`acc.sync_gradients`): average the text LoRA's gradients across
    processes (the text encoder is not wrapped, so nothing else does), then clip every LoRA gradient
    together; the optimizer (wrapped by accelerate) steps only then."""
    if acc.sync_gradients:
        if text_params and acc.num_processes > 1:  # one all-reduce of every text LoRA gradient
            flat = acc.reduce(torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten()
                                         for p in text_params]), "mean")
            for p, part in zip(text_params, flat.split([p.numel() for p in text_params]), strict=True):
                p.grad = part.view_as(p).clone()
        acc.clip_grad_norm_(params, max_grad_norm)
    optimizer.step()
    optimizer.zero_grad()


def log_row(epoch: int, batch: Batch, rewards: Rewards, stats: dict[str, float],
            monitor: AttributeClassifier | None, attrs: Sequence[AttributeSpec]) -> dict[str, Any]:
    """One line of log.jsonl. Class shares come from the reward classifier's outputs of `compute_rewards`
    and, if given, the `monitor` classifier's reading of the same images: each image read (no NaN row)
    counts as its label (`evalsuite.results.schema.label_index`), and a group's dominant share is the
    share of its dominant class (`dominant_class`; 0 where no image of it was read)."""
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
    classes = attrs[0].classes
    for label, outputs in readings:
        probs = outputs[attrs[0].name].probs
        counts = _class_counts(probs, len(classes))
        row[f"{label}_shares"] = dict(zip(classes, np.round(counts / max(counts.sum(), 1), 4).tolist()))
        per_group = [_dominant_share(_class_counts(probs[(batch.group == g).numpy()], len(classes))) for g in groups]
        row[f"{label}_dominant_share"] = round(float(np.mean(per_group)), 4)
        row[f"{label}_dominant_share_by_guidance"] = {
            f"{s:g}": round(float(np.mean([d for d, g in zip(per_group, scale_of) if g == s])), 4)
            for s in sorted(set(scale_of))}
    return row


def _class_counts(probs: np.ndarray, n_classes: int) -> np.ndarray:
    """(K,) counts of the labels (`label_index`) of the rows that were read (no NaN)."""
    return class_counts(np.asarray([label_index(row) for row in probs if not np.isnan(row).any()], np.int64),
                        n_classes)


def _dominant_share(counts: np.ndarray) -> float:
    """The share of the dominant class (`dominant_class`) among the counted images; 0 if none was counted."""
    k = dominant_class(counts)
    return float(counts[k] / counts.sum()) if k is not None else 0.0


def _check_same_run(cfg: TrainConfig, saved: Path) -> None:
    """A checkpoint resumes only the run that wrote it: everything but the epoch count, evaluation and
    checkpoint cadence must match."""
    if not saved.exists():
        return

    def essence(d: dict[str, Any]) -> dict[str, Any]:
        d = json.loads(json.dumps(d))
        if isinstance(d.get("battery"), str):  # held absolute since configs resolve it; relative before
            d["battery"] = os.path.abspath(d["battery"])
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


def _adapter_metadata(cfg: TrainConfig, policy: Policy, family: Mapping[str, str]) -> dict[str, Any]:
    return {"base_model": cfg.model, "training_guidance_scales": list(cfg.sampling.guidance_scales),
            "sampler": policy.sampler, "lora_rank": cfg.lora.rank,
            "lora_alpha": cfg.lora.alpha, "lora_targets": list(cfg.lora.targets),
            "rewards": [{"name": r.name, "weight": r.weight, **r.options_dict} for r in cfg.rewards],
            "reward_classifier": cfg.reward_classifier, "reward_attributes": list(cfg.reward_attributes),
            **family}


def _evaluate(cfg: TrainConfig, battery: Battery, out: Path, lora: Path | None) -> Path:
    """Run the battery (all prompts: training and held-out) with the evaluation classifier first."""
    from evalsuite.runner import RunOptions, run_battery

    e = cfg.evaluation
    data = battery.to_dict()
    data.update(images_per_prompt=e.images_per_prompt, guidance_scales=list(e.guidance_scales), steps=e.steps,
                eta=e.eta)
    eval_battery = battery_from_dict(data, source=f"{cfg.battery} (evaluation)")
    options = RunOptions(results_dir=out.parent, name=out.name, model=cfg.model, lora=str(lora) if lora else None,
                         classifiers=(e.classifier, cfg.reward_classifier), embedder=cfg.embedder,
                         drop_t5=cfg.drop_t5)
    return run_battery(eval_battery, options)
