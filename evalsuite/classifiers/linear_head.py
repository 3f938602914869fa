"""A linear classifier head over a frozen CLIP image encoder, loaded from a local folder: `head:<folder>`.

A linear probe (Radford et al., 2021, "Learning Transferable Visual Models From Natural Language
Supervision", section 3.2) is a logistic regression on the frozen encoder's image embeddings. Trained
on face crops labelled with FairFace's perceived race (7 groups), gender (2) and age (9 bands)
(Kärkkäinen & Joo, "FairFace: Face Attribute Dataset for Balanced Race, Gender, and Age for Bias
Measurement and Mitigation", WACV 2021), it is a light-weight FairFace-style attribute classifier.
docs/classifiers.md ("Plug in a FairFace-style head") gives the recipe for making one.

The folder holds two files, and nothing in it is executed or unpickled:

* ``head.json``::

      {"format": 1,
       "encoder": "openai/clip-vit-large-patch14",   # what follows `clip:` in a CLIP spec (embedders.py)
       "input": "face",                              # "face": the largest detected face; "image": all of it
       "attributes": {"gender": {"classes": ["man", "woman"], "weight": "gender.weight",
                                 "bias": "gender.bias"}},
       "source": "...", "licence": "..."}            # optional free text

  A relative ``encoder`` path that exists inside the head folder is read from there.
* ``head.safetensors`` (read with ``safetensors.torch.load_file``): per attribute a weight (K, d) and a
  bias (K,), K its classes in head.json's order, d the encoder's embedding size.

For an image embedding e (L2-normalised, as `ClipEmbedder.embed_images` gives it), p = softmax(W e + b).
Classes are matched to the battery's by name: an attribute the head measures must have, in the battery,
exactly the head's class set (any order; probability columns follow the battery's order), else
`check()` reports it. Attributes the head does not measure come out "not_measurable". The head has no
person detector (`detects_people = False`): with ``"input": "face"`` it reads the face boxes the runner's
detector found (`uses_faces`), and the detector decides "no_person".

Every problem with the folder (missing files, bad JSON, unknown keys, tensors missing or of the wrong
shape or dtype, non-finite values, an encoder that does not load) is one `ConfigError` listing them all,
raised when the classifier is made, before any image is read.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from evalsuite.battery import AttributeSpec
from evalsuite.errors import ConfigError, SuiteError, did_you_mean
from evalsuite.validation import Check, show

from .base import (
    AttributeOutput,
    ClassifierContext,
    check_images,
    face_crops,
    make_output,
    not_measurable,
    register_classifier,
)
from .embedders import ClipEmbedder, clip_embedder

HEAD_FORMAT = 1
HEAD_JSON = "head.json"
HEAD_TENSORS = "head.safetensors"
INPUTS = ("face", "image")
KEYS = ("format", "encoder", "input", "attributes", "source", "licence")
REQUIRED_KEYS = ("format", "encoder", "input", "attributes")
ATTRIBUTE_KEYS = ("classes", "weight", "bias")
RECIPE = "docs/classifiers.md, 'Plug in a FairFace-style head'"


@dataclass(frozen=True)
class HeadAttribute:
    """One attribute of a head: its classes (the order of W's rows) and p = softmax(W e + b)."""

    name: str
    classes: tuple[str, ...]
    weight: np.ndarray  # (K, d) float64
    bias: np.ndarray  # (K,) float64

    def probs(self, embeddings: np.ndarray) -> np.ndarray:
        """(n, K) class probabilities in the head's class order for (n, d) embeddings (float64)."""
        logits = embeddings.astype(np.float64) @ self.weight.T + self.bias
        logits -= logits.max(axis=1, keepdims=True) if len(logits) else 0.0
        p = np.exp(logits)
        return p / p.sum(axis=1, keepdims=True)


class LinearHead:
    """An AttributeClassifier: a linear head per attribute over a frozen CLIP image encoder.

    Made by `load_head`; `source` and `licence` are head.json's free-text provenance (None if absent)."""

    detects_people = False  # no person detector of its own: the runner's face detector decides no_person

    def __init__(self, name: str, clip: ClipEmbedder, input_kind: str, heads: Mapping[str, HeadAttribute],
                 source: str | None = None, licence: str | None = None) -> None:
        self.name, self.clip, self.input = name, clip, input_kind
        self.heads = dict(heads)
        self.source, self.licence = source, licence
        # a face head reads the detector's boxes (base.uses_faces); an image head reads whole images
        self.uses_faces = input_kind == "face"
        self.crop_size = int(clip.model.config.vision_config.image_size)
        self.methods: dict[str, str] = {}  # attribute -> how it is read, for run.json (set by check())

    def check(self, attributes: Sequence[AttributeSpec]) -> list[str]:
        problems = []
        read = "the largest detected face (box grown by a quarter of its side)" if self.uses_faces else "the image"
        method = f"linear head over CLIP ({self.clip.model_id}) image embeddings of {read}" + \
            (f"; source: {self.source}" if self.source else "") + (f"; licence: {self.licence}" if self.licence else "")
        self.methods = {spec.name: method for spec in attributes if spec.name in self.heads}
        for spec in attributes:
            head = self.heads.get(spec.name)
            if head is not None and set(spec.classes) != set(head.classes):
                problems.append(f"classifier '{self.name}' measures {spec.name} with the classes "
                                f"{', '.join(head.classes)} (any order); the battery's {spec.name} classes are "
                                f"{', '.join(spec.classes)}: rename them or use another classifier")
        return problems

    def classify(self, images: np.ndarray, attributes: Sequence[AttributeSpec],
                 faces: Sequence[np.ndarray] | None = None) -> dict[str, AttributeOutput]:
        """Per attribute the head measures, p = softmax(W e + b) with e the L2-normalised CLIP embedding of
        each image's largest face in `faces` (input "face"; boxes (k, 5) per image, `base.face_crops`) or
        of the whole image (input "image", or `faces` None); status "ok" for every image."""
        check_images(images, f"classifier '{self.name}'")
        problems = self.check(attributes)
        if problems:
            raise SuiteError("; ".join(problems))
        n = len(images)
        if faces is not None and len(faces) != n:
            raise SuiteError(f"classifier '{self.name}': {len(faces)} face box lists for {n} images")
        measured = [spec for spec in attributes if spec.name in self.heads]
        embeddings = np.zeros((0, self.clip.dim))
        if measured and n:
            pixels = images
            if self.uses_faces and faces is not None:
                pixels = face_crops(images, faces, self.crop_size)
            embeddings = self.clip.embed_images(pixels)
        out: dict[str, AttributeOutput] = {}
        for spec in attributes:
            head = self.heads.get(spec.name)
            if head is None:
                out[spec.name] = not_measurable(n, len(spec.classes))
                continue
            columns = [head.classes.index(c) for c in spec.classes]
            out[spec.name] = make_output(head.probs(embeddings)[:, columns], ("ok",) * n)
        return out


def load_head(folder: str | Path, ctx: ClassifierContext, name: str | None = None) -> LinearHead:
    """The head in `folder` (module docstring), its encoder loaded through `clip_embedder`; every problem
    with the folder is one ConfigError naming the file, the key, the value and what is allowed."""
    path = Path(folder).expanduser()
    name = name or f"head:{folder}"
    where = f"classifier '{name}': head folder {path}"
    if not path.is_dir():
        what = "is a file" if path.exists() else "does not exist"
        raise ConfigError(where, [f"the folder {what}; a head folder holds {HEAD_JSON} and {HEAD_TENSORS} "
                                  f"({RECIPE})"])
    problems: list[str] = []
    config = _read_config(path / HEAD_JSON, problems)
    tensors = _read_tensors(path / HEAD_TENSORS, problems)
    clip: ClipEmbedder | None = None
    if config.get("encoder") is not None:
        try:
            clip = clip_embedder(ctx, _encoder_source(path, config["encoder"]), f"{name} encoder")
        except SuiteError as exc:
            problems.append(f"{HEAD_JSON}: encoder: {show(config['encoder'])} does not load as a CLIP "
                            f"(a hub id or a local CLIP folder with safetensors weights): {_first_line(exc)}")
    dim = clip.dim if clip is not None else None
    heads: dict[str, HeadAttribute] = {}
    for attribute, entry in (config.get("attributes") or {}).items():
        head = _attribute_tensors(attribute, entry, tensors, dim, config.get("encoder"), problems)
        if head is not None:
            heads[attribute] = head
    if problems or clip is None:
        raise ConfigError(where, problems or [f"{HEAD_JSON}: encoder: no CLIP loaded"])
    return LinearHead(name, clip, config["input"], heads, config.get("source"), config.get("licence"))


def _read_config(file: Path, problems: list[str]) -> dict[str, Any]:
    """head.json's checked values (a key whose value is wrong is left out); its problems go to `problems`,
    each starting "head.json: <key>: "."""
    if not file.is_file():
        problems.append(f"{HEAD_JSON}: the file is missing; it names the encoder, the input (face or image) "
                        f"and per attribute its classes and tensors ({RECIPE})")
        return {}
    try:
        raw = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        problems.append(f"{HEAD_JSON}: cannot be read: {exc}")
        return {}
    except json.JSONDecodeError as exc:
        problems.append(f"{HEAD_JSON}: not valid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}")
        return {}
    c = Check()
    data = c.mapping("", raw, KEYS, REQUIRED_KEYS) if isinstance(raw, dict) else None
    if data is None:
        problems.append(f"{HEAD_JSON}: must be a JSON object with the keys {', '.join(KEYS)}, got {show(raw)}")
        return {}
    out: dict[str, Any] = {}
    if "format" in data:
        fmt = data["format"]
        if type(fmt) is int and fmt == HEAD_FORMAT:
            out["format"] = fmt
        else:
            c.wrong("format", f"the int {HEAD_FORMAT}", fmt)
    if "encoder" in data:
        out["encoder"] = c.text("encoder", data["encoder"], "a non-empty str: a CLIP hub id or a local CLIP folder")
    if "input" in data:
        out["input"] = c.choice("input", data["input"], INPUTS)
    for key in ("source", "licence"):
        if key in data:
            out[key] = c.text(key, data[key], "a non-empty str (free text)")
    if "attributes" in data:
        attributes = c.mapping("attributes", data["attributes"])
        if attributes is not None and not attributes:
            c.add("attributes", "must name at least one attribute, got an empty object")
        checked = {}
        for attribute, entry in (attributes or {}).items():
            key = f"attributes.{attribute}"
            if not attribute.strip():
                c.add(key, "an attribute name must be a non-empty str")
            fields = c.mapping(key, entry, ATTRIBUTE_KEYS, ATTRIBUTE_KEYS)
            if fields is None:
                continue
            classes = c.str_list(f"{key}.classes", fields["classes"]) if "classes" in fields else None
            if classes is not None and len(classes) < 2:
                c.wrong(f"{key}.classes", "a list of at least 2 classes", list(classes))
                classes = None
            checked[attribute] = {
                "classes": classes,
                "weight": c.text(f"{key}.weight", fields.get("weight"), "the name of a tensor in head.safetensors")
                if "weight" in fields else None,
                "bias": c.text(f"{key}.bias", fields.get("bias"), "the name of a tensor in head.safetensors")
                if "bias" in fields else None,
            }
        out["attributes"] = checked
    problems.extend(f"{HEAD_JSON}: {p}" for p in c.problems)
    return {k: v for k, v in out.items() if v is not None}


def _read_tensors(file: Path, problems: list[str]) -> dict[str, Any] | None:
    """head.safetensors as name -> CPU tensor (`safetensors.torch.load_file`: no pickle), or None."""
    if not file.is_file():
        problems.append(f"{HEAD_TENSORS}: the file is missing; it holds per attribute a weight (K, d) and a "
                        f"bias (K,) tensor, named in {HEAD_JSON} ({RECIPE})")
        return None
    from safetensors.torch import load_file

    try:
        return dict(load_file(str(file), device="cpu"))
    except Exception as exc:  # a truncated or foreign file: one problem, not a traceback
        problems.append(f"{HEAD_TENSORS}: cannot be read as a safetensors file: {_first_line(exc)}")
        return None


def _attribute_tensors(attribute: str, entry: dict[str, Any], tensors: dict[str, Any] | None, dim: int | None,
                       encoder: str | None, problems: list[str]) -> HeadAttribute | None:
    """The attribute's weight and bias as float64 arrays, each checked against its classes and the
    encoder's embedding size; None (after adding problems) where anything is wrong or unknown."""
    if tensors is None:
        return None
    classes: tuple[str, ...] | None = entry["classes"]
    k = len(classes) if classes is not None else None
    found: dict[str, np.ndarray] = {}
    for role in ("weight", "bias"):
        tensor_name = entry[role]
        if tensor_name is None:
            continue
        where = f"{HEAD_TENSORS}: tensor {tensor_name!r} (attributes.{attribute}.{role} in {HEAD_JSON})"
        if tensor_name not in tensors:
            hint = did_you_mean(tensor_name, tensors) if tensors else "; the file holds no tensors"
            problems.append(f"{where}: not in the file{hint}")
            continue
        tensor = tensors[tensor_name]
        if not tensor.is_floating_point():
            dtype = str(tensor.dtype).removeprefix("torch.")
            problems.append(f"{where}: dtype {dtype}; must be a floating-point dtype")
            continue
        shape = tuple(tensor.shape)
        expected: tuple[int | None, ...] = (k, dim) if role == "weight" else (k,)
        if len(shape) != len(expected) or any(e is not None and s != e for s, e in zip(shape, expected)):
            wanted = ", ".join(str(e) if e is not None else n for e, n in zip(expected, "Kd")) + \
                ("" if role == "weight" else ",")
            per_class = f"one {'row' if role == 'weight' else 'entry'} per class of attributes.{attribute}.classes"
            size = f" by the embedding size d of the encoder {encoder!r}" if role == "weight" else ""
            problems.append(f"{where}: shape {shape}; must be ({wanted}): {per_class}{size}")
            continue
        values = tensor.double().numpy()
        bad = int(np.size(values) - np.count_nonzero(np.isfinite(values)))
        if bad:
            problems.append(f"{where}: {bad} non-finite value{'s' if bad != 1 else ''} (NaN or inf); "
                            f"every value must be finite")
            continue
        found[role] = values
    if classes is None or dim is None or len(found) != 2:
        return None
    return HeadAttribute(attribute, classes, found["weight"], found["bias"])


def _encoder_source(folder: Path, encoder: str) -> str:
    """A relative encoder path that exists inside the head folder, from there; anything else as written
    (a hub id, an absolute or working-directory path, a built-in model's name)."""
    local = Path(encoder).expanduser()
    if not local.is_absolute() and (folder / local).exists():
        return str(folder / local)
    return encoder


def _first_line(exc: Exception) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


@register_classifier("head", domains=("natural",))
def _head(ctx: ClassifierContext, arg: str | None) -> LinearHead:
    if not arg:
        raise SuiteError(f"classifier 'head' needs a folder: head:/path/to/folder ({RECIPE})")
    return load_head(arg, ctx, f"head:{arg}")
