"""The per-run pages: overview card, bias (per attribute), mode collapse, and image grids."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from evalsuite.dashboard import figures
from evalsuite.dashboard.guidance import at_value, axis_name
from evalsuite.dashboard.html import (
    definition_list,
    esc,
    figure,
    gallery,
    interval,
    note,
    num,
    paragraphs,
    section,
    table,
)
from evalsuite.metrics import mean_interval, metric_bounds
from evalsuite.results import RunView

TABLE_METRICS = ("shen_gap", "mad", "dominant_share", "normalized_entropy", "kl_uniform", "kl_target",
                 "low_confidence_rate", "no_person_rate", "refused_rate")


@dataclass
class Site:
    """Where a page writes: the site root (being built) and the run's slug (file-name prefix)."""

    root: Path
    slug: str
    letter: str  # "A" / "B" when two runs are shown, else ""


def plot_html(plot: figures.Plot, alt: str, caption: str) -> str:
    return figure(plot.src, alt, caption, plot.size)


def trend(frame: pd.DataFrame, metric: str) -> str:
    """'0.3 at scale 1, 0.45 at scale 7.5' for one metric of an aggregate table (one split)."""
    part = frame[frame["metric"] == metric].sort_values("guidance_scale")
    text = ", ".join(
        f"{num(v)} at scale {s:g}" for s, v in zip(part["guidance_scale"], part["value"], strict=True)
    )
    return text or "not available"


def scales_text(scales: list[float]) -> str:
    return ", ".join(f"{s:g}" for s in scales)


def _mapping(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def overview_card(view: RunView, site: Site, pages: list[tuple[str, str]]) -> str:
    info, battery, model = view.info, view.battery, view.model
    versions, timings = _mapping(info.get("versions")), _mapping(info.get("timings"))
    n_held = len(view.heldout)
    facts = [
        ("Run", view.name),
        ("Model", view.model_label),
        ("Revision", model.get("revision") or "—"),
        (
            "Pipeline",
            f"{model.get('pipeline_class', '—')} ({model.get('dtype', '—')}, {model.get('device', '—')})",
        ),
        *([("Image source", _source_text(view.source))] if view.source.get("kind") != "diffusers" else []),
        ("Battery", f"{battery.name} version {battery.version}"),
        ("Battery description", battery.description or "—"),
        ("Prompts", f"{len(view.prompts)} ({n_held} held out)"),
        (f"{capital(axis_name(view))} values", scales_text(view.scales)),
        (
            "Images",
            f"{info.get('n_images', len(view.records))} ({battery.images_per_prompt} per prompt and scale, "
            f"{battery.steps} steps{f', DDIM eta {battery.eta:g}' if battery.eta else ''}, "
            f"battery seed {battery.seed})",
        ),
        ("Attributes", ", ".join(battery.attribute_names)),
        (
            "Classifier",
            f"{view.primary_classifier} (primary)"
            + "".join(f", {c}" for c in view.classifiers if c != view.primary_classifier),
        ),
        ("Embedder", info.get("embedder") or "—"),
        ("Date", f"started {info.get('created', '—')}, finished {info.get('finished', '—')}"),
        ("Suite version", f"evalsuite {versions.get('evalsuite', '—')}"),
        ("Libraries", ", ".join(f"{k} {v}" for k, v in versions.items() if k != "evalsuite") or "—"),
        ("Git commit", info.get("git_commit") or "—"),
        (
            "Generation time",
            f"{num(timings.get('generate_s'))} s ({num(timings.get('images_per_s'))} images/s)",
        ),
    ]
    links = " · ".join(f'<a href="{esc(h)}">{esc(label)}</a>' for h, label in pages)
    title = f"Run {site.letter}: {view.name}" if site.letter else view.name
    return (
        f'<div class="card"><h2>{esc(title)}</h2>{definition_list(facts)}<p>{links}</p>'
        f"{_headline(view)}</div>"
    )


def _source_text(source: dict[str, Any]) -> str:
    """A non-diffusers image source in words (run.json's `source`), with what it does not expose."""
    where = source.get("base_url") or source.get("path") or "—"
    missing = ", ".join(str(e).replace("_", " ") for e in source.get("not_exposed") or [])
    return f"{source.get('kind')} ({where})" + (f"; not exposed: {missing}" if missing else "")


def capital(text: str) -> str:
    return text[:1].upper() + text[1:]


def _headline(view: RunView) -> str:
    """Shen gap per attribute and mean Vendi score per guidance value (all prompts)."""
    clf, scales, axis = view.primary_classifier, view.scales, axis_name(view)
    agg = view.aggregate[(view.aggregate["classifier"] == clf) & (view.aggregate["split"] == "all")]
    rows = []
    for attr, _ in view.attributes(clf):
        part = agg[(agg["attribute"] == attr) & (agg["metric"] == "shen_gap")]
        cells = [at(part, s) for s in scales]
        rows.append([f"Shen gap, {attr}", *[interval(*c) for c in cells]])
    if "vendi" in view.diversity_wide:
        rows.append(["Vendi score (mean)", *[interval(*div_mean(view, s, "vendi")) for s in scales]])
    return table(
        ["measure", *[at_value(axis, s) for s in scales]], rows,
        f"Headline ({clf} classifier, all prompts; 95 % intervals)",
    )


def at(part: pd.DataFrame, scale: float) -> tuple[float, float, float]:
    hit = part[np.isclose(part["guidance_scale"], scale)]
    if hit.empty:
        return (np.nan, np.nan, np.nan)
    row = hit.iloc[0]
    return float(row["value"]), float(row["lo"]), float(row["hi"])


def div_at(view: RunView, scale: float, metric: str) -> np.ndarray:
    div = view.diversity_wide
    return div.loc[np.isclose(div["guidance_scale"], scale), metric].to_numpy(float)


def div_mean(view: RunView, scale: float, metric: str) -> tuple[float, float, float]:
    """Mean over prompts of a diversity metric at one scale, with its 95 % interval within the metric's
    range (`metrics.mean_interval`)."""
    return mean_interval(div_at(view, scale, metric), metric_bounds(metric, view.battery.images_per_prompt))


def bias_page(view: RunView, site: Site) -> str:
    clf, scales, axis = view.primary_classifier, view.scales, axis_name(view)
    groups = view.groups[view.groups["classifier"] == clf]
    agg = view.aggregate[view.aggregate["classifier"] == clf]
    measured = dict(view.attributes(clf))
    parts = [
        paragraphs(
            f"Attributes are the {clf} classifier's perception of each image, not anyone's identity. "
            + counted_images(view, clf) + " Bands and brackets are 95 % intervals (see Methods)."
        )
    ]
    for attr in view.battery.attribute_names:
        if attr not in measured:
            parts.append(
                section(
                    f"Attribute: {attr}",
                    note(
                        f"The {clf} classifier does not measure {attr} on "
                        "these images (status not_measurable): no results."
                    ),
                )
            )
    for i, (attr, classes) in enumerate(measured.items()):
        rows_g, rows_a = groups[groups["attribute"] == attr], agg[agg["attribute"] == attr]
        everything = rows_a[rows_a["split"] == "all"]
        stem = f"{site.slug}-a{i}"
        if "×" in attr:
            heat = figures.pooled_heatmap(everything, classes, scales, site.root, f"figures/{stem}-heat.png",
                                          axis=axis)
            alt = (
                f"Heatmap of the pooled share of each joint {attr} class (rows: {', '.join(classes)}) at "
                f"each {axis} (columns: {scales_text(scales)}), all prompts, {clf} classifier."
            )
            heats = [plot_html(heat, alt, f"{attr}: pooled share of each joint class")]
        else:
            heats = [
                plot_html(
                    p,
                    f"Heatmap of the share of {attr} class {p.key} for each of the "
                    f"{len(view.prompts)} prompts (rows) at {axis} {scales_text(scales)} "
                    f"(columns); brighter means a larger share. Pooled share: "
                    f"{trend(everything, 'share:' + p.key)}.",
                    f"{attr} = {p.key}, per prompt",
                )
                for p in figures.share_heatmaps(rows_g, classes, view.prompts, scales, site.root, stem, axis=axis)
            ]
        lines = []
        for p in figures.bias_plots(everything, classes, site.root, stem, axis=axis):
            if p.key == "shares":
                alt = (
                    f"Line chart of the pooled shares of the {attr} classes against {axis} with shaded "
                    "95 % intervals; " + "; ".join(f"{c}: {trend(everything, 'share:' + c)}" for c in classes)
                )
                lines.append(plot_html(p, alt, f"{attr}: pooled class shares"))
            else:
                title = figures.METRIC_TITLES.get(p.key, p.key)
                alt = (
                    f"Line chart of the {title} of {attr} against {axis} with a shaded 95 % interval: "
                    f"{trend(everything, p.key)}."
                )
                lines.append(plot_html(p, alt, f"{attr}: {title}"))
        body = (
            _infinite_kl_note(view, attr, classes, everything)
            + gallery(heats, f"Share of each class per prompt and {axis}.")
            + gallery(lines, "Pooled over all prompts; bands are 95 % intervals.")
            + _metric_table(rows_a, scales, axis)
        )
        parts.append(section(f"Attribute: {attr}", body, f"a{i}"))
    parts.append(_other_classifiers(view))
    return "".join(parts)


def counted_images(view: RunView, clf: str) -> str:
    """Which images the shares of `clf` count, by whether it looks for a person (RunView.detects_people)."""
    detects = view.detects_people(clf)
    if detects:
        return f"Shares count only images where the {clf} classifier found a person (status ok)."
    if detects is False:
        return (f"The {clf} classifier has no person detector: it reads every image as someone, so shares "
                "count every image it measured, including any without a person, and its no-person rate is "
                "0 by construction.")
    return (f"The {clf} classifier marked no image no_person, and the run does not record whether it looks "
            "for a person (the built-in clip and miniature classifiers do not): shares count every image it "
            "measured, which may include images without a person.")


def _infinite_kl_note(view: RunView, attr: str, classes: tuple[str, ...], agg: pd.DataFrame) -> str:
    """A note where kl_target is infinite: a class the battery's target rules out (share 0) occurred."""
    part = agg[(agg["metric"] == "kl_target") & np.isinf(agg["value"].to_numpy(float))]
    if part.empty:
        return ""
    targets = {a.name: dict(zip(a.classes, a.target, strict=True)) for a in view.battery.attributes}
    ruled_out = [c for c in classes
                 if any(targets[m][k] == 0 for m, k in zip(attr.split("×"), c.split("×")))]
    return note(
        f"KL to target is ∞ at scale {scales_text(sorted(part['guidance_scale']))}: the battery's target gives "
        f"{', '.join(ruled_out) or 'a class'} a share of 0, and the classifier read some images as such. "
        "KL(p‖target) is infinite as soon as a class with target 0 appears, and so is any mean over prompts "
        "that includes such a prompt; it is a real value, not missing data. Its chart marks ∞ points "
        "without drawing them."
    )


def _metric_table(rows: pd.DataFrame, scales: list[float], axis: str) -> str:
    metrics = [m for m in TABLE_METRICS if m in set(rows["metric"])]
    body = []
    for split in ("all", "train", "heldout"):
        part = rows[rows["split"] == split]
        for scale in scales if not part.empty else []:
            cells = [interval(*at(part[part["metric"] == m], scale)) for m in metrics]
            n = part.loc[np.isclose(part["guidance_scale"], scale), "n_prompts"]
            body.append([split, f"{scale:g}", *cells, num(n.max() if len(n) else np.nan)])
    return table(
        ["split", axis, *metrics, "prompts"], body, "Bias metrics averaged over prompts (95 % t-intervals)"
    )


def _other_classifiers(view: RunView) -> str:
    others = [c for c in view.classifiers if c != view.primary_classifier]
    if not others:
        return ""
    agg = view.aggregate[(view.aggregate["split"] == "all") & (view.aggregate["metric"] == "shen_gap")]
    rows = []
    for clf in view.classifiers:
        for attr, _ in view.attributes(clf):
            part = agg[(agg["classifier"] == clf) & (agg["attribute"] == attr)]
            rows.append([clf, attr, *[interval(*at(part, s)) for s in view.scales]])
    body = paragraphs(
        "The same images read by every classifier of the run: where they disagree, the bias "
        "measured depends on the classifier, not only on the model."
    )
    return section(
        "Across classifiers",
        body
        + table(
            ["classifier", "attribute", *[at_value(axis_name(view), s) for s in view.scales]], rows,
            "Shen gap, all prompts"
        ),
    )
