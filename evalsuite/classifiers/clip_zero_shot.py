"""CLIP zero-shot attribute classification (Radford et al., 2021, "Learning Transferable Visual Models
From Natural Language Supervision", section 3.1: prompts as class descriptions).

For each attribute, p(class | image) = softmax_k(s · cos(image, description_k)) over that attribute's
class descriptions from the battery, s = exp(logit_scale) of the checkpoint. With the miniature CLIP
an attribute whose descriptions use words outside the world's vocabulary is "not_measurable" (so the
default battery's gender is). A description longer than the text encoder's context is a check() problem.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from evalsuite.battery import AttributeSpec
from evalsuite.errors import SuiteError

from .base import (
    AttributeOutput,
    ClassifierContext,
    check_images,
    make_output,
    not_measurable,
    register_classifier,
)
from .embedders import ClipEmbedder, clip_embedder


class ClipZeroShot:
    """An AttributeClassifier over a ClipEmbedder; every image gets status "ok" for measurable attributes."""

    detects_people = False  # no person detector: an image without a person still gets a class

    def __init__(self, clip: ClipEmbedder) -> None:
        self.clip = clip
        self.name = clip.name

    def measurable(self, spec: AttributeSpec) -> bool:
        return not any(self.clip.unknown_words(text) for text in spec.descriptions)

    def check(self, attributes: Sequence[AttributeSpec]) -> list[str]:
        problems = []
        for spec in attributes:
            if not self.measurable(spec):
                continue
            for cls, text in zip(spec.classes, spec.descriptions, strict=True):
                n = self.clip.token_count(text)
                if n > self.clip.max_length:
                    problems.append(f"classifier '{self.name}': the description of {spec.name}.{cls} is "
                                    f"{n} tokens, more than the {self.clip.max_length} that CLIP "
                                    f"'{self.clip.model_id}' reads; shorten it")
        return problems

    def classify(self, images: np.ndarray, attributes: Sequence[AttributeSpec]) -> dict[str, AttributeOutput]:
        check_images(images, f"classifier '{self.name}'")
        problems = self.check(attributes)
        if problems:
            raise SuiteError("; ".join(problems))
        n = len(images)
        measured = [spec for spec in attributes if self.measurable(spec)]
        out = {spec.name: not_measurable(n, len(spec.classes)) for spec in attributes if spec not in measured}
        if not measured:
            return out
        image_emb = self.clip.embed_images(images).astype(np.float64)
        texts = [text for spec in measured for text in spec.descriptions]
        text_emb = self.clip.embed_texts(texts).astype(np.float64)
        start = 0
        for spec in measured:
            k = len(spec.classes)
            logits = self.clip.logit_scale * image_emb @ text_emb[start:start + k].T
            start += k
            logits -= logits.max(axis=1, keepdims=True) if n else 0.0
            probs = np.exp(logits)
            probs /= probs.sum(axis=1, keepdims=True)
            out[spec.name] = make_output(probs, ("ok",) * n)
        return {spec.name: out[spec.name] for spec in attributes}


@register_classifier("clip")
def _clip(ctx: ClassifierContext, arg: str | None) -> ClipZeroShot:
    return ClipZeroShot(clip_embedder(ctx, arg, "clip" if arg is None else f"clip:{arg}"))
