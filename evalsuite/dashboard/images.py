"""The images page's seed × scale grids (per prompt: a row per image index, whose paired seed starts the
same noise at every guidance value, and a column per guidance value), with the primary classifier's labels
and the face detector's boxes over each image; and near-duplicate alerts.

Images are re-encoded (never copied byte for byte) into the site as PNG thumbnails at most `THUMB` pixels
on a side, under names built from indices only (no user text reaches a file name). Face boxes are drawn as
an SVG overlay whose rectangles are placed in percent of the image's width and height, so they scale with
the thumbnail; the pages' Content-Security-Policy forbids inline style attributes, which SVG geometry is not.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from evalsuite.dashboard.guidance import at_value
from evalsuite.dashboard.html import esc
from evalsuite.errors import SuiteError
from evalsuite.metrics import NEAR_DUPLICATE_COSINE, near_duplicate_pairs
from evalsuite.results import RunView

THUMB = 192
PIXELATED_BELOW = 128  # small renders are scaled up without smoothing
MAX_ALERTS = 24
STATUS_TEXT = {"no_person": "no person", "not_measurable": "not measurable"}


@dataclass(frozen=True)
class Thumb:
    src: str  # relative to the site root
    width: int
    height: int
    small: bool
    source: tuple[int, int]  # the image's own width and height in pixels (what face boxes are given in)


class ThumbWriter:
    """Writes each record's thumbnail once, under images/<run slug>/..."""

    def __init__(self, site: Path, slug: str, view: RunView) -> None:
        self.site, self.slug, self.view = site, slug, view
        self.done: dict[tuple[int, float, int], Thumb] = {}
        self.scale_ids: dict[float, int] = {}

    def __call__(self, rec: dict[str, Any]) -> Thumb:
        key = (int(rec["prompt_index"]), float(rec["guidance_scale"]), int(rec["image_index"]))
        if key not in self.done:
            sid = self.scale_ids.setdefault(key[1], len(self.scale_ids))
            rel = f"images/{self.slug}/p{key[0]:04d}_g{sid:02d}_i{key[2]:05d}.png"
            thumb, size = self._read(rec)
            (self.site / rel).parent.mkdir(parents=True, exist_ok=True)
            thumb.save(self.site / rel, format="PNG", optimize=False)
            self.done[key] = Thumb(rel, thumb.width, thumb.height, max(size) < PIXELATED_BELOW, size)
        return self.done[key]

    def _read(self, rec: dict[str, Any]) -> tuple[Image.Image, tuple[int, int]]:
        """The record's image as an RGB thumbnail, and the image's own size; SuiteError naming the file and
        the record where it cannot be read (a damaged or truncated PNG)."""
        path = self.view.image_path(rec)
        try:
            with Image.open(path) as img:
                size = (img.width, img.height)
                thumb = img.convert("RGB")
        except (OSError, ValueError, Image.DecompressionBombError) as exc:  # UnidentifiedImageError is an OSError
            raise SuiteError(
                f"{path}: cannot read the image of record unit {rec.get('unit')} (prompt {rec.get('prompt_index')}, "
                f"guidance {rec.get('guidance_scale')}, image {rec.get('image_index')}) in "
                f"{self.view.path / 'records.jsonl'}: {exc}; the image is damaged: regenerate the run with the "
                "same `evalsuite run` command and --overwrite") from None
        thumb.thumbnail((THUMB, THUMB))
        return thumb, size


def cells(view: RunView) -> dict[tuple[int, float], list[dict[str, Any]]]:
    """Records per (prompt_index, guidance scale), each cell sorted by image index."""
    out: dict[tuple[int, float], list[dict[str, Any]]] = {}
    for rec in view.records:
        out.setdefault((rec["prompt_index"], rec["guidance_scale"]), []).append(rec)
    return {k: sorted(v, key=lambda r: r["image_index"]) for k, v in sorted(out.items())}


# ---------------------------------------------------------------- what is drawn over an image


def labels(view: RunView, rec: dict[str, Any], classifier: str, attributes: Sequence[str]) -> list[str]:
    """The classifier's reading of each attribute: its label, or its status where it has none ("age: not
    measurable"); one "no person" where it found no one for any attribute."""
    statuses = [view.status(rec, classifier, a) for a in attributes]
    if statuses and all(s == "no_person" for s in statuses):
        return [STATUS_TEXT["no_person"]]
    out = []
    for attr, status in zip(attributes, statuses, strict=True):
        found = view.label(rec, classifier, attr)
        out.append(found if found is not None else f"{attr}: {STATUS_TEXT.get(status, status)}")
    return out


def face_list(rec: dict[str, Any]) -> list[tuple[float, ...]] | None:
    """The record's face boxes ``(x0, y0, x1, y1, score)`` in the image's pixels, largest first: None where
    no face detector ran (no `faces` key, or null), [] where one ran and found no face."""
    raw = rec.get("faces")
    if raw is None:
        return None
    boxes = raw if isinstance(raw, list) else [raw]
    for box in boxes:
        if not isinstance(box, list) or len(box) != 5 or not all(_finite(v) for v in box):
            raise SuiteError(f"record unit {rec.get('unit')} (image {rec.get('image')}): faces must be a list of "
                             f"[x0, y0, x1, y1, score] boxes of numbers, got {raw!r}")
    return [tuple(float(v) for v in box) for box in boxes]


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class FaceBox:
    """A face box in percent of the image's width (left, width) and height (top, height)."""

    left: float
    top: float
    width: float
    height: float
    score: float


def face_box(box: Sequence[float], size: tuple[int, int]) -> FaceBox:
    """A box ``(x0, y0, x1, y1, score)`` in pixels of an image of `size` (width, height), in percent of the
    image, clipped to it: [8, 16, 40, 48] on 64 × 64 pixels is left 12.5, top 25, width 50, height 50."""
    w, h = size
    x0, x1 = (min(max(v, 0.0), w) for v in sorted((box[0], box[2])))
    y0, y1 = (min(max(v, 0.0), h) for v in sorted((box[1], box[3])))
    return FaceBox(100 * x0 / w, 100 * y0 / h, 100 * (x1 - x0) / w, 100 * (y1 - y0) / h, float(box[4]))


def _pct(value: float) -> str:
    return f"{round(value, 3):g}%"


def faces_svg(boxes: Sequence[Sequence[float]], size: tuple[int, int]) -> str:
    """The boxes as an overlay of outlined rectangles (the first, the largest face, solid; others dashed)."""
    if not boxes:
        return ""
    rects = []
    for k, box in enumerate(boxes):
        b = face_box(box, size)
        cls = "face" if k == 0 else "face more"
        rects.append(f'<rect class="{cls}" x="{_pct(b.left)}" y="{_pct(b.top)}" width="{_pct(b.width)}" '
                     f'height="{_pct(b.height)}"></rect>')
    return f'<svg class="faces" aria-hidden="true" focusable="false">{"".join(rects)}</svg>'


def faces_text(boxes: Sequence[Sequence[float]] | None) -> str:
    """What the face detector found, in words ("" where none ran)."""
    if boxes is None:
        return ""
    if not boxes:
        return "no face found"
    scores = ", ".join(f"{b[4]:.2f}" for b in boxes)
    return f"{len(boxes)} face{'s' if len(boxes) > 1 else ''} (score {scores})"


def _img(thumb: Thumb, alt: str, lazy: bool = True) -> str:
    cls = ' class="px"' if thumb.small else ""
    load = ' loading="lazy"' if lazy else ""
    return (
        f'<img src="{esc(thumb.src)}" alt="{esc(alt)}" width="{thumb.width}" height="{thumb.height}"'
        f"{cls}{load}>"
    )


# ---------------------------------------------------------------- the seed × scale grid of one prompt


@dataclass(frozen=True)
class GridContext:
    """What every cell of a run's grids needs: the run, its thumbnails, the labelling classifier, the
    attributes it labels and the guidance axis's name."""

    view: RunView
    writer: ThumbWriter
    classifier: str
    attributes: tuple[str, ...]
    axis: str


def shot(ctx: GridContext, rec: dict[str, Any]) -> str:
    """One image with its face boxes and labels drawn over it."""
    thumb = ctx.writer(rec)
    found, boxes = labels(ctx.view, rec, ctx.classifier, ctx.attributes), face_list(rec)
    said = " · ".join(found)
    faces = faces_text(boxes)
    alt = (f"Image {rec['image_index']} of prompt “{rec['prompt']}” at {at_value(ctx.axis, rec['guidance_scale'])}, "
           f"seed {rec['seed']}; {ctx.classifier} classifier: {said or 'no attributes'}"
           + (f"; face detector: {faces}" if faces else ""))
    lines = " · ".join(f"<span>{esc(t)}</span>" for t in found) + (
        f'<span class="nf">{esc(faces)}</span>' if boxes == [] else "")
    caption = f"<figcaption>{lines}</figcaption>" if lines else ""
    return f'<figure class="shot">{_img(thumb, alt)}{faces_svg(boxes or [], thumb.source)}{caption}</figure>'


def seed_cell(row: Sequence[dict[str, Any]]) -> str:
    """The row's paired seed (every seed, should the scales disagree), in a cell of its own that wraps."""
    seeds = list(dict.fromkeys(str(r["seed"]) for r in row))
    return '<td class="seed">' + "<br>".join(f"<code>{esc(s)}</code>" for s in seeds) + "</td>"


def shown_text(shown: Sequence[int], total: int) -> str:
    """How many of a prompt's image indices the grid shows."""
    if len(shown) == total:
        return f"All {total} image indices"
    return f"Image indices {shown[0]}–{shown[-1]}: the first {len(shown)} of {total}"


def prompt_grid(ctx: GridContext, pi: int, by_key: dict[tuple[int, int, float], dict[str, Any]],
                max_rows: int) -> str:
    """One prompt's grid: a row per image index (the first `max_rows`), a column per guidance value."""
    view, scales = ctx.view, ctx.view.scales
    indices = sorted({ii for (p, ii, _) in by_key if p == pi})
    shown = indices[:max_rows]
    head = "".join(f'<th scope="col">{esc(at_value(ctx.axis, s))}</th>' for s in scales)
    rows = []
    for ii in shown:
        row = [by_key[(pi, ii, s)] if (pi, ii, s) in by_key else None for s in scales]
        tds = "".join(f"<td>{shot(ctx, r)}</td>" if r else '<td class="none">no image</td>' for r in row)
        rows.append(f'<tr><th scope="row">#{ii}</th>{seed_cell([r for r in row if r])}{tds}</tr>')
    held = " (held out)" if pi in view.heldout else ""
    caption = f"{shown_text(shown, len(indices))}, each at {len(scales)} values of {ctx.axis}"
    return (
        f'<h3 id="p{pi}">Prompt {pi}: “{esc(view.prompts[pi])}”{esc(held)}</h3>'
        f'<div class="table-wrap"><table class="sxs"><caption>{esc(caption)}</caption>'
        f'<thead><tr><th scope="col">image</th><th scope="col">seed</th>{head}</tr></thead>'
        f'<tbody>{"".join(rows)}</tbody></table></div>'
    )


def seed_grids(ctx: GridContext, max_rows: int) -> str:
    """Every prompt's seed × scale grid, in prompt order."""
    by_key = {(r["prompt_index"], r["image_index"], r["guidance_scale"]): r for r in ctx.view.records}
    return "".join(prompt_grid(ctx, pi, by_key, max_rows) for pi in ctx.view.prompts)


@dataclass(frozen=True)
class Alert:
    prompt_index: int
    scale: float
    a: dict[str, Any]
    b: dict[str, Any]
    cosine: float


def near_duplicates(view: RunView, threshold: float = NEAR_DUPLICATE_COSINE) -> tuple[list[Alert], int]:
    """Pairs of images of one (prompt, scale) whose embeddings have cosine > threshold, most similar
    first (at most MAX_ALERTS), and the total number of such pairs."""
    alerts: list[Alert] = []
    for (pi, scale), group in cells(view).items():
        with_emb = [r for r in group if r.get("embedding")]
        if len(with_emb) < 2:
            continue
        emb = np.asarray([r["embedding"] for r in with_emb], dtype=np.float64)
        if not np.isfinite(emb).all() or np.any(np.linalg.norm(emb, axis=1) == 0):
            continue
        for i, j, cos in near_duplicate_pairs(emb, threshold):
            alerts.append(Alert(pi, scale, with_emb[i], with_emb[j], cos))
    alerts.sort(key=lambda a: (-a.cosine, a.prompt_index, a.scale))
    return alerts[:MAX_ALERTS], len(alerts)


def alerts_html(view: RunView, alerts: Sequence[Alert], writer: ThumbWriter, axis: str) -> str:
    items = []
    for al in alerts:
        prompt = view.prompts.get(al.prompt_index, "")
        where = at_value(axis, al.scale)
        imgs = ""
        for rec in (al.a, al.b):
            alt = f"Image {rec['image_index']} of prompt “{prompt}” at {where}"
            label = f"<figcaption>#{esc(rec['image_index'])}</figcaption>"
            imgs += f"<figure>{_img(writer(rec), alt)}{label}</figure>"
        items.append(
            f'<div class="card"><p>“{esc(prompt)}”, {esc(where)}: cosine '
            f'{al.cosine:.3f}</p><div class="pair">{imgs}</div></div>'
        )
    return f'<div class="dups">{"".join(items)}</div>'
