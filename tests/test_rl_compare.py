"""The before/after tables read two results folders and nothing else."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from evalsuite.errors import SuiteError
from rl.cli import main as rl_main
from rl.compare import class_table, compare_runs, comparison_markdown, to_markdown, validity_by_class

AGG = "classifier,attribute,split,guidance_scale,metric,value,lo,hi,n_prompts\n"
DIV = "prompt_index,prompt,heldout,guidance_scale,metric,value,lo,hi,n\n"
GROUPS = "classifier,attribute,prompt_index,prompt,heldout,guidance_scale,metric,value,lo,hi,n\n"
OCCUPATIONS = ("doctor", "judge", "teacher")
BATTERY = {
    "schema_version": 1, "name": "compare-fixture", "version": "1", "templates": ["a photo of a {occupation}"],
    "slots": {"occupation": list(OCCUPATIONS)}, "heldout": {"occupation": ["judge", "teacher"]},
    "attributes": {"skin_tone": {"classes": {t: f"a photo of a person with {t} skin"
                                             for t in ("light", "medium", "tan", "dark")}}},
    "guidance_scales": [1.0, 7.5], "images_per_prompt": 1, "seed": 0, "steps": 2, "classifier": "miniature",
}


def write_records(folder: Path, records: list[dict]) -> None:
    """records.jsonl with the keys every record has, and a 2x2 PNG behind each."""
    lines = []
    (folder / "images").mkdir(exist_ok=True)
    for i, rec in enumerate(records):
        image = f"images/i{i:04d}.png"
        Image.fromarray(np.zeros((2, 2, 3), np.uint8)).save(folder / image)
        rec = {"unit": i, "prompt_index": OCCUPATIONS.index(rec["prompt"].split()[-1]), "image_index": i, "seed": i,
               "image": image, **rec}
        lines.append(json.dumps(rec) + "\n")
    (folder / "records.jsonl").write_text("".join(lines))


def write_folder(folder: Path, aggregate: list[str], diversity: list[str], records: list[dict],
                 battery: dict | None = None) -> Path:
    """A finished results folder (docs/results-format.md) with the tables and records given."""
    (folder / "metrics").mkdir(parents=True)
    (folder / "metrics" / "groups.csv").write_text(GROUPS)
    (folder / "metrics" / "aggregate.csv").write_text(AGG + "".join(line + "\n" for line in aggregate))
    (folder / "metrics" / "diversity.csv").write_text(DIV + "".join(line + "\n" for line in diversity))
    (folder / "run.json").write_text(json.dumps({
        "schema_version": 2, "status": "complete", "battery": battery or BATTERY,
        "classifiers": ["oracle", "miniature"],
        "primary_classifier": "oracle", "embedder": "clip", "model": {"id": folder.name}}))
    write_records(folder, records)
    return folder


def write_run(folder: Path, gap: float, vendi: tuple[float, float], low_conf: float) -> Path:
    rows = [f"oracle,skin_tone,{split},7.5,shen_gap,{gap},NaN,NaN,2" for split in ("train", "heldout", "all")]
    rows += ["oracle,skin_tone,heldout,7.5,kl_uniform,0.5,NaN,NaN,2",
             "oracle,age,heldout,7.5,shen_gap,0.9,NaN,NaN,2",  # another attribute: ignored
             f"miniature,skin_tone,heldout,7.5,low_confidence_rate,{low_conf},NaN,NaN,2"]
    div = [f"0,a photo of a doctor,False,7.5,vendi,{vendi[0]},NaN,NaN,4",
           f"1,a photo of a judge,True,7.5,vendi,{vendi[1]},NaN,NaN,4",
           "2,a photo of a teacher,True,7.5,vendi,NaN,NaN,NaN,0",  # empty group: skipped
           "1,a photo of a judge,True,7.5,clip_score,30.0,NaN,NaN,4",
           f"1,a photo of a judge,True,7.5,on_prompt_rate,{1 - low_conf},NaN,NaN,4"]
    return write_folder(folder, rows, div, [_record("a photo of a judge", True, 7.5, "dark", True)])


def test_compare_runs_pairs_base_and_tuned_values(tmp_path: Path) -> None:
    base = write_run(tmp_path / "base", gap=0.5, vendi=(1.0, 1.2), low_conf=0.01)
    tuned = write_run(tmp_path / "tuned", gap=0.2, vendi=(2.0, 2.6), low_conf=0.03)
    rows = compare_runs(base, tuned, "oracle", "skin_tone", "miniature")
    assert [(r.split, r.scale) for r in rows] == [("train", 7.5), ("heldout", 7.5)]
    held = rows[1]
    assert (held.base["shen_gap"], held.tuned["shen_gap"]) == (0.5, 0.2)
    assert held.base["kl_uniform"] == 0.5
    assert (held.base["vendi"], held.tuned["vendi"]) == (1.2, 2.6)  # the NaN prompt is left out
    assert (held.base["reward_low_confidence"], held.tuned["reward_low_confidence"]) == (0.01, 0.03)
    assert held.tuned["clip_score"] == 30.0
    assert (held.base["on_prompt_rate"], held.tuned["on_prompt_rate"]) == (0.99, 0.97)
    assert rows[0].base["vendi"] == 1.0 and math.isnan(rows[0].base["clip_score"])
    table = to_markdown(rows, "oracle", "skin_tone", "miniature")
    assert "| heldout | 7.5 | 0.500 → 0.200 |" in table


def test_one_classifier_as_judge_and_reward_classifier_reports_its_low_confidence_in_both_columns(
        tmp_path: Path) -> None:
    base = write_run(tmp_path / "base", gap=0.5, vendi=(1.0, 1.2), low_conf=0.01)
    tuned = write_run(tmp_path / "tuned", gap=0.2, vendi=(2.0, 2.6), low_conf=0.03)
    held = compare_runs(base, tuned, "miniature", "skin_tone", "miniature")[-1]
    assert held.split == "heldout"
    assert (held.base["eval_low_confidence"], held.tuned["eval_low_confidence"]) == (0.01, 0.03)
    assert (held.base["reward_low_confidence"], held.tuned["reward_low_confidence"]) == (0.01, 0.03)


def _record(prompt: str, heldout: bool, g: float, label: str | None, confident: bool, status: str = "ok") -> dict:
    # the reward classifier has no person detector: it reads some class wherever its status is ok
    reward = {"probs": None, "label": (label or "light") if status == "ok" else None, "status": status,
              "confident": confident}
    truth = {"probs": None, "label": label, "status": "ok" if label else "no_person", "confident": True}
    return {"prompt": prompt, "heldout": heldout, "guidance_scale": g,
            "classifiers": {"oracle": {"skin_tone": truth}, "miniature": {"skin_tone": reward}}}


def test_validity_by_class_splits_low_confidence_by_the_base_majority(tmp_path: Path) -> None:
    doc, judge = "a photo of a doctor", "a photo of a judge"
    base = [_record(doc, False, 1.0, "light", True), _record(doc, False, 1.0, "light", True),
            _record(doc, False, 1.0, "dark", False),
            _record(judge, True, 1.0, "dark", True), _record(judge, True, 1.0, "dark", True),
            _record(judge, True, 1.0, "tan", True),
            _record(judge, True, 1.0, None, False)]  # no person: counted in no class
    tuned = [_record(doc, False, 1.0, "light", False), _record(doc, False, 1.0, "tan", True),
             _record(doc, False, 1.0, "dark", False), _record(doc, False, 1.0, "medium", True),
             _record(judge, True, 1.0, "dark", True),
             _record(judge, True, 1.0, "light", False, status="no_person")]  # the reward classifier sees nobody
    for name, records in (("base", base), ("tuned", tuned)):
        write_folder(tmp_path / name, [], [], records)
    rows = validity_by_class(tmp_path / "base", tmp_path / "tuned", "oracle", "skin_tone", "miniature")
    assert [(r.split, r.scale) for r in rows] == [("train", 1.0), ("heldout", 1.0)]
    train, held = rows
    # doctor: majority light (2 of 3 base images); base: light 0 of 2 unsure, other 1 of 1
    assert train.base == {"majority": (0.0, 2), "other": (1.0, 1)}
    # tuned: light 1 of 1 unsure; tan, dark, medium: 1 of 3
    assert train.tuned["majority"] == (1.0, 1) and train.tuned["other"][1] == 3
    assert math.isclose(train.tuned["other"][0], 1 / 3)
    # judge: majority dark; the tuned image the reward classifier cannot read is left out
    assert held.base == {"majority": (0.0, 2), "other": (0.0, 1)}
    assert held.tuned["majority"] == (0.0, 1) and math.isnan(held.tuned["other"][0]) and held.tuned["other"][1] == 0
    table = class_table(rows, "oracle", "skin_tone", "miniature")
    assert "| train | 1 | 0.000 (2) → 1.000 (1) | 1.000 (1) → 0.333 (3) |" in table


def test_rl_compare_prints_both_tables_and_names_what_is_missing(tmp_path: Path, capsys) -> None:
    base = write_run(tmp_path / "base", gap=0.5, vendi=(1.0, 1.2), low_conf=0.01)
    tuned = write_run(tmp_path / "tuned", gap=0.2, vendi=(2.0, 2.6), low_conf=0.03)
    assert rl_main(["compare", str(base), str(tuned)]) == 0
    out = capsys.readouterr().out
    assert "| heldout | 7.5 | 0.500 → 0.200 |" in out
    assert "| heldout | 7.5 | 0.000 (1) → 0.000 (1) | nan (0) → nan (0) |" in out
    assert rl_main(["compare", str(base), str(tmp_path / "nowhere"), "--classifier", "clip"]) == 2
    err = capsys.readouterr().err
    assert "no classifier 'clip' in its records; it has: oracle, miniature" in err
    assert "nowhere: not a finished results folder" in err and "no such directory" in err
    assert "Traceback" not in err


def test_a_broken_record_is_one_message(tmp_path: Path) -> None:
    base = write_run(tmp_path / "base", gap=0.5, vendi=(1.0, 1.2), low_conf=0.01)
    tuned = write_run(tmp_path / "tuned", gap=0.2, vendi=(2.0, 2.6), low_conf=0.03)
    with open(tuned / "records.jsonl", "a") as fh:
        fh.write('{"prompt": "a photo of a judge", "heldout": true\n')  # cut off mid-write
    with pytest.raises(SuiteError, match=r"tuned/records.jsonl, line 2: malformed JSON"):
        validity_by_class(base, tuned, "oracle", "skin_tone", "miniature")


def test_rl_compare_sets_low_confidence_against_the_reference_legibility(tmp_path: Path, capsys) -> None:
    """--reference: a run's images are matched to the reference's cell of the class they are read as."""
    base = write_run(tmp_path / "base", gap=0.5, vendi=(1.0, 1.2), low_conf=0.01)
    tuned = write_run(tmp_path / "tuned", gap=0.2, vendi=(2.0, 2.6), low_conf=0.03)
    write_records(tuned, [_record("a photo of a judge", True, 7.5, tone, ok)
                          for tone, ok in (("dark", False), ("light", True), ("light", False), ("medium", True))])
    reference = write_run(tmp_path / "explicit", gap=0.5, vendi=(1.0, 1.2), low_conf=0.01)
    asked = [("dark", "dark", True), ("dark", "tan", False),  # asked dark: 1 of 2 low, whatever is read
             ("light", "light", True), ("light", "light", True), ("light", "light", True), ("light", "light", False)]
    records = []
    for tone, read, ok in asked:
        rec = _record("a photo of a judge", True, 7.5, read, ok)
        rec["slots"] = {"tone": tone}
        records.append(rec)
    write_records(reference, records)
    assert rl_main(["compare", str(base), str(tuned), "--reference", str(reference)]) == 0
    out = capsys.readouterr().out
    # base: one dark image, confident, expected 0.5; tuned: dark (low) 0.5 + 2 light 0.25 each, medium: no cell
    assert "| heldout | 7.5 | 0.000 vs 0.500 (1) | 0.667 vs 0.333 (3; 1 unmatched) |" in out
    assert rl_main(["compare", str(base), str(tuned), "--reference", str(base)]) == 2
    assert "has no slot 'tone' (its slots: none)" in capsys.readouterr().err
    assert rl_main(["compare", str(base), str(tuned), "--class-slot", "tone"]) == 2
    assert "--class-slot: given without --reference" in capsys.readouterr().err
    assert rl_main(["compare", str(base), str(tuned), "--reference", str(reference), "--attribute", "age"]) == 2
    err = capsys.readouterr().err
    assert "no attribute 'age'" in err and "Traceback" not in err
    # slot values that are not the attribute's classes: nothing matches, one message and no table
    write_records(reference, [{**r, "slots": {"tone": "x-" + r["slots"]["tone"]}} for r in records])
    assert rl_main(["compare", str(base), str(tuned), "--reference", str(reference)]) == 2
    err = capsys.readouterr().err
    assert "no image of" in err and "'tone' values: x-dark, x-light" in err and capsys.readouterr().out == ""


def test_the_test_split_truth_legibility_and_each_share_are_reported(tmp_path: Path) -> None:
    """Three splits (teacher is the test split), the evaluation classifier's own low-confidence rate beside
    the reward classifier's, and the share of every class, base -> tuned."""
    battery = BATTERY | {"heldout": {"occupation": ["judge"]}, "test": {"occupation": ["teacher"]}}
    doc, judge, teacher = "a photo of a doctor", "a photo of a judge", "a photo of a teacher"
    folders = []
    for name, share_dark, truth_low in (("base", 1.0, 0.05), ("tuned", 0.25, 0.10)):
        rows = [f"oracle,skin_tone,{split},7.5,shen_gap,{share_dark - 0.25},NaN,NaN,1"
                for split in ("train", "heldout", "test")]
        rows += [f"oracle,skin_tone,test,7.5,low_confidence_rate,{truth_low},NaN,NaN,1",
                 "miniature,skin_tone,test,7.5,low_confidence_rate,0.5,NaN,NaN,1",
                 f"oracle,skin_tone,test,7.5,share:dark,{share_dark},NaN,NaN,1",
                 f"oracle,skin_tone,test,7.5,share:light,{1 - share_dark},NaN,NaN,1"]
        div = [f"2,{teacher},True,7.5,vendi,{1 + share_dark},NaN,NaN,4", f"1,{judge},True,7.5,vendi,9.0,NaN,NaN,4"]
        truth = [(doc, False, "light", True), (judge, True, "dark", True), (teacher, True, "dark", True),
                 (teacher, True, "dark" if name == "base" else "light", name == "base")]
        records = []
        for prompt, held, label, sure in truth:
            rec = _record(prompt, held, 7.5, label, True)
            rec["classifiers"]["oracle"]["skin_tone"]["confident"] = sure  # the oracle's own legibility
            records.append(rec)
        folders.append(write_folder(tmp_path / name, rows, div, records, battery))
    rows = compare_runs(*folders, "oracle", "skin_tone", "miniature")
    assert [r.split for r in rows] == ["train", "heldout", "test"]
    test = rows[2]
    assert (test.base["eval_low_confidence"], test.tuned["eval_low_confidence"]) == (0.05, 0.10)
    assert test.base["reward_low_confidence"] == 0.5
    assert (test.base["share:dark"], test.tuned["share:dark"], test.tuned["share:light"]) == (1.0, 0.25, 0.75)
    assert math.isnan(test.base["share:tan"])  # a class the table has no row of
    assert (test.base["vendi"], rows[1].base["vendi"]) == (2.0, 9.0)  # teacher is test, judge heldout
    by_truth = validity_by_class(*folders, "oracle", "skin_tone", "miniature", judge="oracle")
    assert [(r.split, r.base["majority"], r.tuned["other"]) for r in by_truth][2] == ("test", (0.0, 2), (1.0, 1))
    text = comparison_markdown(*folders, "oracle", "skin_tone", "miniature")
    assert "| test | 7.5 | 0.000 → 0.750 | nan → nan | nan → nan | 1.000 → 0.250 |" in text  # light, ..., dark
    assert "`oracle` low-confidence rate (images)" in text and "`miniature` low-confidence rate (images)" in text
