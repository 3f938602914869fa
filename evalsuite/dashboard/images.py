"""Image grids per prompt and guidance scale, and near-duplicate alerts, from the records and their PNGs.

Images are re-encoded (never copied byte for byte) into the site as PNG thumbnails at most `THUMB` pixels
on a side, under names built from indices only (no user text reaches a file name).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from evalsuite.dashboard.html import esc
from evalsuite.metrics import NEAR_DUPLICATE_COSINE, near_duplicate_pairs
from evalsuite.results import RunView

THUMB = 192
PIXELATED_BELOW = 128  # small renders are scaled up without smoothing
MAX_ALERTS = 24


@dataclass(frozen=True)
class Thumb:
    src: str  # relative to the site root
    width: int
    height: int
    small: bool


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
            with Image.open(self.view.image_path(rec)) as img:
                small = max(img.size) < PIXELATED_BELOW
                thumb = img.convert("RGB")
                thumb.thumbnail((THUMB, THUMB))
                (self.site / rel).parent.mkdir(parents=True, exist_ok=True)
                thumb.save(self.site / rel, format="PNG", optimize=False)
                self.done[key] = Thumb(rel, thumb.width, thumb.height, small)
        return self.done[key]


def cells(view: RunView) -> dict[tuple[int, float], list[dict[str, Any]]]:
    """Records per (prompt_index, guidance scale), each cell sorted by image index."""
    out: dict[tuple[int, float], list[dict[str, Any]]] = {}
    for rec in view.records:
        out.setdefault((rec["prompt_index"], rec["guidance_scale"]), []).append(rec)
    return {k: sorted(v, key=lambda r: r["image_index"]) for k, v in sorted(out.items())}


def caption(view: RunView, rec: dict[str, Any], classifier: str, attributes: Sequence[str]) -> str:
    """The classifier's labels of one image, e.g. 'tan · old', or why there is none."""
    parts = []
    for attr in attributes:
        label = view.label(rec, classifier, attr)
        status = view.status(rec, classifier, attr)
        if label is not None:
            parts.append(label)
        elif status == "no_person":
            return "no person found"
    return " · ".join(parts) if parts else "not measurable"


def _img(thumb: Thumb, alt: str, lazy: bool = True) -> str:
    cls = ' class="px"' if thumb.small else ""
    load = ' loading="lazy"' if lazy else ""
    return (
        f'<img src="{esc(thumb.src)}" alt="{esc(alt)}" width="{thumb.width}" height="{thumb.height}"'
        f"{cls}{load}>"
    )


def grid_html(
    view: RunView,
    writer: ThumbWriter,
    classifier: str,
    attributes: Sequence[str],
    max_per_cell: int,
    seed: int = 0,
) -> str:
    """One heading per prompt, one grid per guidance scale, at most `max_per_cell` sampled images each."""
    rng = random.Random(seed)
    by_cell = cells(view)
    parts: list[str] = []
    for pi, prompt in view.prompts.items():
        held = " (held out)" if pi in view.heldout else ""
        parts.append(f'<h3 id="p{pi}">Prompt {pi}: “{esc(prompt)}”{esc(held)}</h3>')
        for scale in view.scales:
            group = by_cell.get((pi, scale), [])
            if not group:
                continue
            chosen = sorted(rng.sample(range(len(group)), min(max_per_cell, len(group))))
            shown = "all" if len(chosen) == len(group) else f"{len(chosen)} of {len(group)}, sampled"
            figs = []
            for i in chosen:
                rec = group[i]
                label = caption(view, rec, classifier, attributes)
                alt = (
                    f"Image {rec['image_index']} for prompt “{prompt}” at guidance scale {scale:g}; "
                    f"{classifier} classifier label: {label}"
                )
                figs.append(
                    f"<figure>{_img(writer(rec), alt)}<figcaption>{esc(label)}"
                    f"<small>#{esc(rec['image_index'])} · seed "
                    f"{esc(rec['seed'])}</small></figcaption></figure>"
                )
            parts.append(
                f'<h4>Guidance scale {scale:g} <span class="note">({esc(shown)})</span></h4>'
                f'<div class="grid">{"".join(figs)}</div>'
            )
    return "".join(parts)


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


def alerts_html(view: RunView, alerts: Sequence[Alert], writer: ThumbWriter) -> str:
    items = []
    for al in alerts:
        prompt = view.prompts.get(al.prompt_index, "")
        imgs = ""
        for rec in (al.a, al.b):
            alt = f"Image {rec['image_index']} of prompt “{prompt}” at scale {al.scale:g}"
            label = f"<figcaption>#{esc(rec['image_index'])}</figcaption>"
            imgs += f"<figure>{_img(writer(rec), alt)}{label}</figure>"
        items.append(
            f'<div class="card"><p>“{esc(prompt)}”, scale {al.scale:g}: cosine '
            f'{al.cosine:.3f}</p><div class="pair">{imgs}</div></div>'
        )
    return f'<div class="dups">{"".join(items)}</div>'
