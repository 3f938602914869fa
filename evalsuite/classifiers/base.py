"""Attribute classifiers and image embedders: protocols, result types, the record helper and registries.
A classifier gives per-attribute class probabilities (battery class order) and a status per image; an
embedder maps images and texts into one space. Both are found by a spec string (see `get_classifier`)."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar, cast, runtime_checkable

import numpy as np
import torch

from evalsuite.battery import AttributeSpec
from evalsuite.errors import SuiteError, did_you_mean
from evalsuite.models import ModelProfile
from evalsuite.results.schema import STATUSES, classifier_entry


@dataclass(frozen=True)
class AttributeOutput:
    """One attribute's result for n images: probs (n, K) in the battery's class order, NaN rows where
    the status is not "ok"; status per image: "ok" | "no_person" | "not_measurable"."""

    probs: np.ndarray
    status: tuple[str, ...]

    def __post_init__(self) -> None:
        if self.probs.ndim != 2 or self.probs.shape[0] != len(self.status) or set(self.status) - {*STATUSES}:
            raise ValueError(f"AttributeOutput: probs of shape {self.probs.shape} with statuses "
                             f"{sorted(set(self.status))} (one per row, each one of {', '.join(STATUSES)})")


def make_output(probs: np.ndarray, status: Sequence[str]) -> AttributeOutput:
    """An AttributeOutput in float64 whose rows are NaN wherever the status is not "ok"."""
    out = np.array(probs, dtype=np.float64, copy=True)
    out[np.asarray([s != "ok" for s in status], dtype=bool)] = np.nan
    return AttributeOutput(out, tuple(status))


def not_measurable(n: int, k: int) -> AttributeOutput:
    """n images, K classes, all "not_measurable"."""
    return AttributeOutput(np.full((n, k), np.nan), ("not_measurable",) * n)


@runtime_checkable
class AttributeClassifier(Protocol):
    """`check(attributes)`: problems that make it unusable for them ([] = fine; an attribute it does not
    measure is no problem, it comes out "not_measurable"). `classify(images, attributes)`: uint8 images
    (n, H, W, 3) -> one AttributeOutput per attribute, keyed by attribute name.

    Optional attributes: `detects_people: bool`, whether it looks for a person and reports "no_person"
    where it finds none (see `detects_people()`); `confusion: dict[str, ndarray]`, known confusion
    matrices per attribute (`evalsuite.metrics.confusion_problems` says what a valid one is)."""

    name: str

    def check(self, attributes: Sequence[AttributeSpec]) -> list[str]: ...

    def classify(self, images: np.ndarray, attributes: Sequence[AttributeSpec]) -> dict[str, AttributeOutput]:
        ...


@runtime_checkable
class ImageEmbedder(Protocol):
    """uint8 images (n, H, W, 3) -> (n, d) and texts -> (m, d), float32 L2-normalised rows, one space."""

    name: str

    def embed_images(self, images: np.ndarray) -> np.ndarray: ...

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray: ...


@dataclass(frozen=True)
class ClassifierContext:
    """What a classifier or embedder factory is told about the run: where to run, in which dtype, and the
    profile of the model under audit (`evalsuite.models.ModelProfile`: its image domain, the CLIP that
    reads its images, its vocabulary)."""

    device: str = "cpu"
    dtype: torch.dtype = torch.float32
    profile: ModelProfile = ModelProfile()


def check_images(images: np.ndarray, who: str) -> None:
    """SuiteError unless `images` is a uint8 array of shape (n, H, W, 3)."""
    shape: tuple[int, ...] = getattr(images, "shape", ())
    if getattr(images, "dtype", None) != np.uint8 or len(shape) != 4 or shape[3] != 3:
        raise SuiteError(f"{who}: expected uint8 images of shape (n, H, W, 3), got {type(images).__name__} "
                         f"{getattr(images, 'dtype', '')} of shape {shape or None}")


def validate_outputs(outputs: dict[str, AttributeOutput], attributes: Sequence[AttributeSpec], n: int,
                     who: str) -> None:
    """SuiteError naming classifier `who` where its outputs for n images break the protocol (plug-ins)."""
    for spec in attributes:
        out = outputs.get(spec.name)
        if not isinstance(out, AttributeOutput):
            raise SuiteError(f"classifier '{who}' returned no AttributeOutput for attribute '{spec.name}'")
        if out.probs.shape != (n, len(spec.classes)):
            raise SuiteError(f"classifier '{who}': probs for '{spec.name}' have shape {out.probs.shape}, "
                             f"expected {(n, len(spec.classes))}")
        ok = out.probs[np.asarray([s == "ok" for s in out.status], dtype=bool)]
        if not (np.all(np.isfinite(ok)) and np.all(ok >= 0) and np.allclose(ok.sum(1), 1.0, atol=1e-4)):
            raise SuiteError(f"classifier '{who}': probs for '{spec.name}' are not probability "
                             f"distributions on every row whose status is 'ok'")


def to_record(outputs: dict[str, AttributeOutput], attributes: Sequence[AttributeSpec],
              i: int) -> dict[str, Any]:
    """Image i's per-attribute results as a record holds them: attribute -> the entry of
    `evalsuite.results.schema.classifier_entry` ({probs, label, status, confident})."""
    return {spec.name: classifier_entry(outputs[spec.name].probs[i], outputs[spec.name].status[i], spec.classes)
            for spec in attributes}


def detects_people(classifier: object) -> bool | None:
    """The classifier's `detects_people` flag: True if it reports "no_person" where it finds no person,
    False if it has no person detector (it marks every image it can read "ok"), None if it does not say."""
    flag = getattr(classifier, "detects_people", None)
    return flag if isinstance(flag, bool) else None


T = TypeVar("T")
Factory = Callable[[ClassifierContext, str | None], Any]
_BUILTIN_MODULES = tuple(f"evalsuite.classifiers.{m}" for m in ("miniature", "clip_zero_shot", "embedders",
                                                                  "faces", "skin_tone", "photo", "linear_head"))


class _Registry(Generic[T]):
    """Named factories `(ctx, arg) -> object`, plus plug-ins named `module:factory` or `file.py:factory`.

    Each name declares the image domains it is valid on (`evalsuite.models.ModelProfile.domain`:
    "natural" for photographs and art of the world, a built-in model's own domain such as "miniature");
    None means any domain. Plug-ins (`module:factory`) declare none: they are trusted on every domain."""

    def __init__(self, kind: str, protocol: type) -> None:
        self.kind, self.protocol = kind, protocol
        self.factories: dict[str, Factory] = {}
        self.domains: dict[str, tuple[str, ...] | None] = {}

    def register(self, name: str, domains: Sequence[str] | None = None) -> Callable[[Factory], Factory]:
        def decorate(factory: Factory) -> Factory:
            self.factories[name] = factory
            self.domains[name] = None if domains is None else tuple(domains)
            return factory
        return decorate

    def domain_problems(self, spec: str, domain: str, model: str) -> list[str]:
        """Why `spec` must not read the images of `model`, whose domain is `domain` ([] = it may).
        Found from the registry alone, before anything loads; unknown specs are `problems`' to report."""
        _load_builtins()
        head = spec.partition(":")[0]
        valid = self.domains.get(head) if head in self.factories else None
        if valid is None or domain in valid:
            return []
        instead = [n for n in sorted(self.factories) if domain in (self.domains[n] or (domain,))]
        return [f"{self.kind} '{spec}' reads {' and '.join(valid)} images only; the model '{model}' makes "
                f"{domain} images. Use instead: {', '.join(instead) or 'a plug-in made for them'}"]

    def names(self) -> list[str]:
        _load_builtins()
        return sorted(self.factories)

    def problems(self, spec: str) -> list[str]:
        """What makes `spec` unusable, found without loading or importing anything."""
        _load_builtins()
        head, sep, _ = spec.partition(":")
        if head in self.factories:
            return []
        if not sep:
            return [f"unknown {self.kind} '{spec}'{did_you_mean(spec, self.factories)} "
                    f"(or a plug-in 'package.module:factory' / 'path/to/file.py:factory')"]
        target = spec.rpartition(":")[0]
        if _is_file(target):
            found = Path(target).expanduser().is_file()
            return [] if found else [f"{self.kind} plug-in file '{target}' not found"]
        try:
            found = importlib.util.find_spec(target) is not None
        except (ImportError, ValueError):
            found = False
        hint = "" if "." in target else f"; no {self.kind} of that name{did_you_mean(target, self.factories)}"
        return [] if found else [f"{self.kind} plug-in module '{target}' not found{hint}"]

    def get(self, spec: str, ctx: ClassifierContext) -> T:
        for problem in self.problems(spec):
            raise SuiteError(problem)
        head, sep, arg = spec.partition(":")
        if head in self.factories:
            return cast(T, self.factories[head](ctx, arg if sep else None))
        target, _, attr = spec.rpartition(":")
        factory = getattr(_import_plugin(target, spec, self.kind), attr, None)
        if factory is None or not callable(factory):
            what = "not found" if factory is None else "not callable"
            raise SuiteError(f"{self.kind} plug-in '{spec}': factory '{attr}' {what} in '{target}'")
        try:
            obj = factory(ctx)
        except SuiteError:
            raise
        except Exception as exc:  # a plug-in's own failure (missing weights, ...): one message, no traceback
            why = _first_line(exc)
            raise SuiteError(f"{self.kind} plug-in '{spec}': factory '{attr}' failed: {why}") from None
        if not isinstance(obj, self.protocol):
            raise SuiteError(f"{self.kind} plug-in '{spec}': '{attr}' returned {type(obj).__name__}, which "
                             f"lacks part of the {self.protocol.__name__} protocol (name and its methods)")
        return cast(T, obj)


def _import_plugin(target: str, spec: str, kind: str) -> Any:
    """Import an existing plug-in .py file or module; any error while importing it becomes a SuiteError
    naming `spec` (docs/classifiers.md)."""
    try:
        if not _is_file(target):
            return importlib.import_module(target)
        path = Path(target).expanduser().resolve()
        name = f"evalsuite_plugin_{path.stem}_{hashlib.sha1(str(path).encode()).hexdigest()[:10]}"
        if name not in sys.modules:
            loader_spec = importlib.util.spec_from_file_location(name, path)
            if loader_spec is None or loader_spec.loader is None:
                raise SuiteError(f"{kind} plug-in file '{target}' cannot be imported as Python")
            module = importlib.util.module_from_spec(loader_spec)
            loader_spec.loader.exec_module(module)
            sys.modules[name] = module
        return sys.modules[name]
    except SuiteError:
        raise
    except Exception as exc:  # its own failed imports, syntax and name errors, whatever its top level raises
        raise SuiteError(f"{kind} plug-in '{spec}' failed to import: {_first_line(exc)}") from None


def _first_line(exc: Exception) -> str:
    """The error's type and the first line of its message, e.g. "NameError: name 'x' is not defined"."""
    lines = str(exc).strip().splitlines()
    return type(exc).__name__ + (f": {lines[0]}" if lines else "")


def _is_file(target: str) -> bool:
    return target.endswith(".py") or "/" in target or "\\" in target


def _load_builtins() -> None:
    for module in _BUILTIN_MODULES:
        importlib.import_module(module)


@runtime_checkable
class FaceDetector(Protocol):
    """uint8 images (n, H, W, 3) -> per image a float array (k, 5) of face boxes `x0, y0, x1, y1, score`
    in pixels (x0, y0 inclusive, x1, y1 exclusive), largest first; (0, 5) where it finds no face. The
    runner runs the battery's detector before the classifiers: an image with no face is "no_person" for
    every classifier and is left out of the shares."""

    name: str

    def detect(self, images: np.ndarray) -> list[np.ndarray]: ...


def uses_faces(classifier: object) -> bool:
    """Whether the classifier reads the detector's face boxes: one with `uses_faces = True` is called as
    `classify(images, attributes, faces=...)`, `faces` being the detector's per-image (k, 5) box arrays."""
    return getattr(classifier, "uses_faces", False) is True


def classify_faces(classifier: AttributeClassifier, images: np.ndarray, attributes: Sequence[AttributeSpec],
                   faces: Sequence[np.ndarray] | None) -> dict[str, AttributeOutput]:
    """`classifier`'s outputs after a face detector's `faces` (None: no detector ran): a classifier that
    reads faces gets them, and an image with no face is "no_person" for every attribute, whatever the
    classifier said (so it is left out of the shares and counted in the no-person rate)."""
    if faces is None:
        return classifier.classify(images, attributes)
    if uses_faces(classifier):
        outputs = cast(Any, classifier).classify(images, attributes, faces=faces)
    else:
        outputs = classifier.classify(images, attributes)
    faceless = [len(boxes) == 0 for boxes in faces]
    return {name: make_output(out.probs, ["no_person" if none else s for s, none in zip(out.status, faceless)])
            for name, out in outputs.items()}


def required_faces(who: str, images: np.ndarray, faces: Sequence[np.ndarray] | None) -> Sequence[np.ndarray]:
    """`faces` for a classifier that cannot work without the detector's boxes (`needs_faces`): SuiteError
    naming classifier `who` where there are none, or not one box list per image."""
    if faces is None or len(faces) != len(images):
        raise SuiteError(f"classifier '{who}' reads detected faces: name a face detector for the model's domain "
                         "in the battery (`domains: {natural: {detector: ...}}`)")
    return faces


def face_crops(images: np.ndarray, faces: Sequence[np.ndarray], size: int, margin: float = 0.25) -> np.ndarray:
    """Per image, its largest face box grown by `margin` of the box side on every side (clipped to the
    image), resized to size × size (bilinear); an image with no box is resized whole. uint8 (n, size,
    size, 3)."""
    from PIL import Image

    out = np.empty((len(images), size, size, 3), dtype=np.uint8)
    for i, (img, boxes) in enumerate(zip(images, faces, strict=True)):
        h, w = img.shape[:2]
        if len(boxes):
            x0, y0, x1, y1 = (float(v) for v in boxes[0][:4])
            grow_x, grow_y = margin * (x1 - x0), margin * (y1 - y0)
            left, top = max(0, int(x0 - grow_x)), max(0, int(y0 - grow_y))
            right, bottom = min(w, int(np.ceil(x1 + grow_x))), min(h, int(np.ceil(y1 + grow_y)))
            img = img[top:bottom, left:right]
        out[i] = np.asarray(Image.fromarray(img).resize((size, size), Image.Resampling.BILINEAR))
    return out


_CLASSIFIERS: _Registry[AttributeClassifier] = _Registry("classifier", AttributeClassifier)
_EMBEDDERS: _Registry[ImageEmbedder] = _Registry("embedder", ImageEmbedder)
_DETECTORS: _Registry[FaceDetector] = _Registry("detector", FaceDetector)
_REGISTRIES: dict[str, _Registry[Any]] = {"classifier": _CLASSIFIERS, "embedder": _EMBEDDERS, "detector": _DETECTORS}


PLUGINS_ENV = "EVALSUITE_ALLOW_PLUGINS"  # set to 1 (or pass --allow-plugins) to let files name code plug-ins


def is_plugin(spec: str) -> bool:
    """Whether `spec` names code to import (`package.module:factory` or `path/to/file.py:factory`) rather
    than a registered name (`name` or `name:arg`, e.g. `clip:openai/...` or `head:/folder`)."""
    _load_builtins()
    head, sep, _ = spec.partition(":")
    return bool(sep) and all(head not in r.factories for r in _REGISTRIES.values())


def plugins_allowed() -> bool:
    """Whether files (batteries, RL configs) may name code plug-ins: only where the user opted in, with
    `EVALSUITE_ALLOW_PLUGINS=1` in the environment or `--allow-plugins` on the command line (which sets it)."""
    return os.environ.get(PLUGINS_ENV, "") == "1"


def plugin_problems(spec: str, where: str) -> list[str]:
    """Why a file may not name `spec` (at `where`: its path and key) unless the user opted in: a shared
    battery or config must not run code by itself. [] for registered names, or when plug-ins are allowed."""
    if not is_plugin(spec) or plugins_allowed():
        return []
    return [f"{where}: '{spec}' is a code plug-in, which a file cannot load by itself (it would run that code): "
            f"pass it on the command line instead (--classifier / --embedder), or trust this file's plug-ins "
            f"with --allow-plugins or {PLUGINS_ENV}=1"]


def register_classifier(name: str, domains: Sequence[str] | None = None) -> Callable[[Factory], Factory]:
    """Decorator registering a factory `(ctx, arg) -> AttributeClassifier` under `name` (`name[:arg]`),
    valid on the image `domains` named (None: any)."""
    return _CLASSIFIERS.register(name, domains)


def register_embedder(name: str, domains: Sequence[str] | None = None) -> Callable[[Factory], Factory]:
    """Decorator registering a factory `(ctx, arg) -> ImageEmbedder` under `name`."""
    return _EMBEDDERS.register(name, domains)


def register_detector(name: str, domains: Sequence[str] | None = None) -> Callable[[Factory], Factory]:
    """Decorator registering a factory `(ctx, arg) -> FaceDetector` under `name`."""
    return _DETECTORS.register(name, domains)


def get_classifier(spec: str, ctx: ClassifierContext) -> AttributeClassifier:
    """A classifier from `name`, `name:arg`, `package.module:factory` or `path/to/file.py:factory` (called
    as `factory(ctx)`); a registered name wins. Unknown names and missing plug-in parts raise SuiteError."""
    return _CLASSIFIERS.get(spec, ctx)


def get_embedder(spec: str, ctx: ClassifierContext) -> ImageEmbedder:
    """An embedder from a spec, as for `get_classifier` (built in: `clip`, `clip:<hub-id-or-folder>`)."""
    return _EMBEDDERS.get(spec, ctx)


def check_classifier_spec(spec: str) -> list[str]:
    """Problems with a classifier spec found before anything loads (unknown name, missing plug-in)."""
    return _CLASSIFIERS.problems(spec)


def check_embedder_spec(spec: str) -> list[str]:
    return _EMBEDDERS.problems(spec)


def get_detector(spec: str, ctx: ClassifierContext) -> FaceDetector:
    """A face detector from a spec, as for `get_classifier`."""
    return _DETECTORS.get(spec, ctx)


def check_detector_spec(spec: str) -> list[str]:
    return _DETECTORS.problems(spec)


def domain_problems(kind: str, spec: str, domain: str, model: str) -> list[str]:
    """Why the `kind` ("classifier", "embedder", "detector") named by `spec` must not read the images of
    `model`, whose image domain is `domain` ([] = it may); from the registries alone, nothing loads."""
    return _REGISTRIES[kind].domain_problems(spec, domain, model)


def available_classifiers() -> list[str]:
    return _CLASSIFIERS.names()


def available_embedders() -> list[str]:
    return _EMBEDDERS.names()


def available_detectors() -> list[str]:
    return _DETECTORS.names()


def registered(kind: str) -> dict[str, tuple[str, ...] | None]:
    """The registered names of `kind` ("classifier", "embedder", "detector") and the image domains each
    is valid on (None: any)."""
    registry = _REGISTRIES[kind]
    return {name: registry.domains[name] for name in registry.names()}
