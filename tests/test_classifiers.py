"""Attribute classifiers and embedders on real miniature renders (the oracle needs no assets; the
supervised net and CLIP use the shipped miniature world at ASSETS and skip, saying why, without it)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from evalsuite.battery import Battery, battery_from_dict, load_battery
from evalsuite.classifiers import (
    CONFIDENCE_THRESHOLD,
    AttributeOutput,
    ClassifierContext,
    available_classifiers,
    available_embedders,
    check_classifier_spec,
    check_embedder_spec,
    detects_people,
    get_classifier,
    get_embedder,
    make_output,
    to_record,
    validate_outputs,
)
from evalsuite.errors import SuiteError
from evalsuite.miniature import AGE_NAMES, ASSETS, OCCUPATIONS, TONE_NAMES, render_batch, sample_portraits
from evalsuite.models import builtin_model

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]
CTX = ClassifierContext(profile=builtin_model("miniature").profile())  # the miniature model's CLIP


@pytest.fixture(scope="module")
def battery() -> Battery:
    return load_battery(ROOT / "prompts" / "occupations.yaml")


@pytest.fixture(scope="module")
def reordered(battery: Battery) -> Battery:
    """The default battery with skin_tone's classes listed in another order than the world's."""
    data = battery.to_dict()
    tones = data["attributes"]["skin_tone"]
    order = ["dark", "light", "tan", "medium"]
    data["attributes"]["skin_tone"] = {"classes": {c: tones["classes"][c] for c in order},
                                       "target": {c: tones["target"][c] for c in order}}
    return battery_from_dict(data, "reordered")


@pytest.fixture(scope="module")
def renders() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Fresh renders (a seed the build never used): every occupation × tone × age, true labels by name."""
    rng = np.random.default_rng(20261127)
    portraits = [p for tone in TONE_NAMES for age in AGE_NAMES
                 for p in sample_portraits(list(OCCUPATIONS), rng, tone=tone, age=age)]
    tones, ages = np.array([p.tone for p in portraits]), np.array([p.age for p in portraits])
    return render_batch(portraits), tones, ages


def need(part: str) -> Path:
    path = ASSETS / part
    if not path.exists():
        pytest.skip(f"the miniature world's {part} is missing at {path} (`evalsuite miniature build`)")
    return path


def labels(out: AttributeOutput, classes: tuple[str, ...]) -> np.ndarray:
    return np.array(classes)[np.argmax(out.probs, axis=1)]


def test_oracle_is_exact_and_follows_the_battery_class_order(reordered, renders):
    images, tone, age = renders
    oracle = get_classifier("oracle", CTX)
    assert oracle.check(reordered.attributes) == []
    out = oracle.classify(images, reordered.attributes)
    assert set(out) == {"gender", "skin_tone", "age"}
    classes = reordered.attribute("skin_tone").classes
    assert classes == ("dark", "light", "tan", "medium")
    skin = out["skin_tone"]
    assert skin.probs.dtype == np.float64 and skin.probs.shape == (len(images), 4)
    assert set(skin.status) == {"ok"}
    np.testing.assert_array_equal(skin.probs, np.eye(4)[[classes.index(t) for t in tone]])
    assert (labels(out["age"], reordered.attribute("age").classes) == age).all()
    gender = out["gender"]
    assert set(gender.status) == {"not_measurable"} and np.isnan(gender.probs).all()


def test_oracle_blank_images_have_no_person(battery):
    blank = np.zeros((3, 32, 32, 3), np.uint8)
    blank[1] = 255
    blank[2] = (120, 160, 220)  # a background colour of the world
    out = get_classifier("oracle", CTX).classify(blank, battery.attributes)
    for name in ("skin_tone", "age"):
        assert out[name].status == ("no_person",) * 3 and np.isnan(out[name].probs).all()
    assert out["gender"].status == ("not_measurable",) * 3


def test_oracle_problems_and_refusals(battery, renders):
    oracle = get_classifier("oracle", CTX)
    data = battery.to_dict()
    data["attributes"]["skin_tone"] = {"classes": {"pale": "a pale person", "dark": "a dark person"}}
    renamed = battery_from_dict(data, "renamed").attributes
    problems = oracle.check(renamed)
    assert len(problems) == 1 and "light, medium, tan, dark" in problems[0] and "pale, dark" in problems[0]
    with pytest.raises(SuiteError, match="pale"):
        oracle.classify(renders[0][:2], renamed)
    with pytest.raises(SuiteError, match="32×32"):
        oracle.classify(np.zeros((1, 64, 64, 3), np.uint8), battery.attributes)
    with pytest.raises(SuiteError, match="uint8"):
        oracle.classify(np.zeros((1, 32, 32, 3), np.float32), battery.attributes)
    empty = oracle.classify(np.zeros((0, 32, 32, 3), np.uint8), battery.attributes)
    assert all(empty[s.name].probs.shape == (0, len(s.classes)) for s in battery.attributes)


def test_supervised_classifier_on_fresh_renders(reordered, renders):
    need("classifier")
    images, tone, age = renders
    net = get_classifier("miniature", CTX)
    assert net.check(reordered.attributes) == []
    out = net.classify(images, reordered.attributes)
    tone_acc = float((labels(out["skin_tone"], reordered.attribute("skin_tone").classes) == tone).mean())
    age_acc = float((labels(out["age"], reordered.attribute("age").classes) == age).mean())
    print(f"supervised classifier, {len(images)} fresh renders: skin tone {tone_acc:.4f}, age {age_acc:.4f}")
    assert tone_acc >= 0.99 and age_acc >= 0.99
    np.testing.assert_allclose(out["skin_tone"].probs.sum(1), 1.0)
    assert set(out["gender"].status) == {"not_measurable"}
    for name, matrix in net.confusion.items():  # type: ignore[attr-defined]  # from classifier/confusion.json
        assert matrix.shape == (len(reordered.attribute(name).classes),) * 2
    big = net.classify(np.repeat(np.repeat(images[:8], 2, axis=1), 2, axis=2), reordered.attributes)
    assert big["skin_tone"].probs.shape == (8, 4) and set(big["age"].status) == {"ok"}


def test_clip_zero_shot_with_the_miniature_clip(battery, renders):
    need("clip")
    images, tone, age = renders
    clip = get_classifier("clip", CTX)
    assert clip.name == "clip" and clip.check(battery.attributes) == []
    out = clip.classify(images, battery.attributes)
    tone_acc = float((labels(out["skin_tone"], battery.attribute("skin_tone").classes) == tone).mean())
    age_acc = float((labels(out["age"], battery.attribute("age").classes) == age).mean())
    print(f"CLIP zero-shot (miniature), {len(images)} renders: skin tone {tone_acc:.4f}, age {age_acc:.4f}")
    assert tone_acc >= 0.8
    assert set(out["gender"].status) == {"not_measurable"} and np.isnan(out["gender"].probs).all()
    validate_outputs(out, battery.attributes, len(images), clip.name)


def test_clip_embedder(battery, renders):
    need("clip")
    embedder = get_embedder("clip", CTX)
    images = renders[0][:5]
    emb = embedder.embed_images(images)
    text = embedder.embed_texts(["a photo of a doctor", "a photo of a person with dark skin"])
    assert emb.dtype == np.float32 and text.dtype == np.float32 and emb.shape[1] == text.shape[1]
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(text, axis=1), 1.0, atol=1e-5)
    odd = np.zeros((2, 40, 48, 3), np.uint8)  # any size goes through the CLIP processor
    assert embedder.embed_images(odd).shape == (2, emb.shape[1])


def test_unloadable_clip_names_the_id(tmp_path):
    missing = tmp_path / "no-such-clip"
    for getter in (get_classifier, get_embedder):
        with pytest.raises(SuiteError, match="no-such-clip"):
            getter(f"clip:{missing}", CTX)


def test_registry_names_and_did_you_mean():
    assert {"oracle", "miniature", "clip"} <= set(available_classifiers())
    assert "clip" in available_embedders()
    with pytest.raises(SuiteError, match=r"unknown classifier 'oracel' \(did you mean 'oracle'\?\)"):
        get_classifier("oracel", CTX)
    with pytest.raises(SuiteError, match="unknown embedder 'clop'"):
        get_embedder("clop", CTX)
    with pytest.raises(SuiteError, match="takes no argument"):
        get_classifier("oracle:x", CTX)


def test_specs_are_checked_before_anything_loads(tmp_path):
    assert check_classifier_spec("oracle") == check_classifier_spec("clip:/any/folder") == []
    assert check_embedder_spec("clip") == []
    assert "did you mean 'miniature'" in check_classifier_spec("minature")[0]
    assert "not found" in check_classifier_spec(f"{tmp_path / 'nope.py'}:make")[0]
    assert "plug-in module 'nosuchmodule' not found" in check_classifier_spec("nosuchmodule:make")[0]
    assert check_classifier_spec("json:loads") == []  # an importable module passes the early check


def test_confusion_matrices_follow_the_battery_class_order(reordered):
    oracle = get_classifier("oracle", CTX)
    world = np.arange(16, dtype=float).reshape(4, 4)  # rows/columns in TONE_NAMES order
    oracle.world_confusion = {"skin_tone": world}  # type: ignore[attr-defined]
    assert oracle.check(reordered.attributes) == []
    order = [TONE_NAMES.index(c) for c in reordered.attribute("skin_tone").classes]
    np.testing.assert_array_equal(oracle.confusion["skin_tone"], world[np.ix_(order, order)])  # type: ignore
    assert set(oracle.confusion) == {"skin_tone"}  # type: ignore[attr-defined]


PLUGIN = '''
import numpy as np
from evalsuite.classifiers import make_output, not_measurable

class Halves:
    """Says 50/50 on age, does not measure anything else."""
    def __init__(self, ctx):
        self.name = "halves"
        self.device = ctx.device
    def check(self, attributes):
        return []
    def classify(self, images, attributes):
        n = len(images)
        return {a.name: make_output(np.full((n, 2), 0.5), ["ok"] * n) if a.name == "age"
                else not_measurable(n, len(a.classes)) for a in attributes}

def make(ctx):
    return Halves(ctx)

def broken(ctx):
    return object()
'''


def test_plugin_from_a_file(tmp_path, battery, renders):
    path = tmp_path / "my_classifier.py"
    path.write_text(PLUGIN)
    plugin = get_classifier(f"{path}:make", ClassifierContext(device="cpu"))
    assert plugin.name == "halves" and plugin.check(battery.attributes) == []
    images = renders[0][:4]
    out = plugin.classify(images, battery.attributes)
    validate_outputs(out, battery.attributes, len(images), plugin.name)
    record = to_record(out, battery.attributes, 0)
    assert record["age"] == {"probs": [0.5, 0.5], "label": "young", "status": "ok", "confident": False}
    with pytest.raises(SuiteError, match="factory 'nope' not found"):
        get_classifier(f"{path}:nope", CTX)
    with pytest.raises(SuiteError, match="protocol"):
        get_classifier(f"{path}:broken", CTX)
    with pytest.raises(SuiteError, match="plug-in file .*missing.py' not found"):
        get_classifier(f"{tmp_path / 'missing.py'}:make", CTX)
    with pytest.raises(SuiteError, match="plug-in module 'no_such_package.mod' not found"):
        get_classifier("no_such_package.mod:make", CTX)


@pytest.mark.parametrize("source, spec, message", [
    ("WEIGHTS = load_weights('w.pt')\n\ndef make(ctx):\n    return None\n", "{path}:make",
     "classifier plug-in '{path}:make' failed to import: NameError: name 'load_weights' is not defined"),
    ("def make(ctx):\n    return open('/no/such/weights.pt', 'rb')\n", "{path}:make",
     "classifier plug-in '{path}:make': factory 'make' failed: FileNotFoundError: [Errno 2] No such file or "
     "directory: '/no/such/weights.pt'"),
    ("def make(ctx:\n", "{path}:make", "classifier plug-in '{path}:make' failed to import: SyntaxError: "),
])
def test_failing_plugin_is_one_message(tmp_path, source, spec, message):
    path = tmp_path / "failing.py"
    path.write_text(source)
    with pytest.raises(SuiteError) as info:
        get_classifier(spec.format(path=path), CTX)
    assert str(info.value).startswith(message.format(path=path)) and "\n" not in str(info.value)
    assert info.value.__cause__ is None and info.value.__suppress_context__  # no chained traceback either


def test_which_classifiers_detect_people():
    from evalsuite.classifiers.clip_zero_shot import ClipZeroShot
    from evalsuite.classifiers.miniature import SupervisedClassifier

    assert detects_people(get_classifier("oracle", CTX)) is True
    assert detects_people(SupervisedClassifier) is False and detects_people(ClipZeroShot) is False
    assert detects_people(object()) is None  # a plug-in that does not say


def test_validate_outputs_catches_broken_plugins(battery):
    age = battery.attribute("age")
    with pytest.raises(SuiteError, match="no AttributeOutput for attribute 'age'"):
        validate_outputs({}, [age], 2, "p")
    with pytest.raises(SuiteError, match="shape"):
        validate_outputs({"age": make_output(np.full((2, 3), 1 / 3), ["ok"] * 2)}, [age], 2, "p")
    with pytest.raises(SuiteError, match="not probability"):
        validate_outputs({"age": make_output(np.ones((2, 2)), ["ok"] * 2)}, [age], 2, "p")


def test_to_record_matches_the_results_format(reordered, renders):
    images = np.concatenate([renders[0][:1], np.zeros((1, 32, 32, 3), np.uint8)])
    attributes = reordered.attributes
    out = get_classifier("oracle", CTX).classify(images, attributes)
    first, blank = to_record(out, attributes, 0), to_record(out, attributes, 1)
    json.dumps([first, blank], allow_nan=False)  # plain JSON, no NaN
    assert list(first) == [a.name for a in attributes]
    skin = first["skin_tone"]
    assert list(skin) == ["probs", "label", "status", "confident"]
    assert skin["label"] == renders[1][0] and skin["probs"][list(reordered.attribute("skin_tone").classes)
                                                           .index(renders[1][0])] == 1.0
    assert skin["status"] == "ok" and skin["confident"] is True
    assert first["gender"] == {"probs": None, "label": None, "status": "not_measurable", "confident": False}
    assert blank["age"] == {"probs": None, "label": None, "status": "no_person", "confident": False}
    edge = make_output(np.array([[CONFIDENCE_THRESHOLD, 1 - CONFIDENCE_THRESHOLD], [0.79, 0.21]]), ["ok"] * 2)
    assert [to_record({"age": edge}, [reordered.attribute("age")], i)["age"]["confident"]
            for i in range(2)] == [True, False]
