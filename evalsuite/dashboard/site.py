"""Build the static dashboard site into DIR.partial, then swap it into place (atomic for the reader).

An existing DIR is replaced only when it holds a previous dashboard (the `MARKER` file) or is empty
(`evalsuite.folders.building`).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

from evalsuite.dashboard import collapse, compare, compare_page, images, methods, pages
from evalsuite.dashboard.guidance import values_phrase
from evalsuite.dashboard.html import CSS, CSS_FILE, esc, page
from evalsuite.errors import SuiteError
from evalsuite.folders import building, check_output_target
from evalsuite.results import RunView, open_run

MARKER = ".evalsuite-dashboard"


def load_runs(runs: Sequence[Path]) -> list[RunView]:
    """The runs, read and checked in full (records included) before anything is built."""
    views = [open_run(r) for r in runs]
    for view in views:
        _ = view.records
    return views


def build_dashboard(runs: Sequence[Path], out: Path, *, max_images_per_cell: int = 8) -> Path:
    """Build the dashboard of one run, or of two runs with a comparison page; returns index.html's path.
    The images page shows each prompt's first `max_images_per_cell` image indices at every guidance value
    (so at most that many images per prompt and guidance value)."""
    runs, out = [Path(r) for r in runs], Path(out).resolve()
    if not 1 <= len(runs) <= 2:
        raise SuiteError(f"dashboard: give one or two results folders, got {len(runs)}")
    if max_images_per_cell < 1:
        raise SuiteError(f"dashboard: images per (prompt, scale) cell must be >= 1, got {max_images_per_cell}")
    check_output_target(out, MARKER, "dashboard")
    views = load_runs(runs)
    comparison = compare.compare_runs(views[0], views[1]) if len(views) == 2 else None
    with building(out, MARKER, "dashboard", "evalsuite dashboard") as (partial, marker):
        started = time.perf_counter()
        (partial / "figures").mkdir()
        _write_site(partial, views, comparison, max_images_per_cell)
        marker.update(runs=[str(r) for r in runs], build_s=round(time.perf_counter() - started, 2))
    return out / "index.html"


def _write_site(
    root: Path, views: list[RunView], comparison: compare.Comparison | None, max_per_cell: int
) -> None:
    (root / CSS_FILE).write_text(CSS, encoding="utf-8")
    two = len(views) == 2
    sites = [pages.Site(root, f"r{i}", "AB"[i] if two else "") for i in range(len(views))]
    per_run = {
        s.slug: [
            (f"{s.slug}-bias.html", "Bias"), (f"{s.slug}-diversity.html", "Mode collapse"),
            (f"{s.slug}-images.html", "Images"),
        ]
        for s in sites
    }
    nav: list[tuple[str, str]] = [("index.html", "Overview")]
    for s in sites:
        nav += [(href, f"{s.letter} {label}" if two else label) for href, label in per_run[s.slug]]
    if comparison is not None:
        nav.append(("compare.html", "Compare A vs B"))
    nav.append(("methods.html", "Methods"))

    def write(href: str, title: str, body: str) -> None:
        (root / href).write_text(page(title, body, nav, href), encoding="utf-8")

    for view, s in zip(views, sites, strict=True):
        writer = images.ThumbWriter(root, s.slug, view)
        prefix = f"Run {s.letter}: " if two else ""
        write(f"{s.slug}-bias.html", f"{prefix}bias by attribute", pages.bias_page(view, s))
        write(f"{s.slug}-diversity.html", f"{prefix}mode collapse", collapse.diversity_page(view, s, writer))
        write(f"{s.slug}-images.html", f"{prefix}images", collapse.images_page(view, writer, max_per_cell))
    if comparison is not None:
        write("compare.html", "Comparison: run A vs run B", compare_page.compare_page(comparison, root))
    write("methods.html", "Methods", methods.methods_page(views))
    cards = "".join(pages.overview_card(v, s, per_run[s.slug]) for v, s in zip(views, sites, strict=True))
    extra = (
        '<p><a href="compare.html">Compare run A with run B on paired seeds →</a></p>' if comparison else ""
    )
    intro = (
        "<p>An audit of text-to-image generation for demographic bias (perceived attributes) and mode "
        f'collapse across {esc(values_phrase(*views))}. Read the <a href="methods.html">methods</a> '
        "before the numbers.</p>"
    )
    write("index.html", "Audit overview", intro + extra + f'<div class="cards">{cards}</div>')
