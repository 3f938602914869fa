"""Configuration of the RL fine-tuner: one YAML file plus `key=value` overrides -> frozen dataclasses.

Each field is declared once, on its dataclass below, with `evalsuite.validation.setting`: its check, its
default (a field without one is required) and a one-line meaning. rl/configs/miniature.yaml explains
every field at length (units, interactions, what was measured). The reward names and their options
(option -> allowed values, the first the default) are those registered in `rl.rewards`
(`register_reward`). `load_config` validates the values and the reward names and options (here), the
batch arithmetic, the model source, the battery and the attributes it balances, and the classifier specs
(`rl.config_checks`), and reports every problem of the file and of the overrides at once in one
ConfigError ("key: message").
Paths: a battery named in the file is read relative to the file's folder, one given as `battery=PATH`
relative to the working directory, and the config holds it absolute; output_dir is relative to the
working directory (`load_config`).
`TrainConfig.to_dict()` loads back through `config_from_dict` to an equal config.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

import yaml

from evalsuite.errors import ConfigError, SuiteError, did_you_mean
from evalsuite.validation import (
    Check,
    Section,
    YamlLoader,
    boolean,
    choice,
    declared,
    integer,
    names,
    number,
    read_fields,
    read_yaml,
    scales,
    setting,
    show,
    text,
)
from rl.config_checks import cross_checks
from rl.rewards import REWARDS, reward_spec

log = logging.getLogger("rl")

_POSITIVE = number("(0, inf)")


def _precision(c: Check, key: str, value: Any) -> str | None:
    # YAML 1.1 reads an unquoted `no` as false: take false to mean "no".
    return "no" if value is False else c.choice(key, value, ("no", "fp16", "bf16"))


# The sections are keyword-only, so that an optional field keeps its place among the required ones.


@dataclass(frozen=True, kw_only=True)
class SamplingConfig:
    """The `sampling` section: how each epoch's trajectories are sampled."""

    steps: int = setting(integer(1), doc="denoising steps per trajectory (each one an action of the policy)")
    # eta > 1 asks for a step variance above 1 - a_t' (rl.ddim): DDIM's eta runs from 0 (deterministic) to 1.
    # Flow models (SD3, Flux) read it as the flow SDE's noise level a, sigma_t = a sqrt(t / (1 - t)) (rl.flow_sde)
    eta: float = setting(number("(0, 1]"), doc="the training sampler's noise: DDIM eta (UNet models) or the flow "
                                               "SDE's noise level a (SD3, Flux); the policy must be stochastic")
    guidance_scales: tuple[float, ...] = setting(scales, doc="training guidance scales; each group draws one")
    prompts_per_epoch: int = setting(integer(1), doc="groups (one prompt and scale each) per process per epoch")
    group_size: int = setting(integer(3), doc="images per group, the set a set reward scores (LOO needs >= 3)")
    batch_size: int = setting(integer(1), doc="images denoised together; divides prompts_per_epoch x group_size")


@dataclass(frozen=True, kw_only=True)
class TrainingConfig:
    """The `training` section: the PPO update, its schedule and its KL penalty."""

    epochs: int = setting(integer(1), doc="epochs, each sampling a fresh batch of groups and training on it")
    inner_epochs: int = setting(integer(1), doc="PPO passes over each epoch's samples")
    batch_size: int = setting(integer(1), doc="samples per training micro-batch; divides the samples per epoch")
    gradient_accumulation_steps: int = setting(integer(1), doc="micro-batches accumulated per optimizer step")
    learning_rate: float = setting(_POSITIVE, doc="AdamW learning rate of the LoRA parameters")
    weight_decay: float = setting(number("[0, inf)"), doc="AdamW decoupled weight decay")
    max_grad_norm: float = setting(_POSITIVE, doc="gradient-norm clipping threshold before every optimizer step")
    clip_range: float = setting(_POSITIVE, doc="PPO clip epsilon of the importance ratio")
    adv_clip_max: float = setting(_POSITIVE, doc="advantages are clipped to [-adv_clip_max, adv_clip_max]")
    timestep_fraction: float = setting(number("(0, 1]"), doc="fraction of the window's steps trained per sample")
    mixed_precision: str = setting(_precision, doc='"no" (float32), fp16 or bf16')
    gradient_checkpointing: bool = setting(boolean, doc="recompute activations in the backward pass")
    advantage: str = setting(choice("pooled", "group", "tracker"), doc="advantage normalisation")
    tracker_buffer: int = setting(integer(1), doc="per-prompt reward history of the tracker advantage")
    tracker_min_count: int = setting(integer(1), doc="history a prompt needs to use its own statistics")
    timestep_window: float = setting(number("(0, 1]"), 1.0,
                                     doc="trained steps come from the first ceil(steps x window) of the chain")
    compile: bool = setting(boolean, False, doc="torch.compile the UNet")
    kl_coef: float = setting(number("[0, inf)"), 0.0, doc="weight of the per-step KL to the base model (0: off)")
    kl_steps: str = setting(choice("trained", "chain", "untrained"), "trained",
                            doc="steps the KL penalises: the trained ones, those and others, or others only")


@dataclass(frozen=True, kw_only=True)
class LoraConfigSpec:
    """The `lora` section: the adapters trained (the base weights stay frozen)."""

    rank: int = setting(integer(1), doc="LoRA rank on the UNet")
    alpha: float = setting(_POSITIVE, doc="LoRA alpha: the update is scaled by alpha / rank")
    targets: tuple[str, ...] = setting(names, doc="module-name suffixes that receive adapters")
    text_encoder_rank: int = setting(integer(0), doc="LoRA rank on the text encoder; 0 = no text adapter")


@dataclass(frozen=True)
class RewardConfig:
    """One reward term: a registered reward's name (rl.rewards.REWARDS), a weight >= 0, and its options as
    (key, value) pairs, every option of the reward (defaults filled in)."""

    name: str
    weight: float
    options: tuple[tuple[str, Any], ...] = ()

    @property
    def options_dict(self) -> dict[str, Any]:
        return dict(self.options)


@dataclass(frozen=True, kw_only=True)
class EvaluationConfig:
    """The `evaluation` section: the battery runs before, during and after training."""

    classifier: str = setting(text, doc="evaluation classifier spec; must differ from reward_classifier")
    allow_same_classifier: bool = setting(boolean, False, doc="allow the reward classifier to evaluate too")
    every: int = setting(integer(0), doc="evaluate every N epochs; 0 = only before and after training")
    images_per_prompt: int = setting(integer(1), doc="images per heldout prompt and guidance scale")
    guidance_scales: tuple[float, ...] = setting(scales, doc="evaluation guidance grid")
    steps: int = setting(integer(1), doc="DDIM steps of evaluation images")
    eta: float = setting(number("[0, 1]"), 0.0, doc="DDIM eta of evaluation images (0: deterministic DDIM)")


def _rewards(c: Check, key: str, raw: Any) -> tuple[RewardConfig, ...] | None:
    """A non-empty list of {name, weight, options...}: registered names, each once, weights >= 0 (one
    > 0), each option one of the reward's allowed values; options left out take their default."""
    items = c.sequence(key, raw)
    out: list[RewardConfig] = []
    for i, item in enumerate(items or ()):
        reward = _reward(c, f"{key}[{i}]", item, [r.name for r in out])
        if reward is not None:
            out.append(reward)
    if items and len(out) == len(items) and not any(r.weight > 0 for r in out):
        c.add(key, "at least one reward needs a weight > 0, got all weights 0")
    return tuple(out)


def _reward(c: Check, key: str, item: Any, listed: Sequence[str]) -> RewardConfig | None:
    """One entry of `rewards` (`listed`: the names of the entries before it), or None after its problems."""
    before = len(c.problems)
    entry = c.mapping(key, item, (), ("name", "weight")) or {}
    name = c.text(f"{key}.name", entry["name"]) if "name" in entry else None
    spec = None
    try:
        spec = reward_spec(name) if name is not None else None
    except SuiteError as exc:  # unknown: "did you mean"
        c.add(f"{key}.name", str(exc))
    if spec is not None and spec.name in listed:
        c.add(f"{key}.name", f"reward {spec.name!r} is listed twice; list each reward once")
    weight = c.number(f"{key}.weight", entry["weight"], 0.0) if "weight" in entry else None
    if spec is None:
        return None
    for option, value in entry.items():
        if option in ("name", "weight"):
            continue
        if option not in spec.options:
            hint = did_you_mean(option, spec.options) if spec.options else "; it takes no options"
            c.add(f"{key}.{option}", f"unknown option {option!r} of reward {spec.name!r}{hint}")
        else:
            c.choice(f"{key}.{option}", value, spec.options[option])
    if weight is None or len(c.problems) > before:
        return None
    return RewardConfig(spec.name, weight, tuple((o, entry.get(o, d)) for o, d in spec.defaults.items()))


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """A validated training config. `source` (where it was read from) takes no part in equality."""

    model: str = setting(text, doc="'miniature', a local diffusers folder or a hub id 'org/name' (SD 1.x/2.x, SDXL, "
                                   "SD3/SD3.5, Flux: rl.families)")
    drop_t5: bool = setting(boolean, False, doc="load an SD3 model without its T5 text encoder (as evalsuite's "
                                                "--no-t5), in training and evaluation")
    battery: str = setting(text, doc="prompt battery: training draws its non-heldout prompts, evaluation all")
    output_dir: str = setting(text, doc="where checkpoints, logs, evaluations and the adapter are written")
    seed: int = setting(integer(0), doc="base seed: prompt draws, guidance draws, noises, trained steps")
    sampling: SamplingConfig = setting(Section(SamplingConfig), doc="how trajectories are sampled")
    training: TrainingConfig = setting(Section(TrainingConfig), doc="the PPO update and its schedule")
    lora: LoraConfigSpec = setting(Section(LoraConfigSpec), doc="the adapters trained")
    rewards: tuple[RewardConfig, ...] = setting(_rewards, doc="reward terms, summed with their weights")
    reward_classifier: str = setting(text, doc="classifier spec whose class probabilities the rewards read")
    embedder: str = setting(text, "clip", doc="image embedder spec of the alignment and drift rewards (`clip`: the "
                                              "model's own CLIP, else openai/clip-vit-large-patch14)")
    reward_attributes: tuple[str, ...] = setting(names, doc="battery attributes whose classes the rewards balance")
    validity_threshold: float = setting(number("[0, 1)"),
                                        doc="below this reward-classifier confidence an image is invalid")
    evaluation: EvaluationConfig = setting(Section(EvaluationConfig), doc="the before/after battery evaluation")
    checkpoint_every: int = setting(integer(1), doc="save a training checkpoint every N epochs")
    keep_checkpoints: int = setting(integer(1), doc="most recent checkpoints kept on disk")
    source: str = field(compare=False)

    @property
    def samples_per_epoch_per_process(self) -> int:
        return self.sampling.prompts_per_epoch * self.sampling.group_size

    @property
    def sampling_batches_per_epoch(self) -> int:
        return self.samples_per_epoch_per_process // self.sampling.batch_size

    @property
    def train_micro_batches_per_epoch(self) -> int:
        """Per process and inner epoch."""
        return self.samples_per_epoch_per_process // self.training.batch_size

    @property
    def optimizer_steps_per_epoch(self) -> int:
        """Per process and inner epoch (each step accumulates gradient_accumulation_steps micro-batches)."""
        return self.train_micro_batches_per_epoch // self.training.gradient_accumulation_steps

    @property
    def window_timesteps(self) -> int:
        """The first ceil(steps * timestep_window) denoising steps (the noisiest), from which trained
        steps are drawn."""
        return max(1, math.ceil(self.sampling.steps * self.training.timestep_window - 1e-9))

    @property
    def kl_only_timesteps(self) -> int:
        """Steps per sample penalised by the KL alone (kl_steps chain or untrained): one drawn from outside
        the window for each trained step, as long as the chain has them: min(train_timesteps, steps - window)."""
        t = self.training
        if t.kl_coef == 0 or t.kl_steps == "trained":
            return 0
        return min(self.train_timesteps, self.sampling.steps - self.window_timesteps)

    @property
    def train_timesteps(self) -> int:
        """Denoising steps trained per sample: floor(window steps * timestep_fraction), at least 1."""
        return max(1, math.floor(self.window_timesteps * self.training.timestep_fraction + 1e-9))

    @property
    def needs_base_images(self) -> bool:
        """Whether a reward of weight > 0 needs the base model's images from the same noise."""
        return any(r.weight > 0 and REWARDS[r.name].needs_base_images for r in self.rewards)

    def batch_arithmetic(self, num_processes: int) -> str:
        """A human explanation of how samples, batches and optimizer steps relate, for logs."""
        if isinstance(num_processes, bool) or not isinstance(num_processes, int) or num_processes < 1:
            raise SuiteError(f"batch_arithmetic: num_processes must be an int >= 1, got {num_processes!r}")
        s, t, p, n = self.sampling, self.training, num_processes, self.samples_per_epoch_per_process
        micro, steps, t_per = (
            self.train_micro_batches_per_epoch, self.optimizer_steps_per_epoch, self.train_timesteps)
        accum, frac = t.gradient_accumulation_steps, t.timestep_fraction
        return "\n".join([
            f"samples per epoch: {p} process(es) x {s.prompts_per_epoch} prompts x {s.group_size} images "
            f"= {p * n} ({p * s.prompts_per_epoch} groups of {s.group_size}, one prompt and scale each)",
            f"sampling: {n} / {s.batch_size} = {self.sampling_batches_per_epoch} micro-batches per process",
            f"training: {n} / {t.batch_size} = {micro} micro-batches per process per inner epoch "
            f"({t.inner_epochs} inner epoch(s))",
            (f"timesteps trained per sample: floor({s.steps} x {frac:g}) = {t_per} of {s.steps}"
             if t.timestep_window == 1.0 else
             f"timesteps trained per sample: floor({self.window_timesteps} x {frac:g}) = {t_per} of the first "
             f"{self.window_timesteps} (ceil({s.steps} x window {t.timestep_window:g})) of {s.steps}"),
            f"optimizer steps per epoch: {micro} / {accum} = {steps} per inner epoch, "
            f"{steps * t.inner_epochs} in all",
            f"effective batch per optimizer step: {p} x {t.batch_size} x {accum} = "
            f"{p * t.batch_size * accum} samples x {t_per} timesteps = {p * t.batch_size * accum * t_per} "
            "log-prob terms",
        ] + ([f"KL to the base model (kl_coef {t.kl_coef:g}, kl_steps {t.kl_steps}): "
              + ", ".join(([f"on the {t_per} trained steps"] if t.kl_steps != "untrained" else [])
                          + ([f"on min({t_per}, {s.steps} - {self.window_timesteps}) = {self.kl_only_timesteps} "
                              "steps per sample from outside the window, paired one to one with trained steps"]
                             if self.kl_only_timesteps else []))
              + ("none: the window is the whole chain" if t.kl_steps == "untrained" and not self.kl_only_timesteps
                 else "")]
             if t.kl_coef > 0 else []))

    def to_dict(self) -> dict[str, Any]:
        """Plain YAML/JSON data that `config_from_dict` turns back into an equal config."""
        return {name: _plain(getattr(self, name)) for name in declared(TrainConfig)}


_SECTIONS: dict[str, type[Any]] = {name: f.metadata["check"].cls for name, f in declared(TrainConfig).items()
                              if isinstance(f.metadata["check"], Section)}  # derived: section name -> dataclass


def load_config(path: str | os.PathLike[str], overrides: Sequence[str] = ()) -> TrainConfig:
    """Read a config file, apply `key=value` overrides (dotted keys; values read as YAML) and validate;
    every problem of the file and the overrides is reported in one ConfigError.

    Paths: the file's `battery` is relative to the folder of the config file (so a config works from any
    working directory, the shipped ones included); a `battery=PATH` override, typed on the command line,
    is relative to the working directory. Either way the config holds it as an absolute path.
    `output_dir` stays as written: relative to the working directory, like any output path of a command."""
    source, c = str(path), Check()
    data: Any = None
    try:
        data = read_yaml(path, "config")
    except ConfigError as exc:  # the file's problem, reported with those of the overrides
        c.problems.extend(exc.problems)
    work = copy.deepcopy(dict(data)) if isinstance(data, Mapping) else {}
    for override in overrides:
        _override(c, work, override)
    given = any(o.partition("=")[0].strip() == "battery" for o in overrides)
    base = None if given else Path(os.path.abspath(path)).parent
    config = _build(c, work if isinstance(data, Mapping) else data, source, base) if data is not None else None
    if c.problems or config is None:
        raise ConfigError(source, c.problems)
    return config


def config_from_dict(data: Mapping[str, Any], source: str) -> TrainConfig:
    """Validate config data (as read from YAML) and build a TrainConfig, or raise one ConfigError. A
    relative battery path is taken relative to the working directory (`to_dict` holds it absolute)."""
    c = Check()
    config = _build(c, data, source)
    if c.problems or config is None:
        raise ConfigError(source, c.problems)
    return config


def with_reward(config: TrainConfig, name: str) -> TrainConfig:
    """The `--reward NAME` shorthand. A reward the config lists keeps its weight and options, and is
    switched on at weight 1.0 if its weight is 0 (logged); the other rewards are kept. A reward the config
    does not list replaces the config's rewards: NAME alone, weight 1, default options. Revalidated.

    The order of the rewards means nothing to the trainer (a weighted sum), so NAME is not moved.

    Raises:
        ConfigError: NAME is not a registered reward (rl.rewards.REWARDS).
    """
    try:
        reward_spec(name)
    except SuiteError as exc:
        raise ConfigError("--reward", [f"--reward: {exc}"]) from None
    listed = {r.name: r for r in config.rewards}
    if name not in listed:
        rewards = [RewardConfig(name, 1.0)]
    else:
        if listed[name].weight == 0:
            log.info("--reward %s: %s gives it weight 0; switched on at weight 1.0", name, config.source)
        rewards = [RewardConfig(r.name, 1.0, r.options) if r.name == name and r.weight == 0 else r
                   for r in config.rewards]
    return config_from_dict({**config.to_dict(), "rewards": [_plain(r) for r in rewards]}, config.source)


def _override(c: Check, data: dict[str, Any], override: str) -> None:
    """Apply one `key=value` to `data`, or add a problem naming the override."""
    key, sep, raw = override.partition("=")
    problem = None if sep and key.strip() else "must be key=value with a dotted key, e.g. seed=1"
    try:
        value = yaml.load(raw, Loader=YamlLoader)  # noqa: S506 - YamlLoader is a SafeLoader
    except yaml.YAMLError as exc:
        problem = problem or f"the value is not valid YAML: {getattr(exc, 'problem', None) or exc}"
    if problem is None:
        problem = _assign(data, re.sub(r"\[(\d+)\]", r".\1", key.strip()).split("."), value)
    if problem is not None:
        c.add(f"override {override!r}", problem)


def _assign(data: dict[str, Any], parts: list[str], value: Any) -> str | None:
    head, rest, keys = parts[0], parts[1:], tuple(declared(TrainConfig))
    if head not in keys:
        return f"unknown key {head!r}{did_you_mean(head, keys)}"
    if head in _SECTIONS and rest:
        sub = tuple(declared(_SECTIONS[head]))
        if len(rest) > 1 or rest[0] not in sub:
            return f"unknown key {'.'.join(rest)!r} in {head}{did_you_mean(rest[0], sub)}"
        section = data.setdefault(head, {})
        if not isinstance(section, dict):
            return f"{head} in the file is not a mapping"
        section[rest[0]] = value
    elif head == "rewards" and rest:
        rewards = data.get("rewards")
        count = len(rewards) if isinstance(rewards, list) else 0
        if not isinstance(rewards, list) or not rest[0].isdigit() or int(rest[0]) >= count or len(rest) > 2:
            return (f"rewards has {count} entries: use rewards.I or rewards.I.KEY with I in 0..{count - 1}, "
                    f"or replace the list (rewards=[{{name: diversity, weight: 1}}])")
        if len(rest) == 1:
            rewards[int(rest[0])] = value
        elif isinstance(entry := rewards[int(rest[0])], dict):
            entry[rest[1]] = value  # name, weight or an option: checked with the rewards
        else:
            return f"rewards[{rest[0]}] in the file is not a mapping"
    elif rest:
        return f"{head!r} has no sub-keys"
    else:
        data[head] = value
    return None


def _build(c: Check, data: Any, source: str, base: Path | None = None) -> TrainConfig | None:
    """Check `data` and build the config; `base`: the folder a relative battery path is read from (None:
    the working directory)."""
    if not isinstance(data, Mapping):
        c.problems.append(f"top level must be a mapping of config keys, got {show(data)}")
        return None
    values = read_fields(c, TrainConfig, data) or {}
    if isinstance(values.get("battery"), str):
        values["battery"] = _battery_path(c, values["battery"], base, source)
    raws = {name: dict(data[name]) if isinstance(data.get(name), Mapping) else {} for name in _SECTIONS}
    cross_checks(c, values, raws)
    if c.problems:
        return None
    return TrainConfig(**{**values, **{name: cls(**values[name]) for name, cls in _SECTIONS.items()}},
                       source=source)


def _battery_path(c: Check, value: str, base: Path | None, source: str) -> str | None:
    """The absolute path of the battery `value` (relative paths: to `base`, the config file's folder, or
    to the working directory where `base` is None). Where the config file's folder has no such file, one
    problem names both that path and the config file, and the battery's own checks are skipped (None)."""
    given = Path(value).expanduser()
    path = Path(os.path.abspath(given if given.is_absolute() or base is None else base / given))
    if base is None or given.is_absolute() or path.exists():
        return str(path)
    hint = ""
    if Path(os.path.abspath(given)).exists():
        hint = (f"; '{os.path.abspath(given)}' exists relative to the working directory, but paths in a config "
                f"file are read relative to its folder: write {os.path.relpath(os.path.abspath(given), base)!r} "
                "or an absolute path, or give battery=PATH on the command line")
    c.add("battery", f"{value!r}: no such file {str(path)!r} (relative to the folder of the config file "
                     f"{source!r}){hint}")
    return None


def _plain(value: Any) -> Any:
    if isinstance(value, RewardConfig):
        return {"name": value.name, "weight": value.weight, **value.options_dict}
    if is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in fields(value)}
    return [_plain(v) for v in value] if isinstance(value, tuple) else value
