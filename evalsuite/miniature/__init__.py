"""The built-in miniature text-to-image world: renderer, oracle, shipped models and their builder.

`ASSETS` is the shipped world (built by `evalsuite miniature build`): `pipeline/` (a diffusers
StableDiffusionPipeline), `clip/` (a transformers CLIPModel + processor), `classifier/` (the supervised
skin-tone/age classifier), `words.txt` (the vocabulary) and `build.json`.
The environment variable EVALSUITE_MINIATURE_DIR points it elsewhere.
"""

import os
from pathlib import Path

from .oracle import read_attributes, read_colour_probs, read_occupation, read_signature, read_worn_hat
from .render import Portrait, render, render_batch, sample_portraits
from .world import AGE_NAMES, MEASURABLE_ATTRIBUTES, OCCUPATIONS, TONE_NAMES, describe_world

ASSETS = Path(os.environ.get("EVALSUITE_MINIATURE_DIR") or Path(__file__).parent / "assets")

__all__ = [
    "ASSETS", "AGE_NAMES", "MEASURABLE_ATTRIBUTES", "OCCUPATIONS", "TONE_NAMES", "Portrait",
    "describe_world", "read_attributes", "read_occupation", "read_colour_probs", "read_signature", "read_worn_hat",
    "render",
    "render_batch", "sample_portraits",
]
