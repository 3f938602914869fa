"""Issue 21, "Hardening": safetensors-only weights, the `rl finetune` output folder (refusals, marker, lock),
comparable runs in `rl compare`, config paths relative to the config file, and byte-stable adapter files.

Items: 1 pickled adapters (`test_a_pickled_adapter_*`, `test_load_adapter_*`); 2 an output_dir that is a
file or cannot be written (`test_an_output_dir_that_*`); 3 a folder rl did not write, the lock and the
marker (`test_a_folder_rl_did_not_write_*`, `test_a_locked_*`, `test_claim_*`, `test_two_processes_*`);
4 `rl compare` (`test_rl_compare_*`); 5 config paths (`test_*config*_from_another_directory*`,
`test_a_battery_*`); 6 safetensors bytes (`test_*_byte_identical*`).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from fixtures_results import make_run
from safetensors import safe_open
from safetensors.torch import load_file

import evalsuite.models
from evalsuite.cli import main as evalsuite_main
from evalsuite.errors import ConfigError, SuiteError
from evalsuite.locks import LOCK_NAME
from evalsuite.miniature import ASSETS
from rl.cli import main as rl_main
from rl.config import load_config
from rl.lora import DIFFUSERS_WEIGHTS, add_lora, canonical_safetensors, save_adapter, save_safetensors
from rl.output import MARKER, claim_output, output_problem

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "rl" / "configs" / "miniature.yaml"
BATTERY = ROOT / "prompts" / "occupations.yaml"
SMALL = ["--limit-prompts", "2", "--images-per-prompt", "2", "--scales", "1,7.5", "--steps", "2"]
miniature = pytest.mark.skipif(not (ASSETS / "pipeline").is_dir(), reason="the shipped miniature world is missing")


def _error(capsys: pytest.CaptureFixture[str], prefix: str = "rl: error:") -> str:
    err = capsys.readouterr().err
    assert err.startswith(prefix) and "Traceback" not in err, err
    return err


# ---------------------------------------------------------------- 1. weights load from safetensors only


@pytest.fixture(scope="module")
def pickled_adapter(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A working LoRA adapter of the miniature model, re-saved with torch.save as pytorch_lora_weights.bin
    (diffusers would load it by unpickling when not told to use safetensors)."""
    from evalsuite.models import load_model

    root = tmp_path_factory.mktemp("adapters")
    pipe = load_model("miniature").pipe
    params = add_lora(pipe.unet, 2, 2.0, ["to_q", "to_v"])
    with torch.no_grad():
        for p in params:
            p.add_(0.1)
    good = save_adapter(pipe, root / "good", metadata={})["diffusers"]
    bad = root / "pickled"
    bad.mkdir()
    torch.save(load_file(str(good)), bad / "pytorch_lora_weights.bin")
    return bad


@miniature
def test_a_pickled_adapter_is_refused_by_evalsuite_run(pickled_adapter: Path, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    code = evalsuite_main(["-q", "run", str(BATTERY), *SMALL, "--lora", str(pickled_adapter),
                           "--results", str(tmp_path / "r")])
    assert code == 2
    err = _error(capsys, "evalsuite: error:")
    assert "pytorch_lora_weights.bin" in err and "safetensors only" in err and str(pickled_adapter) in err
    assert not (tmp_path / "r").exists()  # refused before anything is written
    single = pickled_adapter / "pytorch_lora_weights.bin"  # the file itself, as a kohya-style --lora
    assert evalsuite_main(["-q", "run", str(BATTERY), *SMALL, "--lora", str(single),
                           "--results", str(tmp_path / "r")]) == 2
    assert "is pickled weights" in _error(capsys, "evalsuite: error:") and not (tmp_path / "r").exists()


@miniature
def test_a_pickled_adapter_is_refused_by_rl_kl_profile(pickled_adapter: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    assert rl_main(["kl-profile", str(pickled_adapter), "--images", "1", "--steps", "2"]) == 2
    err = _error(capsys)
    assert "pytorch_lora_weights.bin" in err and "no .safetensors file" in err and err.count("\n") == 1


@miniature
def test_load_adapter_asks_diffusers_for_safetensors_only(pickled_adapter: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Past the up-front check too: diffusers is told to use safetensors, so it never unpickles."""
    from evalsuite.models import load_adapter, load_model

    pipe = load_model("miniature").pipe
    monkeypatch.setattr(evalsuite.models, "adapter_weight_problems", lambda lora: [])
    with pytest.raises(SuiteError, match="could not load adapter"):
        load_adapter(pipe, str(pickled_adapter))


def test_an_adapter_folder_without_weights_is_named(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("no weights")
    assert evalsuite.models.adapter_weight_problems(str(tmp_path)) == [
        f"--lora: adapter folder '{tmp_path}' holds no .safetensors weights file at its top level"]
    (tmp_path / "w.safetensors").write_bytes(b"")
    assert evalsuite.models.adapter_weight_problems(str(tmp_path)) == []


# ---------------------------------------------------------------- 2 and 3. the output folder of rl finetune


TOY = ["training.epochs=1", "sampling.steps=2", "sampling.prompts_per_epoch=1", "sampling.group_size=4",
       "sampling.batch_size=4", "training.batch_size=4"]  # were a refusal to fail, the run would be short


def finetune(out: Path | str, *extra: str) -> int:
    return rl_main(["-q", "finetune", "--config", str(CONFIG), "--no-eval", f"output_dir={out}", *TOY, *extra])


@miniature
def test_an_output_dir_that_is_a_file_or_cannot_be_made_is_one_message(tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    afile = tmp_path / "afile"
    afile.write_text("mine")
    assert finetune(afile) == 2
    assert f"output_dir: '{afile}' exists and is a file, not a folder" in _error(capsys)
    assert finetune(afile / "sub") == 2
    assert f"output_dir: cannot create the folder '{afile / 'sub'}' (Not a directory)" in _error(capsys)
    assert afile.read_text() == "mine"


@miniature
def test_an_output_dir_that_cannot_be_written_is_one_message(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    """A read-only place (simulated: these tests may run as root, who may write anywhere)."""
    real = Path.mkdir

    def refuse(self: Path, *args: object, **kwargs: object) -> None:
        if self == tmp_path / "ro" / "run":
            raise PermissionError(13, "Permission denied", str(self))
        real(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(Path, "mkdir", refuse)
    assert finetune(tmp_path / "ro" / "run") == 2
    err = _error(capsys)
    assert f"output_dir: cannot create the folder '{tmp_path / 'ro' / 'run'}' (Permission denied)" in err


@miniature
def test_a_folder_rl_did_not_write_is_refused_and_left_alone(tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "config.json").write_text('{"user": "settings"}')
    assert finetune(mine) == 2
    err = _error(capsys)
    assert f"output_dir: '{mine}' is a folder that rl finetune did not write (it holds config.json" in err
    assert sorted(p.name for p in mine.iterdir()) == ["config.json"]
    assert (mine / "config.json").read_text() == '{"user": "settings"}'


@miniature
def test_a_locked_output_folder_names_the_other_training(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / MARKER).write_text('{"tool": "rl finetune", "format": 1}\n')
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        (out / LOCK_NAME).write_text(json.dumps({"pid": other.pid, "host": socket.gethostname(),
                                                 "started": "2026-01-01T00:00:00Z"}))
        assert finetune(out) == 2
        err = _error(capsys)
        assert f"another rl finetune is writing here: process {other.pid}" in err
        assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME, MARKER]
    finally:
        other.kill()
        other.wait()


def test_claim_marks_locks_and_takes_back_an_unused_new_folder(tmp_path: Path) -> None:
    out = tmp_path / "new" / "run"
    with contextlib.ExitStack() as stack:
        claim_output(out, stack)
        assert json.loads((out / MARKER).read_text())["tool"] == "rl finetune"
        assert json.loads((out / LOCK_NAME).read_text())["pid"] == os.getpid()
        with contextlib.ExitStack() as again, pytest.raises(SuiteError, match="another rl finetune"):
            lock = json.loads((out / LOCK_NAME).read_text())
            (out / LOCK_NAME).write_text(json.dumps({**lock, "pid": os.getppid()}))  # as if held by another
            claim_output(out, again)
        (out / LOCK_NAME).write_text(json.dumps(lock))
    assert not out.exists()  # created here and nothing written but the marker: removed again
    with contextlib.ExitStack() as stack:
        claim_output(out, stack)
        (out / "log.jsonl").write_text("")
    assert sorted(p.name for p in out.iterdir()) == ["log.jsonl", MARKER]  # kept, unlocked
    assert output_problem(out) is None


def test_an_rl_folder_from_before_the_marker_is_recognised(tmp_path: Path) -> None:
    old = tmp_path / "old"
    (old / "checkpoints").mkdir(parents=True)
    keys = ("model", "battery", "output_dir", "seed", "sampling", "training", "lora", "rewards")
    (old / "config.json").write_text(json.dumps({k: {} for k in keys}))
    assert output_problem(old) is None
    (old / "checkpoints").rmdir()
    assert "did not write" in str(output_problem(old))
    assert output_problem(tmp_path / "nothing-yet") is None and output_problem(tmp_path / "empty") is None


@miniature
@pytest.mark.multiprocess
def test_two_processes_both_end_on_a_refused_output_folder(tmp_path: Path) -> None:
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "rl.cli", "-q",
           "finetune", "--config", str(CONFIG), "--no-eval", f"output_dir={mine}", *TOY]
    start = time.monotonic()
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                          cwd=tmp_path, timeout=300)
    assert done.returncode != 0 and time.monotonic() - start < 300
    assert done.stderr.count("is a folder that rl finetune did not write") == 2, done.stderr[-3000:]
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"]


# ---------------------------------------------------------------- 4. rl compare: comparable runs only


def test_rl_compare_refuses_runs_that_differ_and_compares_their_overlap_on_request(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = make_run(tmp_path, "base", scales=(1.0, 3.0, 7.5), images=4)
    tuned = make_run(tmp_path, "tuned", scales=(1.0, 7.5), images=3, model_key=1, version="2.0")
    assert rl_main(["compare", str(base), str(tuned)]) == 2
    err = _error(capsys)
    assert f"{base} and {tuned} are not comparable runs" in err
    for difference in ("battery.version: '1.0' vs '2.0'", "images_per_prompt: 4 vs 3",
                       "guidance_scales: [1.0, 3.0, 7.5] vs [1.0, 7.5]", "add --overlap"):
        assert difference in err
    assert rl_main(["compare", str(base), str(tuned), "--overlap"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("Compared on their overlap (--overlap): 18 images of each run")  # 3 prompts x 2 x 3
    assert "guidance scales 1, 7.5" in out and "images_per_prompt: 4 vs 3" in out
    assert "| heldout | 7.5 |" in out and "| heldout | 3 |" not in out


def test_rl_compare_of_comparable_runs_says_nothing_more(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = make_run(tmp_path, "base", images=3)
    tuned = make_run(tmp_path, "tuned", images=3, model_key=1)
    assert rl_main(["compare", str(base), str(tuned)]) == 0
    assert capsys.readouterr().out.startswith("Base -> tuned.")


def test_rl_compare_names_a_missing_attribute_once(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = make_run(tmp_path, "base", images=2)
    tuned = make_run(tmp_path, "tuned", images=2, model_key=1)
    assert rl_main(["compare", str(base), str(tuned), "--attribute", "nosuch"]) == 2
    err = _error(capsys)
    assert err.count("no attribute 'nosuch'") == 1 and f"{base}, {tuned}: no attribute 'nosuch'" in err
    assert "allowed: age, gender, skin_tone" in err


# ---------------------------------------------------------------- 5. config paths


@pytest.mark.parametrize("name", ["miniature.yaml", "sd15.yaml"])
def test_the_shipped_config_loads_from_another_directory(name: str, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    cfg = load_config(ROOT / "rl" / "configs" / name)
    assert Path(cfg.battery).is_absolute() and Path(cfg.battery).is_file()
    assert Path(cfg.battery) == BATTERY
    assert cfg.output_dir.startswith("results/rl/")  # relative to the working directory, as written


def test_a_battery_is_read_relative_to_the_config_file_and_an_override_to_the_working_directory(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = yaml.safe_load(CONFIG.read_text())
    (tmp_path / "configs").mkdir()
    (tmp_path / "prompts").mkdir()
    (tmp_path / "prompts" / "mine.yaml").write_text(BATTERY.read_text())
    config = tmp_path / "configs" / "mine.yaml"
    config.write_text(yaml.safe_dump({**data, "battery": "../prompts/mine.yaml"}))
    monkeypatch.chdir(ROOT)
    assert load_config(config).battery == str(tmp_path / "prompts" / "mine.yaml")
    monkeypatch.chdir(tmp_path)
    assert load_config(config, ["battery=prompts/mine.yaml"]).battery == str(tmp_path / "prompts" / "mine.yaml")
    # written relative to the working directory, as before: one problem naming both paths
    config.write_text(yaml.safe_dump({**data, "battery": "prompts/mine.yaml"}))
    with pytest.raises(ConfigError) as excinfo:
        load_config(config)
    [problem] = excinfo.value.problems
    assert problem.startswith(f"battery: 'prompts/mine.yaml': no such file '{tmp_path / 'configs' / 'prompts'}")
    assert f"'{tmp_path / 'prompts' / 'mine.yaml'}' exists relative to the working directory" in problem
    assert "write '../prompts/mine.yaml'" in problem


# ---------------------------------------------------------------- 6. the same adapter, the same bytes


def test_safetensors_files_are_byte_identical_whatever_the_metadata_order(tmp_path: Path) -> None:
    tensors = {"b": torch.ones(3), "a": torch.zeros(2), "c": torch.ones(2, dtype=torch.float16)}
    items = [(f"key{i}", str(i)) for i in range(12)]
    written = []
    for i in range(4):
        random.Random(i).shuffle(items)
        save_safetensors(tensors, tmp_path / f"{i}.safetensors", metadata=dict(items))
        written.append((tmp_path / f"{i}.safetensors").read_bytes())
    assert all(data == written[0] for data in written)
    assert canonical_safetensors(written[0]) == written[0]
    with safe_open(str(tmp_path / "0.safetensors"), "pt") as f:
        assert f.metadata() == dict(items) and torch.equal(f.get_tensor("b"), tensors["b"])


def test_two_exports_of_one_adapter_are_byte_identical(tmp_path: Path) -> None:
    from tiny_pipeline import tiny_sd_pipeline

    pipe = tiny_sd_pipeline(tmp_path / "base")
    add_lora(pipe.unet, 2, 2.0, ["to_q", "to_v"])
    meta = {f"key{i}": i for i in range(6)} | {"base_model": "tiny"}
    first = save_adapter(pipe, tmp_path / "a", metadata=meta, name="x")
    second = save_adapter(pipe, tmp_path / "b", metadata=dict(reversed(meta.items())), name="x")
    for key in ("diffusers", "info", "kohya"):
        assert first[key].read_bytes() == second[key].read_bytes(), key
    assert (tmp_path / "a" / DIFFUSERS_WEIGHTS).read_bytes() == canonical_safetensors(
        (tmp_path / "a" / DIFFUSERS_WEIGHTS).read_bytes())
