"""The battery runner: expand a battery into work units, generate, classify, write, resume, analyse.

A work unit is (prompt, guidance scale, image index). Units are numbered prompt-major, then scale,
then image, and cut into fixed batches of `batch_size`; batch b belongs to process b mod P under
`accelerate launch`. A batch is written as its PNG files (each renamed into place) and then its records
in one appended, fsynced write to the process's own `records.rank{r}.jsonl`, so a killed run loses at
most the batch in flight. Running the same command again resumes: finished batches are skipped (their
images checked against the recorded SHA-256), the records of a batch cut off mid-write are dropped
(`store.repair_shards`), and because batches are fixed, the regenerated batch equals the one that was
lost. When every batch is done, the shards are
merged into `records.jsonl` in unit order and the metric tables are written.

The runner is generic: a model is known through its `evalsuite.models.ModelProfile` (its image domain,
which exact readers ride along, whether an exact reader judges each image on-prompt), the folder's format
and its writing are `evalsuite.results`', the numbers `evalsuite.analysis`'. The battery's `domains` entry
for the model's domain names the classifier and the face detector; classifiers, detectors and embedders
made for another domain are refused before anything loads (`_scoring_problems`), and the detector runs on
each batch before the classifiers (`evalsuite.classifiers.classify_faces`: no face, "no_person").
"""

from __future__ import annotations

import hashlib
import json
import logging
import platform
import re
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from . import __version__
from .battery import Battery, Prompt
from .errors import SuiteError
from .generate import make_generator, unit_seed
from .models import DEFAULT_MODEL, LoadedModel, builtin_model
from .results import schema, store

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

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["results_dir"] = str(self.results_dir)
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


@dataclass
class Plan:
    battery: Battery
    units: list[Unit]
    batch_size: int
    batches: list[list[Unit]] = field(init=False)

    def __post_init__(self) -> None:
        self.batches = [self.units[i:i + self.batch_size] for i in range(0, len(self.units), self.batch_size)]


def plan_units(battery: Battery, batch_size: int) -> Plan:
    units: list[Unit] = []
    for pi, prompt in enumerate(battery.prompts()):
        for g in battery.guidance_scales:
            for ii in range(battery.images_per_prompt):
                seed = unit_seed(battery.name, prompt.text, ii) ^ battery.seed
                units.append(Unit(len(units), pi, prompt, float(g), ii, seed))
    return Plan(battery, units, batch_size)


def default_run_name(battery: Battery, options: RunOptions) -> str:
    model = options.model or DEFAULT_MODEL
    parts = [battery.name, Path(model).name if Path(model).exists() else model]
    if options.lora:
        scale = f"-x{options.lora_scale:g}" if options.lora_scale != 1 else ""
        window = f"-w{options.lora_window:g}" if options.lora_window != 1 else ""
        parts.append("lora-" + Path(options.lora).name + scale + window)
    if battery.eta:
        parts.append(f"eta{battery.eta:g}")
    if options.drop_t5:
        parts.append("no-t5")
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", "__".join(parts)).strip("-")


def fingerprint(battery: Battery, options: RunOptions) -> str:
    """What must match for a folder to be resumed: everything that changes an image or a record."""
    described = battery.to_dict()
    if not described["eta"]:  # eta 0: the fingerprint of folders made before the key existed
        del described["eta"]
    model = None if options.model == DEFAULT_MODEL else options.model  # the default model, named or not
    keys: dict[str, Any] = {"battery": described, "model": model, "revision": options.revision,
            "lora": options.lora, "dtype": options.dtype, "batch_size": options.batch_size,
            "classifiers": list(options.classifiers), "embedder": options.embedder,
            "compile": options.compile}
    if options.lora_scale != 1.0:  # absent at 1: the fingerprint of folders made before the option existed
        keys["lora_scale"] = float(options.lora_scale)  # 2 and 2.0: one run
    if options.lora_window != 1.0:
        keys["lora_window"] = float(options.lora_window)
    if options.drop_t5:  # absent when false: the fingerprint of folders made before the option existed
        keys["drop_t5"] = True
    return hashlib.sha256(json.dumps(keys, sort_keys=True).encode()).hexdigest()[:16]


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


def timed_generate(generator: Any, batch: list[Unit]) -> tuple[np.ndarray, float]:
    t0 = time.perf_counter()
    images = generator.generate([u.prompt.text for u in batch], [u.guidance_scale for u in batch],
                                [u.seed for u in batch])
    return images, time.perf_counter() - t0


def _validate(battery: Battery, options: RunOptions) -> None:
    """Every check that needs no model, all before anything loads."""
    from .models import adapter_problems, check_model_source, pipeline_problems, resolve_dtype

    problems = []
    if options.name is not None and (not _RUN_NAME.fullmatch(options.name) or options.name in (".", "..")):
        problems.append(f"--name: '{options.name}' must be a folder name of letters, digits, '.', '_' and '-' "
                        "(no path: the folder goes under --results)")
    builtin = builtin_model(options.model)
    if options.revision and (builtin is not None or Path(str(options.model)).expanduser().exists()):
        kind = "built in" if builtin is not None else "a local folder"
        problems.append(f"--revision: '{options.revision}' applies to hub models only; "
                        f"'{options.model or DEFAULT_MODEL}' is {kind}")
    for check in (lambda: check_model_source(options.model), lambda: resolve_dtype(options.dtype)):
        try:
            check()
        except SuiteError as exc:
            problems.append(str(exc))
    if options.batch_size < 1:
        problems.append(f"--batch-size: must be >= 1, got {options.batch_size}")
    problems += _scoring_problems(battery, options)
    problems += adapter_problems(options.lora, options.lora_scale, options.lora_window, options.compile)
    problems += pipeline_problems(options.model, options.drop_t5)
    if problems:
        raise SuiteError("cannot run:\n" + "\n".join(f"  - {p}" for p in problems))


def _scoring_problems(battery: Battery, options: RunOptions) -> list[str]:
    """Unknown classifier, detector and embedder specs, and any of them made for another image domain
    than the model's (the miniature world's classifiers on a photograph model, say): from the
    registries and the model's profile alone, before anything loads."""
    from .classifiers import check_classifier_spec, check_detector_spec, check_embedder_spec, domain_problems
    from .models import model_profile

    try:
        domain = model_profile(options.model).domain
    except (OSError, SuiteError):  # a built-in model whose files are missing: check_model_source says so
        return []
    model = options.model or DEFAULT_MODEL
    setup = battery.setup_for(domain)
    problems = []
    for kind, specs, check in (("classifier", options.classifiers or (setup.classifier,), check_classifier_spec),
                               ("detector", (setup.detector,) if setup.detector else (), check_detector_spec),
                               ("embedder", (options.embedder,), check_embedder_spec)):
        for spec in specs:
            problems += check(spec) or domain_problems(kind, spec, domain, model)
    if problems and not options.classifiers and setup.classifier == battery.classifier and battery.domains:
        listed = ", ".join(name for name, _ in battery.domains)
        problems.append(f"the battery {battery.source or battery.name} names classifiers for {listed} images "
                        f"under `domains`, none for {domain} images: add `domains: {{{domain}: {{classifier: "
                        f"...}}}}` or pass --classifier")
    return problems


def run_battery(battery: Battery, options: RunOptions) -> Path:
    """Generate, classify and analyse `battery` under `options`; return the run folder."""
    from accelerate import PartialState

    from .analysis import metric_tables
    from .classifiers import (
        ClassifierContext,
        classify_faces,
        get_classifier,
        get_detector,
        get_embedder,
        to_record,
    )
    from .metrics import confusion_problems
    from .models import load_model, resolve_device
    from .summary import summary_table

    _validate(battery, options)
    import torch

    # cpu=True is what makes accelerate join the processes of a multi-process launch without a GPU (gloo)
    state = PartialState(cpu=options.device == "cpu" or not torch.cuda.is_available())
    rank, world, main = state.process_index, state.num_processes, state.is_main_process
    device = str(state.device) if options.device == "auto" else resolve_device(options.device)
    run_dir = options.results_dir / (options.name or default_run_name(battery, options))
    store.check_writable(options.results_dir)
    plan = plan_units(battery, options.batch_size)
    fp = fingerprint(battery, options)
    # the model, generator and classifiers are built before the folder is touched: a refusal (an eta the
    # scheduler cannot honour, a classifier that cannot read an attribute) leaves the folder as it was
    loaded = load_model(options.model, dtype=options.dtype, device=device, revision=options.revision,
                        lora=options.lora, lora_scale=options.lora_scale,
                        lora_window=options.lora_window, drop_t5=options.drop_t5)
    generator = make_generator(loaded, battery.steps, eta=battery.eta, compile=options.compile)
    ctx = ClassifierContext(device=device, dtype=loaded.denoiser.dtype, profile=loaded.profile)
    setup = battery.setup_for(loaded.profile.domain)
    specs = list(dict.fromkeys([*(options.classifiers or (setup.classifier,)), *loaded.profile.exact_readers]))
    classifiers = {spec: get_classifier(spec, ctx) for spec in specs}
    detector = get_detector(setup.detector, ctx) if setup.detector else None
    problems = [f"classifier '{n}': {p}" for n, c in classifiers.items() for p in c.check(battery.attributes)]
    problems += [f"classifier '{n}' reads detected faces, and the battery names no face detector for "
                 f"{loaded.profile.domain} images (`domains: {{{loaded.profile.domain}: {{detector: ...}}}}`)"
                 for n, c in classifiers.items() if getattr(c, "needs_faces", False) and detector is None]
    problems += [f"classifier '{n}': confusion matrix of '{attr}': {p}" for n, c in classifiers.items()
                 for attr, m in (getattr(c, "confusion", None) or {}).items() if attr in battery.attribute_names
                 for p in confusion_problems(m, battery.attribute(attr).classes)]
    if problems:
        raise SuiteError("cannot run:\n" + "\n".join(f"  - {p}" for p in problems))
    embedder = get_embedder(options.embedder, ctx)
    run_json = run_dir / "run.json"
    store.check_run_folder(run_dir, fp, options.overwrite)  # every process: a refusal ends them all
    state.wait_for_everyone()
    if main:
        store.prepare_run_folder(run_dir, options.overwrite)
    state.wait_for_everyone()
    info = json.loads(run_json.read_text()) if run_json.exists() else {}
    resumed = info.get("status") in ("running", "complete")

    if main:
        for prompt in battery.prompts():
            if unknown := loaded.unknown_words(prompt.text):
                log.warning("prompt %r: words outside the model's vocabulary: %s", prompt.text, ", ".join(unknown))
        new = _run_info(battery, options, loaded, classifiers, setup.detector, fp, world)
        before = {k: info.get(k) for k in _SESSION_KEYS}
        if resumed and any(before[k] is not None and before[k] != new.get(k) for k in _SESSION_KEYS):
            log.warning("%s: resuming a run begun with other versions, commit or device (kept in run.json "
                        "'earlier_sessions'); its earlier images may differ from these at the bit level", run_dir)
            new["earlier_sessions"] = [*info.get("earlier_sessions", []), before]
        info = {**info, **new, "status": "running"}
        info.setdefault("created", store.now())
        store.write_json_atomic(run_json, info)
        store.save_battery(run_dir / "battery.yaml", battery)

    sizes = [len(b) for b in plan.batches]
    if main and resumed:
        store.repair_shards(run_dir, sizes, options.batch_size)
    state.wait_for_everyone()
    done = store.done_batches(run_dir, sizes, options.batch_size) if resumed else set()
    mine = [b for b in range(len(plan.batches)) if b % world == rank and b not in done]
    n_done = sum(len(plan.batches[b]) for b in done)
    if main and done:
        log.info("resuming %s: %d of %d images already made", run_dir, n_done, len(plan.units))
    texts = [p.text for p in battery.prompts()]
    text_emb = dict(zip(texts, embedder.embed_texts(texts)))
    shard = run_dir / f"records.rank{rank}.jsonl"
    bar = progress(len(plan.units), n_done, main and log.isEnabledFor(logging.INFO))
    gen_s = 0.0
    for b in mine:
        batch = plan.batches[b]
        images, dt = timed_generate(generator, batch)
        gen_s += dt
        faces = detector.detect(images) if detector is not None else None
        outputs = {name: classify_faces(clf, images, battery.attributes, faces)
                   for name, clf in classifiers.items()}
        emb = embedder.embed_images(images)
        on_prompt = _read_on_prompt(loaded, images, batch)
        made_records = [schema.make_record(
            unit=u.unit, prompt_index=u.prompt_index, prompt=u.prompt.text, heldout=u.prompt.heldout,
            slots=dict(u.prompt.slots), guidance_scale=u.guidance_scale, image_index=u.image_index, seed=u.seed,
            image=u.image_path(), sha256=store.write_png(run_dir / u.image_path(), images[i]), embedding=emb[i],
            clip_score=100 * max(float(np.dot(emb[i], text_emb[u.prompt.text])), 0.0),
            classifiers={n: to_record(o, battery.attributes, i) for n, o in outputs.items()},
            on_prompt=on_prompt[i], faces=None if faces is None else faces[i].tolist())
            for i, u in enumerate(batch)]
        store.append_records(shard, made_records)
        bar.update(len(batch) * (world if main else 1))
    bar.close()
    from accelerate.utils import gather_object

    gen_s = max(gather_object([gen_s]))  # the slowest process: the run's generation wall time
    if not main:
        return run_dir

    t0 = time.perf_counter()
    records = store.merge_shards(run_dir, len(plan.units))
    tables = metric_tables(records, battery, confusions=_known_confusions(classifiers))
    store.write_tables(run_dir, tables)
    text = summary_table(tables["groups"], tables["diversity"], classifier=specs[0],
                         attributes=[a.name for a in battery.attributes])
    (run_dir / "summary.txt").write_text(text + "\n")
    made = len(plan.units) - n_done
    info.update(status="complete", finished=store.now(), n_images=len(records), timings={
        "generate_s": round(gen_s, 2), "images_made": made,
        "images_per_s": round(made / gen_s, 2) if gen_s else None,
        "analyse_s": round(time.perf_counter() - t0, 2)})
    store.write_json_atomic(run_json, info)
    log.info("results in %s", run_dir)
    return run_dir


def _read_on_prompt(loaded: LoadedModel, images: np.ndarray, batch: list[Unit]) -> list[schema.OnPrompt | None]:
    """Per image, the profile's on-prompt reading (None everywhere when the model has no such reader)."""
    reader = loaded.profile.on_prompt
    if reader is None:
        return [None] * len(batch)
    return reader.read(images, [u.prompt for u in batch])


def _run_info(battery: Battery, options: RunOptions, loaded: LoadedModel, classifiers: dict[str, Any],
              detector: str | None, fp: str, world: int) -> dict[str, Any]:
    from .classifiers import detects_people

    specs = list(classifiers)
    return {
        "schema_version": schema.SCHEMA_VERSION,
        "run_name": Path(options.name or default_run_name(battery, options)).name,
        "fingerprint": fp, "battery": battery.to_dict(), "options": {**options.to_dict(), "processes": world,
        "steps": battery.steps, "eta": battery.eta, "sampler": type(loaded.pipe.scheduler).__name__},
        "model": loaded.describe(), "classifiers": specs, "primary_classifier": specs[0],
        "exact_classifiers": list(loaded.profile.exact_readers),
        "detector": detector,
        "detects_people": {spec: True if detector else detects_people(c) for spec, c in classifiers.items()},
        "classifier_methods": {spec: dict(c.methods) for spec, c in classifiers.items() if getattr(c, "methods", None)},
        "embedder": options.embedder,
        "seeds": {"battery_seed": battery.seed,
                  "rule": "sha256('battery|prompt|image_index')[:8] >> 1, XOR battery seed; same at every scale"},
        "versions": versions(), "git_commit": git_commit(), "device": loaded.device,
    }


def _known_confusions(classifiers: dict[str, Any]) -> dict[tuple[str, str], np.ndarray]:
    out = {}
    for name, clf in classifiers.items():
        for attribute, matrix in (getattr(clf, "confusion", None) or {}).items():
            out[(name, attribute)] = np.asarray(matrix, dtype=float)
    return out
