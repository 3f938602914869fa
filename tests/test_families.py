"""Every diffusers family the runner drives, end to end through the real CLI on tiny random pipelines
(tests/tiny_pipeline.py): SD 1.x, SD 2.x (v-prediction), SDXL, SD3 (with and without its T5), Flux
(packed latents, distilled guidance) and PixArt-Σ; pipelines it cannot drive are refused before they
load; `--compile` compiles every generator's denoiser or is refused."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_pipeline import save_tiny_pipeline, tiny_flux_pipeline, tiny_sd2_pipeline

from evalsuite.cli import main
from evalsuite.errors import SuiteError
from evalsuite.generate import BatchedGenerator, PipelineGenerator, initial_noise, make_generator
from evalsuite.miniature import ASSETS
from evalsuite.models import guidance_kind, load_model

torch.set_num_threads(2)
CLIP = ASSETS / "clip"  # the miniature world's CLIP: it reads any image and knows the battery's words
pytestmark = pytest.mark.skipif(not (CLIP / "config.json").is_file(), reason="the shipped miniature world is missing")

# 2 prompts x 2 guidance scales x 2 images, 2 steps; words the miniature tokenizers know
BATTERY = """\
schema_version: 1
name: families
version: "1"
templates: ["a photo of a {occupation}"]
slots: {occupation: [nurse, judge]}
attributes:
  skin_tone:
    classes: {light: "a photo of a person with light skin", dark: "a photo of a person with dark skin"}
  age:
    classes: {young: "a photo of a young person", old: "a photo of an old person"}
guidance_scales: [1.0, 4.0]
images_per_prompt: 2
seed: 0
steps: 2
classifier: clip
"""
PROMPTS = ["a photo of a nurse", "a photo of a judge", "a photo of a nurse"]

# family -> (pipeline class, guidance kind, image side in pixels)
FAMILIES = {
    "sd1": ("StableDiffusionPipeline", "classifier-free", 8),
    "sd2": ("StableDiffusionPipeline", "classifier-free", 32),
    "sdxl": ("StableDiffusionXLPipeline", "classifier-free", 32),
    "sd3": ("StableDiffusion3Pipeline", "classifier-free", 32),
    "flux": ("FluxPipeline", "distilled", 128),
    "pixart": ("PixArtSigmaPipeline", "classifier-free", 32),
}


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """The saved folder of a family's tiny pipeline, built once per session when first asked for."""
    built: dict[str, Path] = {}

    def folder(family: str) -> Path:
        if family not in built:
            built[family] = save_tiny_pipeline(family, tmp_path_factory.mktemp(family))
        return built[family]

    return folder


@pytest.fixture(scope="session")
def battery(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("battery") / "families.yaml"
    path.write_text(BATTERY)
    return path


def run_cli(battery: Path, model: Path | str, results: Path, name: str, *extra: str) -> int:
    return main(["-q", "run", str(battery), "--model", str(model), "--classifier", f"clip:{CLIP}",
                 "--embedder", f"clip:{CLIP}", "--device", "cpu", "--results", str(results), "--name", name, *extra])


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "records.jsonl").read_text().splitlines()]


def expect_refusal(capsys: pytest.CaptureFixture[str], code: int, *needles: str) -> str:
    """Exit 2 with one message (one problem), no traceback, naming every needle."""
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("evalsuite: error:") and "Traceback" not in err, err
    assert err.count("\n  - ") <= 1, err  # one problem, not a list
    for needle in needles:
        assert needle in err, err
    return err


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_family_runs_end_to_end(family: str, tiny_model: Callable[[str], Path], battery: Path,
                                      tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`evalsuite run` then `evalsuite dashboard` on each family's tiny pipeline: 8 images of the model's
    size, paired seeds across the two scales, what ran in run.json, and the same images on a second run."""
    pipeline_class, guidance, side = FAMILIES[family]
    assert run_cli(battery, tiny_model(family), tmp_path, "a") == 0
    run = tmp_path / "a"
    info = json.loads((run / "run.json").read_text())
    assert info["status"] == "complete" and info["n_images"] == 8
    assert info["model"]["pipeline_class"] == pipeline_class and info["model"]["guidance"] == guidance
    assert "drop_t5" not in info["model"] and info["options"]["drop_t5"] is False
    recs = records(run)
    assert [r["unit"] for r in recs] == list(range(8))
    images = {(r["prompt_index"], r["image_index"], r["guidance_scale"]): np.asarray(Image.open(run / r["image"]))
              for r in recs}
    assert {im.shape for im in images.values()} == {(side, side, 3)}
    seeds = {(r["prompt_index"], r["image_index"], r["guidance_scale"]): r["seed"] for r in recs}
    for p in range(2):  # paired: one seed per (prompt, image) at both scales, another per image
        assert seeds[(p, 0, 1.0)] == seeds[(p, 0, 4.0)] != seeds[(p, 1, 1.0)] == seeds[(p, 1, 4.0)]
        # the guidance acts: the same noise makes another image at another scale
        assert np.abs(images[(p, 0, 1.0)].astype(int) - images[(p, 0, 4.0)]).mean() > 0.1
    assert {r["classifiers"][f"clip:{CLIP}"]["skin_tone"]["status"] for r in recs} == {"ok"}
    # the same command into another folder makes the same images, bit for bit
    assert run_cli(battery, tiny_model(family), tmp_path, "b") == 0
    assert [r["sha256"] for r in records(tmp_path / "b")] == [r["sha256"] for r in recs]
    capsys.readouterr()
    assert main(["dashboard", str(run), "--out", str(tmp_path / "site")]) == 0
    pages = " ".join(p.read_text() for p in (tmp_path / "site").rglob("*.html"))
    assert len(list((tmp_path / "site").rglob("*.png"))) > 0
    if guidance == "distilled":  # Flux's guidance axis is labelled as distilled guidance
        assert "distilled guidance" in pages


def test_flux_noise_is_packed_as_fluxpipeline_draws_it(tiny_model: Callable[[str], Path]) -> None:
    """The paired noise goes into Flux packed in 2x2 patches exactly as FluxPipeline packs what it draws:
    the generator's image equals the pipeline's own from a CPU generator seeded with the image's seed."""
    loaded = load_model(str(tiny_model("flux")))
    gen = make_generator(loaded, steps=2)
    assert isinstance(gen, PipelineGenerator) and gen.shape == (4, 128, 128)
    ours = gen.generate(["a photo of a nurse"], [3.5], [7])
    theirs = loaded.pipe(prompt=["a photo of a nurse"], guidance_scale=3.5, num_inference_steps=2, output_type="np",
                         generator=torch.Generator("cpu").manual_seed(7)).images
    assert np.abs(ours[0].astype(int) - (np.asarray(theirs[0]) * 255).round().astype(int)).max() <= 1


def test_guidance_kind_follows_the_denoiser(tmp_path: Path) -> None:
    """Distilled guidance where the transformer embeds the scale (FLUX.1 [dev]), none where a Flux
    transformer takes no guidance (FLUX.1 [schnell]), classifier-free otherwise."""
    assert guidance_kind(tiny_flux_pipeline(tmp_path / "dev")) == "distilled"
    assert guidance_kind(tiny_flux_pipeline(tmp_path / "schnell", guidance_embeds=False)) == "none"
    assert guidance_kind(tiny_sd2_pipeline(tmp_path / "sd2")) == "classifier-free"
    assert load_model("miniature").describe()["guidance"] == "classifier-free"


def test_sd2_v_prediction_batched_equals_plain_diffusers(tmp_path: Path) -> None:
    """The batched loop on a v-prediction pipeline (SD 2.x) with an Euler sampler gives the images of one
    plain pipeline call per (prompt, scale) from the same noise."""
    from evalsuite.models import LoadedModel

    pipe = tiny_sd2_pipeline(tmp_path)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    gen = BatchedGenerator(LoadedModel(pipe=pipe, model_id="sd2", revision=None, dtype="float32", device="cpu"),
                           steps=3)
    prompts, scales, seeds = PROMPTS, [1.0, 4.0, 4.0], [1, 2, 1]
    ours = gen.generate(prompts, scales, seeds)
    for i, (p, g, s) in enumerate(zip(prompts, scales, seeds)):
        ref = pipe(prompt=[p], guidance_scale=g, latents=initial_noise([s], gen.shape), num_inference_steps=3,
                   output_type="np").images[0]
        assert np.abs(ours[i].astype(int) - (ref * 255).round().astype(int)).max() <= 1, (p, g)


def test_sd3_runs_without_its_t5(tiny_model: Callable[[str], Path], battery: Path, tmp_path: Path,
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """--no-t5 loads SD3 without its T5 (whose loading would fail here) and says so in run.json; the T5's
    part of the context is then zeros, so the images differ from those made with the T5."""
    import transformers

    folder = tiny_model("sd3")
    assert run_cli(battery, folder, tmp_path, "with-t5") == 0

    def no_t5(*args: object, **kwargs: object) -> None:
        raise AssertionError("the T5 must not load")

    monkeypatch.setattr(transformers.T5EncoderModel, "from_pretrained", no_t5)
    loaded = load_model(str(folder), drop_t5=True)
    assert loaded.pipe.text_encoder_3 is None and loaded.pipe.tokenizer_3 is None
    assert loaded.describe()["drop_t5"] is True
    assert run_cli(battery, folder, tmp_path, "no-t5", "--no-t5") == 0
    info = json.loads((tmp_path / "no-t5" / "run.json").read_text())
    assert info["status"] == "complete" and info["options"]["drop_t5"] is True and info["model"]["drop_t5"] is True
    first = [np.asarray(Image.open(tmp_path / name / records(tmp_path / name)[0]["image"]), dtype=int)
             for name in ("with-t5", "no-t5")]
    assert np.abs(first[0] - first[1]).mean() > 0.1


def test_no_t5_joins_the_fingerprint_and_name_only_when_set(battery: Path) -> None:
    """Without --no-t5 the fingerprint is the one folders had before the option existed (they resume)."""
    from evalsuite.battery import load_battery
    from evalsuite.runner import RunOptions, default_run_name, fingerprint

    b = load_battery(battery)
    plain, off, on = RunOptions(model="m/sd3"), RunOptions(model="m/sd3", drop_t5=False), RunOptions(model="m/sd3",
                                                                                                   drop_t5=True)
    assert fingerprint(b, plain) == fingerprint(b, off) != fingerprint(b, on)
    assert default_run_name(b, on) == default_run_name(b, plain) + "__no-t5"


def _index(folder: Path, class_name: str, *components: str) -> Path:
    """A folder holding only a model_index.json (nothing to load)."""
    folder.mkdir(parents=True)
    index = {"_class_name": class_name, "_diffusers_version": "0.42.1",
             **{c: ["transformers", "T5EncoderModel"] for c in components}}
    (folder / "model_index.json").write_text(json.dumps(index))
    return folder


@pytest.mark.parametrize("class_name, components, needle", [
    ("FluxPipeline", ("text_encoder_2",), "needs its T5 (text_encoder_2)"),
    ("PixArtSigmaPipeline", ("text_encoder",), "needs its T5 (text_encoder)"),
    ("StableDiffusionXLPipeline", (), "has no T5"),
])
def test_no_t5_is_refused_where_the_t5_is_needed_or_absent(battery: Path, tmp_path: Path, class_name: str,
                                                            components: tuple[str, ...], needle: str,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    model = _index(tmp_path / "model", class_name, *components)
    expect_refusal(capsys, run_cli(battery, model, tmp_path / "r", "x", "--no-t5"), "--no-t5", class_name, needle,
                   "SD3 (StableDiffusion3Pipeline)")
    assert not (tmp_path / "r").exists()


def test_no_t5_is_refused_for_the_builtin_model(battery: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    expect_refusal(capsys, main(["-q", "run", str(battery), "--no-t5", "--results", str(tmp_path / "r")]),
                   "--no-t5", "'miniature'", "has no T5")
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("kind", ["img2img", "prior", "other-text-to-image"])
def test_a_pipeline_the_runner_cannot_drive_is_refused_before_it_loads(
        kind: str, battery: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """An image-to-image pipeline (a real saved folder), a Kandinsky prior, and a text-to-image family the
    generators do not lay latents out for: exit 2 with one message naming the class and the families,
    before any weights load and before anything is written."""
    from diffusers import AutoPipelineForText2Image

    if kind == "img2img":
        model, class_name = save_tiny_pipeline("img2img", tmp_path / "img2img"), "StableDiffusionImg2ImgPipeline"
    else:
        class_name = "KandinskyV22PriorPipeline" if kind == "prior" else "SanaPipeline"
        model = _index(tmp_path / kind, class_name, "text_encoder")
    capsys.readouterr()  # what building the model printed

    def never(*args: object, **kwargs: object) -> None:
        raise AssertionError("nothing may load")

    monkeypatch.setattr(AutoPipelineForText2Image, "from_pretrained", never)
    expect_refusal(capsys, run_cli(battery, model, tmp_path / "r", "x"), f"'{model}' is a {class_name}",
                   "cannot drive", "SD 1.x/2.x (StableDiffusionPipeline)", "SDXL (StableDiffusionXLPipeline)",
                   "SD3 (StableDiffusion3Pipeline)", "Flux (FluxPipeline)", "PixArt-Σ (PixArtSigmaPipeline)")
    assert not (tmp_path / "r").exists()
    assert run_cli(battery, model, tmp_path / "r", "x", "--batch-size", "0") == 2  # collected with the others
    err = capsys.readouterr().err
    assert "cannot drive" in err and "--batch-size" in err and not (tmp_path / "r").exists()
    with pytest.raises(SuiteError, match=f"is a {class_name}, which the runner cannot drive"):
        load_model(str(model))


def test_a_hub_model_is_checked_from_its_index_before_its_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    """A hub id: its model_index.json (read first) decides, before from_pretrained fetches any weights."""
    from diffusers import AutoPipelineForText2Image

    index = {"_class_name": "StableDiffusionImg2ImgPipeline"}
    monkeypatch.setattr(AutoPipelineForText2Image, "load_config", classmethod(lambda cls, *a, **k: dict(index)))

    def never(*args: object, **kwargs: object) -> None:
        raise AssertionError("no weights may load")

    monkeypatch.setattr(AutoPipelineForText2Image, "from_pretrained", never)
    with pytest.raises(SuiteError, match="'org/model' is a StableDiffusionImg2ImgPipeline, which the runner cannot"):
        load_model("org/model")
    index.update(_class_name="FluxPipeline", text_encoder_2=["transformers", "T5EncoderModel"])
    with pytest.raises(SuiteError, match=r"--no-t5: 'org/model' is a Flux pipeline \(FluxPipeline\), which needs"):
        load_model("org/model", drop_t5=True)


@pytest.mark.parametrize("family", ["sd1", "sdxl", "sd3", "flux", "pixart"])
def test_compile_compiles_every_generators_denoiser(family: str, tiny_model: Callable[[str], Path]) -> None:
    """--compile is not ignored: the pipeline calls a compiled denoiser (compilation itself waits for the
    first call: `test_a_compiled_run_makes_the_eager_images` runs one)."""
    from torch._dynamo.eval_frame import OptimizedModule

    loaded = load_model(str(tiny_model(family)))
    gen = make_generator(loaded, steps=2, compile=True)
    if isinstance(gen, BatchedGenerator):
        assert isinstance(gen.unet, OptimizedModule)
    else:
        assert isinstance(gen.called_denoiser, OptimizedModule) and not isinstance(gen.denoiser, OptimizedModule)
        assert isinstance(loaded.denoiser, OptimizedModule)
        assert loaded.describe()["pipeline_class"] == FAMILIES[family][0]
    plain = make_generator(load_model(str(tiny_model(family))), steps=2)
    assert not isinstance(plain.unet if isinstance(plain, BatchedGenerator) else plain.called_denoiser,
                          OptimizedModule)


def test_compile_without_a_compiler_on_the_cpu_is_refused(tiny_model: Callable[[str], Path], battery: Path,
                                                          tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    model = tiny_model("sdxl")
    capsys.readouterr()  # what building the model printed
    monkeypatch.setenv("CXX", "no-such-compiler++")
    expect_refusal(capsys, run_cli(battery, model, tmp_path / "r", "x", "--compile"), "--compile",
                   "no-such-compiler++")
    assert not (tmp_path / "r" / "x").exists()  # refused with the model loaded, before the run folder is made


@pytest.mark.slow
def test_a_compiled_run_makes_the_eager_images(tiny_model: Callable[[str], Path], battery: Path, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """A real --compile run (torch.compile's inductor on the CPU) of the pipeline-call generator compiles
    the transformer and makes the eager run's images up to rounding."""
    from diffusers import SD3Transformer2DModel

    compiled: list[object] = []
    real_compile = torch.compile

    def spy(model: object, **kwargs: object) -> object:
        compiled.append(model)
        return real_compile(model, **kwargs)  # type: ignore[call-overload]

    assert run_cli(battery, tiny_model("sd3"), tmp_path, "eager") == 0
    monkeypatch.setattr(torch, "compile", spy)
    assert run_cli(battery, tiny_model("sd3"), tmp_path, "compiled", "--compile") == 0
    assert [type(m) for m in compiled] == [SD3Transformer2DModel]
    info = json.loads((tmp_path / "compiled" / "run.json").read_text())
    assert info["options"]["compile"] is True and info["status"] == "complete"
    for eager, compiled in zip(records(tmp_path / "eager"), records(tmp_path / "compiled"), strict=True):
        a, b = (np.asarray(Image.open(tmp_path / name / r["image"]), dtype=int)
                for name, r in (("eager", eager), ("compiled", compiled)))
        assert np.abs(a - b).max() <= 2
