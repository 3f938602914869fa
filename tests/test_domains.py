"""Classifiers know the image domain they are valid on: a battery names a classifier and a face detector per
domain, a classifier of another domain is refused before any model loads, and the detector runs before
the classifiers (no face: "no_person" for every classifier, left out of the shares, its rate reported)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from evalsuite.battery import DomainSetup, battery_from_dict, load_battery
from evalsuite.classifiers import domain_problems
from evalsuite.cli import main
from evalsuite.errors import ConfigError
from evalsuite.miniature import ASSETS

ROOT = Path(__file__).resolve().parents[1]
CLIP = ASSETS / "clip"
pytestmark = pytest.mark.skipif(not (ASSETS / "pipeline").is_dir(), reason="the shipped miniature world is missing")


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Stable Diffusion folder: a model of the natural domain, as any hub model is."""
    from tiny_pipeline import tiny_sd_pipeline

    root = tmp_path_factory.mktemp("sd")
    tiny_sd_pipeline(root).save_pretrained(root / "model", safe_serialization=True)
    return root / "model"


def small_battery(tmp_path: Path, **changes: object) -> Path:
    data = yaml.safe_load((ROOT / "prompts" / "occupations.yaml").read_text())
    data.update(slots={"occupation": ["doctor", "nurse"]}, heldout={}, test={}, guidance_scales=[1.0, 3.0],
                images_per_prompt=2, steps=2, intersections=[], **changes)
    path = tmp_path / "battery.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def test_the_default_battery_scores_each_domain_with_its_own_set() -> None:
    battery = load_battery(ROOT / "prompts" / "occupations.yaml")
    assert battery.setup_for("miniature") == DomainSetup("miniature")
    assert battery.setup_for("natural") == DomainSetup("photo", "opencv-haar")
    assert battery_from_dict(battery.to_dict(), "again") == battery


def test_bad_domains_are_reported_together(tmp_path: Path) -> None:
    data = yaml.safe_load(small_battery(tmp_path).read_text())
    data["domains"] = {"natural": {"clasifier": "photo"}, "mini ature": {"classifier": 3}, "x": "photo"}
    with pytest.raises(ConfigError) as err:
        battery_from_dict(data, "b.yaml")
    text = str(err.value)
    for expected in ("domains.natural.clasifier: unknown key 'clasifier' (did you mean 'classifier'?)",
                     "domains.natural.classifier: required key is missing", "domains.mini ature:",
                     "domains.mini ature.classifier", "domains.x"):
        assert expected in text, text


def test_registry_domains() -> None:
    assert domain_problems("classifier", "miniature", "natural", "m") != []
    assert domain_problems("classifier", "oracle", "natural", "m") != []
    assert domain_problems("classifier", "photo", "miniature", "m") != []
    assert domain_problems("detector", "opencv-haar", "miniature", "m") != []
    assert domain_problems("classifier", "clip", "natural", "m") == domain_problems("classifier", "clip", "miniature",
                                                                                     "m") == []
    assert domain_problems("classifier", "my.module:factory", "natural", "m") == []  # plug-ins are trusted


@pytest.mark.parametrize("case", ["miniature classifier on a photo model", "photo classifier on the miniature",
                                  "battery without a natural entry"])
def test_a_classifier_of_another_domain_is_refused_before_loading(
        case: str, sd_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    if case == "miniature classifier on a photo model":
        args, expected = ["--model", str(sd_folder), "--classifier", "miniature"], \
            f"classifier 'miniature' reads miniature images only; the model '{sd_folder}' makes natural images. " \
            "Use instead:"
        battery = small_battery(tmp_path)
    elif case == "photo classifier on the miniature":
        args, expected = ["--classifier", "photo"], "classifier 'photo' reads natural images only"
        battery = small_battery(tmp_path)
    else:
        args, expected = ["--model", str(sd_folder)], "none for natural images"
        battery = small_battery(tmp_path, domains={"miniature": {"classifier": "miniature"}})
    results = tmp_path / "results"
    assert main(["-q", "run", str(battery), "--results", str(results), "--device", "cpu", *args]) == 2
    err = capsys.readouterr().err
    assert expected in err and "Traceback" not in err
    assert not results.exists() or not any(results.iterdir())


def test_no_face_means_no_person_for_every_classifier(sd_folder: Path, tmp_path: Path) -> None:
    """On a random tiny model (noise images) the detector finds no face: every entry is no_person, the
    shares are empty and the no-person rate is 1; run.json names the detector and the skin-tone method."""
    results = tmp_path / "results"
    spec = f"photo:{CLIP}"
    assert main(["-q", "run", str(small_battery(tmp_path)), "--results", str(results), "--name", "r",
                 "--device", "cpu", "--model", str(sd_folder), "--classifier", spec, "--embedder", f"clip:{CLIP}"]) == 0
    run = results / "r"
    info = json.loads((run / "run.json").read_text())
    assert info["detector"] == "opencv-haar" and info["detects_people"] == {spec: True}
    assert info["classifier_methods"][spec]["skin_tone"].startswith("ITA")
    assert info["classifier_methods"][spec]["gender"].startswith("CLIP zero-shot")
    records = [json.loads(line) for line in (run / "records.jsonl").read_text().splitlines()]
    assert len(records) == 8 and all(r["faces"] == [] for r in records)
    assert {e["status"] for r in records for e in r["classifiers"][spec].values()} == {"no_person"}
    groups = pd.read_csv(run / "metrics" / "groups.csv")
    rate = groups[groups.metric == "no_person_rate"]
    assert len(rate) == 2 * 2 * 3 and (rate.value == 1.0).all()  # 2 prompts x 2 scales x (gender, skin, age)
    # the dashboard of a run where no one was found builds, and shows how skin tone was measured
    assert main(["-q", "dashboard", str(run), "--out", str(tmp_path / "site")]) == 0
    methods = (tmp_path / "site" / "methods.html").read_text()
    assert "ITA° of face skin pixels (Chardon et al. 1991)" in methods
    assert "opencv-haar runs first: an image with no face found is no_person for every classifier" in methods


DETECTOR = '''
import numpy as np

class EveryOther:
    name = "every-other"

    def detect(self, images):
        return [np.array([[8.0, 8.0, 56.0, 56.0, 1.0]]) if i % 2 == 0 else np.zeros((0, 5))
                for i in range(len(images))]

def make(ctx):
    return EveryOther()
'''


def test_the_detector_runs_before_the_classifiers(sd_folder: Path, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A plug-in detector that finds a face in every other image of a batch: those images keep the
    classifier's reading, the others are no_person, and the no-person rate of each group is their share."""
    monkeypatch.setenv("EVALSUITE_ALLOW_PLUGINS", "0")  # --allow-plugins sets it: restored after the test
    plugin = tmp_path / "detector.py"
    plugin.write_text(DETECTOR)
    battery = small_battery(tmp_path, domains={"natural": {"classifier": f"clip:{CLIP}",
                                                           "detector": f"{plugin}:make"}})
    results = tmp_path / "results"
    assert main(["-q", "run", str(battery), "--results", str(results), "--name", "r", "--device", "cpu",
                 "--model", str(sd_folder), "--embedder", f"clip:{CLIP}", "--batch-size", "4", "--allow-plugins"]) == 0
    records = [json.loads(line) for line in (results / "r" / "records.jsonl").read_text().splitlines()]
    for i, rec in enumerate(records):
        found = i % 4 % 2 == 0  # batches of 4: the detector numbers images within its batch
        assert rec["faces"] == ([[8.0, 8.0, 56.0, 56.0, 1.0]] if found else [])
        statuses = {e["status"] for e in rec["classifiers"][f"clip:{CLIP}"].values()}
        assert statuses == ({"ok"} if found else {"no_person"})
    groups = pd.read_csv(results / "r" / "metrics" / "groups.csv")
    rates = groups[(groups.metric == "no_person_rate") & (groups.attribute == "skin_tone")].value
    assert np.allclose(rates, 0.5)


def test_the_classifiers_command_lists_each_name_with_its_domains(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["classifiers"]) == 0
    lines = [line.split() for line in capsys.readouterr().out.splitlines()]
    assert ["miniature", "miniature"] in lines and ["photo", "natural"] in lines and ["clip", "any"] in lines
    assert ["opencv-haar", "natural"] in lines


def test_the_default_battery_on_a_photo_model_never_scores_with_the_miniature_cnn(
        sd_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """prompts/occupations.yaml, no flag, on a diffusers folder: the natural set is chosen (photo with its
    default CLIP, which this offline machine cannot fetch: one message, exit 2, nothing written) and
    never the miniature classifier the battery names for its own model."""
    results = tmp_path / "results"
    code = main(["-q", "run", str(ROOT / "prompts" / "occupations.yaml"), "--model", str(sd_folder), "--results",
                 str(results), "--device", "cpu", "--limit-prompts", "1", "--images-per-prompt", "1"])
    err = capsys.readouterr().err
    assert code == 2 and "could not load CLIP 'openai/clip-vit-large-patch14'" in err and "Traceback" not in err
    assert not results.exists() or not any(results.iterdir())
