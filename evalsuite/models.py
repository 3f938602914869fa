"""Load a text-to-image model: a built-in model, a local diffusers folder, or a hub id.

A pipeline loads through `AutoPipelineForText2Image`, with safetensors only and never remote code, if
its class is one of the families the generators can drive (`PIPELINE_FAMILIES`: SD 1.x/2.x, SDXL, SD3,
Flux, PixArt-Σ); any other class (an image-to-image pipeline, a prior/decoder pair, a text-to-image
family whose latents the generators do not lay out) is refused before its weights load, from its
model_index.json (`pipeline_problems`). An SD3 pipeline may be loaded without its T5 text encoder
(`drop_t5`). What a model brings to an audit beside its
pipeline is its `ModelProfile`: the kind of images it makes, the CLIP that reads them, its vocabulary,
exact readers of its images (classifiers that know the truth, which ride along on every audit of it and
against which dashboards score the others) and an on-prompt reader. A folder or hub id gets the default
profile (natural images, nothing extra); a built-in model registers its own (`register_builtin_model`):
the miniature world plugs in this way, like any model a user would register, and the runner and trainer
know it only through its profile. `DEFAULT_MODEL` is audited when no model is named.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import json
import logging
import math
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch

from .errors import SuiteError, did_you_mean

if TYPE_CHECKING:
    from .battery import Prompt
    from .results.schema import OnPrompt

log = logging.getLogger(__name__)

DEFAULT_MODEL = "miniature"  # the built-in model audited when none is named
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_BUILTIN_MODULES = ("evalsuite.miniature.model",)  # modules that register built-in models when imported


@dataclass(frozen=True)
class PipelineFamily:
    """A family of diffusers text-to-image pipelines that the generators drive (`evalsuite.generate`)."""

    name: str  # as users know it
    packed_latents: bool = False  # its initial noise goes in as 2x2 patches, (n, h/2 x w/2, 4 C), not (n, C, h, w)
    t5: str | None = None  # the pipeline component holding its T5 text encoder, if it has one
    optional_t5: bool = False  # the pipeline runs without that T5 (`load_model(drop_t5=True)`)


# diffusers pipeline class -> family: the pipelines whose latents, guidance and text encoders the generators
# know (each is tested end to end on a tiny pipeline, tests/test_families.py). SD3 encodes the prompt with
# two CLIPs and a T5 whose part of the context is zeros when the T5 is left out (StableDiffusion3Pipeline's
# `_get_t5_prompt_embeds`); Flux (FluxPipeline) packs its latent in 2x2 patches and conditions on a CLIP's
# pooled output and a T5's states; PixArt-Σ (PixArtSigmaPipeline) conditions on a T5 alone.
PIPELINE_FAMILIES: dict[str, PipelineFamily] = {
    "StableDiffusionPipeline": PipelineFamily("SD 1.x/2.x"),
    "StableDiffusionXLPipeline": PipelineFamily("SDXL"),
    "StableDiffusion3Pipeline": PipelineFamily("SD3", t5="text_encoder_3", optional_t5=True),
    "FluxPipeline": PipelineFamily("Flux", packed_latents=True, t5="text_encoder_2"),
    "PixArtSigmaPipeline": PipelineFamily("PixArt-Σ", t5="text_encoder"),
}


class OnPromptReader(Protocol):
    """Reads, per image, whether it shows what its prompt asked for, where an exact reader exists.

    `description` says what is read (for run.json and the dashboard). `read(images, prompts)` takes
    uint8 images (n, H, W, 3) and each image's battery prompt, and returns per image what was found and
    what was wanted (`OnPrompt`), or None where the prompt asks for nothing this reader can check."""

    description: str

    def read(self, images: np.ndarray, prompts: Sequence[Prompt]) -> list[OnPrompt | None]: ...


@dataclass(frozen=True)
class ModelProfile:
    """What a model brings to an audit beside its pipeline (the default: natural images, nothing extra)."""

    domain: str = "natural"  # the kind of images it makes ("natural": photographs and art of the world)
    clip: str | None = None  # the CLIP (folder or hub id) that reads its images; None: the embedders' default
    vocabulary: frozenset[str] | None = None  # the only words its text encoder knows; None: open vocabulary
    exact_readers: tuple[str, ...] = ()  # classifier specs that read its images exactly: every audit adds them
    on_prompt: OnPromptReader | None = None  # reads whether an image shows what its prompt asked for

    def unknown_words(self, text: str) -> list[str]:
        """Words of `text` outside the vocabulary (always [] for an open vocabulary)."""
        if self.vocabulary is None:
            return []
        return [w for w in re.findall(r"[a-z]+", text.lower()) if w not in self.vocabulary]


@dataclass(frozen=True)
class BuiltinModel:
    """A model known by name: a diffusers pipeline folder and its profile.

    `folder` and `profile` are called when needed (a profile may read files of the folder); `prepare`,
    if given, adjusts a loaded pipeline (e.g. its attention processor); `load_kwargs` go to
    `from_pretrained`; `missing` says how to get the folder when it is absent."""

    name: str
    folder: Callable[[], Path]
    profile: Callable[[], ModelProfile]
    prepare: Callable[[Any], None] | None = None
    load_kwargs: Mapping[str, Any] = field(default_factory=dict)
    missing: str = ""


BUILTIN_MODELS: dict[str, BuiltinModel] = {}  # name -> model, filled by register_builtin_model


def register_builtin_model(model: BuiltinModel) -> BuiltinModel:
    """Make `model` loadable as `--model NAME` (and `model: NAME` in RL configs)."""
    BUILTIN_MODELS[model.name] = model
    return model


def builtin_model(name: str | None) -> BuiltinModel | None:
    """The built-in model called `name` (None: `DEFAULT_MODEL`), or None if `name` is not one."""
    for module in _BUILTIN_MODULES:
        importlib.import_module(module)
    return BUILTIN_MODELS.get(DEFAULT_MODEL if name is None else name)


def model_profile(name: str | None) -> ModelProfile:
    """The profile a model will be audited with, known before it loads: a built-in model's own, else the
    default (natural images) for a folder or hub id."""
    builtin = builtin_model(name)
    return builtin.profile() if builtin is not None else ModelProfile()


@dataclass
class LoadedModel:
    """A pipeline plus what results need to describe it."""

    pipe: Any  # a diffusers DiffusionPipeline
    model_id: str
    revision: str | None
    dtype: str
    device: str
    profile: ModelProfile = ModelProfile()
    builtin: bool = False
    lora: str | None = None
    lora_scale: float = 1.0
    lora_window: float = 1.0  # the adapter acts on the first ceil(passes x lora_window) sampler passes
    drop_t5: bool = False  # loaded without its T5 text encoder (SD3)

    def unknown_words(self, prompt: str) -> list[str]:
        """Words of `prompt` outside the model's vocabulary (empty for open-vocabulary models)."""
        return self.profile.unknown_words(prompt)

    @property
    def denoiser(self) -> Any:
        """The pipeline's denoising network: its UNet, or its transformer (SD3, Flux, PixArt)."""
        unet = getattr(self.pipe, "unet", None)
        return unet if unet is not None else self.pipe.transformer

    def describe(self) -> dict[str, Any]:
        return {"id": self.model_id, "revision": self.revision, "builtin": self.builtin,
                "domain": self.profile.domain, "dtype": self.dtype, "device": self.device, "lora": self.lora,
                **({"lora_scale": self.lora_scale} if self.lora else {}),
                **({"lora_window": self.lora_window} if self.lora and self.lora_window != 1.0 else {}),
                **({"on_prompt": self.profile.on_prompt.description} if self.profile.on_prompt else {}),
                **({"drop_t5": True} if self.drop_t5 else {}),
                "pipeline_class": type(self.pipe).__name__, "guidance": guidance_kind(self.pipe)}


def guidance_kind(pipe: Any) -> str:
    """What the guidance scale does in `pipe` (run.json's model "guidance"):

    * "classifier-free": above 1 the pipeline adds an unconditional pass and extrapolates,
      ε̂ = ε_u + g (ε_c - ε_u) (Ho & Salimans 2022): SD 1.x/2.x, SDXL, SD3, PixArt-Σ;
    * "distilled": the scale is an input of the denoiser (its `guidance_embeds`), which was distilled from
      a classifier-free-guided teacher to imitate its output at that scale, in one pass: FLUX.1 [dev]
      (Black Forest Labs' model card: "guidance distillation"). FluxPipeline feeds `guidance_scale` to the
      transformer's guidance embedding and runs true CFG only with `true_cfg_scale` > 1, which the
      generators leave at 1;
    * "none": the denoiser takes no guidance input and there is no unconditional pass, so the scale
      changes nothing (FLUX.1 [schnell], timestep-distilled without guidance: `guidance_embeds` false).
    """
    config = getattr(getattr(pipe, "transformer", None), "config", None)
    if config is not None and "guidance_embeds" in config:
        return "distilled" if config["guidance_embeds"] else "none"
    return "classifier-free"


def resolve_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise SuiteError(f"--dtype: unknown dtype '{name}'{did_you_mean(name, DTYPES)}")
    return DTYPES[name]


def resolve_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SuiteError(f"--device: '{name}' requested but no CUDA device is available; use --device cpu")
    if re.fullmatch(r"cpu:\d+", name):  # accelerate names the CPU of each process 'cpu:N'
        return "cpu"
    if not re.fullmatch(r"cpu|cuda(:\d+)?|mps", name):
        raise SuiteError(f"--device: '{name}' is not a device; allowed: auto, cpu, cuda, cuda:N, mps")
    if name.startswith("cuda:") and int(name[5:]) >= torch.cuda.device_count():
        raise SuiteError(f"--device: '{name}' does not exist; this machine has cuda:0 to "
                         f"cuda:{torch.cuda.device_count() - 1}")
    return name


def check_model_source(model: str | None) -> None:
    """Fail fast (before anything loads) on a model that is neither built in, a folder, nor a hub id."""
    builtin = builtin_model(model)
    if builtin is not None:
        if not (builtin.folder() / "model_index.json").is_file():
            raise SuiteError(f"the built-in model '{builtin.name}' is missing at {builtin.folder()}"
                             + (f"; {builtin.missing}" if builtin.missing else ""))
        return
    assert model is not None  # None names DEFAULT_MODEL, which is built in
    path = Path(model).expanduser()
    if path.exists():
        if not (path / "model_index.json").is_file():
            raise SuiteError(f"--model: '{model}' is a folder but not a diffusers pipeline (no model_index.json)")
        return
    if model.startswith((".", "/", "~")) or not _HUB_ID.match(model):
        raise SuiteError(f"--model: '{model}' is not a local folder (not found) and not a hub id like "
                         f"'org/name'; the built-in models are {', '.join(sorted(BUILTIN_MODELS))}")


def unsupported_pipeline(model: str, class_name: str) -> str:
    """The one message refusing a pipeline class the runner cannot drive."""
    families = ", ".join(f"{f.name} ({name})" for name, f in PIPELINE_FAMILIES.items())
    return (f"--model: '{model}' is a {class_name}, which the runner cannot drive (it renders text-to-image "
            f"pipelines of known families only: {families})")


def pipeline_problems(model: str | None, drop_t5: bool = False) -> list[str]:
    """Why the runner cannot drive the pipeline of `model`, or cannot leave its T5 out (`drop_t5`), one
    message each ([] = it can). Read from the model_index.json of a built-in model or a local folder, so
    nothing loads; a hub id's index is checked by `load_model` before its weights download, and a model
    that is not found is `check_model_source`'s to report."""
    index = model_index(model)
    return [] if index is None else _index_problems(index, model or DEFAULT_MODEL, drop_t5)


def model_index(model: str | None) -> dict[str, Any] | None:
    """The model_index.json of a built-in model or a local folder (its `_class_name` and components), read
    without loading anything; None where there is none to read: a hub id, a model that is not found
    (`check_model_source` says so), or a file that is not JSON (loading says so)."""
    builtin = builtin_model(model)
    try:
        folder = builtin.folder() if builtin is not None else Path(str(model)).expanduser()
        index = json.loads((folder / "model_index.json").read_text())
    except (OSError, ValueError):
        return None
    return index if isinstance(index, dict) else None


def _index_problems(index: Mapping[str, Any], model: str, drop_t5: bool) -> list[str]:
    """`pipeline_problems` of a read model_index.json (its `_class_name` and component keys)."""
    name = str(index.get("_class_name"))
    family = PIPELINE_FAMILIES.get(name)
    if family is None:
        return [unsupported_pipeline(model, name)]
    if drop_t5 and not (family.optional_t5 and family.t5 in index):
        optional = [f"{f.name} ({n})" for n, f in PIPELINE_FAMILIES.items() if f.optional_t5]
        needs = f"needs its T5 ({family.t5})" if family.t5 else "has no T5"
        return [f"--no-t5: '{model}' is a {family.name} pipeline ({name}), which {needs}; only "
                f"{', '.join(optional)} can leave its T5 text encoder out"]
    return []


def load_model(model: str | None = None, *, dtype: str = "float32", device: str = "cpu",
               revision: str | None = None, lora: str | None = None, lora_scale: float = 1.0,
               lora_window: float = 1.0, drop_t5: bool = False) -> LoadedModel:
    """Load a text-to-image pipeline; `model` is a built-in name (None: `DEFAULT_MODEL`), a local folder
    or a hub id, of a family in `PIPELINE_FAMILIES` (any other is refused before its weights load). `lora`,
    a LoRA adapter, is loaded on top at strength `lora_scale` (`load_adapter`); the generators switch its
    denoiser part off after the first ceil(passes x `lora_window`) sampler passes
    (`evalsuite.generate.lora_steps`). `drop_t5` loads an SD3 pipeline without its T5 text encoder
    (`text_encoder_3=None, tokenizer_3=None`, which diffusers' StableDiffusion3Pipeline allows: its T5
    context is then zeros), saving the T5's memory at some cost in prompt following."""
    from diffusers import AutoPipelineForText2Image

    check_model_source(model)
    if problems := adapter_problems(lora, lora_scale, lora_window) + pipeline_problems(model, drop_t5):
        raise SuiteError("; ".join(problems))
    torch_dtype = resolve_dtype(dtype)
    device = resolve_device(device)
    kwargs: dict[str, Any] = {_dtype_keyword(): torch_dtype, "use_safetensors": True}
    builtin = builtin_model(model)
    if builtin is not None:
        source, model_id, profile = str(builtin.folder()), builtin.name, builtin.profile()
        kwargs.update(builtin.load_kwargs)
    else:
        assert model is not None
        local = Path(model).expanduser()
        source, model_id, profile = str(local) if local.exists() else model, model, ModelProfile()
        if revision:
            kwargs["revision"] = revision
    if drop_t5:
        kwargs.update(text_encoder_3=None, tokenizer_3=None)
    try:
        if builtin is None and not Path(source).exists():  # a hub id: its model_index.json before its weights
            index = AutoPipelineForText2Image.load_config(source, revision=revision)
            if problems := _index_problems(index, model_id, drop_t5):
                raise SuiteError("; ".join(problems))
        pipe = AutoPipelineForText2Image.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as exc:
        raise SuiteError(f"--model: could not load '{model_id}': {str(exc).splitlines()[0]}") from exc
    if type(pipe).__name__ not in PIPELINE_FAMILIES:  # AutoPipeline maps some classes to others
        raise SuiteError(unsupported_pipeline(model_id, type(pipe).__name__))
    if getattr(pipe, "safety_checker", None) is not None:
        log.info("disabling the safety checker: audits must see every image the model makes")
        pipe.safety_checker = None
    if lora:
        load_adapter(pipe, lora, lora_scale)
    if builtin is not None and builtin.prepare is not None:
        builtin.prepare(pipe)
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return LoadedModel(pipe=pipe, model_id=model_id, revision=revision, dtype=dtype, device=device,
                       profile=profile, builtin=builtin is not None, lora=lora, lora_scale=lora_scale,
                       lora_window=lora_window, drop_t5=drop_t5)


ADAPTER_NAME = "audited"  # the PEFT adapter name of a loaded --lora


WINDOW_WITH_COMPILE = ("--lora-window: not supported with --compile (the compiled UNet would keep the adapter "
                       "on); drop one of them")


def adapter_problems(lora: str | None, scale: float, window: float = 1.0, compile: bool = False) -> list[str]:
    """What is wrong with `--lora LORA --lora-scale SCALE --lora-window WINDOW [--compile]`, one message
    each (empty: nothing). The runner collects them with its other checks before anything loads;
    `load_adapter` and `load_model` refuse them, and the generators refuse a window on a compiled UNet."""
    problems = []
    if lora and not Path(lora).expanduser().exists():
        problems.append(f"--lora: adapter '{lora}' not found")
    elif lora:
        problems += adapter_weight_problems(lora)
    if not math.isfinite(scale):
        problems.append(f"--lora-scale: must be a finite number, got {scale}")
    elif scale != 1.0 and not lora:
        problems.append(f"--lora-scale: {scale:g} given without --lora (it scales an adapter)")
    if not (math.isfinite(window) and 0.0 < window <= 1.0):
        problems.append(f"--lora-window: must be in (0, 1] (the share of the denoising steps, from the "
                        f"first, that the adapter acts on), got {window:g}")
    elif window != 1.0 and not lora:
        problems.append(f"--lora-window: {window:g} given without --lora (it limits an adapter)")
    elif window != 1.0 and compile:
        problems.append(WINDOW_WITH_COMPILE)
    return problems


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")  # weights that load by unpickling
SAFE_SUFFIX = ".safetensors"


def adapter_weight_problems(lora: str) -> list[str]:
    """Why the adapter `lora` (a file or a folder) cannot load as safetensors, one message ([] = it can).

    Adapters load from safetensors only (`load_adapter` asks diffusers for nothing else): unpickling a
    .bin/.pt/.ckpt/.pkl file can run any code it holds. A file must be a .safetensors file; a folder must
    hold one at its top level (where `load_lora_weights` looks). The message names the pickled files."""
    path = Path(lora).expanduser()
    rule = ("adapters load from safetensors only (unpickling weights can run code): convert it with "
            "safetensors.torch.save_file, or load the adapter you trust and save it again as .safetensors")
    if path.is_file():
        if path.suffix.lower() == SAFE_SUFFIX:
            return []
        kind = "pickled weights" if path.suffix.lower() in PICKLE_SUFFIXES else f"not a {SAFE_SUFFIX} file"
        return [f"--lora: adapter file '{path}' is {kind}; {rule}"]
    if not path.is_dir():
        return []
    files = sorted(p.name for p in path.iterdir() if p.is_file())
    if any(name.lower().endswith(SAFE_SUFFIX) for name in files):
        return []
    pickled = [name for name in files if name.lower().endswith(PICKLE_SUFFIXES)]
    if pickled:
        return [f"--lora: adapter folder '{path}' holds pickled weights ({', '.join(pickled)}) and no "
                f"{SAFE_SUFFIX} file; {rule}"]
    return [f"--lora: adapter folder '{path}' holds no {SAFE_SUFFIX} weights file at its top level"]


def adapter_steps(steps: int, window: float) -> int:
    """How many denoising steps, from the first (noisiest), a LoRA with `--lora-window window` acts on:
    ceil(steps x window), at least 1 (the rule of the RL trainer's `timestep_window`)."""
    return max(1, math.ceil(steps * window - 1e-9))


def load_adapter(pipe: Any, lora: str, scale: float = 1.0) -> None:
    """Load a LoRA adapter (a diffusers/PEFT folder or a kohya safetensors file; safetensors only:
    `adapter_weight_problems`) into `pipe`, every adapted module (UNet, text encoders) at strength
    `scale`: each LoRA update is multiplied by it, so 0 is
    the base model, 1 the adapter as trained, values between interpolate, values above 1 extrapolate and
    negative values reverse the adapter's direction (the "LoRA scale" of diffusers and WebUIs)."""
    problems = adapter_problems(lora, scale)
    if problems:
        raise SuiteError("; ".join(problems))
    from safetensors import SafetensorError

    try:  # safetensors only: diffusers never falls back to unpickling a .bin
        pipe.load_lora_weights(str(Path(lora).expanduser()), adapter_name=ADAPTER_NAME, use_safetensors=True)
    except (OSError, ValueError, KeyError, SafetensorError) as exc:
        raise SuiteError(f"--lora: could not load adapter '{lora}': {str(exc).splitlines()[0]}") from exc
    if scale != 1.0:
        try:
            pipe.set_adapters([ADAPTER_NAME], adapter_weights=[scale])
        except (ValueError, AttributeError, NotImplementedError) as exc:
            raise SuiteError(f"--lora-scale: cannot set adapter '{lora}' to strength {scale:g} on "
                             f"{type(pipe).__name__}: {str(exc).splitlines()[0]}") from exc


def _dtype_keyword() -> str:
    """diffusers 0.40 renamed from_pretrained's `torch_dtype` to `dtype` (the old name warns until 1.0)."""
    from importlib.metadata import version

    major_minor = tuple(int(part) for part in re.findall(r"\d+", version("diffusers"))[:2])
    return "dtype" if major_minor >= (0, 40) else "torch_dtype"


def use_math_attention(unet: Any) -> None:
    """Switch a UNet to diffusers' plain matmul attention (`AttnProcessor`).

    For tiny models: with heads 8 wide PyTorch's fused CPU attention kernel is slower than two matmuls
    and a softmax (measured on 2 cores with the miniature UNet: a training step at batch 128 takes 0.55 s
    instead of 0.70 s). Real models keep their default (fused) attention.
    """
    from diffusers.models.attention_processor import AttnProcessor

    unet.set_attn_processor(AttnProcessor())


# Order in which PyTorch's fused attention kernels are tried on a GPU (the first that supports the call
# runs; none is switched off). None keeps PyTorch's own order. Measured on an H200 with Stable
# Diffusion 1.5's shapes (heads 40 wide, 4,096 tokens) by bench/attention.py: see bench/README.md.
CUDA_ATTENTION_ORDER: tuple[str, ...] | None = None


@contextlib.contextmanager
def attention_order(device: str | torch.device, order: tuple[str, ...] | None = None) -> Iterator[None]:
    """Within the block, try PyTorch's fused attention kernels in `order` (names of
    `torch.nn.attention.SDPBackend`, default `CUDA_ATTENTION_ORDER`) on a CUDA device.

    Only the priority changes: every kernel stays enabled, so a call that the first kernel cannot
    run falls through to the next. On a CPU, with no order, or on PyTorch < 2.6 (which cannot reorder
    without switching kernels off), the block runs unchanged.
    """
    order = CUDA_ATTENTION_ORDER if order is None else order
    known = ("CUDNN_ATTENTION", "FLASH_ATTENTION", "EFFICIENT_ATTENTION", "MATH", "OVERRIDEABLE")
    if bad := [name for name in order or () if name not in known]:
        raise SuiteError(f"attention kernel '{bad[0]}' is unknown{did_you_mean(bad[0], known)}")
    from torch.nn.attention import SDPBackend, sdpa_kernel

    reorders = "set_priority" in inspect.signature(sdpa_kernel).parameters  # PyTorch >= 2.6
    if torch.device(device).type != "cuda" or not order or not reorders:
        yield  # (an older PyTorch cannot reorder kernels without switching some off: keep its order)
        return
    every = [name for name in known if hasattr(SDPBackend, name)]
    names = [n for n in order if n in every] + [n for n in every if n not in order]
    with sdpa_kernel([getattr(SDPBackend, n) for n in names], set_priority=True):
        yield
