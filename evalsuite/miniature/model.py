"""The miniature world as a built-in model (`--model miniature`, the default): its pipeline folder and
its profile, registered with `evalsuite.models.register_builtin_model` like any other model would be.

The profile says what the world brings to an audit: its images are of the "miniature" domain, read by
its own CLIP (which knows only the world's words), the exact `oracle` classifier rides along on every
audit, and the oracle's reading of the hat judges whether an image shows the prompt's occupation
(`HatReader`: the miniature model draws hats faithfully, but not the 3×3-pixel badge).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from evalsuite.battery import Prompt
from evalsuite.models import BuiltinModel, ModelProfile, register_builtin_model, use_math_attention
from evalsuite.results.schema import OnPrompt

from . import ASSETS
from .oracle import read_worn_hat
from .world import OCCUPATIONS

NAME = "miniature"
DOMAIN = "miniature"


class HatReader:
    """On-prompt truth: the hat style the oracle reads above the face (`read_worn_hat`; None where it
    finds no person) against the hat of the occupation the prompt's `occupation` slot names."""

    description = "the hat the oracle reads, against the hat of the prompt's occupation (miniature world)"

    def read(self, images: np.ndarray, prompts: Sequence[Prompt]) -> list[OnPrompt | None]:
        hats = read_worn_hat(images)
        out: list[OnPrompt | None] = []
        for hat, prompt in zip(hats, prompts, strict=True):
            occupation = OCCUPATIONS.get(dict(prompt.slots).get("occupation", ""))
            out.append(None if occupation is None else {"read": hat, "wanted": occupation.hat})
        return out


def profile() -> ModelProfile:
    """The miniature model's profile (reads the world's word list from the assets)."""
    words = frozenset((ASSETS / "words.txt").read_text().split())
    return ModelProfile(domain=DOMAIN, clip=str(ASSETS / "clip"), vocabulary=words, exact_readers=("oracle",),
                        on_prompt=HatReader())


MODEL = register_builtin_model(BuiltinModel(
    name=NAME, folder=lambda: ASSETS / "pipeline", profile=profile,
    prepare=lambda pipe: use_math_attention(pipe.unet),
    load_kwargs={"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False},
    missing="rebuild it with `evalsuite miniature build`"))
