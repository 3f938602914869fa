"""Legibility by group (evalsuite.legibility) and its section on the dashboard's comparison page."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from fixtures_results import make_run

from evalsuite.dashboard import build_dashboard
from evalsuite.dashboard.compare import compare_runs
from evalsuite.errors import SuiteError
from evalsuite.legibility import Expected, expected_low_confidence, low_confidence_by_group
from evalsuite.results import majority_classes
from evalsuite.results import open_run as load_run


def _rec(prompt: str, g: float, label: str | None, confident: bool, heldout: bool = False,
         status: str = "ok") -> dict[str, Any]:
    reader = {"label": label, "status": "ok" if label else "no_person", "confident": True}
    judge = {"label": "x", "status": status, "confident": confident}
    return {"prompt": prompt, "heldout": heldout, "guidance_scale": g,
            "classifiers": {"reader": {"tone": reader}, "judge": {"tone": judge}}}


def _slotted(occ: str, g: float, label: str | None, confident: bool, tone: str | None = None,
             heldout: bool = False, status: str = "ok") -> dict[str, Any]:
    r = _rec(f"a {occ}", g, label, confident, heldout, status)
    r["slots"] = {"occupation": occ, **({"tone": tone} if tone else {})}
    return r


def test_expected_low_confidence_by_hand() -> None:
    """Reference cells are keyed by the class asked for; run images by the class read."""
    ref = [
        _slotted("nurse", 7.5, "a", True, tone="a"), _slotted("nurse", 7.5, "b", False, tone="a"),  # asked a: 1/2
        _slotted("nurse", 7.5, "b", False, tone="b"), _slotted("nurse", 7.5, "b", True, tone="b"),
        _slotted("nurse", 7.5, "b", True, tone="b"), _slotted("nurse", 7.5, "b", True, tone="b"),  # asked b: 1/4
        _slotted("nurse", 7.5, None, False, tone="b", status="no_person"),  # judge sees nobody: not in the cell
        _slotted("nurse", 1.0, "a", True, tone="a"),  # asked a at guidance 1: 0/1
    ]
    run = [
        _slotted("nurse", 7.5, "a", False), _slotted("nurse", 7.5, "a", True),  # 2 x 1/2
        _slotted("nurse", 7.5, "b", False), _slotted("nurse", 7.5, "b", True), _slotted("nurse", 7.5, "b", True),
        _slotted("nurse", 7.5, None, False),  # no label: not counted
        _slotted("nurse", 1.0, "a", True), _slotted("nurse", 1.0, "b", False),  # b at guidance 1: no cell
        _slotted("judge", 7.5, "a", False, heldout=True),  # no reference cell for judges
    ]
    out = expected_low_confidence(run, ref, "reader", "judge", "tone", "tone")
    assert out == {("train", 7.5): Expected(low=2, expected=2 * 0.5 + 3 * 0.25, matched=5, unmatched=0),
                   ("train", 1.0): Expected(low=0, expected=0.0, matched=1, unmatched=1),
                   ("heldout", 7.5): Expected(low=0, expected=0.0, matched=0, unmatched=1)}
    pooled = expected_low_confidence(run, ref, "reader", "judge", "tone", "tone", by_split=False)
    assert pooled[("all", 7.5)] == Expected(low=2, expected=1.75, matched=5, unmatched=1)
    # the reference against itself at one scale: a cell per class asked; every image read as asked but one
    assert expected_low_confidence(ref[:2], ref, "reader", "judge", "tone", "tone")[("train", 7.5)] == \
        Expected(low=1, expected=0.5 + 0.25, matched=2, unmatched=0)
    with pytest.raises(SuiteError, match="no slot 'tone'"):
        expected_low_confidence(run, run, "reader", "judge", "tone", "tone")


def test_majority_and_low_confidence_counts_by_hand() -> None:
    recs = [
        _rec("p", 1.0, "b", True), _rec("p", 1.0, "a", False), _rec("p", 3.0, "a", True),
        _rec("p", 3.0, "b", False), _rec("p", 3.0, None, False),  # no person: in no group
        _rec("q", 1.0, "c", False, heldout=True), _rec("q", 3.0, "d", True, heldout=True),  # tie c/d: c first
        _rec("q", 3.0, "c", True, heldout=True, status="no_person"),  # the judge sees nobody: left out
    ]
    majority = majority_classes(recs, "reader", "tone", ("b", "a", "c", "d"))
    assert majority == {"p": "b", "q": "c"}  # p: b and a twice each, b first in class order
    # the tie goes by class order, not by the order the records come in
    assert majority_classes(recs, "reader", "tone", ("a", "b", "c", "d")) == {"p": "a", "q": "c"}
    assert majority_classes(recs[::-1], "reader", "tone", ("b", "a", "c", "d")) == majority
    by_split = low_confidence_by_group(recs, majority, "reader", "judge", "tone")
    assert by_split == {
        ("train", 1.0, "majority"): (0, 1), ("train", 1.0, "other"): (1, 1),
        ("train", 3.0, "majority"): (1, 1), ("train", 3.0, "other"): (0, 1),
        ("heldout", 1.0, "majority"): (1, 1), ("heldout", 3.0, "other"): (0, 1),
    }
    pooled = low_confidence_by_group(recs, majority, "reader", "judge", "tone", by_split=False)
    assert pooled == {("all", 1.0, "majority"): (1, 2), ("all", 1.0, "other"): (1, 1),
                      ("all", 3.0, "majority"): (1, 1), ("all", 3.0, "other"): (0, 2)}
    assert low_confidence_by_group(recs, {}, "reader", "judge", "tone") == {}  # no majority, no group


def test_a_record_without_an_entry_counts_as_not_measurable() -> None:
    """As in evalsuite.analysis: a missing classifier entry is "not_measurable", so the image is skipped."""
    recs = [_rec("p", 1.0, "a", True), _rec("p", 1.0, "a", False), _rec("p", 1.0, "b", False)]
    no_reader, no_judge, no_classifiers = (_rec("p", 1.0, "b", False) for _ in range(3))
    del no_reader["classifiers"]["reader"]["tone"]
    del no_judge["classifiers"]["judge"]
    del no_classifiers["classifiers"]
    recs += [no_reader, no_judge, no_classifiers]
    # the reader labels a, a, b, then b once more (no_judge): a and b twice each, a first in class order
    majority = majority_classes(recs, "reader", "tone", ("a", "b"))
    assert majority == {"p": "a"}
    # counted: the three complete records only (no_judge has a label, but the judge has no entry)
    assert low_confidence_by_group(recs, majority, "reader", "judge", "tone") == {
        ("train", 1.0, "majority"): (1, 2), ("train", 1.0, "other"): (1, 1)}
    ref = [_slotted("p", 1.0, "a", False, tone="a"), _slotted("p", 1.0, "a", True, tone="a")]
    del ref[1]["classifiers"]["judge"]  # not in its cell: the cell's rate is 1/1
    run = [_slotted("p", 1.0, "a", True), _slotted("p", 1.0, "a", True)]
    del run[1]["classifiers"]["reader"]
    assert expected_low_confidence(run, ref, "reader", "judge", "tone", "tone") == {
        ("train", 1.0): Expected(low=0, expected=1.0, matched=1, unmatched=0)}


@pytest.mark.slow
def test_comparison_page_shows_legibility_by_group(tmp_path: Path) -> None:
    runs = []
    for name, boost in (("base", 0.0), ("tuned", 0.4)):
        run = make_run(tmp_path / "results", name, model_key=int(boost > 0), bias_boost=boost)
        info = json.loads((run / "run.json").read_text())
        info["primary_classifier"] = "oracle"  # groups by the truth; the noisy classifier is the judge
        (run / "run.json").write_text(json.dumps(info))
        runs.append(run)
    c = compare_runs(load_run(runs[0]), load_run(runs[1]))
    # every classifier judges, the reader too (the fixture's oracle is always sure: rate 0)
    assert c.classifier == "oracle" and set(c.legibility["judge"]) == {"miniature", "oracle"}
    assert (c.legibility[c.legibility["judge"] == "oracle"][["a", "b"]].fillna(0) == 0).all().all()  # NaN: empty
    assert set(c.legibility["attribute"]) == {"skin_tone", "age"}  # gender: no labels, no groups
    # recount one cell straight from the records: skin tone, guidance 3, majority and other, run B
    recs = [[json.loads(line) for line in (r / "records.jsonl").read_text().splitlines()] for r in runs]
    counts: dict[str, dict[str, int]] = {}
    for r in recs[0]:
        label = r["classifiers"]["oracle"]["skin_tone"]["label"]
        if label is not None:
            counts.setdefault(r["prompt"], {}).setdefault(label, 0)
            counts[r["prompt"]][label] += 1
    majority = {p: max(c, key=lambda k: (c[k], -list(c).index(k))) for p, c in counts.items()}
    for group in ("majority", "other"):
        row = c.legibility[(c.legibility["attribute"] == "skin_tone") & (c.legibility["guidance_scale"] == 3.0)
                           & (c.legibility["group"] == group)].iloc[0]
        prompts_seen = set()
        for side, run_recs in (("a", recs[0]), ("b", recs[1])):
            low = n = 0
            for r in run_recs:
                label = r["classifiers"]["oracle"]["skin_tone"]["label"]
                judged = r["classifiers"]["miniature"]["skin_tone"]
                if r["guidance_scale"] != 3.0 or label is None or judged["status"] != "ok":
                    continue
                if (label == majority[r["prompt"]]) == (group == "majority"):
                    n += 1
                    low += not judged["confident"]
                    prompts_seen.add(r["prompt"])
            assert row[f"{side}_n"] == n and abs(row[side] - low / n) < 1e-12, (side, group)
            assert row[f"{side}_lo"] <= row[side] <= row[f"{side}_hi"]
        assert row["n_prompts"] == len(prompts_seen)
    site = build_dashboard(runs, tmp_path / "site").parent
    page = (site / "compare.html").read_text()
    assert "Legibility by group" in page and "Low-confidence rate of miniature on skin_tone" in page


@pytest.mark.slow
def test_a_run_with_one_classifier_judges_its_own_legibility(tmp_path: Path) -> None:
    runs = [make_run(tmp_path / "results", name, model_key=k) for k, name in enumerate(("a", "b"))]
    for run in runs:
        lines = []
        for line in (run / "records.jsonl").read_text().splitlines():
            r = json.loads(line)
            del r["classifiers"]["oracle"]
            lines.append(json.dumps(r))
        (run / "records.jsonl").write_text("\n".join(lines) + "\n")
        info = json.loads((run / "run.json").read_text())
        info["classifiers"] = ["miniature"]
        (run / "run.json").write_text(json.dumps(info))
    shutil.rmtree(tmp_path / "site", ignore_errors=True)
    c = compare_runs(load_run(runs[0]), load_run(runs[1]))
    assert set(c.legibility["judge"]) == {"miniature"}  # the reader's own confidence, by group
    page = (build_dashboard(runs, tmp_path / "site").parent / "compare.html").read_text()
    assert "Legibility by group" in page and "Low-confidence rate of miniature" in page
