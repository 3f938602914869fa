"""Image/text embedders: CLIP through transformers (`CLIPModel` + `CLIPProcessor`).

Spec `clip` is the CLIP that the audited model's profile names (`ModelProfile.clip`; the miniature
world's own for the miniature model), else `openai/clip-vit-large-patch14`; `clip:<hub-id-or-folder>`
picks any CLIP checkpoint and `clip:<built-in model>` (e.g. `clip:miniature`) that model's CLIP. Weights
load as safetensors only. A profile's CLIP with a closed vocabulary knows only those words
(`ClipEmbedder.unknown_words`).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from evalsuite.errors import SuiteError
from evalsuite.models import builtin_model

from .base import ClassifierContext, check_images, register_embedder

DEFAULT_CLIP = "openai/clip-vit-large-patch14"
BATCH = 256


class ClipEmbedder:
    """A CLIP model as an ImageEmbedder: L2-normalised float32 image and text embeddings."""

    def __init__(self, name: str, source: str, model_id: str, ctx: ClassifierContext,
                 vocabulary: frozenset[str] | None = None) -> None:
        self.name, self.model_id, self.vocabulary = name, model_id, vocabulary
        self.device, self.dtype = ctx.device, ctx.dtype
        self.model, self.processor = _load_clip(source, model_id, ctx.device, ctx.dtype)
        self.dim = int(self.model.config.projection_dim)
        self.max_length = int(self.processor.tokenizer.model_max_length)

    @property
    def logit_scale(self) -> float:
        """CLIP's learned temperature, exp(logit_scale) (100 for OpenAI's checkpoints)."""
        return float(self.model.logit_scale.detach().float().exp().item())

    def embed_images(self, images: np.ndarray) -> np.ndarray:
        check_images(images, f"embedder '{self.name}'")
        chunks = []
        with torch.no_grad():
            for start in range(0, len(images), BATCH):
                batch = self.processor(images=list(images[start:start + BATCH]), return_tensors="pt")
                pixels = batch["pixel_values"].to(self.device, self.dtype)
                chunks.append(_normalised(self.model.get_image_features(pixel_values=pixels)))
        return np.concatenate(chunks) if chunks else np.zeros((0, self.dim), np.float32)

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        texts = list(texts)
        chunks = []
        with torch.no_grad():
            for start in range(0, len(texts), BATCH):
                tokens = self.processor(text=texts[start:start + BATCH], padding="max_length",
                                        truncation=True, max_length=self.max_length, return_tensors="pt")
                tokens = {k: v.to(self.device) for k, v in tokens.items()}
                chunks.append(_normalised(self.model.get_text_features(**tokens)))
        return np.concatenate(chunks) if chunks else np.zeros((0, self.dim), np.float32)

    def token_count(self, text: str) -> int:
        """Tokens of `text` including the start and end tokens (more than `max_length` get truncated)."""
        return len(self.processor.tokenizer(text, verbose=False)["input_ids"])

    def unknown_words(self, text: str) -> list[str]:
        """Words of `text` outside the model's vocabulary (always [] for open-vocabulary checkpoints)."""
        if self.vocabulary is None:
            return []
        return [w for w in re.findall(r"[a-z]+", text.lower()) if w not in self.vocabulary]


def _normalised(features: Any) -> np.ndarray:
    """Projected features (a tensor, or a model output whose pooler_output holds them) as unit rows."""
    if not isinstance(features, torch.Tensor):  # transformers 5 returns BaseModelOutputWithPooling
        features = getattr(features, "pooler_output", None)
        if not isinstance(features, torch.Tensor):
            raise SuiteError("CLIP returned neither a tensor nor an output with pooler_output")
    x = torch.nn.functional.normalize(features.float(), dim=-1)
    return x.cpu().numpy().astype(np.float32)


@functools.lru_cache(maxsize=4)
def _load_clip(source: str, model_id: str, device: str, dtype: torch.dtype) -> tuple[Any, Any]:
    """CLIPModel (eval, on device) and CLIPProcessor; cached so a classifier and an embedder share them."""
    from transformers import CLIPModel, CLIPProcessor

    try:
        processor = CLIPProcessor.from_pretrained(source)
        model: Any = CLIPModel.from_pretrained(source, use_safetensors=True, dtype=dtype)
    except Exception as exc:  # any loading failure (missing, offline, not CLIP) becomes one message
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise SuiteError(f"could not load CLIP '{model_id}' (safetensors weights and a CLIPProcessor "
                         f"are needed): {first}") from exc
    return model.to(device).eval(), processor


def clip_embedder(ctx: ClassifierContext, arg: str | None, name: str) -> ClipEmbedder:
    """The CLIP a spec names (see the module docstring); `name` becomes the object's name."""
    profile = ctx.profile
    builtin = builtin_model(arg) if arg is not None and not Path(arg).expanduser().exists() else None
    if builtin is not None:  # clip:<built-in model>: that model's own CLIP
        profile, arg = builtin.profile(), None
        if profile.clip is None:
            raise SuiteError(f"{name}: the built-in model '{builtin.name}' names no CLIP of its own")
    if arg is None and profile.clip is not None:  # the audited model's own CLIP, with its vocabulary
        own = Path(profile.clip).expanduser()
        if own.is_absolute() and not (own / "config.json").is_file():
            raise SuiteError(f"{name}: the CLIP of the audited model is missing at {own}")
        return ClipEmbedder(name, str(own) if own.exists() else profile.clip, profile.clip, ctx,
                            vocabulary=profile.vocabulary)
    choice = arg or DEFAULT_CLIP
    path = Path(choice).expanduser()
    return ClipEmbedder(name, str(path) if path.exists() else choice, choice, ctx)


@register_embedder("clip")
def _clip(ctx: ClassifierContext, arg: str | None) -> ClipEmbedder:
    return clip_embedder(ctx, arg, "clip" if arg is None else f"clip:{arg}")
