"""The checks of an RL config across its fields and beyond its file (`rl.config` checks each field).

Batch arithmetic (the batch sizes divide the samples per epoch), the tracker sizes, the KL window, the
model source and whether the trainer can drive its pipeline (`rl.families.trainable_problems`, from its
model_index.json, before anything loads; an SD3 model may leave its T5 out: `drop_t5`), the battery and
the attributes the rewards balance, and the classifier and embedder specs
(known, made for the model's image domain: `evalsuite.classifiers.domain_problems`, and no code plug-in
unless the user opted in: `evalsuite.classifiers.plugin_problems`). Each
problem is added to the `Check` of the config being read, so that one ConfigError reports them all.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from evalsuite.battery import Battery, load_battery
from evalsuite.classifiers import check_classifier_spec, check_embedder_spec, domain_problems, plugin_problems
from evalsuite.errors import ConfigError, SuiteError, did_you_mean
from evalsuite.models import check_model_source, model_profile, pipeline_problems
from evalsuite.validation import Check
from rl.families import trainable_problems

__all__ = ["check_battery", "cross_checks"]


def cross_checks(c: Check, values: Mapping[str, Any], raws: Mapping[str, Mapping[str, Any]]) -> None:
    """Add the problems of the checks across fields to `c`. `values`: the checked top-level values, each
    section a dict (None where a check failed, or the section itself where it is missing); `raws`: each
    section's raw mapping ({} where missing), whose ints are read again so that one bad value hides no
    other problem."""
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
    sampling, t, evaluation = (values.get(name) or {} for name in ("sampling", "training", "evaluation"))
    if sizes := ints("training", "tracker_buffer", "tracker_min_count"):  # whatever the advantage: the trainer
        if sizes[1] > sizes[0]:  # builds its tracker in every run
            c.add("training.tracker_min_count", f"must be <= tracker_buffer ({sizes[0]}), got {sizes[1]}")
    steps, window = sampling.get("steps"), t.get("timestep_window")
    if t.get("kl_coef") and t.get("kl_steps") == "untrained" and isinstance(steps, int) and \
            isinstance(window, float) and math.ceil(steps * window - 1e-9) >= steps:
        c.add("training.kl_steps", f"untrained penalises the steps outside training.timestep_window, but a window "
              f"of {window:g} covers all {steps} steps: choose trained or chain, or a shorter window")
    if values.get("model"):
        try:
            check_model_source(values["model"])
        except SuiteError as exc:
            c.add("model", str(exc).removeprefix("--model: "))
        else:  # a pipeline the trainer cannot drive (or whose T5 cannot be left out) is refused before it loads
            raw = (values.get("lora") or {}).get("text_encoder_rank")
            rank = raw if isinstance(raw, int) else 0
            problems = trainable_problems(values["model"], rank)
            if values.get("drop_t5") and not problems:
                problems = [("drop_t5", p.removeprefix("--no-t5: "))
                            for p in pipeline_problems(values["model"], drop_t5=True)]
            for key, message in problems:
                c.add(key, message)
    if values.get("battery"):
        check_battery(c, values["battery"], values.get("reward_attributes") or ())
    spec, evaluator = values.get("reward_classifier"), evaluation.get("classifier")
    domain = _domain(values.get("model"))
    for key, kind, value in (("reward_classifier", "classifier", spec), ("evaluation.classifier", "classifier",
                             evaluator), ("embedder", "embedder", values.get("embedder"))):
        if not value:
            continue
        check = check_classifier_spec if kind == "classifier" else check_embedder_spec
        found = check(value) or (domain_problems(kind, value, domain, values["model"]) if domain else [])
        c.problems.extend(f"{key}: {p}" for p in found)
        c.problems.extend(plugin_problems(value, key))  # a config must not run code by itself
    if spec and spec == evaluator and evaluation.get("allow_same_classifier") is False:
        c.add("evaluation.classifier",
              f"{evaluator!r} is also the reward_classifier: a reward classifier equal to the evaluation "
              "classifier is refused unless explicitly allowed (set evaluation.allow_same_classifier: true)")


def _domain(model: str | None) -> str | None:
    """The image domain of `model` (None where it cannot be told: no model, or one that is not found)."""
    if not model:
        return None
    try:
        check_model_source(model)
        return model_profile(model).domain
    except (OSError, SuiteError):
        return None


def check_battery(c: Check, path: str, attributes: Sequence[str]) -> None:
    """The battery loads, has training and heldout prompts, and has every rewarded attribute."""
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
