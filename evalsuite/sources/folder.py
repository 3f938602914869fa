"""Images made elsewhere (exported from a service without an API, or from any other tool), audited as
`evalsuite run BATTERY --images PATH` with the same classifiers, metrics and dashboard as a rendered run.

PATH is a manifest (a .csv or .jsonl file) or a folder. A manifest has one row per image: `prompt` (the
battery prompt's exact text), `path` (the image file, relative to the manifest's folder or absolute),
and optionally `seed` (an int) and `guidance_scale` (a number, one of the battery's scales). A folder
holds either such a manifest, named manifest.csv or manifest.jsonl, or one subfolder per prompt, named by
the prompt's exact text, with its images (IMAGE_SUFFIXES) in file-name order.

Each (battery prompt, guidance scale) must have exactly `images_per_prompt` images (after command-line
overrides); image i of a cell, in manifest or file-name order, is that cell's image index i. Without
`guidance_scale` the images' scale is not known, so the battery must list one scale (a label only). A row
or file that matches no battery prompt, an image that cannot be read, a cell with too few or too many
images: each is one message, all reported together before anything is written.

What a folder exposes: the guidance scale where the manifest gives it, the seed where every row gives
one (a record carries the row's seed, else the unit's derived seed as an identifier only); run.json's
`source` says which.
"""

from __future__ import annotations

import csv
import difflib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from evalsuite.battery import Battery
from evalsuite.errors import SuiteError, did_you_mean
from evalsuite.models import ModelProfile
from evalsuite.sources.base import Made, Source, Wanted, describe_source, one_scale_problem

MANIFESTS = ("manifest.csv", "manifest.jsonl")  # looked for, in this order, in a folder given as --images
COLUMNS = ("prompt", "path", "seed", "guidance_scale")  # of a manifest; the first two are required
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


@dataclass(frozen=True)
class _Row:
    where: str  # "manifest.csv, line 3" or a file's path, for messages
    prompt: str
    path: Path
    seed: int | None
    scale: float | None


Cell = tuple[int, float]  # (prompt index, guidance scale)


@dataclass(frozen=True)
class _Found:
    """A folder read against a battery: per cell its images (path, seed) in order, and what it exposes."""

    cells: dict[Cell, list[tuple[Path, int | None]]]
    exposes: tuple[str, ...]
    layout: str


def folder_problems(path: Path, battery: Battery) -> list[str]:
    """Every problem of `--images PATH` against `battery`, one message each ([]: it can be audited);
    every image is read once."""
    return _read(path, battery, check_images=True)[1]


def folder_source(path: Path, battery: Battery, device: str) -> Source:
    """The images at `path` (a manifest or a folder) as a `Source`. Call `folder_problems` first."""
    found, problems = _read(path, battery, check_images=False)
    if problems:
        raise SuiteError("--images:\n" + "\n".join(f"  - {p}" for p in problems))
    info = describe_source("folder", found.exposes, path=str(path), layout=found.layout,
                           images=sum(len(v) for v in found.cells.values()), requests="none (images made elsewhere)")
    entry = {"id": f"images:{path}", "revision": None, "builtin": False, "domain": "natural", "lora": None,
             "guidance": "as recorded" if "guidance_scale" in found.exposes else "not exposed"}
    return Source(_FolderUnits(found.cells), entry, ModelProfile(), device, info=info)


def folder_name(path: Path) -> str:
    """A short name for the images at `path`, for the default run name: the folder's (a manifest's folder's)."""
    return (path.parent if path.suffix.lower() in (".csv", ".jsonl") else path).resolve().name or "images"


class _FolderUnits:
    """Each unit's image read from its file."""

    def __init__(self, cells: dict[Cell, list[tuple[Path, int | None]]]) -> None:
        self.cells = cells

    def make(self, units: Sequence[Wanted]) -> Made:
        images: list[np.ndarray | None] = []
        seeds: list[int | None] = []
        for unit in units:
            file, seed = self.cells[(unit.prompt_index, unit.guidance_scale)][unit.image_index]
            problem, image = _load(file)
            if image is None:
                raise SuiteError(f"--images: {file}: {problem} (it changed since the run began)")
            images.append(image)
            seeds.append(seed)
        return Made(images, [None] * len(units), seeds)


def _read(path: Path, battery: Battery, check_images: bool) -> tuple[_Found, list[str]]:
    """Read the rows of `path`, match them to the battery's cells, and list every problem."""
    rows, problems, layout = _rows(path, battery)
    index = {p.text: i for i, p in enumerate(battery.prompts())}
    scales = [float(s) for s in battery.guidance_scales]
    with_scale = [r for r in rows if r.scale is not None]
    if not with_scale and (problem := one_scale_problem(battery, f"--images {path} (no guidance_scale column)")):
        problems.append(problem)
    cells: dict[Cell, list[tuple[Path, int | None]]] = {}
    for row in rows:
        found = []
        if row.prompt not in index:
            close = difflib.get_close_matches(row.prompt, list(index), n=1, cutoff=0.6)  # (not all 44 prompts)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            found.append(f"prompt {row.prompt!r} is not a prompt of the battery{hint}")
        if row.scale is None and with_scale:
            found.append("guidance_scale is missing (other rows give one)")
        elif row.scale is not None and row.scale not in scales:
            allowed = ", ".join(f"{s:g}" for s in scales)
            found.append(f"guidance_scale {row.scale:g} is not one of the battery's ({allowed})")
        if check_images and (problem := _load(row.path)[0]):
            found.append(problem)
        problems += [f"{row.where}: {p}" for p in found]
        if not found:
            scale = row.scale if row.scale is not None else scales[0]
            cells.setdefault((index[row.prompt], scale), []).append((row.path, row.seed))
    if not problems:
        problems += _count_problems(cells, battery)
    exposes = tuple(k for k, given in (("guidance_scale", bool(with_scale)),
                                       ("seed", bool(rows) and all(r.seed is not None for r in rows))) if given)
    return _Found(cells, exposes, layout), problems


def _count_problems(cells: dict[Cell, list[tuple[Path, int | None]]], battery: Battery) -> list[str]:
    """A message per (prompt, scale) of the battery without exactly images_per_prompt images."""
    want = battery.images_per_prompt
    out = []
    for pi, prompt in enumerate(battery.prompts()):
        for scale in battery.guidance_scales:
            have = len(cells.get((pi, float(scale)), []))
            if have != want:
                out.append(f"prompt {prompt.text!r} at guidance scale {scale:g}: {have} images, the battery asks "
                           f"for {want} per prompt and scale (change it with --images-per-prompt, or cut the "
                           "battery's prompts with --limit-prompts)")
    return out


def _rows(path: Path, battery: Battery) -> tuple[list[_Row], list[str], str]:
    """The rows of a manifest, or of a folder of per-prompt subfolders; their problems; the layout's name."""
    if not path.exists():
        return [], [f"--images: '{path}' does not exist (give a folder of images or a manifest .csv/.jsonl)"], ""
    if path.is_file():
        return (*_manifest(path), f"manifest {path.name}")
    for name in MANIFESTS:
        if (path / name).is_file():
            return (*_manifest(path / name), f"manifest {name}")
    return (*_subfolders(path), "a subfolder per prompt")


def _manifest(path: Path) -> tuple[list[_Row], list[str]]:
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".jsonl"):
        return [], [f"--images: '{path}' is a file but not a manifest (.csv or .jsonl)"]
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        return [], [f"--images: {path}: cannot read ({exc})"]
    entries: list[tuple[int, Any]] = []
    problems: list[str] = []
    if suffix == ".csv":
        reader = csv.DictReader(text.splitlines())
        try:
            problems += [f"{path.name}: unknown column {c!r}{did_you_mean(c, COLUMNS)}; the columns are "
                         f"{', '.join(COLUMNS)}" for c in reader.fieldnames or () if c not in COLUMNS]
            entries = [(n, row) for n, row in enumerate(reader, start=2)]
        except csv.Error as exc:
            return [], [f"{path.name}, line {reader.line_num + 1}: not CSV ({exc})"]
    else:
        for n, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    entries.append((n, json.loads(line)))
                except ValueError as exc:
                    problems.append(f"{path.name}, line {n}: not JSON ({exc})")
    if not entries and not problems:
        problems.append(f"{path.name}: lists no image")
    rows = []
    for n, raw in entries:
        row, found = _row(raw, f"{path.name}, line {n}", path.parent)
        problems += found
        rows += [row] if row is not None else []
    return rows, problems


def _row(raw: Any, where: str, base: Path) -> tuple[_Row | None, list[str]]:
    """One manifest row (a dict of COLUMNS) as a `_Row`, or its problems."""
    if not isinstance(raw, dict):
        return None, [f"{where}: must be an object with {', '.join(COLUMNS)}"]
    problems = [f"{where}: unknown key {k!r}{did_you_mean(str(k), COLUMNS)}" for k in raw if k not in COLUMNS]
    problems += [f"{where}: {k} is missing" for k in ("prompt", "path") if not raw.get(k)]
    seed, scale = raw.get("seed"), raw.get("guidance_scale")
    try:
        seed = None if seed in (None, "") else int(seed)
    except (TypeError, ValueError):
        problems.append(f"{where}: seed {seed!r} is not an int")
    try:
        scale = None if scale in (None, "") else float(scale)
        if scale is not None and not math.isfinite(scale):
            raise ValueError
    except (TypeError, ValueError):
        problems.append(f"{where}: guidance_scale {scale!r} is not a number")
    if problems:
        return None, problems
    file = Path(str(raw["path"])).expanduser()
    return _Row(where, str(raw["prompt"]), file if file.is_absolute() else base / file, seed, scale), []


def _subfolders(folder: Path) -> tuple[list[_Row], list[str]]:
    try:
        return _listed(folder)
    except OSError as exc:  # an unreadable folder
        return [], [f"--images: '{folder}': cannot list ({exc.strerror or exc})"]


def _listed(folder: Path) -> tuple[list[_Row], list[str]]:
    rows, problems = [], []
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith("."):
            continue
        if not entry.is_dir():
            problems.append(f"{entry}: not in a prompt's subfolder (the layout is {folder}/<prompt>/<image>, "
                            f"or a manifest: {' or '.join(MANIFESTS)})")
            continue
        for file in sorted(entry.iterdir()):
            if file.name.startswith("."):
                continue
            if file.suffix.lower() not in IMAGE_SUFFIXES:
                problems.append(f"{file}: not an image file ({', '.join(IMAGE_SUFFIXES)})")
                continue
            rows.append(_Row(str(file), entry.name, file, None, None))
    if not rows and not problems:
        problems.append(f"--images: '{folder}' holds no image")
    return rows, problems


def _load(file: Path) -> tuple[str | None, np.ndarray | None]:
    """(None, the image as uint8 RGB (H, W, 3)), or (why it cannot be read, None)."""
    if not file.is_file():
        return f"image '{file}' is missing", None
    try:
        with Image.open(file) as im:
            return None, np.asarray(im.convert("RGB"), dtype=np.uint8)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        return f"image '{file}' cannot be read ({exc})", None
