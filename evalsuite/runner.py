"""The battery runner: expand a battery into work units, generate, classify, write, resume, analyse.

A work unit is (prompt, guidance scale, image index). Units are numbered prompt-major, then scale,
then image, and cut into fixed batches of `batch_size`; batch b belongs to process b mod P under
`accelerate launch`. A batch is written as its PNG files (each renamed into place) and then its records
in one appended, fsynced write to the process's own `records.rank{r}.jsonl`, so a killed run loses at
most the batch in flight. Running the same command again resumes: finished batches are skipped (their
images checked against the recorded SHA-256), the records of a batch cut off mid-write are dropped
(`store.repair_shards`), and because batches are fixed, the regenerated batch equals the one that was
lost. When every batch is done, the shards are
merged into `records.jsonl` in unit order and the metric tables are written. Units are computed from their
number when their batch comes (`Plan`), so memory does not grow with the battery (`evalsuite.battery` bounds it).

One run writes a folder at a time: the main process holds its lock (`evalsuite.locks.folder_lock`) from
before the model loads (a folder that does not exist yet: from its creation, after the model loaded) to the
end, and a second run is refused naming the first's process, on every process of a launch. Nothing is
created before the model loads. A write that fails (a full disk) is one `SuiteError` naming the file, with
no partial file left; the same command resumes.

The images come from a `evalsuite.sources.Source`: a diffusers pipeline and its generator, a hosted image
API (`--model openai:NAME`) or a folder of images made elsewhere (`--images`); its generator makes a batch's
units into images, or refusals, which get a refused record (`schema.refused_record`). Images of one size are
scored together. A source that keeps what it received for a resume (a hosted API's paid images) keeps it in
its `scratch` folder under the run folder until the run completes.

The runner is generic: a model is known through its `evalsuite.models.ModelProfile` (its image domain,
which exact readers ride along, whether an exact reader judges each image on-prompt), the folder's format
and its writing are `evalsuite.results`', the numbers `evalsuite.analysis`'. The battery's `domains` entry
for the model's domain names the classifier and the face detector; classifiers, detectors and embedders
made for another domain are refused before anything loads (`_scoring_problems`), and the detector runs on
each batch before the classifiers (`evalsuite.classifiers.classify_faces`: no face, "no_person").
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import platform
import re
import shutil
import subprocess
import time
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from . import __version__
from .battery import Battery, Prompt
from .errors import SuiteError
from .generate import make_generator, unit_seed
from .locks import folder_lock
from .models import DEFAULT_MODEL, ModelProfile, builtin_model
from .results import schema, store
from .sources import HostedOptions, Made, Source, folder_name, is_hosted

log = logging.getLogger(__name__)

_RUN_NAME = re.compile(r"[A-Za-z0-9_.-]+")
_SESSION_KEYS = ("versions", "git_commit", "device")  # may differ between a run and its resumption


@dataclass(frozen=True)
class RunOptions:
    """Everything about a run that is not in the battery (command-line options)."""

    results_dir: Path = Path("results")
    name: str | None = None
    model: str | None = None
    revision: str | None = None
    lora: str | None = None
    lora_scale: float = 1.0  # strength of the LoRA adapter (models.load_adapter)
    lora_window: float = 1.0  # share of the denoising steps, from the first, the adapter acts on
    dtype: str = "float32"
    device: str = "auto"
    batch_size: int = 64
    classifiers: tuple[str, ...] = ()
    embedder: str = "clip"
    overwrite: bool = False
    compile: bool = False  # torch.compile the denoiser (and SD's decoder; pays on GPUs for long runs)
    drop_t5: bool = False  # load an SD3 pipeline without its T5 text encoder (--no-t5)
    images: str | None = None  # audit images made elsewhere: a folder or a manifest (evalsuite.sources.folder)
    hosted: HostedOptions = HostedOptions()  # how to reach a hosted --model openai:NAME (evalsuite.sources.hosted)

    def to_dict(self) -> dict[str, Any]:
        """The options as run.json's `options` holds them (`images` and `hosted` only where they apply)."""
        d = asdict(self)
        d["results_dir"] = str(self.results_dir)
        if self.images is None:
            del d["images"]
        if not is_hosted(self.model):
            del d["hosted"]
        return d


@dataclass(frozen=True)
class Unit:
    unit: int
    prompt_index: int
    prompt: Prompt
    guidance_scale: float
    image_index: int
    seed: int

    def image_path(self) -> str:
        return f"images/p{self.prompt_index:03d}/g{self.guidance_scale:g}/i{self.image_index:04d}.png"


@dataclass(frozen=True)
class Plan:
    """The run's work units, numbered prompt-major, then scale, then image, and cut into fixed batches of
    `batch_size` (the last may be shorter). A unit is computed from its number when asked for, so memory
    does not grow with the battery: only the prompts are held."""

    battery: Battery
    batch_size: int
    prompts: tuple[Prompt, ...]

    @property
    def n_units(self) -> int:
        return len(self.prompts) * len(self.battery.guidance_scales) * self.battery.images_per_prompt

    @property
    def n_batches(self) -> int:
        return -(-self.n_units // self.batch_size)

    def unit(self, number: int) -> Unit:
        """Unit `number`: its prompt, scale and image index, and its seed (paired across scales)."""
        b = self.battery
        per_prompt = len(b.guidance_scales) * b.images_per_prompt
        pi, rest = divmod(number, per_prompt)
        gi, ii = divmod(rest, b.images_per_prompt)
        prompt = self.prompts[pi]
        seed = unit_seed(b.name, prompt.text, ii) ^ b.seed
        return Unit(number, pi, prompt, float(b.guidance_scales[gi]), ii, seed)

    def batch(self, index: int) -> list[Unit]:
        """The units of batch `index`."""
        start = index * self.batch_size
        return [self.unit(k) for k in range(start, min(start + self.batch_size, self.n_units))]


def plan_units(battery: Battery, batch_size: int) -> Plan:
    """The battery's work units in batches of `batch_size` (computed lazily: `Plan`)."""
    return Plan(battery, batch_size, battery.prompts())


def default_run_name(battery: Battery, options: RunOptions) -> str:
    model = options.model or DEFAULT_MODEL
    parts = [battery.name, Path(model).name if Path(model).exists() else model]
    if options.images is not None:
        parts = [battery.name, "images-" + folder_name(Path(options.images))]
    if options.lora:
        scale = f"-x{options.lora_scale:g}" if options.lora_scale != 1 else ""
        window = f"-w{options.lora_window:g}" if options.lora_window != 1 else ""
        parts.append("lora-" + Path(options.lora).name + scale + window)
    if battery.eta:
        parts.append(f"eta{battery.eta:g}")
    if options.drop_t5:
        parts.append("no-t5")
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", "__".join(parts)).strip("-")


def fingerprint_keys(battery: Mapping[str, Any], options: Mapping[str, Any]) -> dict[str, Any]:
    """What must match for a folder to be resumed, from a battery's `to_dict()` and the options' `to_dict()`
    (or run.json's `battery` and `options`): everything that changes an image or a record."""
    described = dict(battery)
    if not described.get("eta"):  # eta 0: the fingerprint of folders made before the key existed
        described.pop("eta", None)
    model = options.get("model")
    keys: dict[str, Any] = {
        "battery": described, "model": None if model == DEFAULT_MODEL else model,  # the default model, named or not
        "revision": options.get("revision"), "lora": options.get("lora"), "dtype": options.get("dtype"),
        "batch_size": options.get("batch_size"), "classifiers": list(options.get("classifiers") or ()),
        "embedder": options.get("embedder"), "compile": options.get("compile")}
    # each absent at its default: the fingerprint of folders made before the option existed
    if options.get("lora_scale", 1.0) != 1.0:
        keys["lora_scale"] = float(options["lora_scale"])  # 2 and 2.0: one run
    if options.get("lora_window", 1.0) != 1.0:
        keys["lora_window"] = float(options["lora_window"])
    if options.get("drop_t5"):
        keys["drop_t5"] = True
    if options.get("images") is not None:
        keys["images"] = options["images"]
    if is_hosted(model) and isinstance(options.get("hosted"), Mapping):  # what changes a hosted image
        keys.update({f"hosted.{k}": options["hosted"].get(k) for k in ("base", "size", "quality", "response_format")})
    return keys


def fingerprint(battery: Battery, options: RunOptions) -> str:
    """The hash of `fingerprint_keys`: a folder resumes only under the same one."""
    keys = fingerprint_keys(battery.to_dict(), options.to_dict())
    return hashlib.sha256(json.dumps(keys, sort_keys=True).encode()).hexdigest()[:16]


def config_differences(info: Mapping[str, Any], battery: Battery, options: RunOptions) -> list[str]:
    """What differs between the run a folder's run.json describes and this one, key by key
    ("battery.images_per_prompt: 4 in the folder, 8 now"), from the inputs of the fingerprint."""
    recorded: dict[str, Any] = info["battery"] if isinstance(info.get("battery"), dict) else {}
    used: dict[str, Any] = info["options"] if isinstance(info.get("options"), dict) else {}
    old = fingerprint_keys(recorded, used)
    new = fingerprint_keys(battery.to_dict(), options.to_dict())
    old_flat = {**{f"battery.{k}": v for k, v in recorded.items()}, **{k: v for k, v in old.items() if k != "battery"}}
    new_flat = {**{f"battery.{k}": v for k, v in battery.to_dict().items()},
                **{k: v for k, v in new.items() if k != "battery"}}
    return [f"{key}: {_shown(old_flat.get(key))} in the folder, {_shown(new_flat.get(key))} now"
            for key in dict.fromkeys([*old_flat, *new_flat]) if _plain(old_flat.get(key)) != _plain(new_flat.get(key))]


def _plain(value: Any) -> Any:
    """A value as JSON would read it back (tuples as lists), for comparing run.json with this run."""
    return json.loads(json.dumps(value))


def _shown(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 80 else text[:77] + "..."


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).parent)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def versions() -> dict[str, str]:
    import diffusers
    import torch
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__, "diffusers": diffusers.__version__,
            "transformers": transformers.__version__, "evalsuite": __version__}


def progress(total: int, initial: int, enabled: bool) -> tqdm:
    return tqdm(total=total, initial=initial, unit="img", desc="generate", disable=not enabled, dynamic_ncols=True)


def timed_make(source: Source, batch: list[Unit]) -> tuple[Made, float]:
    t0 = time.perf_counter()
    made = source.generator.make(batch)
    return made, time.perf_counter() - t0


def _validate(battery: Battery, options: RunOptions) -> None:
    """Every check that needs no model, all before anything loads."""
    from .models import adapter_problems, check_model_source, pipeline_problems, resolve_dtype

    problems = []
    if options.name is not None and (not _RUN_NAME.fullmatch(options.name) or options.name in (".", "..")):
        problems.append(f"--name: '{options.name}' must be a folder name of letters, digits, '.', '_' and '-' "
                        "(no path: the folder goes under --results)")
    other_source = options.images is not None or is_hosted(options.model)
    builtin = None if other_source else builtin_model(options.model)
    if options.revision and (builtin is not None or Path(str(options.model)).expanduser().exists()):
        kind = "built in" if builtin is not None else "a local folder"
        problems.append(f"--revision: '{options.revision}' applies to hub models only; "
                        f"'{options.model or DEFAULT_MODEL}' is {kind}")
    checks = [lambda: resolve_dtype(options.dtype)] if other_source else \
        [lambda: check_model_source(options.model), lambda: resolve_dtype(options.dtype)]
    for check in checks:
        try:
            check()
        except SuiteError as exc:
            problems.append(str(exc))
    if options.batch_size < 1:
        problems.append(f"--batch-size: must be >= 1, got {options.batch_size}")
    if other_source:
        problems += _source_problems(battery, options)
    elif changed := options.hosted.changed():
        problems.append(f"{', '.join(changed)}: given without a hosted model (--model openai:NAME)")
    problems += _scoring_problems(battery, options)
    if not other_source:
        problems += adapter_problems(options.lora, options.lora_scale, options.lora_window, options.compile)
        problems += pipeline_problems(options.model, options.drop_t5)
    if problems:
        raise SuiteError("cannot run:\n" + "\n".join(f"  - {p}" for p in problems))


def _source_problems(battery: Battery, options: RunOptions) -> list[str]:
    """What is wrong with a hosted model (`--model openai:NAME`) or a folder of images (`--images`) and
    the options given with it, one message each, before any request or image is read twice."""
    from .sources import folder_problems, hosted_problems, one_scale_problem

    who = f"--images {options.images}" if options.images is not None else f"the hosted model '{options.model}'"
    diffusers_only = [("--revision", options.revision is not None), ("--lora", options.lora is not None),
                      ("--lora-scale", options.lora_scale != 1.0), ("--lora-window", options.lora_window != 1.0),
                      ("--compile", options.compile), ("--no-t5", options.drop_t5)]
    problems = [f"{flag}: applies to diffusers models only, not to {who}" for flag, given in diffusers_only if given]
    if options.images is not None:
        if options.model is not None:
            problems.append(f"--model: '{options.model}' given with --images (images made elsewhere): drop one")
        if changed := options.hosted.changed():
            problems.append(f"{', '.join(changed)}: given without a hosted model (--model openai:NAME)")
        return problems + folder_problems(Path(options.images), battery)
    problems += hosted_problems(str(options.model), options.hosted)
    return problems + [p for p in [one_scale_problem(battery, who)] if p]


def _profile(options: RunOptions) -> ModelProfile:
    """The profile the audited images are scored with, known before anything loads: a hosted model's and a
    folder's are the default (natural images)."""
    from .models import model_profile

    return ModelProfile() if options.images is not None or is_hosted(options.model) else model_profile(options.model)


def _scoring_problems(battery: Battery, options: RunOptions) -> list[str]:
    """Unknown classifier, detector and embedder specs, and any of them made for another image domain
    than the model's (the miniature world's classifiers on a photograph model, say): from the
    registries and the model's profile alone, before anything loads."""
    from .battery import battery_plugin_problems
    from .classifiers import check_classifier_spec, check_detector_spec, check_embedder_spec, domain_problems

    try:
        domain = _profile(options).domain
    except (OSError, SuiteError):  # a built-in model whose files are missing: check_model_source says so
        return []
    model = f"images {options.images}" if options.images is not None else options.model or DEFAULT_MODEL
    setup = battery.setup_for(domain)
    problems = []
    for kind, specs, check in (("classifier", options.classifiers or (setup.classifier,), check_classifier_spec),
                               ("detector", (setup.detector,) if setup.detector else (), check_detector_spec),
                               ("embedder", (options.embedder,), check_embedder_spec)):
        for spec in specs:
            problems += check(spec) or domain_problems(kind, spec, domain, model)
    wrong_domain = bool(domain_problems("classifier", setup.classifier, domain, model))
    problems += battery_plugin_problems(battery, domain, with_classifier=not options.classifiers)
    if wrong_domain and not options.classifiers and setup.classifier == battery.classifier and battery.domains:
        listed = ", ".join(name for name, _ in battery.domains)
        problems.append(f"the battery {battery.source or battery.name} names classifiers for {listed} images "
                        f"under `domains`, none for {domain} images: add `domains: {{{domain}: {{classifier: "
                        f"...}}}}` or pass --classifier")
    return problems


@dataclass
class _Scoring:
    """What a run loads before it touches its folder: the source of its images (a model and its generator,
    a hosted service, a folder) and what scores its images."""

    source: Source
    classifiers: dict[str, Any]
    detector: Any
    detector_spec: str | None
    embedder: Any

    @property
    def specs(self) -> list[str]:
        return list(self.classifiers)


class _FolderLock:
    """The run folder's lock (`evalsuite.locks.folder_lock`), held by the main process for the rest of the
    run. `take` is collective: every process calls it at the same point and raises the main process's
    refusal, so that a refusal ends them all."""

    def __init__(self, state: Any, run_dir: Path, stack: contextlib.ExitStack) -> None:
        self.state, self.run_dir, self.stack, self.held = state, run_dir, stack, False

    def take(self, create: bool) -> None:
        """Lock the folder if it exists (or, with `create`, after creating it); not again if held."""
        from accelerate.utils import gather_object

        refusal = None
        if self.state.is_main_process and not self.held and (create or self.run_dir.is_dir()):
            try:
                self.run_dir.mkdir(parents=True, exist_ok=True)
                self.stack.enter_context(folder_lock(self.run_dir, "evalsuite run"))
                self.held = True
            except SuiteError as exc:
                refusal = str(exc)
            except OSError as exc:
                refusal = f"{self.run_dir}: cannot create the results folder ({exc.strerror or exc})"
        refusals = [r for r in gather_object([refusal]) if r]
        if refusals:
            raise SuiteError(refusals[0])


def run_battery(battery: Battery, options: RunOptions) -> Path:
    """Generate, classify and analyse `battery` under `options`; return the run folder."""
    from accelerate import PartialState

    from .models import resolve_device

    _validate(battery, options)
    import torch

    # cpu=True is what makes accelerate join the processes of a multi-process launch without a GPU (gloo)
    state = PartialState(cpu=options.device == "cpu" or not torch.cuda.is_available())
    device = str(state.device) if options.device == "auto" else resolve_device(options.device)
    run_dir = options.results_dir / (options.name or default_run_name(battery, options))
    store.check_writable(options.results_dir)  # creates nothing: a model that fails to load leaves no folder
    fp = fingerprint(battery, options)

    def check() -> None:  # every process: a refusal ends them all
        store.check_run_folder(run_dir, fp, options.overwrite, lambda info: config_differences(info, battery, options))

    check()
    with contextlib.ExitStack() as stack:
        lock = _FolderLock(state, run_dir, stack)
        lock.take(create=False)  # a folder that exists is locked before anything heavy loads
        # the model, generator and classifiers are built before the folder is written: a refusal (an eta the
        # scheduler cannot honour, a classifier that cannot read an attribute) leaves the folder as it was
        scoring = _load_scoring(battery, options, device, run_dir)
        lock.take(create=True)
        check()  # again under the lock: another run may have written the folder in between
        return _run_locked(state, battery, options, run_dir, fp, scoring)


def _open_source(battery: Battery, options: RunOptions, device: str, run_dir: Path) -> tuple[Source, Any]:
    """The source of the run's images and the dtype its classifiers run in: a hosted model or a folder of
    images (float32 unless --dtype), else the model loaded with its generator (its denoiser's dtype)."""
    from .models import load_model, resolve_dtype
    from .sources import folder_source, hosted_source, pipeline_source

    if options.images is not None:
        return folder_source(Path(options.images), battery, device), resolve_dtype(options.dtype)
    if is_hosted(options.model):
        return hosted_source(str(options.model), options.hosted, device, run_dir), resolve_dtype(options.dtype)
    loaded = load_model(options.model, dtype=options.dtype, device=device, revision=options.revision,
                        lora=options.lora, lora_scale=options.lora_scale,
                        lora_window=options.lora_window, drop_t5=options.drop_t5)
    generator = make_generator(loaded, battery.steps, eta=battery.eta, compile=options.compile)
    return pipeline_source(loaded, generator), loaded.denoiser.dtype


def _load_scoring(battery: Battery, options: RunOptions, device: str, run_dir: Path) -> _Scoring:
    """Open the source of the images (load the model and its generator), the classifiers, the detector and
    the embedder; SuiteError with every problem a classifier finds in the battery."""
    from .classifiers import ClassifierContext, get_classifier, get_detector, get_embedder
    from .metrics import confusion_problems

    source, dtype = _open_source(battery, options, device, run_dir)
    profile = source.profile
    ctx = ClassifierContext(device=device, dtype=dtype, profile=profile)
    setup = battery.setup_for(profile.domain)
    specs = list(dict.fromkeys([*(options.classifiers or (setup.classifier,)), *profile.exact_readers]))
    classifiers = {spec: get_classifier(spec, ctx) for spec in specs}
    detector = get_detector(setup.detector, ctx) if setup.detector else None
    problems = [f"classifier '{n}': {p}" for n, c in classifiers.items() for p in c.check(battery.attributes)]
    problems += [f"classifier '{n}' reads detected faces, and the battery names no face detector for "
                 f"{profile.domain} images (`domains: {{{profile.domain}: {{detector: ...}}}}`)"
                 for n, c in classifiers.items() if getattr(c, "needs_faces", False) and detector is None]
    problems += [f"classifier '{n}': confusion matrix of '{attr}': {p}" for n, c in classifiers.items()
                 for attr, m in (getattr(c, "confusion", None) or {}).items() if attr in battery.attribute_names
                 for p in confusion_problems(m, battery.attribute(attr).classes)]
    if problems:
        raise SuiteError("cannot run:\n" + "\n".join(f"  - {p}" for p in problems))
    return _Scoring(source, classifiers, detector, setup.detector, get_embedder(options.embedder, ctx))


def _start_run_json(run_dir: Path, battery: Battery, options: RunOptions, scoring: _Scoring, fp: str, world: int,
                    info: dict[str, Any], resumed: bool) -> dict[str, Any]:
    """Main process: run.json (status running, earlier sessions kept) and battery.yaml; returns run.json's data."""
    for prompt in battery.prompts():
        if unknown := scoring.source.profile.unknown_words(prompt.text):
            log.warning("prompt %r: words outside the model's vocabulary: %s", prompt.text, ", ".join(unknown))
    new = _run_info(battery, options, scoring.source, scoring.classifiers, scoring.detector_spec, fp, world)
    before = {k: info.get(k) for k in _SESSION_KEYS}
    if resumed and any(before[k] is not None and before[k] != new.get(k) for k in _SESSION_KEYS):
        log.warning("%s: resuming a run begun with other versions, commit or device (kept in run.json "
                    "'earlier_sessions'); its earlier images may differ from these at the bit level", run_dir)
        new["earlier_sessions"] = [*info.get("earlier_sessions", []), before]
    info = {**info, **new, "status": "running"}
    info.setdefault("created", store.now())
    store.write_json_atomic(run_dir / "run.json", info)
    store.save_battery(run_dir / "battery.yaml", battery)
    return info


def _make_batch(run_dir: Path, battery: Battery, scoring: _Scoring, batch: list[Unit],
                text_emb: dict[str, np.ndarray]) -> tuple[list[schema.Record], float]:
    """Make, score and write one batch's images; its records (in unit order) and the generation time.

    Images are scored together where they have one size (always, for a pipeline); an image the source
    refused to make gets a refused record (`schema.refused_record`)."""
    made, dt = timed_make(scoring.source, batch)
    records: list[schema.Record] = []
    for idx in _same_size(made.images):
        images = np.stack([made.images[i] for i in idx])  # type: ignore[misc]  # _same_size skips None
        records += _score(run_dir, battery, scoring, [batch[i] for i in idx], images, [made.seeds[i] for i in idx],
                          text_emb)
    attributes = battery.attribute_names
    records += [schema.refused_record(
        unit=u.unit, prompt_index=u.prompt_index, prompt=u.prompt.text, heldout=u.prompt.heldout,
        slots=dict(u.prompt.slots), guidance_scale=u.guidance_scale, image_index=u.image_index, seed=u.seed,
        classifiers={name: attributes for name in scoring.classifiers}, reason=str(made.refusals[i]))
        for i, u in enumerate(batch) if made.images[i] is None]
    return sorted(records, key=lambda r: r["unit"]), dt


def _same_size(images: list[np.ndarray | None]) -> list[list[int]]:
    """Indices of the images (None: refused, skipped) grouped by shape, in order of first appearance."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, image in enumerate(images):
        if image is not None:
            groups.setdefault(image.shape, []).append(i)
    return list(groups.values())


def _score(run_dir: Path, battery: Battery, scoring: _Scoring, batch: list[Unit], images: np.ndarray,
           seeds: list[int | None], text_emb: dict[str, np.ndarray]) -> list[schema.Record]:
    """Score and write images of one size (n, H, W, 3) made for `batch`; their records. `seeds`: the seed an
    image was made with where the source knows one other than its unit's."""
    from .classifiers import classify_faces, to_record

    faces = scoring.detector.detect(images) if scoring.detector is not None else None
    outputs = {name: classify_faces(clf, images, battery.attributes, faces)
               for name, clf in scoring.classifiers.items()}
    emb = scoring.embedder.embed_images(images)
    on_prompt = _read_on_prompt(scoring.source.profile, images, batch)
    return [schema.make_record(
        unit=u.unit, prompt_index=u.prompt_index, prompt=u.prompt.text, heldout=u.prompt.heldout,
        slots=dict(u.prompt.slots), guidance_scale=u.guidance_scale, image_index=u.image_index,
        seed=u.seed if seeds[i] is None else int(seeds[i]),  # type: ignore[arg-type]
        image=u.image_path(), sha256=store.write_png(run_dir / u.image_path(), images[i]), embedding=emb[i],
        clip_score=100 * max(float(np.dot(emb[i], text_emb[u.prompt.text])), 0.0),
        classifiers={n: to_record(o, battery.attributes, i) for n, o in outputs.items()},
        on_prompt=on_prompt[i], faces=None if faces is None else faces[i].tolist())
        for i, u in enumerate(batch)]


def _my_batches(n_batches: int, rank: int, world: int, done: set[int]) -> Iterator[int]:
    """This process's batches still to make (batch b belongs to process b mod world), in order."""
    return (b for b in range(rank, n_batches, world) if b not in done)


def _run_locked(state: Any, battery: Battery, options: RunOptions, run_dir: Path, fp: str,
                scoring: _Scoring) -> Path:
    """The run proper, once the folder is checked and locked: resume, generate, merge, analyse."""
    from accelerate.utils import gather_object

    from .analysis import metric_tables
    from .summary import summary_table

    rank, world, main = state.process_index, state.num_processes, state.is_main_process
    plan = plan_units(battery, options.batch_size)
    run_json = run_dir / "run.json"
    state.wait_for_everyone()
    if main:
        store.prepare_run_folder(run_dir, options.overwrite)
    state.wait_for_everyone()
    info = json.loads(run_json.read_text()) if run_json.exists() else {}
    resumed = info.get("status") in ("running", "complete")
    if main:
        info = _start_run_json(run_dir, battery, options, scoring, fp, world, info, resumed)
        if resumed:
            store.repair_shards(run_dir, plan.n_units, options.batch_size)
    state.wait_for_everyone()
    done = store.done_batches(run_dir, plan.n_units, options.batch_size) if resumed else set()
    n_done = sum(store.batch_len(b, plan.n_units, options.batch_size) for b in done)
    if main and done:
        log.info("resuming %s: %d of %d images already made", run_dir, n_done, plan.n_units)
    texts = [p.text for p in plan.prompts]
    text_emb = dict(zip(texts, scoring.embedder.embed_texts(texts)))
    shard = run_dir / f"records.rank{rank}.jsonl"
    bar = progress(plan.n_units, n_done, main and log.isEnabledFor(logging.INFO))
    gen_s = 0.0
    for b in _my_batches(plan.n_batches, rank, world, done):
        batch = plan.batch(b)
        made_records, dt = _make_batch(run_dir, battery, scoring, batch, text_emb)
        gen_s += dt
        store.append_records(shard, made_records)
        bar.update(len(batch) * (world if main else 1))
    bar.close()
    gen_s = max(gather_object([gen_s]))  # the slowest process: the run's generation wall time
    if not main:
        return run_dir

    t0 = time.perf_counter()
    records = store.merge_shards(run_dir, plan.n_units)
    tables = metric_tables(records, battery, confusions=_known_confusions(scoring.classifiers),
                           refusals=scoring.source.refusals)
    store.write_tables(run_dir, tables)
    text = summary_table(tables["groups"], tables["diversity"], classifier=scoring.specs[0],
                         attributes=[a.name for a in battery.attributes])
    store.write_text(run_dir / "summary.txt", text + "\n")
    made = plan.n_units - n_done
    info.update(status="complete", finished=store.now(), n_images=len(records), timings={
        "generate_s": round(gen_s, 2), "images_made": made,
        "images_per_s": round(made / gen_s, 2) if gen_s else None,
        "analyse_s": round(time.perf_counter() - t0, 2)})
    store.write_json_atomic(run_json, info)
    if scoring.source.scratch:  # what a hosted service returned: its images are in images/ now
        shutil.rmtree(run_dir / scoring.source.scratch, ignore_errors=True)
    log.info("results in %s", run_dir)
    return run_dir


def _read_on_prompt(profile: ModelProfile, images: np.ndarray, batch: list[Unit]) -> list[schema.OnPrompt | None]:
    """Per image, the profile's on-prompt reading (None everywhere when the model has no such reader)."""
    reader = profile.on_prompt
    if reader is None:
        return [None] * len(batch)
    return reader.read(images, [u.prompt for u in batch])


def _run_info(battery: Battery, options: RunOptions, source: Source, classifiers: dict[str, Any],
              detector: str | None, fp: str, world: int) -> dict[str, Any]:
    from .classifiers import detects_people

    specs = list(classifiers)
    return {
        "schema_version": schema.SCHEMA_VERSION,
        "run_name": Path(options.name or default_run_name(battery, options)).name,
        "fingerprint": fp, "battery": battery.to_dict(), "options": {**options.to_dict(), "processes": world,
        "steps": battery.steps, "eta": battery.eta, "sampler": source.sampler},
        "model": source.model, **({"source": source.info} if source.info is not None else {}),
        "classifiers": specs, "primary_classifier": specs[0], "exact_classifiers": list(source.profile.exact_readers),
        "detector": detector,
        "detects_people": {spec: True if detector else detects_people(c) for spec, c in classifiers.items()},
        "classifier_methods": {spec: dict(c.methods) for spec, c in classifiers.items() if getattr(c, "methods", None)},
        "embedder": options.embedder,
        "seeds": {"battery_seed": battery.seed,
                  "rule": "sha256('battery|prompt|image_index')[:8] >> 1, XOR battery seed; same at every scale"},
        "versions": versions(), "git_commit": git_commit(), "device": source.device,
    }


def _known_confusions(classifiers: dict[str, Any]) -> dict[tuple[str, str], np.ndarray]:
    out = {}
    for name, clf in classifiers.items():
        for attribute, matrix in (getattr(clf, "confusion", None) or {}).items():
            out[(name, attribute)] = np.asarray(matrix, dtype=float)
    return out
