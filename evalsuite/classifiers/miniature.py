"""Classifiers of the built-in miniature world: the exact pixel oracle and the supervised AttributeNet.

Both measure `skin_tone` (classes light, medium, tan, dark) and `age` (young, old), matched to a
battery by attribute NAME and class NAME: the battery may list the classes in any order (probability
columns follow the battery's order), but its class set must be exactly the world's, else `check()`
reports a problem and `classify()` raises SuiteError. Every other attribute (perceived gender, which the
miniature world does not render) is "not_measurable".
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from evalsuite.battery import AttributeSpec
from evalsuite.errors import SuiteError
from evalsuite.miniature import AGE_NAMES, ASSETS, TONE_NAMES

from .base import (
    AttributeOutput,
    ClassifierContext,
    check_images,
    make_output,
    not_measurable,
    register_classifier,
)

IMAGE_SIZE = 32
BATCH = 256


class _WorldClassifier:
    """Shared name matching; subclasses return world-ordered probs and statuses per measured attribute.

    `confusion` holds, for the attributes last passed to `check()`, the known confusion matrices
    (rows: true class, columns: predicted class, both in the battery's class order); `confusions()`
    computes them for any attributes.
    """

    name = "world"

    def __init__(self, heads: dict[str, tuple[str, ...]],
                 world_confusion: dict[str, np.ndarray] | None = None) -> None:
        self.heads = heads  # attribute -> the world's class names, in the order of `_measure`'s columns
        self.world_confusion = world_confusion or {}  # attribute -> matrix in the world's class order
        self.confusion: dict[str, np.ndarray] = {}

    def check(self, attributes: Sequence[AttributeSpec]) -> list[str]:
        problems = []
        for spec in attributes:
            known = self.heads.get(spec.name)
            if known is not None and set(spec.classes) != set(known):
                problems.append(f"classifier '{self.name}' measures {spec.name} with the classes "
                                f"{', '.join(known)} (any order); the battery's {spec.name} classes are "
                                f"{', '.join(spec.classes)}: rename them or use another classifier")
        self.confusion = {} if problems else self.confusions(attributes)
        return problems

    def confusions(self, attributes: Sequence[AttributeSpec]) -> dict[str, np.ndarray]:
        out = {}
        for spec in attributes:
            if spec.name in self.world_confusion and set(spec.classes) == set(self.heads[spec.name]):
                order = [self.heads[spec.name].index(c) for c in spec.classes]
                out[spec.name] = self.world_confusion[spec.name][np.ix_(order, order)]
        return out

    def classify(self, images: np.ndarray, attributes: Sequence[AttributeSpec]) -> dict[str, AttributeOutput]:
        check_images(images, f"classifier '{self.name}'")
        problems = self.check(attributes)
        if problems:
            raise SuiteError("; ".join(problems))
        wanted = [spec.name for spec in attributes if spec.name in self.heads]
        measured = self._measure(images) if wanted and len(images) else {}
        out: dict[str, AttributeOutput] = {}
        for spec in attributes:
            if spec.name not in self.heads:
                out[spec.name] = not_measurable(len(images), len(spec.classes))
                continue
            if not len(images):
                out[spec.name] = make_output(np.zeros((0, len(spec.classes))), ())
                continue
            probs, status = measured[spec.name]
            columns = [self.heads[spec.name].index(c) for c in spec.classes]
            out[spec.name] = make_output(probs[:, columns], status)
        return out

    def _measure(self, images: np.ndarray) -> dict[str, tuple[np.ndarray, list[str]]]:
        raise NotImplementedError


class OracleClassifier(_WorldClassifier):
    """The exact oracle (`evalsuite.miniature.read_attributes`): labels from the face and hair pixels;
    "no_person" where too few skin or hair pixels are found. Its probabilities say how far the face's
    median skin (hair) colour lies from the tone read toward the next nearest
    (`evalsuite.miniature.read_colour_probs`), one-hot on renders, so its confidence is legibility read
    from the truth.
    It reads 32×32 miniature images only: `classify()` raises SuiteError on any other size (it is not
    meant for other models)."""

    name = "oracle"
    detects_people = True

    def __init__(self) -> None:
        super().__init__({"skin_tone": TONE_NAMES, "age": AGE_NAMES})

    def classify(self, images: np.ndarray, attributes: Sequence[AttributeSpec]) -> dict[str, AttributeOutput]:
        check_images(images, "classifier 'oracle'")
        if images.shape[1:3] != (IMAGE_SIZE, IMAGE_SIZE):
            raise SuiteError(f"classifier 'oracle' reads only {IMAGE_SIZE}×{IMAGE_SIZE} miniature images, "
                             f"got {images.shape[1]}×{images.shape[2]}; use 'miniature' or 'clip' for others")
        return super().classify(images, attributes)

    def _measure(self, images: np.ndarray) -> dict[str, tuple[np.ndarray, list[str]]]:
        from evalsuite.miniature import read_attributes, read_colour_probs

        tone, age = read_attributes(images)
        shares = dict(zip(("skin_tone", "age"), read_colour_probs(images), strict=True))
        status = ["ok" if t >= 0 else "no_person" for t in tone]
        out = {}
        for name, labels in (("skin_tone", tone), ("age", age)):
            k = len(self.heads[name])
            person = (labels >= 0)[:, None]
            out[name] = (np.where(person, shares[name], np.eye(k)[np.clip(labels, 0, k - 1)]), status)
        return out


class SupervisedClassifier(_WorldClassifier):
    """The miniature world's trained AttributeNet (softmax probs); images of another size are resized to
    32×32 (PIL bilinear). It always reports "ok" for the attributes it measures (it has no person
    detector). Runs in float32 on the context's device."""

    name = "miniature"
    detects_people = False

    def __init__(self, ctx: ClassifierContext) -> None:
        import torch

        from evalsuite.miniature.classifier import load_classifier

        folder = ASSETS / "classifier"
        if not (folder / "model.safetensors").is_file() or not (folder / "config.json").is_file():
            raise SuiteError(f"classifier 'miniature': the miniature attribute classifier is missing at "
                             f"{folder}; rebuild it with `evalsuite miniature build`")
        heads = json.loads((folder / "config.json").read_text()).get("heads", {})
        super().__init__({"skin_tone": tuple(heads.get("skin_tone", TONE_NAMES)),
                          "age": tuple(heads.get("age", AGE_NAMES))},
                         _load_confusion(folder / "confusion.json"))
        self.device = ctx.device
        self.net = load_classifier(folder).to(device=ctx.device, dtype=torch.float32)

    def _measure(self, images: np.ndarray) -> dict[str, tuple[np.ndarray, list[str]]]:
        import torch

        images = _resize(images, IMAGE_SIZE)
        tones, ages = [], []
        with torch.no_grad():
            for start in range(0, len(images), BATCH):
                x = torch.from_numpy(images[start:start + BATCH]).to(self.device)
                x = (x.permute(0, 3, 1, 2).float() / 127.5 - 1.0).contiguous()  # NCHW: channels-last is slow on CPU
                tone_logits, age_logits = self.net(x)
                tones.append(torch.softmax(tone_logits.double(), -1).cpu().numpy())
                ages.append(torch.softmax(age_logits.double(), -1).cpu().numpy())
        status = ["ok"] * len(images)
        return {"skin_tone": (np.concatenate(tones), status), "age": (np.concatenate(ages), status)}


def _load_confusion(path: Path) -> dict[str, np.ndarray]:
    """classifier/confusion.json (rows: oracle class on generated images, world order); rows without
    samples (all zero) become NaN, which the corrected shares treat as unknown."""
    if not path.is_file():
        return {}
    data = json.loads(path.read_text())
    out = {}
    for name, matrix in data.items():
        if not name.startswith("_"):
            m = np.asarray(matrix, dtype=np.float64)
            m[m.sum(1) == 0] = np.nan
            out[name] = m
    return out


def _resize(images: np.ndarray, size: int) -> np.ndarray:
    if images.shape[1:3] == (size, size):
        return images
    from PIL import Image

    return np.stack([np.asarray(Image.fromarray(img).resize((size, size), Image.Resampling.BILINEAR))
                     for img in images])


@register_classifier("oracle", domains=("miniature",))
def _oracle(ctx: ClassifierContext, arg: str | None) -> OracleClassifier:
    _no_arg("oracle", arg)
    return OracleClassifier()


@register_classifier("miniature", domains=("miniature",))
def _supervised(ctx: ClassifierContext, arg: str | None) -> SupervisedClassifier:
    _no_arg("miniature", arg)
    return SupervisedClassifier(ctx)


def _no_arg(name: str, arg: str | None) -> None:
    if arg is not None:
        raise SuiteError(f"classifier '{name}' takes no argument, got '{name}:{arg}'")
