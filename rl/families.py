"""The pipeline families `rl finetune` trains, keyed on the diffusers pipeline class, and the one factory
of their policies (`policy_for`).

| pipeline class | family | policy | LoRA on | text LoRA | kohya file |
|---|---|---|---|---|---|
| StableDiffusionPipeline | SD 1.x/2.x | stochastic DDIM (`rl.unet_policy`) | UNet | CLIP | yes |
| StableDiffusionXLPipeline | SDXL | stochastic DDIM (`rl.unet_policy`) | UNet | both CLIPs | yes (te1, te2) |
| StableDiffusion3Pipeline | SD3/SD3.5 | flow SDE (`rl.flow_policy`) | transformer | no | no |
| FluxPipeline | Flux | flow SDE, distilled guidance as input | transformer | no | no |

Any other class (PixArt-Σ, which the runner audits; image-to-image pipelines; ...) is refused with one
message (`untrainable`), from its model_index.json before anything loads (`trainable_problems`, called by
the config checks) and again, by the loaded pipeline's class, in `policy_for`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from evalsuite.errors import SuiteError
from evalsuite.models import model_index

from .flow_policy import FlowPolicy
from .policy import Policy
from .unet_policy import UNetPolicy

__all__ = ["TRAINABLE", "TrainableFamily", "check_trainable", "family_of", "policy_for", "trainable_problems",
           "untrainable"]


@dataclass(frozen=True)
class TrainableFamily:
    """A family the trainer drives: its name, its policy kind ("ddim" or "flow"), whether a text LoRA may
    adapt its text encoders, and what its adapter's metadata adds (the kohya base-model version)."""

    name: str
    policy: str
    text_lora: bool
    metadata: Mapping[str, str] = field(default_factory=dict)


TRAINABLE: dict[str, TrainableFamily] = {
    "StableDiffusionPipeline": TrainableFamily("SD 1.x/2.x", "ddim", text_lora=True),
    "StableDiffusionXLPipeline": TrainableFamily("SDXL", "ddim", text_lora=True,
                                                 metadata={"base_model_version": "sdxl_base_v1-0"}),
    "StableDiffusion3Pipeline": TrainableFamily("SD3/SD3.5", "flow", text_lora=False),
    "FluxPipeline": TrainableFamily("Flux", "flow", text_lora=False),
}


def untrainable(model: str, class_name: str) -> str:
    """The one message refusing a pipeline class the trainer cannot drive."""
    families = ", ".join(f"{f.name} ({name})" for name, f in TRAINABLE.items())
    return f"'{model}' is a {class_name}, which rl finetune cannot train; it trains {families}"


def trainable_problems(model: str, text_encoder_rank: int = 0) -> list[tuple[str, str]]:
    """Why the trainer cannot train `model`, as (config key, message) pairs ([] = it can, or the index
    cannot be read before loading: a hub id), from its model_index.json: a class outside `TRAINABLE`
    (key "model"), or a text LoRA asked of a family that takes none (key "lora.text_encoder_rank")."""
    index = model_index(model)
    if index is None:
        return []
    return _class_problems(model, str(index.get("_class_name")), text_encoder_rank)


def _class_problems(model: str, class_name: str, text_encoder_rank: int) -> list[tuple[str, str]]:
    family = TRAINABLE.get(class_name)
    if family is None:
        return [("model", untrainable(model, class_name))]
    if text_encoder_rank and not family.text_lora:
        return [("lora.text_encoder_rank", f"{text_encoder_rank}, but a {family.name} model ({class_name}) is "
                 "trained with a LoRA on its transformer only; set lora.text_encoder_rank: 0")]
    return []


def check_trainable(model: str, text_encoder_rank: int = 0) -> None:
    """Refuse (SuiteError, one message) a hub id whose pipeline the trainer cannot train, from its
    model_index.json alone, before its weights download. A local folder or built-in model was checked with
    the config (`trainable_problems`); an index that cannot be fetched is left to `load_model` to report."""
    if model_index(model) is not None or Path(model).expanduser().exists():
        return
    from diffusers import DiffusionPipeline

    try:
        index = DiffusionPipeline.load_config(model)
    except (OSError, ValueError):
        return
    if problems := _class_problems(model, str(index.get("_class_name")), text_encoder_rank):
        raise SuiteError("; ".join(f"{key}: {message}" for key, message in problems))


def family_of(pipe: Any) -> TrainableFamily:
    """The family of a loaded pipeline; SuiteError (`untrainable`) for any other class."""
    name = type(pipe).__name__
    if name not in TRAINABLE:
        raise SuiteError(untrainable(getattr(pipe, "name_or_path", None) or name, name))
    return TRAINABLE[name]


def policy_for(pipe: Any, steps: int, eta: float, model: str = "", text_encoder_rank: int = 0) -> Policy:
    """The policy of a loaded pipeline (`TRAINABLE`): stochastic DDIM with `eta`, or the flow SDE with
    noise level `eta`, over `steps` steps. Refuses, with one message, a class it cannot drive or a text
    LoRA its family does not take."""
    name = type(pipe).__name__
    if problems := _class_problems(model or name, name, text_encoder_rank):
        raise SuiteError("; ".join(f"{key}: {message}" for key, message in problems))
    if TRAINABLE[name].policy == "flow":
        return FlowPolicy(pipe, steps, eta)
    return UNetPolicy(pipe, steps, eta)
