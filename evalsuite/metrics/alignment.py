"""Text-image alignment metrics over precomputed embeddings."""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike, NDArray

from evalsuite.metrics.diversity import l2_normalize
from evalsuite.metrics.registry import register_metric


@register_metric("clip_score", higher_is_better=True, kind="alignment")
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
