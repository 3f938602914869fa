"""Issue 21, hardening: bounded work, a full disk, a corrupt image on the dashboard, a torn records line,
two runs on one folder, and the smaller messages. Each test names the item it covers."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path
from typing import Any

import pytest
import torch
from cli_errors import expect_error
from fixtures_results import make_run

from evalsuite.battery import MAX_IMAGES, MAX_PROMPTS, MAX_SCALES, MAX_STEPS, battery_from_dict, load_battery
from evalsuite.cli import main
from evalsuite.errors import ConfigError
from evalsuite.miniature import ASSETS
from evalsuite.results import store
from evalsuite.runner import plan_units

torch.set_num_threads(2)
ROOT = Path(__file__).resolve().parents[1]
BATTERY = ROOT / "prompts" / "occupations.yaml"
SMALL = ["--limit-prompts", "3", "--images-per-prompt", "4", "--scales", "1,7.5", "--steps", "8", "--batch-size", "5"]
needs_world = pytest.mark.skipif(not (ASSETS / "pipeline").is_dir(), reason="the shipped miniature world is missing")


def run_cli(*args: str) -> int:
    return main(["-q", "run", str(BATTERY), *SMALL, *args])



def battery_with(tmp_path: Path, **changes: Any) -> Path:
    """The shipped battery file with some keys changed (YAML is a superset of JSON)."""
    data = load_battery(BATTERY).to_dict() | changes
    path = tmp_path / "changed.yaml"
    path.write_text(json.dumps(data))
    return path


@pytest.fixture(scope="module")
def whole(tmp_path_factory: pytest.TempPathFactory) -> str:
    """records.jsonl of the uninterrupted small run, which every resumed run must reproduce byte for byte."""
    if not (ASSETS / "pipeline").is_dir():
        pytest.skip("the shipped miniature world is missing")
    root = tmp_path_factory.mktemp("whole")
    assert run_cli("--results", str(root)) == 0
    return (root / "occupations__miniature" / "records.jsonl").read_text()


def interrupted(run: Path) -> None:
    """Mark a finished run as interrupted (status running), as a kill before its end leaves it."""
    info = json.loads((run / "run.json").read_text())
    (run / "run.json").write_text(json.dumps({**info, "status": "running"}))


# ---------------------------------------------------------------- item 1: an upper bound on work


@pytest.mark.parametrize(("changes", "needles"), [
    ({"images_per_prompt": 10**12}, ["images_per_prompt: must be an int in [1, 100000]", "1000000000000"]),
    ({"steps": MAX_STEPS + 1}, ["steps: must be an int in [1, 1000]"]),
    ({"guidance_scales": [1.0 + i for i in range(MAX_SCALES + 1)]}, ["guidance_scales: must list at most 64"]),
    ({"templates": ["a {a} {b}"], "slots": {"a": [f"a{i}" for i in range(400)], "b": [f"b{i}" for i in range(400)]},
      "heldout": {}, "test": {}}, ["templates: the templates expand over their slots to 160,000 prompts",
                                   "at most 100,000"]),
    ({"images_per_prompt": 100_000}, ["images_per_prompt: 44 prompts x 4 guidance scales x 100,000 images",
                                      "17,600,000 images", "at most 10,000,000"]),
])
def test_validate_refuses_a_battery_beyond_the_bounds(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                      changes: dict[str, Any], needles: list[str]) -> None:
    """Item 1: `validate` (and loading) refuses more work than the documented bounds, naming file and key."""
    path = battery_with(tmp_path, **changes)
    expect_error(capsys, main(["validate", str(path)]), "changed.yaml", *needles)
    with pytest.raises(ConfigError):
        load_battery(path)


@needs_world
def test_run_refuses_a_huge_override_before_anything_is_written(tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    """Item 1: the command-line override is held to the same bound, naming the option; nothing is written."""
    expect_error(capsys, run_cli("--images-per-prompt", str(10**12), "--results", str(tmp_path / "r")),
                 "--images-per-prompt: must be an int in [1, 100000]")
    assert not (tmp_path / "r").exists()


def test_the_bounds_are_documented() -> None:
    """Item 1: the shipped battery's header and the battery module's docstring state the bounds."""
    import evalsuite.battery as battery_module

    header = BATTERY.read_text().split("schema_version:", 1)[0]
    for text in (header, battery_module.__doc__ or ""):
        for bound in ("100000" if "100000" in text else "100 000", "1000", "64", "10000000" if "10000000" in text
                      else "10 000 000"):
            assert bound in text
    assert MAX_PROMPTS == 100_000 and MAX_IMAGES == 10_000_000


def test_the_plan_is_lazy_and_numbers_units_as_before() -> None:
    """Item 1: units come prompt-major, then scale, then image, in fixed batches, as an eager expansion
    numbers them (so existing folders resume); a battery at the bound plans in constant memory."""
    small = load_battery(BATTERY).with_overrides(limit_prompts=3, images_per_prompt=4, guidance_scales=[1, 7.5])
    plan = plan_units(small, 5)
    expected = [(pi, g, ii) for pi in range(3) for g in (1.0, 7.5) for ii in range(4)]
    units = [u for b in range(plan.n_batches) for u in plan.batch(b)]
    assert [(u.prompt_index, u.guidance_scale, u.image_index) for u in units] == expected
    assert [u.unit for u in units] == list(range(24)) and [len(plan.batch(b)) for b in range(5)] == [5, 5, 5, 5, 4]
    assert units[0].seed == units[4].seed != units[1].seed  # paired across scales
    big = load_battery(BATTERY).with_overrides(images_per_prompt=56_000)  # 44 x 4 x 56 000 = 9 856 000 units
    tracemalloc.start()
    plan = plan_units(big, 64)
    last = plan.batch(plan.n_batches - 1)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert plan.n_units == 9_856_000 and last[-1].unit == plan.n_units - 1 and last[-1].image_index == 55_999
    assert peak < 5_000_000, peak


# ---------------------------------------------------------------- item 2: a full disk


class DiskFull:
    """store's low-level file write, failing with ENOSPC after `after` writes (half the data written first,
    as a real full disk leaves it)."""

    def __init__(self, after: int) -> None:
        self.after, self.calls = after, 0
        self.real = store._write_file

    def __call__(self, path: Path, data: bytes) -> None:
        self.calls += 1
        if self.calls > self.after:
            with open(path, "wb") as fh:
                fh.write(data[:len(data) // 2])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        self.real(path, data)


@needs_world
@pytest.mark.parametrize("after", [7, 1000])  # an image half-way through the third batch; the tables at the end
def test_a_full_disk_stops_cleanly_and_the_resume_completes(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                            monkeypatch: pytest.MonkeyPatch, whole: str,
                                                            after: int) -> None:
    """Item 2: one message naming the file and the OS reason, no .tmp left, and a resume once there is
    space again writes the uninterrupted run's records."""
    disk = DiskFull(after)
    monkeypatch.setattr(store, "_write_file", disk)
    if after == 1000:  # the images and run.json fit; the first table does not
        monkeypatch.setattr(store.pd.DataFrame, "to_csv", lambda self, path, **kw: disk(Path(path), b"x" * 10))
        disk.after = 0
    err = expect_error(capsys, run_cli("--results", str(tmp_path)), "No space left on device", "cannot write",
                       "run the same command again")
    run = tmp_path / "occupations__miniature"
    assert str(run) in err
    assert not list(run.rglob("*.tmp"))
    assert not (run / ".lock").exists()
    monkeypatch.undo()
    assert run_cli("--results", str(tmp_path)) == 0
    assert (run / "records.jsonl").read_text() == whole


@needs_world
def test_a_full_disk_during_a_record_append_leaves_no_partial_line(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                                   monkeypatch: pytest.MonkeyPatch, whole: str) -> None:
    """Item 2: an append that fails is cut back, so the shard holds whole batches only."""
    real_fsync, calls = os.fsync, []

    def fsync(fd: int) -> None:
        calls.append(fd)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(fd)

    monkeypatch.setattr(store.os, "fsync", fsync)
    expect_error(capsys, run_cli("--results", str(tmp_path)), "records.rank0.jsonl", "No space left on device")
    run = tmp_path / "occupations__miniature"
    assert (run / "records.rank0.jsonl").read_text() == "".join(whole.splitlines(keepends=True)[:5])
    monkeypatch.undo()
    assert run_cli("--results", str(tmp_path)) == 0
    assert (run / "records.jsonl").read_text() == whole


# ---------------------------------------------------------------- item 3: a corrupt image on the dashboard


def test_the_dashboard_names_a_corrupt_image_and_its_record(tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    """Item 3: one message naming the image file and its record, and how to regenerate it."""
    run = make_run(tmp_path / "results", "base")
    first = json.loads((run / "records.jsonl").read_text().splitlines()[0])
    (run / first["image"]).write_bytes(b"\x89PNG not really")
    err = expect_error(capsys, main(["dashboard", str(run), "--out", str(tmp_path / "site")]),
                       str(run / first["image"]), f"record unit {first['unit']}", "records.jsonl", "evalsuite run")
    assert "UnidentifiedImageError" not in err
    assert not (tmp_path / "site").exists()


# ---------------------------------------------------------------- item 4: a torn last line


@needs_world
@pytest.mark.parametrize("where", ["records.jsonl", "records.rank0.jsonl"])
def test_one_rerun_repairs_a_torn_last_line(tmp_path: Path, whole: str, where: str) -> None:
    """Item 4: records.jsonl (or a shard) cut mid-line: one rerun gives the uninterrupted records. Before,
    a torn records.jsonl was never repaired: its torn batch was made again into a shard beside its other
    records, and the merge found them twice ("damaged") until a second rerun's repair dropped them."""
    assert run_cli("--results", str(tmp_path)) == 0
    run = tmp_path / "occupations__miniature"
    lines = whole.splitlines(keepends=True)
    (run / "records.jsonl").unlink()
    (run / where).write_text("".join(lines[:-3]) + lines[-3][:40])  # the last batch (units 20-23) torn at 21
    interrupted(run)
    assert run_cli("--results", str(tmp_path)) == 0
    assert (run / "records.jsonl").read_text() == whole
    assert not list(run.glob("records.rank*.jsonl"))


# ---------------------------------------------------------------- item 5: two runs on one folder


HOLD = """
import sys, time
from pathlib import Path
from evalsuite.locks import folder_lock
folder = Path(sys.argv[1]); folder.mkdir(parents=True, exist_ok=True)
with folder_lock(folder, "evalsuite run"):
    print("locked", flush=True)
    time.sleep(120)
"""


def hold_lock(folder: Path) -> subprocess.Popen[str]:
    """A child process that holds `folder`'s lock (as a running `evalsuite run` does)."""
    child = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    assert child.stdout is not None and child.stdout.readline().strip() == "locked"
    return child


@needs_world
@pytest.mark.parametrize("started", [True, False])
def test_a_second_run_on_a_locked_folder_is_refused_before_loading(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                                   monkeypatch: pytest.MonkeyPatch, whole: str,
                                                                   started: bool) -> None:
    """Item 5: while another run holds the folder (one that has written its run.json, or one that has only
    just created the folder), a run is refused with the holder's pid before its model loads; afterwards it
    runs, and the folder is left as it was."""
    from evalsuite import models

    run = tmp_path / "occupations__miniature"
    if started:
        assert run_cli("--results", str(tmp_path)) == 0
        interrupted(run)
    child = hold_lock(run)
    try:
        monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("the model loaded"))
        before = sorted((p.name, p.stat().st_mtime_ns) for p in run.rglob("*"))
        expect_error(capsys, run_cli("--results", str(tmp_path)), str(run), "another evalsuite run is writing here",
                     f"process {child.pid}")
        assert sorted((p.name, p.stat().st_mtime_ns) for p in run.rglob("*")) == before
    finally:
        child.kill()
        child.wait()
    monkeypatch.undo()
    assert run_cli("--results", str(tmp_path)) == 0  # the holder is gone: its lock is stale
    assert (run / "records.jsonl").read_text() == whole and not (run / ".lock").exists()


@pytest.mark.slow
@needs_world
def test_two_real_runs_on_one_folder(tmp_path: Path, whole: str) -> None:
    """Item 5, with two real processes started together: one makes the run; the other is refused with the
    first one's pid, or, if the first was done by then, resumes the finished run. Never "damaged"."""
    cmd = [sys.executable, "-m", "evalsuite.cli", "-q", "run", str(BATTERY), *SMALL, "--results", str(tmp_path)]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)]
    time.sleep(0.5)
    procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT))
    results = [(p.wait(timeout=300), p.communicate()[1]) for p in procs]
    assert 0 in [code for code, _ in results], results
    for (code, err), other in zip(results, (procs[1].pid, procs[0].pid), strict=True):
        assert code == 0 or (code == 2 and f"another evalsuite run is writing here: process {other}" in err), err
    assert (tmp_path / "occupations__miniature" / "records.jsonl").read_text() == whole


@pytest.mark.slow
@pytest.mark.multiprocess
@needs_world
def test_a_refused_lock_ends_every_process_of_a_launch(tmp_path: Path) -> None:
    """Item 5 under `accelerate launch`: the main process finds the folder locked, and every process ends
    with the refusal (none waits for the others forever)."""
    run = tmp_path / "occupations__miniature"
    child = hold_lock(run)
    try:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "evalsuite.cli",
               "-q", "run", str(BATTERY), *SMALL, "--results", str(tmp_path)]
        done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=240,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
    finally:
        child.kill()
        child.wait()
    assert done.returncode != 0
    assert f"another evalsuite run is writing here: process {child.pid}" in done.stderr, done.stderr[-3000:]
    assert [p.name for p in run.iterdir()] == [".lock"]  # the killed holder's, stale now; nothing else


# ---------------------------------------------------------------- item 6: smaller things


def test_publish_on_an_unfinished_run_names_the_run_command(tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    """Item 6: an unfinished run is refused by publish naming `evalsuite run`, not another command."""
    run = make_run(tmp_path / "results", "base")
    interrupted(run)
    err = expect_error(capsys, main(["publish", str(run), "--out", str(tmp_path / "ds")]),
                       "not complete", "evalsuite run")
    assert "dashboard" not in err and not (tmp_path / "ds").exists()


def test_push_to_hub_checks_the_repo_id_before_writing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Item 6: a malformed --push-to-hub id is refused before the dataset is written."""
    run = make_run(tmp_path / "results", "base")
    expect_error(capsys, main(["publish", str(run), "--out", str(tmp_path / "ds"), "--push-to-hub", "me/my data/x"]),
                 "--push-to-hub", "'me/my data/x'", "not a Hub repo id")
    assert not (tmp_path / "ds").exists()


@needs_world
def test_a_model_that_fails_to_load_leaves_no_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Item 6: nothing is created before the model loads (before: an empty results folder stayed)."""
    from evalsuite import models
    from evalsuite.errors import SuiteError

    def fail(*args: Any, **kwargs: Any) -> None:
        raise SuiteError("cannot load the model (test)")

    monkeypatch.setattr(models, "load_model", fail)
    expect_error(capsys, run_cli("--results", str(tmp_path / "results" / "deeper")), "cannot load the model")
    assert not (tmp_path / "results").exists()


@needs_world
def test_the_resume_refusal_names_the_keys_that_differ(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Item 6: "another configuration" says which keys differ, with both values."""
    assert run_cli("--results", str(tmp_path), "--limit-prompts", "1", "--scales", "1") == 0
    expect_error(capsys, run_cli("--results", str(tmp_path), "--limit-prompts", "1", "--scales", "1",
                                 "--images-per-prompt", "3", "--batch-size", "2"),
                 "holds a run with another configuration", "battery.images_per_prompt: 4 in the folder, 3 now",
                 "batch_size: 5 in the folder, 2 now")


def test_the_bound_on_the_total_names_the_product() -> None:
    """Item 1: the total is checked from the fields (a dict battery, as run.json holds one)."""
    data = load_battery(BATTERY).to_dict() | {"images_per_prompt": 60_000}
    with pytest.raises(ConfigError, match="10,560,000 images"):
        battery_from_dict(data, "inline")
