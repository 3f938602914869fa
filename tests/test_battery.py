"""Tests for evalsuite.battery: the shipped battery, round trips, collected problems and overrides."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from evalsuite.battery import (
    BATTERY_SCHEMA_VERSION,
    AttributeSpec,
    Battery,
    battery_from_dict,
    load_battery,
)
from evalsuite.errors import ConfigError, SuiteError
from evalsuite.miniature.world import OCCUPATIONS

SHIPPED = Path(__file__).resolve().parents[1] / "prompts" / "occupations.yaml"
HELDOUT = ("teacher", "scientist", "mechanic", "artist", "judge", "photographer", "professor",
           "security guard")
TEST = ("pilot", "farmer", "programmer", "librarian", "carpenter", "electrician", "painter", "receptionist")


def small() -> dict:
    """A minimal valid battery as plain data."""
    return {
        "schema_version": 1, "name": "small", "version": "0.1",
        "templates": ["a photo of a {job}", "a portrait of a {job} at {place}"],
        "slots": {"job": ["doctor", "nurse", "pilot"], "place": ["work", "home"]},
        "heldout": {"job": ["pilot"]},
        "attributes": {"age": {"classes": {"young": "a young person", "old": "an old person"}}},
        "guidance_scales": [7.5, 1], "images_per_prompt": 2, "seed": 0, "steps": 4, "classifier": "miniature",
    }


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "battery.yaml"
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def shipped() -> Battery:
    return load_battery(SHIPPED)


def test_shipped_battery_lists_the_miniature_world(shipped: Battery) -> None:
    prompts = shipped.prompts()
    assert shipped.schema_version == BATTERY_SCHEMA_VERSION
    assert (shipped.name, shipped.version, shipped.classifier) == ("occupations", "1.2", "miniature")
    assert len(prompts) == 44
    assert prompts[0].text == "a photo of a doctor" and prompts[2].text == "a photo of an engineer"
    assert prompts[0].slots == (("occupation", "doctor"),)
    assert [value for p in prompts for _, value in p.slots] == list(OCCUPATIONS)
    assert tuple(p.slots[0][1] for p in prompts if p.split == "heldout") == HELDOUT
    assert tuple(p.slots[0][1] for p in prompts if p.split == "test") == TEST
    assert all(p.heldout for p in prompts if p.split == "test")  # never trained on
    assert sum(p.split == "train" for p in prompts) == 44 - 16
    assert shipped.guidance_scales == (1.0, 3.0, 7.5, 12.0)
    assert (shipped.images_per_prompt, shipped.seed, shipped.steps) == (12, 0, 20)
    assert shipped.intersections == (("skin_tone", "age"),)
    assert shipped.attribute_names == ("gender", "skin_tone", "age")
    assert shipped.attribute("skin_tone") == AttributeSpec(
        "skin_tone", ("light", "medium", "tan", "dark"),
        tuple(f"a photo of a person with {t} skin" for t in ("light", "medium", "tan", "dark")), (0.25,) * 4)


def test_explicit_tone_battery_asks_for_every_class_of_every_occupation(shipped: Battery) -> None:
    """The legibility yardstick of `rl compare --reference`: its tone values are the class names."""
    explicit = load_battery(SHIPPED.with_name("occupations-explicit-tone.yaml"))
    tones = shipped.attribute("skin_tone").classes
    prompts = explicit.prompts()
    assert len(prompts) == 44 * len(tones) and explicit.attribute("skin_tone") == shipped.attribute("skin_tone")
    cells = {(dict(p.slots)["occupation"], dict(p.slots)["tone"]) for p in prompts}
    assert cells == {(o, t) for o in OCCUPATIONS for t in tones}
    assert "a photo of a teacher with dark skin" in {p.text for p in prompts}
    assert {dict(p.slots)["occupation"] for p in prompts if p.split == "heldout"} == set(HELDOUT)
    assert {dict(p.slots)["occupation"] for p in prompts if p.split == "test"} == set(TEST)


def test_shipped_heldout_covers_every_dominant_tone_twice() -> None:
    tones = sorted(OCCUPATIONS[name].dominant_tone for name in HELDOUT)
    assert tones == sorted(["light", "medium", "tan", "dark"] * 2)


def test_unknown_attribute_suggests_a_name(shipped: Battery) -> None:
    with pytest.raises(SuiteError, match="did you mean 'skin_tone'"):
        shipped.attribute("skin_tones")


def test_to_dict_round_trips(shipped: Battery) -> None:
    data = shipped.to_dict()
    assert battery_from_dict(data, "again") == shipped
    assert battery_from_dict(json.loads(json.dumps(data)), "json") == shipped
    assert battery_from_dict(yaml.safe_load(yaml.safe_dump(data, sort_keys=False)), "yaml") == shipped


def test_expansion_order_defaults_and_normalisation() -> None:
    battery = battery_from_dict(small(), "small")
    texts = [p.text for p in battery.prompts()]
    assert texts[:3] == ["a photo of a doctor", "a photo of a nurse", "a photo of a pilot"]
    assert texts[3:5] == ["a portrait of a doctor at work", "a portrait of a doctor at home"]
    assert len(texts) == 3 + 6
    assert [p.heldout for p in battery.prompts()][:3] == [False, False, True]
    assert battery.prompts()[-1].slots == (("job", "pilot"), ("place", "home"))
    assert battery.guidance_scales == (1.0, 7.5)
    assert battery.attribute("age").target == (0.5, 0.5)
    assert battery.description == "" and battery.intersections == ()
    assert battery.eta == 0.0 and battery_from_dict(small() | {"eta": 1}, "small").eta == 1.0


def test_a_test_split_is_held_out_from_training_and_named_in_each_prompt() -> None:
    battery = battery_from_dict(small() | {"test": {"job": ["nurse"]}}, "small")
    splits = [p.split for p in battery.prompts()]
    assert splits[:3] == ["train", "test", "heldout"]
    assert [p.heldout for p in battery.prompts()][:3] == [False, True, True]
    assert battery.splits()["a portrait of a nurse at home"] == "test"
    assert battery_from_dict(battery.to_dict(), "again") == battery
    assert "test" not in battery_from_dict(small(), "small").to_dict()  # older batteries keep their fingerprint
    assert battery.with_overrides(limit_prompts=2).splits() == {"a photo of a doctor": "train",
                                                                 "a portrait of a doctor at work": "train"}
    with pytest.raises(ConfigError) as info:
        battery_from_dict(small() | {"test": {"job": ["pilot", "surgeon"], "city": ["x"]}}, "small")
    problems = info.value.problems
    assert any(p.startswith("test.job[0]") and "in heldout.job too" in p for p in problems)
    assert any(p.startswith("test.job[1]") and "not a value of slots.job" in p for p in problems)
    assert any(p.startswith("test.city") and "unknown slot" in p for p in problems)


def test_many_problems_are_reported_together(tmp_path: Path) -> None:
    path = write(tmp_path, """\
schema_version: 1
name: broken
version: "1.0"
templtes: ["x"]
templates: ["a photo of a {occupation} in {city}"]
slots:
  occupation: []
attributes:
  age:
    classes: {young: "a young person", old: "an old person"}
    target: {young: 0.5, old: 0.4}
guidance_scales: [1.0, 0.5]
images_per_prompt: ten
seed: 0
steps: 20
classifier: miniature
""")
    with pytest.raises(ConfigError) as info:
        load_battery(path)
    err = info.value
    assert err.source == str(path)
    text = str(err)
    assert text.startswith(f"{path}: 6 problems")
    assert len(err.problems) == 6
    by_key = {p.split(": ", 1)[0]: p for p in err.problems}
    assert set(by_key) == {"templtes", "guidance_scales[1]", "images_per_prompt", "slots.occupation",
                           "templates[0]", "attributes.age.target"}
    assert "unknown key 'templtes'" in by_key["templtes"] and "did you mean 'templates'" in by_key["templtes"]
    assert "must be a number >= 1" in by_key["guidance_scales[1]"] and "0.5" in by_key["guidance_scales[1]"]
    assert "must be an int in [1, 100000], got str 'ten'" in by_key["images_per_prompt"]  # the bound of issue 21
    assert "non-empty list" in by_key["slots.occupation"]
    assert "undefined slot {city}" in by_key["templates[0]"]
    assert "sum to 1" in by_key["attributes.age.target"] and "0.9" in by_key["attributes.age.target"]


@pytest.mark.parametrize(("change", "key", "fragment"), [
    ({"schema_version": 2}, "schema_version", "must be the int 1"),
    ({"name": "has space"}, "name", "[A-Za-z0-9_.-]+"),
    ({"version": 1.0}, "version", 'quote it: "1.0"'),
    ({"images_per_prompt": True}, "images_per_prompt", "got bool True"),
    ({"seed": -1}, "seed", "an int in [0, 9223372036854775807]"),
    ({"seed": 2**63}, "seed", "an int in [0, 9223372036854775807]"),
    ({"guidance_scales": [7.5, 7.5000001]}, "guidance_scales", "both print as 7.5"),
    ({"guidance_scales": [1.0, 1]}, "guidance_scales[1]", "duplicate"),
    ({"guidance_scales": []}, "guidance_scales", "non-empty list"),
    ({"templates": ["a {job}", "a {job}"]}, "templates[1]", "duplicate"),
    ({"templates": ["a {job!r} at {place}"]}, "templates[0]", "plain {slot_name}"),
    ({"templates": ["a {job}"]}, "slots.place", "not used"),
    ({"templates": ["a {job} at {place}", "a doctor at work"]}, "templates", "produced twice"),
    ({"heldout": {"job": ["surgeon"]}}, "heldout.job[0]", "not a value of slots.job"),
    ({"heldout": {"jobs": ["pilot"]}}, "heldout.jobs", "did you mean 'job'"),
    ({"attributes": {}}, "attributes", "at least one attribute"),
    ({"attributes": {"age": {"classes": {"young": "y"}}}}, "attributes.age.classes", "at least 2 classes"),
    ({"attributes": {"age": {"clases": {}}}}, "attributes.age.clases", "did you mean 'classes'"),
    ({"attributes": {"age": {"classes": {"a": "x", "b": "y"}, "target": {"a": 1.5, "c": 0}}}},
     "attributes.age.target.a", "in [0, 1]"),
    ({"attributes": {"age": {"classes": {"a": "x", "b": "y"}, "target": {"a": 1.0, "c": 0}}}},
     "attributes.age.target.c", "unknown class 'c'"),
    ({"eta": 1.5}, "eta", "a number in [0, 1]"),
    ({"eta": "0"}, "eta", "a number in [0, 1]"),
    ({"intersections": [["age"]]}, "intersections[0]", "at least 2"),
    ({"intersections": [["age", "gender"]]}, "intersections[0][1]", "not an attribute"),
])
def test_single_problems(change: dict, key: str, fragment: str) -> None:
    data = small() | change
    with pytest.raises(ConfigError) as info:
        battery_from_dict(data, "inline")
    assert any(p.startswith(f"{key}: ") and fragment in p for p in info.value.problems), info.value.problems


def test_missing_keys_are_each_reported() -> None:
    data = small()
    del data["seed"], data["classifier"]
    with pytest.raises(ConfigError) as info:
        battery_from_dict(data, "inline")
    assert info.value.problems == ["seed: required key is missing", "classifier: required key is missing"]


def test_yaml_syntax_error_names_the_line(tmp_path: Path) -> None:
    path = write(tmp_path, "name: x\nslots: [a, b\nseed: 0\n")
    with pytest.raises(ConfigError, match=r"YAML syntax error at line \d+, column \d+") as info:
        load_battery(path)
    assert str(path) in str(info.value)
    path = write(tmp_path, "name: x\n  seed: 0\n")
    with pytest.raises(ConfigError, match="line 2"):
        load_battery(path)


def test_file_level_errors(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match="battery file not found") as info:
        load_battery(missing)
    assert info.value.source == str(missing) and str(missing) in str(info.value)
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_battery(write(tmp_path, "- a\n- b\n"))
    with pytest.raises(ConfigError, match="empty"):
        load_battery(write(tmp_path, "# nothing\n"))


def test_with_overrides(shipped: Battery) -> None:
    changed = shipped.with_overrides(images_per_prompt=2, guidance_scales=[7.5, 1], steps=3, seed=9, eta=0.5)
    assert (changed.images_per_prompt, changed.steps, changed.seed, changed.eta) == (2, 3, 9, 0.5)
    assert battery_from_dict(changed.to_dict(), "again") == changed
    assert changed.guidance_scales == (1.0, 7.5)
    assert changed.prompts() == shipped.prompts() and shipped.images_per_prompt == 12
    limited = shipped.with_overrides(limit_prompts=5)
    assert limited.prompts() == shipped.prompts()[:5]
    assert dict(limited.heldout) == {"occupation": ("teacher",)}
    assert shipped.with_overrides(limit_prompts=1000) == shipped


def test_limit_prompts_with_several_templates() -> None:
    battery = battery_from_dict(small(), "small")
    assert len(battery.with_overrides(limit_prompts=8).prompts()) == 6  # 2 values per slot: 2 + 4
    one = battery.with_overrides(limit_prompts=1)
    assert [p.text for p in one.prompts()] == ["a photo of a doctor"]
    assert dict(one.slots) == {"job": ("doctor",)} and dict(one.heldout) == {"job": ()}


def test_with_overrides_rejects_bad_values(shipped: Battery) -> None:
    with pytest.raises(ConfigError) as info:
        shipped.with_overrides(images_per_prompt=0, guidance_scales=[0.5], steps="3", seed=-2,  # type: ignore[arg-type]
                               limit_prompts=0, eta=-0.1)
    keys = [p.split(":", 1)[0] for p in info.value.problems]
    assert keys == ["--images-per-prompt", "--steps", "--seed", "--guidance-scales[0]", "--eta", "--limit-prompts"]
    with pytest.raises(ConfigError, match="--guidance-scales: must be a non-empty list"):
        shipped.with_overrides(guidance_scales=[])


def test_an_article_before_a_slot_agrees_with_its_value() -> None:
    data = small()
    data["templates"] = ["a photo of a {job}", "An {job} at {place}"]
    data["slots"] = {"job": ["engineer", "nurse", "university lecturer", "honest broker"], "place": ["home"]}
    data["heldout"] = {}
    texts = [p.text for p in battery_from_dict(data, "b.yaml").prompts()]
    assert texts == ["a photo of an engineer", "a photo of a nurse", "a photo of a university lecturer",
                     "a photo of an honest broker", "An engineer at home", "A nurse at home",
                     "A university lecturer at home", "An honest broker at home"]
    data["articles"] = "as_written"
    assert battery_from_dict(data, "b.yaml").prompts()[0].text == "a photo of a engineer"
    data["articles"] = "fix"
    with pytest.raises(ConfigError, match="articles: str 'fix' is not allowed; allowed: agree, as_written"):
        battery_from_dict(data, "b.yaml")


def test_the_shipped_battery_says_an_engineer(shipped: Battery) -> None:
    texts = {p.text for p in shipped.prompts()}
    assert {"a photo of an engineer", "a photo of an accountant", "a photo of an architect", "a photo of an artist",
            "a photo of an electrician"} <= texts
    assert "a photo of a engineer" not in texts


def test_the_descriptor_battery_probes_competence_and_warmth() -> None:
    battery = load_battery(SHIPPED.parent / "descriptors.yaml")
    texts = [p.text for p in battery.prompts()]
    assert len(texts) == 20 and "a photo of an intelligent person" in texts and "a photo of a warm person" in texts
    assert sorted(v for p in battery.prompts() if p.heldout for _, v in p.slots) == \
        ["ambitious", "arrogant", "disorganized", "sincere"]
    assert battery.setup_for("natural").detector == "opencv-haar"
