"""Configuration of the RL fine-tuner: one YAML file plus `key=value` overrides -> frozen dataclasses.

rl/configs/miniature.yaml documents every field (meaning, units, interactions). Every key is required
except those of `_OPTIONAL` (evaluation.allow_same_classifier false, evaluation.eta 0,
training.timestep_window 1, training.compile false, training.kl_coef 0, training.kl_steps trained) and
the per-reward options (default: the first allowed value, see REWARD_OPTIONS). `load_config` validates
the values, the batch arithmetic, the model source, the battery and the attributes it balances, reward
names and options, and the classifier specs, and reports every problem of the file and of the overrides
at once in one ConfigError ("key: message"). `TrainConfig.to_dict()` loads back through
`config_from_dict` to an equal config.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any

import yaml

from evalsuite.battery import Battery, _Check, _show, load_battery  # the battery loader's problem collector
from evalsuite.classifiers.base import check_classifier_spec
from evalsuite.errors import ConfigError, SuiteError, did_you_mean
from evalsuite.models import check_model_source
from rl.rewards import KERNELS, REWARDS

log = logging.getLogger("rl")

# Options each reward takes -> allowed values; the first value is the default.
REWARD_OPTIONS: dict[str, dict[str, tuple[str, ...]]] = {
    # diversity features: the reward classifier's class probabilities, or one-hot labels of its most
    # probable class (rl.rewards.hard_labels); an image-embedding variant needs a reference image set,
    # not built yet
    "diversity": {"kernel": tuple(KERNELS), "features": ("probs", "labels"),
                  "reference": ("uniform", "target")},
    "balance": {"mode": ("kl", "entropy"), "reference": ("uniform", "target")},
    "alignment": {},
    "drift": {"features": ("embedding",)},
    "confidence": {},
}


class _Loader(yaml.SafeLoader):
    """Safe YAML that also reads exponent floats without a dot (1e-4; plain YAML 1.1 reads a str)."""


_Loader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+$"),
                              list("-+0123456789"))


@dataclass(frozen=True)
class SamplingConfig:
    steps: int
    eta: float
    guidance_scales: tuple[float, ...]
    prompts_per_epoch: int
    group_size: int
    batch_size: int


@dataclass(frozen=True)
class TrainingConfig:
    epochs: int
    inner_epochs: int
    batch_size: int
    gradient_accumulation_steps: int
    learning_rate: float
    weight_decay: float
    max_grad_norm: float
    clip_range: float
    adv_clip_max: float
    timestep_fraction: float
    mixed_precision: str
    gradient_checkpointing: bool
    advantage: str
    tracker_buffer: int
    tracker_min_count: int
    timestep_window: float = 1.0
    compile: bool = False
    kl_coef: float = 0.0
    kl_steps: str = "trained"


@dataclass(frozen=True)
class LoraConfigSpec:
    rank: int
    alpha: float
    targets: tuple[str, ...]
    text_encoder_rank: int


@dataclass(frozen=True)
class RewardConfig:
    """One reward term: a name in rl.rewards.REWARDS, a weight >= 0, its options as (key, value) pairs."""

    name: str
    weight: float
    options: tuple[tuple[str, Any], ...] = ()

    @property
    def options_dict(self) -> dict[str, Any]:
        return dict(self.options)


@dataclass(frozen=True)
class EvaluationConfig:
    classifier: str
    allow_same_classifier: bool
    every: int
    images_per_prompt: int
    guidance_scales: tuple[float, ...]
    steps: int
    eta: float


@dataclass(frozen=True)
class TrainConfig:
    """A validated training config. `source` (where it was read from) takes no part in equality."""

    model: str
    battery: str
    output_dir: str
    seed: int
    sampling: SamplingConfig
    training: TrainingConfig
    lora: LoraConfigSpec
    rewards: tuple[RewardConfig, ...]
    reward_classifier: str
    reward_attributes: tuple[str, ...]
    validity_threshold: float
    evaluation: EvaluationConfig
    checkpoint_every: int
    keep_checkpoints: int
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
        return {f.name: _plain(getattr(self, f.name)) for f in fields(self) if f.name != "source"}


Checker = Callable[[_Check, str, Any], Any]


def _call(method: str, *args: Any) -> Checker:
    """A checker that calls the battery checker's `method(key, value, *args)`."""
    return lambda c, k, v: getattr(c, method)(k, v, *args)


def _num(interval: str) -> Checker:
    """A finite number in an interval written like '(0, 1]' or '[0, inf)'."""
    low, high = (float(x) for x in interval[1:-1].split(","))

    def check(c: _Check, key: str, v: Any) -> float | None:
        ok = (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
              and (low < v if interval[0] == "(" else low <= v)
              and (v < high if interval[-1] == ")" else v <= high))
        return float(v) if ok else c.wrong(key, f"a number in {interval}", v)
    return check


def _choice(*allowed: str) -> Checker:
    def check(c: _Check, key: str, value: Any) -> str | None:
        if isinstance(value, str) and value in allowed:
            return value
        c.add(key, f"{_show(value)} is not allowed{did_you_mean(str(value), allowed)}")
        return None
    return check


def _bool(c: _Check, key: str, value: Any) -> bool | None:
    return value if isinstance(value, bool) else c.wrong(key, "true or false", value)


def _precision(c: _Check, key: str, value: Any) -> str | None:
    # YAML 1.1 reads an unquoted `no` as false: take false to mean "no".
    return "no" if value is False else _choice("no", "fp16", "bf16")(c, key, value)


def _int(low: int) -> Checker:
    return _call("integer", low)


_text, _names, _scales, _POSITIVE = _call("text"), _call("str_list"), _call("scales"), _num("(0, inf)")
_SECTIONS: dict[str, dict[str, Checker]] = {
    # eta > 1 asks for a step variance above 1 - a_t' (rl.ddim): DDIM's eta runs from 0 (deterministic) to 1
    "sampling": {"steps": _int(1), "eta": _num("(0, 1]"), "guidance_scales": _scales,
                 "prompts_per_epoch": _int(1), "group_size": _int(3), "batch_size": _int(1)},
    "training": {"epochs": _int(1), "inner_epochs": _int(1), "batch_size": _int(1),
                 "gradient_accumulation_steps": _int(1), "learning_rate": _POSITIVE,
                 "weight_decay": _num("[0, inf)"), "max_grad_norm": _POSITIVE, "clip_range": _POSITIVE,
                 "adv_clip_max": _POSITIVE, "timestep_fraction": _num("(0, 1]"),
                 "timestep_window": _num("(0, 1]"), "kl_coef": _num("[0, inf)"),
                 "kl_steps": _choice("trained", "chain", "untrained"),
                 "mixed_precision": _precision, "gradient_checkpointing": _bool, "compile": _bool,
                 "advantage": _choice("pooled", "group", "tracker"),
                 "tracker_buffer": _int(1), "tracker_min_count": _int(1)},
    "lora": {"rank": _int(1), "alpha": _POSITIVE, "targets": _names, "text_encoder_rank": _int(0)},
    "evaluation": {"classifier": _text, "allow_same_classifier": _bool, "every": _int(0),
                   "images_per_prompt": _int(1), "guidance_scales": _scales, "steps": _int(1),
                   "eta": _num("[0, 1]")},
}
_OPTIONAL = {"evaluation.allow_same_classifier": False, "evaluation.eta": 0.0, "training.timestep_window": 1.0,
             "training.compile": False, "training.kl_coef": 0.0,
             "training.kl_steps": "trained"}
_TOP: dict[str, Checker] = {
    "model": _text, "battery": _text, "output_dir": _text, "seed": _int(0), "reward_classifier": _text,
    "reward_attributes": _names, "validity_threshold": _num("[0, 1)"),
    "checkpoint_every": _int(1), "keep_checkpoints": _int(1),
}
_KEYS = tuple(f.name for f in fields(TrainConfig) if f.name != "source")
_CLASSES = {"sampling": SamplingConfig, "training": TrainingConfig, "lora": LoraConfigSpec,
            "evaluation": EvaluationConfig}


def load_config(path: str | os.PathLike[str], overrides: Sequence[str] = ()) -> TrainConfig:
    """Read a config file, apply `key=value` overrides (dotted keys; values read as YAML) and validate;
    every problem of the file and the overrides is reported in one ConfigError."""
    source, c = str(path), _Check()
    data: Any = None
    try:
        with open(path, encoding="utf-8") as handle:
            data = yaml.load(handle.read(), Loader=_Loader)
        if data is None:
            c.problems.append("file is empty; expected a mapping of config keys")
    except FileNotFoundError:
        c.problems.append("config file not found")
    except (OSError, UnicodeDecodeError) as exc:
        c.problems.append(f"cannot read config file: {exc}")
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        c.problems.append(f"YAML syntax error{where}: {getattr(exc, 'problem', None) or exc}")
    work = copy.deepcopy(dict(data)) if isinstance(data, Mapping) else {}
    for text in overrides:
        _override(c, work, text)
    config = _build(c, work if isinstance(data, Mapping) else data, source) if data is not None else None
    if c.problems or config is None:
        raise ConfigError(source, c.problems)
    return config


def config_from_dict(data: Mapping[str, Any], source: str) -> TrainConfig:
    """Validate config data (as read from YAML) and build a TrainConfig, or raise one ConfigError."""
    c = _Check()
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
    if name not in REWARDS:
        raise ConfigError("--reward", [f"--reward: unknown reward {name!r}{did_you_mean(name, REWARDS)}"])
    listed = {r.name: r for r in config.rewards}
    if name not in listed:
        rewards = [RewardConfig(name, 1.0)]
    else:
        if listed[name].weight == 0:
            log.info("--reward %s: %s gives it weight 0; switched on at weight 1.0", name, config.source)
        rewards = [RewardConfig(r.name, 1.0, r.options) if r.name == name and r.weight == 0 else r
                   for r in config.rewards]
    return config_from_dict({**config.to_dict(), "rewards": [_plain(r) for r in rewards]}, config.source)


def _override(c: _Check, data: dict[str, Any], text: str) -> None:
    """Apply one `key=value` to `data`, or add a problem naming the override."""
    key, sep, raw = text.partition("=")
    problem = None if sep and key.strip() else "must be key=value with a dotted key, e.g. seed=1"
    try:
        value = yaml.load(raw, Loader=_Loader)
    except yaml.YAMLError as exc:
        problem = problem or f"the value is not valid YAML: {getattr(exc, 'problem', None) or exc}"
    if problem is None:
        problem = _assign(data, re.sub(r"\[(\d+)\]", r".\1", key.strip()).split("."), value)
    if problem is not None:
        c.add(f"override {text!r}", problem)


def _assign(data: dict[str, Any], parts: list[str], value: Any) -> str | None:
    head, rest = parts[0], parts[1:]
    if head not in _KEYS:
        return f"unknown key {head!r}{did_you_mean(head, _KEYS)}"
    if head in _SECTIONS and rest:
        if len(rest) > 1 or rest[0] not in _SECTIONS[head]:
            return f"unknown key {'.'.join(rest)!r} in {head}{did_you_mean(rest[0], _SECTIONS[head])}"
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


def _build(c: _Check, data: Any, source: str) -> TrainConfig | None:
    if not isinstance(data, Mapping):
        c.problems.append(f"top level must be a mapping of config keys, got {_show(data)}")
        return None
    d = c.mapping("", data, _KEYS, _KEYS) or {}
    out: dict[str, Any] = {k: check(c, k, d[k]) if k in d else None for k, check in _TOP.items()}
    raws: dict[str, dict[str, Any]] = {}
    for name, checks in _SECTIONS.items():
        required = [k for k in checks if f"{name}.{k}" not in _OPTIONAL]
        raws[name] = (c.mapping(name, d[name], tuple(checks), required) if name in d else None) or {}
        out[name] = {k: check(c, f"{name}.{k}", raws[name][k]) if k in raws[name]
                     else _OPTIONAL.get(f"{name}.{k}") for k, check in checks.items()}
    out["rewards"] = _rewards(c, d["rewards"]) if "rewards" in d else None
    _cross_checks(c, out, raws)
    if c.problems:
        return None
    sections = {name: cls(**out[name]) for name, cls in _CLASSES.items()}
    return TrainConfig(**{**out, **sections, "source": source})


def _cross_checks(c: _Check, out: dict[str, Any], raws: dict[str, dict[str, Any]]) -> None:
    """Batch arithmetic, tracker sizes, model source, battery and attributes, classifier specs."""
    def ints(section: str, *keys: str) -> list[int] | None:  # raw values: one bad value hides no other
        good = [v for v in (raws[section].get(k) for k in keys) if type(v) is int and v >= 1]
        return good if len(good) == len(keys) else None

    if sizes := ints("sampling", "prompts_per_epoch", "group_size"):
        n, what = sizes[0] * sizes[1], f"sampling.prompts_per_epoch x group_size = {sizes[0]} x {sizes[1]}"
        for key, b in (("sampling.batch_size", ints("sampling", "batch_size")),
                       ("training.batch_size", ints("training", "batch_size"))):
            if b and n % b[0]:
                c.add(key, f"must divide the samples per epoch ({what} = {n}), got {b[0]}")
        b = ints("training", "batch_size", "gradient_accumulation_steps")
        if b and not n % b[0] and n % (b[0] * b[1]):
            c.add("training.gradient_accumulation_steps",
                  f"training.batch_size x gradient_accumulation_steps = {b[0]} x {b[1]} = {b[0] * b[1]} must "
                  f"divide the samples per epoch ({what} = {n}), got {b[1]}")
    t = out["training"]
    if sizes := ints("training", "tracker_buffer", "tracker_min_count"):  # whatever the advantage: the trainer
        if sizes[1] > sizes[0]:  # builds its tracker in every run
            c.add("training.tracker_min_count", f"must be <= tracker_buffer ({sizes[0]}), got {sizes[1]}")
    steps, window = out["sampling"].get("steps"), t.get("timestep_window", 1.0)
    if t.get("kl_coef") and t.get("kl_steps") == "untrained" and isinstance(steps, int) and \
            isinstance(window, float) and math.ceil(steps * window - 1e-9) >= steps:
        c.add("training.kl_steps", f"untrained penalises the steps outside training.timestep_window, but a window "
              f"of {window:g} covers all {steps} steps: choose trained or chain, or a shorter window")
    if out["model"]:
        try:
            check_model_source(out["model"])
        except SuiteError as exc:
            c.add("model", str(exc).removeprefix("--model: "))
    if out["battery"]:
        _check_battery(c, out["battery"], out["reward_attributes"] or ())
    spec, evaluator = out["reward_classifier"], out["evaluation"]["classifier"]
    for key, value in (("reward_classifier", spec), ("evaluation.classifier", evaluator)):
        c.problems.extend(f"{key}: {p}" for p in (check_classifier_spec(value) if value else []))
    if spec and spec == evaluator and out["evaluation"]["allow_same_classifier"] is False:
        c.add("evaluation.classifier",
              f"{evaluator!r} is also the reward_classifier: a reward classifier equal to the evaluation "
              "classifier is refused unless explicitly allowed (set evaluation.allow_same_classifier: true)")


def _check_battery(c: _Check, path: str, attributes: Sequence[str]) -> None:
    battery: Battery | None = None
    try:
        battery = load_battery(path)
    except ConfigError as exc:
        c.problems.extend(f"battery: {exc.source}: {p}" for p in exc.problems)
    if battery is None:
        return
    held = [p.heldout for p in battery.prompts()]
    if all(held):
        c.add("battery", f"{path!r} has no training prompts: every prompt is heldout")
    if not any(held):
        c.add("battery", f"{path!r} has no heldout prompts, which evaluation runs; add a `heldout` section")
    for i, name in enumerate(attributes):
        if name not in battery.attribute_names:
            c.add(f"reward_attributes[{i}]", f"{name!r} is not an attribute of battery {path!r}"
                                             f"{did_you_mean(name, battery.attribute_names)}")


def _rewards(c: _Check, raw: Any) -> tuple[RewardConfig, ...] | None:
    items = c.sequence("rewards", raw)
    out: list[RewardConfig] = []
    for i, item in enumerate(items or ()):
        key, before = f"rewards[{i}]", len(c.problems)
        entry = c.mapping(key, item, (), ("name", "weight")) or {}
        name = c.text(f"{key}.name", entry["name"]) if "name" in entry else None
        if name is not None and name not in REWARDS:
            c.add(f"{key}.name", f"unknown reward {name!r}{did_you_mean(name, REWARDS)}")
            name = None
        elif name is not None and any(r.name == name for r in out):
            c.add(f"{key}.name", f"reward {name!r} is listed twice; list each reward once")
        weight = c.number(f"{key}.weight", entry["weight"], 0.0) if "weight" in entry else None
        schema = REWARD_OPTIONS.get(name, {}) if name is not None else {}
        for option, value in entry.items() if name is not None else ():
            if option in ("name", "weight"):
                continue
            if option not in schema:
                hint = did_you_mean(option, schema) if schema else "; it takes no options"
                c.add(f"{key}.{option}", f"unknown option {option!r} of reward {name!r}{hint}")
            else:
                _choice(*schema[option])(c, f"{key}.{option}", value)
        if name is not None and weight is not None and len(c.problems) == before:
            out.append(RewardConfig(name, weight, tuple((o, entry.get(o, a[0])) for o, a in schema.items())))
    if items and len(out) == len(items) and not any(r.weight > 0 for r in out):
        c.add("rewards", "at least one reward needs a weight > 0, got all weights 0")
    return tuple(out)


def _plain(value: Any) -> Any:
    if isinstance(value, RewardConfig):
        return {"name": value.name, "weight": value.weight, **value.options_dict}
    if is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in fields(value)}
    return [_plain(v) for v in value] if isinstance(value, tuple) else value
