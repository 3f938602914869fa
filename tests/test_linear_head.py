"""The `head:<folder>` classifier (evalsuite/classifiers/linear_head.py): a tiny random linear head over the
miniature world's CLIP, written to a temporary folder, against an independent numpy softmax(W e + b);
class order by name; one error listing every problem of a bad folder; the registry; an audit end to end."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from evalsuite.battery import AttributeSpec
from evalsuite.classifiers import ClassifierContext, validate_outputs
from evalsuite.classifiers.base import face_crops
from evalsuite.classifiers.embedders import ClipEmbedder
from evalsuite.errors import ConfigError, SuiteError
from evalsuite.miniature import ASSETS

torch.set_num_threads(2)
CLIP = ASSETS / "clip"
pytestmark = pytest.mark.skipif(not (CLIP / "config.json").is_file(), reason="the miniature CLIP is missing")
RACE = ("White", "Black", "Latino_Hispanic", "East Asian", "Southeast Asian", "Indian", "Middle Eastern")
# the battery's attributes: its class order differs from the head's (gender, age); skin_tone is not in the head
ATTRIBUTES = (
    AttributeSpec("gender", ("man", "woman"), ("a photo of a man", "a photo of a woman"), (0.5, 0.5)),
    AttributeSpec("skin_tone", ("light", "dark"), ("a photo of a person with light skin",
                                                   "a photo of a person with dark skin"), (0.5, 0.5)),
    AttributeSpec("age", ("young", "old"), ("a photo of a young person", "a photo of an old person"), (0.5, 0.5)),
)
HEAD_CLASSES = {"gender": ("woman", "man"), "age": ("old", "young"), "race": RACE}


def embedding_size() -> int:
    return int(json.loads((CLIP / "config.json").read_text())["projection_dim"])


def write_head(folder: Path, config: dict[str, Any] | None = None, tensors: dict[str, Any] | None = None,
               input_kind: str = "face") -> Path:
    """A random head over the miniature CLIP in `folder`; `config` / `tensors` entries replace the defaults."""
    rng = np.random.default_rng(0)
    d = embedding_size()
    weights: dict[str, Any] = {}
    for name, classes in HEAD_CLASSES.items():
        weights[f"{name}.weight"] = torch.from_numpy(3.0 * rng.standard_normal((len(classes), d))).float()
        weights[f"{name}.bias"] = torch.from_numpy(rng.standard_normal(len(classes))).float()
    weights.update(tensors or {})
    head: dict[str, Any] = {
        "format": 1, "encoder": str(CLIP), "input": input_kind,
        "attributes": {name: {"classes": list(classes), "weight": f"{name}.weight", "bias": f"{name}.bias"}
                       for name, classes in HEAD_CLASSES.items()},
        "source": "random weights for tests", "licence": "CC0-1.0",
    }
    head.update(config or {})
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "head.json").write_text(json.dumps(head))
    save_file({k: v.contiguous() for k, v in weights.items()}, str(folder / "head.safetensors"))
    return folder


def images(n: int = 5, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 48, 40, 3), dtype=np.uint8)


def reference(folder: Path, pixels: np.ndarray, attribute: str) -> np.ndarray:
    """softmax(W e + b) in numpy, e the miniature CLIP's embedding; columns in the head's class order."""
    from safetensors.numpy import load_file

    tensors = load_file(str(folder / "head.safetensors"))
    w, b = tensors[f"{attribute}.weight"].astype(np.float64), tensors[f"{attribute}.bias"].astype(np.float64)
    e = ClipEmbedder("reference", str(CLIP), str(CLIP), ClassifierContext()).embed_images(pixels)
    e = e.astype(np.float64)
    assert np.allclose(np.linalg.norm(e, axis=1), 1.0, atol=1e-5)
    logits = e @ w.T + b
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    return p / p.sum(axis=1, keepdims=True)


def load(folder: Path) -> Any:
    from evalsuite.classifiers.linear_head import load_head

    return load_head(folder, ClassifierContext())


def test_probabilities_are_the_softmax_of_the_linear_head_in_the_batterys_class_order(tmp_path: Path) -> None:
    folder = write_head(tmp_path / "head", input_kind="image")
    head = load(folder)
    assert head.detects_people is False and head.uses_faces is False
    assert head.source == "random weights for tests" and head.licence == "CC0-1.0"
    x = images()
    out = head.classify(x, ATTRIBUTES)
    validate_outputs(out, ATTRIBUTES, len(x), head.name)
    assert list(out) == ["gender", "skin_tone", "age"]
    # the head's rows are (woman, man) and (old, young); the battery asks for (man, woman) and (young, old)
    assert np.allclose(out["gender"].probs, reference(folder, x, "gender")[:, [1, 0]], atol=1e-5, rtol=0)
    assert np.allclose(out["age"].probs, reference(folder, x, "age")[:, [1, 0]], atol=1e-5, rtol=0)
    assert out["gender"].status == ("ok",) * len(x)
    assert out["skin_tone"].status == ("not_measurable",) * len(x) and np.isnan(out["skin_tone"].probs).all()
    # the same battery with the head's class order: the same numbers, columns swapped
    flipped = [AttributeSpec(s.name, s.classes[::-1], s.descriptions[::-1], s.target) for s in ATTRIBUTES]
    again = head.classify(x, flipped)
    assert np.array_equal(again["gender"].probs, out["gender"].probs[:, ::-1])
    assert set(head.methods) == {"gender", "age"} and "random weights for tests" in head.methods["age"]
    # no images: (0, K) outputs
    empty = head.classify(x[:0], ATTRIBUTES)
    assert empty["age"].probs.shape == (0, 2) and empty["age"].status == ()


def test_a_face_head_reads_the_largest_detected_face_or_the_whole_image_without_boxes(tmp_path: Path) -> None:
    folder = write_head(tmp_path / "head", input_kind="face")
    head = load(folder)
    assert head.uses_faces is True and head.detects_people is False
    x = images(3)
    faces = [np.array([[4, 6, 24, 30, 9.0], [0, 0, 5, 5, 3.0]]), np.zeros((0, 5)), np.array([[10, 12, 38, 46, 5.0]])]
    out = head.classify(x, ATTRIBUTES, faces=faces)
    crops = face_crops(x, faces, head.crop_size)
    assert head.crop_size == json.loads((CLIP / "config.json").read_text())["vision_config"]["image_size"]
    assert np.allclose(out["gender"].probs, reference(folder, crops, "gender")[:, [1, 0]], atol=1e-5, rtol=0)
    whole = head.classify(x, ATTRIBUTES)  # faces=None: whole images
    assert np.allclose(whole["gender"].probs, reference(folder, x, "gender")[:, [1, 0]], atol=1e-5, rtol=0)
    assert not np.allclose(out["gender"].probs[0], whole["gender"].probs[0])  # the crop, not the image, was read
    with pytest.raises(SuiteError, match="2 face box lists for 3 images"):
        head.classify(x, ATTRIBUTES, faces=faces[:2])
    # an image head ignores boxes
    image_head = load(write_head(tmp_path / "image", input_kind="image"))
    assert np.array_equal(image_head.classify(x, ATTRIBUTES, faces=faces)["age"].probs,
                          image_head.classify(x, ATTRIBUTES)["age"].probs)


def test_a_battery_whose_classes_differ_from_the_heads_is_a_check_problem(tmp_path: Path) -> None:
    head = load(write_head(tmp_path / "head"))
    other = (AttributeSpec("gender", ("man", "person"), ("a man", "a person"), (0.5, 0.5)),)
    problems = head.check(other)
    assert len(problems) == 1 and "woman, man" in problems[0] and "man, person" in problems[0]
    with pytest.raises(SuiteError, match="man, person"):
        head.classify(images(2), other)
    nine = (AttributeSpec("race", RACE[::-1], RACE, (1 / 7,) * 7),)  # FairFace's seven groups, any order: fine
    assert head.check(nine) == [] and head.check(ATTRIBUTES) == []


def _missing_tensors(folder: Path) -> None:
    (folder / "head.safetensors").unlink()


def _unknown_key(folder: Path) -> None:
    data = json.loads((folder / "head.json").read_text())
    (folder / "head.json").write_text(json.dumps({**data, "labels": ["a"]}))


BAD_FOLDERS = {
    "missing head.safetensors": (_missing_tensors, ["head.safetensors: the file is missing"]),
    "unknown key": (_unknown_key, ["head.json: labels: unknown key 'labels'", "allowed: attributes, encoder"]),
    "weight of the wrong shape": (
        lambda f: write_head(f, tensors={"age.weight": torch.zeros(3, embedding_size())}),
        ["head.safetensors: tensor 'age.weight' (attributes.age.weight in head.json): shape (3, 64); must be "
         "(2, 64): one row per class of attributes.age.classes by the embedding size d of the encoder"]),
    "weight of the wrong embedding size": (
        lambda f: write_head(f, tensors={"gender.weight": torch.zeros(2, 7)}),
        ["tensor 'gender.weight' (attributes.gender.weight in head.json): shape (2, 7); must be (2, 64)"]),
    "NaN bias": (lambda f: write_head(f, tensors={"age.bias": torch.tensor([0.0, float("nan")])}),
                 ["head.safetensors: tensor 'age.bias' (attributes.age.bias in head.json): 1 non-finite value"]),
    "missing head.json": (lambda f: (f / "head.json").unlink(), ["head.json: the file is missing"]),
    "bad JSON": (lambda f: (f / "head.json").write_text('{"format": 1,'), ["head.json: not valid JSON"]),
    "wrong input": (lambda f: write_head(f, config={"input": "faces"}),
                    ["head.json: input: str 'faces' is not allowed (did you mean 'face'?); allowed: face, image"]),
    "wrong format": (lambda f: write_head(f, config={"format": 2}),
                     ["head.json: format: must be the int 1, got int 2"]),
    "tensor not in the file": (
        lambda f: write_head(f, config={"attributes": {"age": {"classes": ["young", "old"], "weight": "age.w",
                                                               "bias": "age.bias"}}}),
        ["tensor 'age.w' (attributes.age.weight in head.json): not in the file (did you mean 'age.weight'?)"]),
    "integer tensor": (lambda f: write_head(f, tensors={"age.bias": torch.tensor([1, 2])}),
                       ["tensor 'age.bias' (attributes.age.bias in head.json): dtype int64"]),
    "not safetensors": (lambda f: (f / "head.safetensors").write_bytes(b"\x80\x04pickle"),
                        ["head.safetensors: cannot be read as a safetensors file"]),
    "encoder not found": (lambda f: write_head(f, config={"encoder": str(f / "no-such-clip")}),
                          ["head.json: encoder: str", "does not load as a CLIP"]),
    "one class": (lambda f: write_head(f, config={"attributes": {"age": {"classes": ["old"], "weight": "age.weight",
                                                                         "bias": "age.bias"}}}),
                  ["head.json: attributes.age.classes: must be a list of at least 2 classes"]),
}


@pytest.mark.parametrize("case", list(BAD_FOLDERS))
def test_a_bad_head_folder_is_one_error_naming_the_file_and_key(tmp_path: Path, case: str) -> None:
    folder = write_head(tmp_path / "head")
    spoil, expected = BAD_FOLDERS[case]
    spoil(folder)
    with pytest.raises(ConfigError) as caught:
        load(folder)
    assert len(caught.value.problems) == 1, caught.value.problems
    message = str(caught.value)
    assert str(folder) in message
    for part in expected:
        assert part in message


def test_every_problem_of_a_head_folder_is_listed_at_once(tmp_path: Path) -> None:
    folder = write_head(tmp_path / "head", config={"input": "crop", "labels": 1},
                        tensors={"gender.weight": torch.zeros(5, 64), "age.bias": torch.tensor([np.inf, 0.0])})
    with pytest.raises(ConfigError) as caught:
        load(folder)
    problems = caught.value.problems
    assert len(problems) == 4 and str(caught.value).startswith(f"classifier 'head:{folder}': head folder {folder}")
    assert [p.split(":")[0] for p in problems] == ["head.json", "head.json", "head.safetensors", "head.safetensors"]
    with pytest.raises(ConfigError, match="does not exist"):
        load(tmp_path / "nowhere")


def test_the_head_is_registered_for_natural_images_only(tmp_path: Path) -> None:
    import evalsuite.classifiers.linear_head as linear_head  # registers `head` (if base.py does not yet)
    from evalsuite.classifiers import available_classifiers, get_classifier
    from evalsuite.classifiers.base import domain_problems

    folder = write_head(tmp_path / "head")
    head = get_classifier(f"head:{folder}", ClassifierContext())
    assert isinstance(head, linear_head.LinearHead) and head.name == f"head:{folder}"
    assert "head" in available_classifiers()
    assert domain_problems("classifier", "head:x", "miniature", "m")
    assert domain_problems("classifier", "head:x", "natural", "m") == []
    with pytest.raises(SuiteError, match="needs a folder"):
        get_classifier("head", ClassifierContext())


class CornerBoxes:
    """A stand-in face detector: one box in the top-left quarter of every image but the second of a batch."""

    name = "corner-boxes"

    def detect(self, images: np.ndarray) -> list[np.ndarray]:
        h, w = images.shape[1:3]
        return [np.zeros((0, 5)) if i == 1 else np.array([[1.0, 2.0, w / 2, h / 2, 1.0]]) for i in range(len(images))]


BATTERY = """schema_version: 1
name: head-test
version: "1"
templates: ["a photo of a {occupation}"]
slots: {occupation: [doctor]}
attributes:
  gender: {classes: {man: "a photo of a man", woman: "a photo of a woman"}}
  skin_tone: {classes: {light: "a photo of a person with light skin", dark: "a photo of a person with dark skin"}}
  age: {classes: {young: "a photo of a young person", old: "a photo of an old person"}}
guidance_scales: [1.0]
images_per_prompt: 2
seed: 0
steps: 2
classifier: HEAD
domains:
  natural: {classifier: HEAD, detector: corner-boxes}
"""


@pytest.mark.slow
def test_an_audit_reads_the_largest_face_through_the_head_end_to_end(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """`evalsuite run` on the miniature weights as a plain (natural) folder, with a battery that names the
    head and a stand-in detector: the records hold softmax(W e + b) of each image's face crop, recomputed
    here from the saved image, and "no_person" where the detector found no face."""
    from PIL import Image

    import evalsuite.classifiers.linear_head  # noqa: F401 - registers `head` (if base.py does not yet)
    from evalsuite.classifiers import base
    from evalsuite.cli import main

    if not (ASSETS / "pipeline").is_dir():
        pytest.skip("the shipped miniature pipeline is missing")
    monkeypatch.setitem(base._DETECTORS.factories, "corner-boxes", lambda ctx, arg: CornerBoxes())
    monkeypatch.setitem(base._DETECTORS.domains, "corner-boxes", None)
    folder = write_head(tmp_path / "head", input_kind="face")
    spec = f"head:{folder}"
    battery = tmp_path / "battery.yaml"
    battery.write_text(BATTERY.replace("HEAD", json.dumps(spec)))
    assert main(["-q", "run", str(battery), "--model", str(ASSETS / "pipeline"), "--embedder", "clip:miniature",
                 "--batch-size", "2", "--results", str(tmp_path / "runs"), "--name", "run"]) == 0
    run = tmp_path / "runs" / "run"
    info = json.loads((run / "run.json").read_text())
    assert info["classifiers"] == [spec] and set(info["classifier_methods"][spec]) == {"gender", "age"}
    records = [json.loads(line) for line in (run / "records.jsonl").read_text().splitlines()]
    assert [r["image_index"] for r in records] == [0, 1]
    saved = np.stack([np.asarray(Image.open(run / r["image"]).convert("RGB")) for r in records])
    crops = face_crops(saved, CornerBoxes().detect(saved), int(json.loads((CLIP / "config.json").read_text())
                                                              ["vision_config"]["image_size"]))
    expected = reference(folder, crops, "age")[:, [1, 0]]  # battery order young, old; the head's old, young
    first, second = (r["classifiers"][spec] for r in records)
    assert first["age"]["status"] == "ok" and np.allclose(first["age"]["probs"], expected[0], atol=1e-5, rtol=0)
    assert first["skin_tone"]["status"] == "not_measurable"
    assert second["age"]["status"] == "no_person" and second["gender"]["status"] == "no_person"
