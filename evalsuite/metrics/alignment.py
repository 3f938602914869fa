"""Text-image alignment metrics: CLIP score over precomputed embeddings, and the on-prompt rate
against an exact reading of what each image shows."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from numpy.typing import ArrayLike, NDArray

from evalsuite.metrics.diversity import l2_normalize
from evalsuite.metrics.registry import register_metric


@register_metric("clip_score", higher_is_better=True, kind="alignment", bounds=(0.0, 100.0))
def clip_score(image_emb: ArrayLike, text_emb: ArrayLike, scale: float = 100.0) -> NDArray[np.float64]:
    """Per-image CLIP score: scale · max(cos(image_i, text_i), 0).

    Uses the common torchmetrics-style definition with scale = 100 (range [0, 100]); the original
    CLIPScore of Hessel et al., "CLIPScore: A Reference-free Evaluation Metric for Image Captioning",
    EMNLP 2021, uses w = 2.5 instead (pass ``scale=2.5`` for that). ``image_emb`` is (n, d);
    ``text_emb`` is one prompt embedding (d,) shared by all images, or (n, d) paired row by row.
    Higher is better. Empty-group rule: n = 0 images -> empty array (its mean is NaN).
    """
    img = l2_normalize(image_emb, "image_emb")
    txt_arr = np.asarray(text_emb, dtype=np.float64)
    if txt_arr.ndim == 1:
        txt_arr = txt_arr[None, :]
    txt = l2_normalize(txt_arr, "text_emb")
    if txt.shape[1] != img.shape[1]:
        raise ValueError(f"embedding widths differ: image {img.shape[1]}, text {txt.shape[1]}")
    if txt.shape[0] not in (1, img.shape[0]):
        raise ValueError(f"text_emb must be (d,) or ({img.shape[0]}, d), got {np.shape(text_emb)}")
    cos = np.clip((img * txt).sum(axis=1), -1.0, 1.0)
    return np.asarray(scale * np.maximum(cos, 0.0), dtype=np.float64)


@register_metric("on_prompt_rate", higher_is_better=True, kind="truth", bounds=(0.0, 1.0))
def on_prompt_rate(read: Sequence[str | None], wanted: str) -> float:
    """Share of images that show what the prompt asked for: (1/n) Σ_i [read_i = wanted].

    ``read`` holds, per image, what an exact reader found (on the miniature world: the hat style the
    oracle reads, against the prompt's occupation's hat). Unlike a CLIP score it does not reward the
    stereotype a CLIP learned with the prompt, so it judges whether a debiased image is still
    on-prompt. Higher is better. Empty-group rule: n = 0 -> NaN.
    """
    if not read:
        return math.nan
    return sum(r == wanted for r in read) / len(read)
