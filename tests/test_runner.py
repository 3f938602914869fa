"""The battery runner on the shipped miniature model: paired seeds, equality with plain diffusers,
results, resume after SIGKILL, and bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from cli_errors import expect_error

from evalsuite.cli import main
from evalsuite.errors import SuiteError
from evalsuite.generate import BatchedGenerator, initial_noise, unit_seed
from evalsuite.miniature import ASSETS, OCCUPATIONS

torch.set_num_threads(2)
ROOT = Path(__file__).resolve().parents[1]
BATTERY = ROOT / "prompts" / "occupations.yaml"
pytestmark = pytest.mark.skipif(not (ASSETS / "pipeline").is_dir(), reason="the shipped miniature world is missing")
SMALL = ["--limit-prompts", "3", "--images-per-prompt", "4", "--scales", "1,7.5", "--steps", "8"]


def run_cli(*args: str) -> int:
    return main(["-q", "run", str(BATTERY), *args])


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "records.jsonl").read_text().splitlines()]


def test_seeds_are_paired_across_scales_and_models() -> None:
    assert unit_seed("occupations", "a photo of a nurse", 3) == unit_seed("occupations", "a photo of a nurse", 3)
    assert unit_seed("occupations", "a photo of a nurse", 3) != unit_seed("occupations", "a photo of a nurse", 4)
    a = initial_noise([11, 12], (4, 8, 8))
    assert torch.equal(a[1], initial_noise([12], (4, 8, 8))[0])


def test_a_dtype_reaches_every_component_without_deprecation_warnings() -> None:
    import warnings

    from evalsuite.models import load_model

    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # diffusers >= 0.40 warns on `torch_dtype`
        pipe = load_model("miniature", dtype="bfloat16").pipe
    assert {pipe.unet.dtype, pipe.text_encoder.dtype, pipe.vae.dtype} == {torch.bfloat16}


def test_batched_generation_equals_plain_diffusers() -> None:
    """A batch mixing prompts and scales gives the images of one plain pipeline call per (prompt, scale)."""
    from evalsuite.models import load_model

    model = load_model("miniature")
    gen = BatchedGenerator(model, steps=10)
    prompts = ["a photo of a nurse", "a photo of a judge", "a photo of a nurse", "a photo of a judge"]
    scales = [1.0, 7.5, 7.5, 3.0]
    seeds = [1, 2, 3, 4]
    ours = gen.generate(prompts, scales, seeds)
    for i, (p, g, s) in enumerate(zip(prompts, scales, seeds)):
        latents = initial_noise([s], gen.shape)
        ref = model.pipe(prompt=[p], guidance_scale=g, latents=latents, num_inference_steps=10, output_type="np")
        ref_u8 = (ref.images[0] * 255).round().astype(np.uint8)
        assert np.abs(ours[i].astype(int) - ref_u8.astype(int)).max() <= 1, (p, g)


def test_stochastic_sampling_is_seeded_per_image() -> None:
    """With eta > 0 each image's step noise comes from its own seed: the same image alone or in another
    batch, whatever the global RNG did in between; and eta = 1 differs from eta = 0."""
    from evalsuite.models import load_model

    gen = BatchedGenerator(load_model("miniature"), steps=6, eta=1.0)
    batch = gen.generate(["a photo of a nurse", "a photo of a judge", "a photo of a nurse"], [1.0, 7.5, 3.0], [5, 6, 7])
    torch.randn(100)  # the global stream moves; the images must not
    alone = gen.generate(["a photo of a judge"], [7.5], [6])
    assert np.abs(alone[0].astype(int) - batch[1].astype(int)).max() <= 1  # batch shapes round differently
    gen.eta = 0.0
    assert np.abs(gen.generate(["a photo of a judge"], [7.5], [6])[0].astype(int) - alone[0].astype(int)).mean() > 5


def test_a_stochastic_run_is_paired_and_independent_of_batching(tmp_path: Path) -> None:
    """--eta 1: recorded in the results, the same images whatever the batch size, not the eta-0 images."""
    from PIL import Image

    def pixels(name: str) -> np.ndarray:
        run = tmp_path / name / ("occupations__miniature" + ("" if name == "c" else "__eta1"))
        return np.stack([np.asarray(Image.open(run / r["image"]), dtype=int) for r in records(run)])

    for name, extra in (("a", ["--eta", "1", "--batch-size", "5"]), ("b", ["--eta", "1", "--batch-size", "3"]),
                        ("c", [])):
        assert run_cli(*SMALL, "--results", str(tmp_path / name), *extra) == 0
    info = json.loads((tmp_path / "a" / "occupations__miniature__eta1" / "run.json").read_text())
    assert info["battery"]["eta"] == 1.0 and info["options"]["eta"] == 1.0
    assert np.abs(pixels("a") - pixels("b")).max() <= 1  # batch shapes round differently
    assert np.abs(pixels("a") - pixels("c")).mean() > 5


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_the_pipeline_call_generator_makes_the_batched_generators_images(eta: float) -> None:
    """The generator for non-SD pipelines (one pipeline call per prompt and scale) gives the same images
    from the same seeds, with eta > 0 too (its per-image generators carry the same step-noise streams)."""
    from evalsuite.generate import PipelineGenerator
    from evalsuite.models import load_model

    model = load_model("miniature")
    args = (["a photo of a nurse", "a photo of a judge", "a photo of a nurse"], [1.0, 7.5, 7.5], [5, 6, 7])
    batched = BatchedGenerator(model, steps=6, eta=eta).generate(*args)
    called = PipelineGenerator(model, steps=6, eta=eta).generate(*args)
    assert np.abs(batched.astype(int) - called.astype(int)).max() <= 1


def test_eta_on_a_scheduler_without_eta_is_refused() -> None:
    from diffusers import EulerDiscreteScheduler

    from evalsuite.errors import SuiteError
    from evalsuite.models import load_model

    model = load_model("miniature")
    model.pipe.scheduler = EulerDiscreteScheduler.from_config(model.pipe.scheduler.config)
    BatchedGenerator(model, steps=4, eta=0.0)  # eta 0 runs with any scheduler
    with pytest.raises(SuiteError, match="needs a DDIM-style scheduler.*EulerDiscreteScheduler"):
        BatchedGenerator(model, steps=4, eta=1.0)


def test_a_run_with_another_eta_does_not_resume_into_a_folder(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    """eta is part of what a folder holds: --eta 1 gets its own default name, and into a named eta-0
    folder it is refused, leaving that folder as it was."""
    assert run_cli(*SMALL, "--results", str(tmp_path), "--limit-prompts", "1", "--scales", "1") == 0
    run = tmp_path / "occupations__miniature"
    before = sorted(p.name for p in run.rglob("*"))
    assert run_cli(*SMALL, "--results", str(tmp_path), "--limit-prompts", "1", "--scales", "1", "--eta", "1") == 0
    assert (tmp_path / "occupations__miniature__eta1" / "run.json").is_file()
    assert run_cli(*SMALL, "--results", str(tmp_path), "--limit-prompts", "1", "--scales", "1", "--eta", "1",
                   "--name", run.name) == 2
    assert "holds a run with another configuration" in capsys.readouterr().err
    assert sorted(p.name for p in run.rglob("*")) == before


def test_run_writes_self_describing_results(tmp_path: Path) -> None:
    assert run_cli(*SMALL, "--results", str(tmp_path), "--batch-size", "5") == 0
    run = tmp_path / "occupations__miniature"
    info = json.loads((run / "run.json").read_text())
    assert info["status"] == "complete" and info["schema_version"] == 2
    assert info["battery"]["images_per_prompt"] == 4 and info["model"]["id"] == "miniature"
    assert info["model"]["builtin"] is True and info["model"]["domain"] == "miniature"
    assert info["classifiers"] == ["miniature", "oracle"]  # the battery's, then the model's exact reader
    assert info["exact_classifiers"] == ["oracle"]
    assert {"torch", "diffusers", "transformers", "evalsuite"} <= set(info["versions"])
    recs = records(run)
    assert [r["unit"] for r in recs] == list(range(3 * 2 * 4))
    # paired seeds: the same image index has the same seed at every scale
    by_key = {(r["prompt_index"], r["image_index"], r["guidance_scale"]): r["seed"] for r in recs}
    assert all(by_key[(p, i, 1.0)] == by_key[(p, i, 7.5)] for p in range(3) for i in range(4))
    assert all((run / r["image"]).is_file() for r in recs)
    rec = recs[0]
    assert rec["classifiers"]["oracle"]["gender"]["status"] == "not_measurable"
    assert rec["classifiers"]["miniature"]["skin_tone"]["status"] == "ok"
    # the miniature model's profile reads each image's hat against the prompt's occupation's
    assert rec["on_prompt"]["wanted"] == OCCUPATIONS["doctor"].hat and "oracle_hat" not in rec
    for table in ("groups", "aggregate", "diversity"):
        assert (run / "metrics" / f"{table}.csv").is_file()
    summary = (run / "summary.txt").read_text()
    assert "doctor" in summary and "nurse" in summary and "7.5" in summary


class BrightnessReader:
    """A stand-in exact reader: an image "reads" bright or dark by its mean pixel; the prompt's
    occupation wants bright for a doctor, dark for anyone else."""

    description = "mean pixel above 128 (test reader)"

    def read(self, images: np.ndarray, prompts: list) -> list:
        return [{"read": "bright" if image.mean() > 128 else "dark",
                 "wanted": "bright" if dict(p.slots)["occupation"] == "doctor" else "dark"}
                for image, p in zip(images, prompts, strict=True)]


def test_a_registered_model_plugs_in_through_its_profile(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The runner knows a model only through its profile: a model registered here brings its own
    exact reader and on-prompt reader, as the miniature world does; a plain folder brings none."""
    from PIL import Image

    from evalsuite import models

    profile = models.ModelProfile(domain="test", clip=str(ASSETS / "clip"), exact_readers=("oracle",),
                                  on_prompt=BrightnessReader())
    monkeypatch.setitem(models.BUILTIN_MODELS, "tiny-world", models.BuiltinModel(
        name="tiny-world", folder=lambda: ASSETS / "pipeline", profile=lambda: profile,
        load_kwargs={"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}))
    # the miniature world's classifiers read only its own domain: a model of another domain is refused them
    assert run_cli(*SMALL, "--model", "tiny-world", "--classifier", "miniature", "--results", str(tmp_path)) == 2
    assert run_cli(*SMALL, "--model", "tiny-world", "--classifier", "clip:miniature", "--results", str(tmp_path)) == 0
    run = tmp_path / "occupations__tiny-world"
    info = json.loads((run / "run.json").read_text())
    assert info["classifiers"] == ["clip:miniature", "oracle"] and info["model"]["domain"] == "test"
    assert info["model"]["on_prompt"] == "mean pixel above 128 (test reader)"
    recs = records(run)
    for r in recs:  # each reading recomputed from the saved image
        bright = np.asarray(Image.open(run / r["image"])).mean() > 128
        assert r["on_prompt"]["read"] == ("bright" if bright else "dark")
    div = pd.read_csv(run / "metrics" / "diversity.csv")
    on = div[(div.metric == "on_prompt_rate") & (div.prompt_index == 0) & (div.guidance_scale == 7.5)]
    first = [r for r in recs if r["prompt_index"] == 0 and r["guidance_scale"] == 7.5]
    assert on.value.item() == pytest.approx(sum(r["on_prompt"]["read"] == r["on_prompt"]["wanted"] for r in first) / 4)
    # the same weights as a plain folder: the default profile, nothing rides along, nothing is read
    assert run_cli(*SMALL, "--model", str(ASSETS / "pipeline"), "--classifier", "clip:miniature", "--embedder",
                   "clip:miniature", "--results", str(tmp_path), "--name", "folder") == 0
    plain = json.loads((tmp_path / "folder" / "run.json").read_text())
    assert plain["classifiers"] == ["clip:miniature"] and plain["exact_classifiers"] == []
    assert plain["model"]["builtin"] is False
    assert plain["model"]["domain"] == "natural" and "on_prompt" not in records(tmp_path / "folder")[0]


@pytest.mark.slow
def test_a_killed_run_resumes_to_the_uninterrupted_records(tmp_path: Path) -> None:
    args = [sys.executable, "-m", "evalsuite.cli", "-q", "run", str(BATTERY), "--limit-prompts", "4",
            "--images-per-prompt", "12", "--scales", "1,7.5", "--steps", "20", "--batch-size", "6"]
    whole = tmp_path / "whole"
    subprocess.run([*args, "--results", str(whole)], check=True, capture_output=True)
    cut = tmp_path / "cut"
    proc = subprocess.Popen([*args, "--results", str(cut)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    shard = cut / "occupations__miniature" / "records.rank0.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (shard.exists() and shard.read_text().count("\n") >= 12):
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    made = shard.read_text().count("\n")
    assert 12 <= made < 96, "the kill must land half-way"
    with open(shard, "a") as fh:  # a torn write, as if killed mid-line
        fh.write('{"unit": 9')
    subprocess.run([*args, "--results", str(cut)], check=True, capture_output=True)
    a, b = records(whole / "occupations__miniature"), records(cut / "occupations__miniature")
    assert len(b) == len({r["unit"] for r in b}) == 96
    assert a == b


def test_a_batch_cut_between_lines_or_merged_twice_resumes_to_the_same_records(tmp_path: Path) -> None:
    """A kill can cut a batch's appended records between lines, or come between the merge into
    records.jsonl and the removal of the shards: the resumed run regenerates what is partial and keeps
    every unit once."""
    args = [*SMALL, "--results", str(tmp_path), "--batch-size", "5"]
    assert run_cli(*args) == 0
    run = tmp_path / "occupations__miniature"
    whole = (run / "records.jsonl").read_text().splitlines(keepends=True)
    info = json.loads((run / "run.json").read_text())
    (run / "run.json").write_text(json.dumps({**info, "status": "running"}))
    (run / "records.jsonl").unlink()
    (run / "records.rank0.jsonl").write_text("".join(whole[:12]))  # batches 0 and 1 whole, 2 of batch 2's 5 lines
    assert run_cli(*args) == 0
    assert (run / "records.jsonl").read_text().splitlines(keepends=True) == whole
    assert not list(run.glob("records.rank*.jsonl"))
    (run / "run.json").write_text(json.dumps({**info, "status": "running"}))
    (run / "records.rank1.jsonl").write_text("".join(whole[5:10]))  # merged, but its shard not yet removed
    assert run_cli(*args) == 0
    assert (run / "records.jsonl").read_text().splitlines(keepends=True) == whole


def test_overwrite_deletes_only_a_results_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    mine = tmp_path / "notes"
    mine.mkdir()
    (mine / "keep.txt").write_text("not a run")
    expect_error(capsys, run_cli(*SMALL, "--results", str(tmp_path), "--name", "notes", "--overwrite"),
                 "notes", "not a results folder")
    assert (mine / "keep.txt").read_text() == "not a run"


def test_validate_checks_the_batterys_classifier(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "clf.yaml"
    bad.write_text(BATTERY.read_text().replace("classifier: miniature", "classifier: minature"))
    assert "classifier: minature" in bad.read_text()
    expect_error(capsys, main(["validate", str(bad)]), "clf.yaml", "minature", "did you mean 'miniature'")


def test_same_command_twice_does_not_regenerate(tmp_path: Path) -> None:
    assert run_cli(*SMALL, "--results", str(tmp_path)) == 0
    run = tmp_path / "occupations__miniature"
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*.png")}
    assert run_cli(*SMALL, "--results", str(tmp_path)) == 0
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*.png")} == before
    assert len(records(run)) == 24


# ---------------------------------------------------------------- bad input



def test_bad_battery_keys_and_values_are_reported_together(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = BATTERY.read_text().replace("images_per_prompt:", "imagesper_prompt:").replace("[1.0, 3.0", "[0.5, 3.0")
    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    err = expect_error(capsys, main(["run", str(bad), "--results", str(tmp_path / "r")]),
                       "bad.yaml", "imagesper_prompt", "did you mean 'images_per_prompt'", "guidance_scales[0]")
    assert not (tmp_path / "r").exists(), err


def test_empty_slot_list(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "empty.yaml"
    bad.write_text("schema_version: 1\nname: x\nversion: '1'\ntemplates: ['a photo of a {occupation}']\n"
                   "slots: {occupation: []}\nattributes: {age: {classes: {young: a, old: b}}}\n"
                   "guidance_scales: [1.0]\nimages_per_prompt: 1\nseed: 0\nsteps: 2\nclassifier: oracle\n")
    expect_error(capsys, main(["validate", str(bad)]), "slots.occupation")


@pytest.mark.parametrize("args, needles", [
    (["--scales", "0.5,7.5"], ["--guidance-scales", "0.5"]),
    (["--model", "./no/such/model"], ["--model", "./no/such/model"]),
    (["--classifier", "orcale"], ["unknown classifier 'orcale'", "did you mean 'oracle'"]),
    (["--dtype", "float8"], ["--dtype", "float8"]),
    (["--lora-scale", "0.5"], ["--lora-scale", "0.5", "without --lora"]),
    (["--lora-scale", "nan", "--lora", "."], ["--lora-scale", "finite"]),
    (["--lora-window", "0.5"], ["--lora-window", "0.5", "without --lora"]),
    (["--lora-window", "0", "--lora", "."], ["--lora-window", "(0, 1]", "got 0"]),
    (["--lora-window", "1.5", "--lora", "."], ["--lora-window", "(0, 1]", "got 1.5"]),
    (["--lora-window", "0.5", "--lora", ".", "--compile"], ["--lora-window", "not supported with --compile"]),
    (["--name", ".."], ["--name", "'..'", "no path"]),
    (["--name", "a/b"], ["--name", "'a/b'", "no path"]),
    (["--embedder", "clpi"], ["clpi", "did you mean 'clip'"]),
    (["--revision", "main"], ["--revision", "hub models only", "built in"]),
    (["--seed", str(2**64)], ["--seed", "an int in [0, 9223372036854775807]"]),
    (["--scales", "7.5,7.5000001"], ["--guidance-scales", "both print as 7.5"]),
])
def test_bad_options_fail_before_anything_is_written(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                     args: list[str], needles: list[str]) -> None:
    expect_error(capsys, run_cli(*SMALL, "--results", str(tmp_path / "r"), *args), *needles)
    assert not (tmp_path / "r").exists()


def test_lora_scale_joins_the_fingerprint_only_when_not_one() -> None:
    """At strength 1 the fingerprint is the one folders had before --lora-scale existed (they resume);
    2 and 2.0 are one run."""
    from evalsuite.battery import load_battery
    from evalsuite.runner import RunOptions, default_run_name, fingerprint

    battery = load_battery(BATTERY)
    plain = RunOptions(lora="results/adapter")
    assert fingerprint(battery, RunOptions(lora="results/adapter", lora_scale=1.0)) == fingerprint(battery, plain)
    two, two_f = RunOptions(lora="results/adapter", lora_scale=2), RunOptions(lora="results/adapter", lora_scale=2.0)
    assert fingerprint(battery, two) == fingerprint(battery, two_f) != fingerprint(battery, plain)
    assert default_run_name(battery, plain) == "occupations__miniature__lora-adapter"
    assert default_run_name(battery, RunOptions(lora="results/adapter", lora_scale=0.5)).endswith("lora-adapter-x0.5")
    half = RunOptions(lora="results/adapter", lora_window=0.5)
    assert fingerprint(battery, RunOptions(lora="results/adapter", lora_window=1.0)) == fingerprint(battery, plain)
    assert fingerprint(battery, half) not in (fingerprint(battery, plain), fingerprint(battery, two))
    assert default_run_name(battery, half).endswith("lora-adapter-w0.5")


def _random_adapter(folder: Path) -> str:
    """A LoRA adapter for the miniature model with random (non-zero) weights, saved as rl saves one."""
    from evalsuite.models import load_model
    from rl.lora import add_lora, save_adapter

    pipe = load_model("miniature").pipe
    params = add_lora(pipe.unet, 4, 4.0, ["to_q", "to_k", "to_v", "to_out.0"])
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return str(save_adapter(pipe, folder, metadata={})["dir"])


def test_lora_window_runs_the_base_model_after_the_adapters_steps(tmp_path: Path) -> None:
    """--lora-window W: the adapter acts on the first ceil(steps x W) steps and the base model finishes.
    Checked against diffusers' own pipeline call, whose step callback switches the adapter off (the
    generator for non-SD pipelines); a window that covers every step is the full adapter, and the adapter
    is back on after each batch (a second call repeats the first)."""
    from evalsuite.generate import PipelineGenerator, lora_steps
    from evalsuite.models import load_model

    adapter = _random_adapter(tmp_path / "adapter")
    args = (["a photo of a nurse", "a photo of a judge"], [1.0, 7.5], [5, 6])
    base = BatchedGenerator(load_model("miniature"), steps=6).generate(*args)
    full = BatchedGenerator(load_model("miniature", lora=adapter), steps=6).generate(*args)
    half_model = load_model("miniature", lora=adapter, lora_window=0.5)
    assert lora_steps(0.5, 6) == 3 and lora_steps(0.5, 7) == 4 and lora_steps(0.99, 6) is None
    half = BatchedGenerator(half_model, steps=6)
    first, again = half.generate(*args), half.generate(*args)
    called = PipelineGenerator(half_model, steps=6).generate(*args)
    assert np.array_equal(first, again)
    assert np.abs(first.astype(int) - called.astype(int)).max() <= 1
    for other in (base, full):
        assert np.abs(first.astype(int) - other.astype(int)).mean() > 1
    every = load_model("miniature", lora=adapter, lora_window=0.99)  # ceil(6 x 0.99) = 6 steps
    assert np.array_equal(BatchedGenerator(every, steps=6).generate(*args), full)
    with pytest.raises(SuiteError, match="not supported with --compile"):
        BatchedGenerator(half_model, steps=6, compile=True)


class _Denoiser:
    """The outermost boundary of the adapter switch: records what the generators ask of the denoiser."""

    peft_config = {"audited": None}

    def __init__(self) -> None:
        self.calls: list[str] = []

    def disable_lora(self) -> None:
        self.calls.append("off")

    def enable_lora(self) -> None:
        self.calls.append("on")


def test_the_adapter_switch_counts_sampler_passes_and_always_switches_back() -> None:
    """The window is a share of the sampler's passes (PNDM makes 21 of 20 steps); the adapter comes back
    on after an error; a text-encoder-only adapter (no denoiser layers) is refused."""
    from types import SimpleNamespace

    from evalsuite.generate import _adapter_switch, _switch_after, check_lora_window
    from evalsuite.models import LoadedModel

    den = _Denoiser()
    with _adapter_switch(den) as off:
        callback = _switch_after(0.5, off)
        pipe = SimpleNamespace(scheduler=SimpleNamespace(timesteps=list(range(21))))
        for step in range(21):
            callback(pipe, step, 0, {})
            if step == 9:
                assert den.calls == []  # ceil(21 x 0.5) = 11 passes with the adapter: off after pass 10
        assert den.calls == ["off"]
    assert den.calls == ["off", "on"]
    den = _Denoiser()
    with pytest.raises(RuntimeError), _adapter_switch(den) as off:
        off()
        raise RuntimeError("the sampler failed")
    assert den.calls == ["off", "on"]
    with _adapter_switch(den):  # never switched off: nothing to switch on
        pass
    assert den.calls == ["off", "on"]
    loaded = LoadedModel(pipe=None, model_id="m", revision=None, dtype="float32", device="cpu",
                         lora="te-only", lora_window=0.5)
    assert check_lora_window(loaded, den, compile=False) == 0.5
    den.peft_config = {}
    with pytest.raises(SuiteError, match="no layers in the denoiser"):
        check_lora_window(loaded, den, compile=False)


def test_unwritable_results_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    expect_error(capsys, run_cli(*SMALL, "--results", str(blocker / "sub")), "cannot write results", "sub")


def test_a_corrupt_image_in_a_resumed_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli(*SMALL, "--results", str(tmp_path)) == 0
    run = tmp_path / "occupations__miniature"
    # turn the finished run back into an interrupted one whose first image was damaged
    recs = (run / "records.jsonl").read_text()
    (run / "records.jsonl").unlink()
    (run / "records.rank0.jsonl").write_text(recs)
    info = json.loads((run / "run.json").read_text())
    (run / "run.json").write_text(json.dumps({**info, "status": "running"}))
    first = run / json.loads(recs.splitlines()[0])["image"]
    first.write_bytes(b"\x89PNG garbage")
    expect_error(capsys, run_cli(*SMALL, "--results", str(tmp_path)), str(first), "corrupt")
    assert os.path.getsize(first) == len(b"\x89PNG garbage")


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_processes_shard_the_work_and_merge_one_result(tmp_path: Path) -> None:
    base = [str(BATTERY), "--limit-prompts", "2", "--images-per-prompt", "4", "--scales", "1,7.5", "--steps", "6",
            "--batch-size", "4"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # the same arithmetic in both runs: bit-identical images
    one_cmd = [sys.executable, "-m", "evalsuite.cli", "-q", "run", *base, "--results", str(tmp_path / "one")]
    subprocess.run(one_cmd, check=True, capture_output=True, cwd=ROOT, env=env)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "evalsuite.cli",
           "-q", "run", *base, "--results", str(tmp_path / "two")]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    one, two = (records(tmp_path / name / "occupations__miniature") for name in ("one", "two"))
    info = json.loads((tmp_path / "two" / "occupations__miniature" / "run.json").read_text())
    assert info["options"]["processes"] == 2
    assert [r["unit"] for r in two] == list(range(16))
    assert [r["seed"] for r in one] == [r["seed"] for r in two]
    assert [r["sha256"] for r in one] == [r["sha256"] for r in two]
