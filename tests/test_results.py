"""The results package: the format's rules (entries, labels, the dominant class), version handling, the
one reader and the table writer, on hand-built records and fixture folders."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from fixtures_results import make_run

from evalsuite.analysis import diversity_metrics
from evalsuite.errors import SuiteError
from evalsuite.results import classifier_entry, dominant_class, entry, label, open_run
from evalsuite.results.schema import NOT_MEASURABLE, SCHEMA_VERSION, upgrade_record
from evalsuite.results.store import check_run_folder, write_tables


@pytest.fixture(scope="module")
def v1_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A version-1 folder (as evalsuite wrote them before 2026-12): its records carry `oracle_hat`."""
    run = make_run(tmp_path_factory.mktemp("results"), "v1", values=("doctor", "nurse"), scales=(1.0, 7.5), images=4)
    lines = (run / "records.jsonl").read_text().splitlines()
    hats = ["cap", "none", None, "cap"] * (len(lines) // 4)
    out = []
    for line, hat in zip(lines, hats, strict=True):
        rec = json.loads(line)
        rec["oracle_hat"] = {"read": hat, "wanted": "cap"}
        out.append(json.dumps(rec))
    (run / "records.jsonl").write_text("\n".join(out) + "\n")
    return run


def test_a_version_1_folder_reads_with_its_records_upgraded(v1_run: Path) -> None:
    view = open_run(v1_run)
    assert view.version == 1 and view.info["schema_version"] == 1
    first = view.records[0]
    assert "oracle_hat" not in first and first["on_prompt"] == {"read": "cap", "wanted": "cap"}
    # the analysis reads the upgraded records: cap, none, None, cap of 4 -> on-prompt 2 of 4
    rows = diversity_metrics(view.records)
    on = rows[(rows.metric == "on_prompt_rate")]
    assert len(on) == 4 and set(on.value) == {0.5} and set(on.n) == {4}
    assert upgrade_record({"oracle_hat": {"read": "cap", "wanted": "cap"}}, SCHEMA_VERSION) == \
        {"oracle_hat": {"read": "cap", "wanted": "cap"}}  # only version 1 is renamed


def test_a_version_this_evalsuite_does_not_read_is_refused_naming_it(v1_run: Path, tmp_path: Path) -> None:
    run = tmp_path / "future"
    shutil.copytree(v1_run, run)
    info = json.loads((run / "run.json").read_text())
    (run / "run.json").write_text(json.dumps({**info, "schema_version": 7}))
    with pytest.raises(SuiteError, match=r"results format version 7 is not one this evalsuite reads \(1, 2\)"):
        open_run(run)


def test_resuming_into_a_folder_of_another_version_is_refused(tmp_path: Path) -> None:
    run = tmp_path / "old"
    run.mkdir()
    (run / "run.json").write_text(json.dumps({"schema_version": 1, "fingerprint": "abc", "status": "running"}))
    with pytest.raises(SuiteError, match="results format version 1; this evalsuite writes version 2"):
        check_run_folder(run, "abc", overwrite=False)
    check_run_folder(run, "abc", overwrite=True)  # --overwrite starts it afresh
    with pytest.raises(SuiteError, match="another configuration"):
        check_run_folder(run, "xyz", overwrite=False)


def test_records_are_streamed_and_a_bad_line_names_its_number(v1_run: Path, tmp_path: Path) -> None:
    run = tmp_path / "damaged"
    shutil.copytree(v1_run, run)
    with open(run / "records.jsonl", "a") as fh:
        fh.write('{"prompt": "cut off mid-wr\n')
    view = open_run(run)  # tables and run.json are checked at once; records when read
    stream = view.iter_records()
    assert next(stream)["unit"] == 0  # the first record comes before the damaged last line is read
    with pytest.raises(SuiteError, match=r"records.jsonl, line 17: malformed JSON"):
        list(stream)


def test_the_entry_and_label_rules() -> None:
    ok = classifier_entry([0.1, 0.85, 0.05], "ok", ("light", "tan", "dark"))
    assert ok == {"probs": [0.1, 0.85, 0.05], "label": "tan", "status": "ok", "confident": True}
    tie = classifier_entry([0.4, 0.4, 0.2], "ok", ("light", "tan", "dark"))
    assert tie["label"] == "light" and tie["confident"] is False  # a tie goes to the first class
    assert classifier_entry([0.2, 0.8], "ok", ("young", "old"))["confident"] is True  # 0.8 is confident
    assert classifier_entry([0.3, 0.7], "no_person", ("young", "old")) == \
        {"probs": None, "label": None, "status": "no_person", "confident": False}
    record = {"unit": 3, "classifiers": {"c": {"tone": ok, "age": classifier_entry([0.9, 0.1], "ok", ("young", "old"))},
                                         "d": {"tone": {"status": "maybe"}}}}
    assert entry(record, "c", "tone").label == "tan" and entry(record, "c", "tone").top == 0.85
    assert entry(record, "c", "gender") == NOT_MEASURABLE and entry(record, "x", "tone") == NOT_MEASURABLE
    assert label(record, "c", "tone×age") == "tan×young" and label(record, "c", "tone×gender") is None
    with pytest.raises(SuiteError, match="record unit 3: d/tone has unknown status 'maybe'"):
        entry(record, "d", "tone")


def test_the_dominant_class_rule() -> None:
    assert dominant_class([2, 3, 3]) == 1  # the largest count, the first in class order on ties
    assert dominant_class([0.25, 0.25, 0.5]) == 2
    assert dominant_class([float("nan"), 1.0]) == 1 and dominant_class([0, 0]) is None
    assert dominant_class([float("nan")] * 3) is None and dominant_class([]) is None


def test_tables_are_written_with_the_schema_columns_only(tmp_path: Path) -> None:
    good = pd.DataFrame([[0, "p", False, 7.5, "vendi", 1.5, math.nan, math.nan, 4]],
                        columns=["prompt_index", "prompt", "heldout", "guidance_scale", "metric", "value", "lo", "hi",
                                 "n"])
    paths = write_tables(tmp_path, {"diversity": good})
    assert paths["diversity.csv"].read_text().splitlines()[1] == "0,p,False,7.5,vendi,1.5,NaN,NaN,4"
    back = pd.read_parquet(paths["diversity.parquet"])
    assert back["heldout"].dtype == bool and np.isnan(back["lo"][0])
    with pytest.raises(ValueError, match="not one of the results tables"):
        write_tables(tmp_path, {"diversity": good.drop(columns=["n"])})
