"""`photo[:<clip>]`: the attribute classifier for natural images (photographs of people).

Per image it reads the largest face the runner's detector found: skin tone by that face's pixels on a
published scale (`skin_tone.py`: ITA / Fitzpatrick proxy, or the Monk scale, chosen by the battery's
class names), every other attribute (perceived gender, age, ...) by CLIP zero-shot over the battery's class
descriptions (`clip_zero_shot.py`) on a crop around that face (the box grown by half its side on every
side, so hair and the head's outline are in view). `<clip>` names the CLIP (a hub id or a local folder;
default `openai/clip-vit-large-patch14`). An image with no detected face is "no_person" (the runner
marks it so for every classifier).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from evalsuite.battery import AttributeSpec

from .base import AttributeOutput, ClassifierContext, check_images, face_crops, register_classifier, required_faces
from .clip_zero_shot import ClipZeroShot
from .embedders import clip_embedder
from .skin_tone import SkinToneClassifier

CROP_MARGIN = 0.5  # the face box grown by half its side on every side for CLIP


class PhotoClassifier:
    """Skin tone by face pixels, the other attributes by CLIP zero-shot on the face crop."""

    uses_faces = True
    needs_faces = True
    detects_people = False  # the runner's detector decides "no_person"

    def __init__(self, clip: ClipZeroShot) -> None:
        self.clip = clip
        self.skin = SkinToneClassifier()
        self.name = "photo" if clip.name == "clip" else f"photo:{clip.name.partition(':')[2]}"
        self.methods: dict[str, str] = {}

    def check(self, attributes: Sequence[AttributeSpec]) -> list[str]:
        by_pixels = [spec for spec in attributes if self.skin.measures(spec)]
        problems = self.skin.check(by_pixels) + self.clip.check([s for s in attributes if s not in by_pixels])
        clip_method = f"CLIP zero-shot ({self.clip.clip.model_id}) over the battery's class descriptions, on the " \
                      f"face crop"
        self.methods = {spec.name: self.skin.methods.get(spec.name, clip_method) for spec in attributes}
        return problems

    def classify(self, images: np.ndarray, attributes: Sequence[AttributeSpec],
                 faces: Sequence[np.ndarray] | None = None) -> dict[str, AttributeOutput]:
        check_images(images, f"classifier '{self.name}'")
        faces = required_faces(self.name, images, faces)
        by_pixels = [spec for spec in attributes if self.skin.measures(spec)]
        by_clip = [spec for spec in attributes if spec not in by_pixels]
        out = self.skin.classify(images, by_pixels, faces) if by_pixels else {}
        if by_clip:
            size = max(images.shape[1], 1)
            out.update(self.clip.classify(face_crops(images, faces, size, CROP_MARGIN), by_clip))
        return {spec.name: out[spec.name] for spec in attributes}


@register_classifier("photo", domains=("natural",))
def _photo(ctx: ClassifierContext, arg: str | None) -> PhotoClassifier:
    clip = ClipZeroShot(clip_embedder(ctx, arg, "clip" if arg is None else f"clip:{arg}"))
    return PhotoClassifier(clip)
