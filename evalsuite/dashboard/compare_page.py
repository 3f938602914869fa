"""The comparison page of two runs: shares, bias metrics and diversity on paired seeds, with intervals."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from evalsuite.dashboard import figures
from evalsuite.dashboard.compare import Comparison
from evalsuite.dashboard.guidance import axis_name
from evalsuite.dashboard.html import definition_list, gallery, interval, note, num, paragraphs, section, table
from evalsuite.dashboard.pages import plot_html
from evalsuite.metrics import CONFIDENCE_THRESHOLD

FIGURE_METRICS = ("shen_gap", "dominant_share", "normalized_entropy")


def compare_page(c: Comparison, root: Path) -> str:
    labels = (f"A: {figures.short(c.a.name, 20)}", f"B: {figures.short(c.b.name, 20)}")
    scales, axis = ", ".join(f"{s:g}" for s in c.scales), axis_name(c.a, c.b)
    facts = [
        ("Run A", f"{c.a.name} — model {c.a.model_label}, battery {c.a.battery.name} v{c.a.battery.version}"),
        ("Run B", f"{c.b.name} — model {c.b.model_label}, battery {c.b.battery.name} v{c.b.battery.version}"),
        ("Classifier", c.classifier), ("Prompts in common", str(len(c.prompts))),
        (f"{axis[:1].upper()}{axis[1:]} values in common", scales),
        ("Paired images", f"{c.n_pairs} (same prompt, scale and image index, different seeds: paired by position)"
         if c.by_position else f"{c.n_pairs} (same prompt, scale, image index and seed)"),
    ]
    same = ("so the two runs differ in the model and in their initial noise (seeds)" if c.by_position
            else "so the two runs differ only in the model")
    parts = [
        definition_list(facts),
        paragraphs(
            f"Every comparison below uses only the paired images, {same}. Changes are B − A with 95 % "
            "intervals; an interval that excludes 0 marks a change larger than seed-to-seed noise."
        ),
    ]
    parts += [note(n, "alert") for n in c.notes]
    for i, (attr, shares) in enumerate(c.shares.groupby("attribute", sort=False)):
        classes = list(dict.fromkeys(shares["class"]))
        mets = c.metrics[c.metrics["attribute"] == attr]
        frame = pd.concat(
            [
                shares.rename(columns={"class": "panel"}),
                mets[mets["metric"].isin(FIGURE_METRICS)].rename(columns={"metric": "panel"}),
            ]
        )
        keys = classes + [m for m in FIGURE_METRICS if m in set(mets["metric"])]
        plots = []
        for p in paired_plots(frame, keys, labels, root, f"compare-a{i}", axis):
            what = f"share of {p.key}" if p.key in classes else figures.METRIC_TITLES.get(p.key, p.key)
            alt = (
                f"Line chart against {axis} ({scales}) of the {what} for {attr}: run A solid, run B "
                "dashed, shaded 95 % intervals, on paired seeds."
            )
            plots.append(plot_html(p, alt, f"{attr}: {what}, A vs B"))
        delta = delta_plot(shares, classes, root, f"figures/compare-a{i}-delta.png", axis)
        if delta is not None:
            alt = (
                f"Dot plot of the paired change in share (B minus A) of each {attr} class at each {axis}, "
                f"with 95 % error bars; the horizontal line marks no change. {_biggest(shares)}"
            )
            plots.append(plot_html(delta, alt, f"{attr}: change in share, B − A"))
        body = gallery(plots, "Run A solid, run B dashed; bands and bars are 95 % intervals.")
        body += table(
            [axis, "class", "A", "B", "B − A", "pairs", "prompts"],
            [
                [
                    f"{r.guidance_scale:g}", r.panel, interval(r.a, r.a_lo, r.a_hi),
                    interval(r.b, r.b_lo, r.b_hi), interval(r.delta, r.d_lo, r.d_hi), r.n_pairs, r.n_prompts,
                ]
                for r in shares.rename(columns={"class": "panel"}).itertuples()
            ],
            "Pooled shares on paired images (cluster-robust 95 % intervals)",
        )
        body += _metric_table(
            mets, "Bias metrics per prompt on paired images, mean over prompts (95 % t-intervals)", axis
        )
        flips = c.flips[c.flips["attribute"] == attr]
        body += table(
            [axis, "label changed", "pairs"],
            [[f"{r.guidance_scale:g}", num(r.rate), r.n_pairs] for r in flips.itertuples()],
            "Fraction of paired images whose label differs between A and B",
        )
        parts.append(section(f"Attribute: {attr}", body, f"c{i}"))
    if not c.legibility.empty:
        parts.append(_legibility(c, axis))
    if not c.splits.empty:
        parts.append(_by_split(c, axis))
    parts.append(_diversity(c, root, labels, scales, axis))
    return "".join(parts)


def _legibility(c: Comparison, axis: str) -> str:
    """The judge classifiers' low-confidence rates among majority-class and other-class images."""
    body = paragraphs(
        f"Whose images lose legibility. Each image is put in a group by what {c.classifier} reads: the "
        "prompt's majority class (its most common class over run A's paired images of that prompt) or any "
        "other class. The rate is the share of a group's images a classifier (the judge; the reader too) reads "
        f"with low confidence (top class probability below {CONFIDENCE_THRESHOLD:g}); the miniature world's "
        "oracle judges by the face's pixels, a measure no policy is trained against. A change that only an "
        "average shows can hide a model whose rarer groups come out less legibly than its majority. Pooled "
        "over all prompts (training and held-out alike) with cluster-robust 95 % intervals; a group's images "
        "differ between A and B when the model changes who is drawn."
    )
    for (judge, attr), rows in c.legibility.groupby(["judge", "attribute"], sort=False):
        body += table(
            [axis, f"{attr} group", "A", "B", "images A", "images B", "prompts"],
            [
                [f"{r.guidance_scale:g}", r.group, interval(r.a, r.a_lo, r.a_hi), interval(r.b, r.b_lo, r.b_hi),
                 r.a_n, r.b_n, r.n_prompts]
                for r in rows.itertuples()
            ],
            f"Low-confidence rate of {judge} on {attr}, by the {c.classifier} group",
        )
    return section("Legibility by group", body, "cleg")


def _by_split(c: Comparison, axis: str) -> str:
    """Shares and low-confidence rates per split of the battery: trained on, validation, test."""
    body = paragraphs(
        "The same paired images, split as the battery splits its prompts: train (an RL run trained on them), "
        "heldout (validation: settings were chosen on them) and test (never trained on, never used to choose "
        "a setting: the fair place for a headline). Shares are of what "
        f"{c.classifier} reads; low-confidence rates are each classifier's own (top class probability below "
        f"{CONFIDENCE_THRESHOLD:g}). Pooled over the split's prompts, cluster-robust 95 % intervals."
    )
    for (split, attr), rows in c.splits.groupby(["split", "attribute"], sort=False):
        body += table(
            [axis, "quantity", "A", "B", "prompts"],
            [[f"{r.guidance_scale:g}", r.quantity.replace("share:", "share of ").replace(
                "low_confidence:", "low confidence of "), interval(r.a, r.a_lo, r.a_hi),
              interval(r.b, r.b_lo, r.b_hi), r.n_prompts] for r in rows.itertuples()],
            f"{split} prompts: {attr}",
        )
    return section("By split", body, "csplit")


def _biggest(shares: pd.DataFrame) -> str:
    if shares.empty or shares["delta"].isna().all():
        return ""
    r = shares.loc[shares["delta"].abs().idxmax()]
    change = interval(r["delta"], r["d_lo"], r["d_hi"])
    return f"Largest change: {r['class']} at scale {r['guidance_scale']:g}, {change}."


def _metric_table(rows: pd.DataFrame, caption: str, axis: str) -> str:
    body = [
        [
            f"{r.guidance_scale:g}", r.metric, interval(r.a, r.a_lo, r.a_hi), interval(r.b, r.b_lo, r.b_hi),
            interval(r.delta, r.d_lo, r.d_hi), r.n_prompts,
        ]
        for r in rows.itertuples()
    ]
    return table([axis, "metric", "A", "B", "B − A", "prompts"], body, caption)


def _diversity(c: Comparison, root: Path, labels: tuple[str, str], scales: str, axis: str) -> str:
    if c.diversity.empty:
        return section("Mode collapse", note("No diversity comparison (see the notes above)."), "cdiv")
    keys = list(dict.fromkeys(c.diversity["metric"]))
    plots = []
    for p in paired_plots(c.diversity.rename(columns={"metric": "panel"}), keys, labels, root, "compare-div", axis):
        title = figures.METRIC_TITLES.get(p.key, p.key)
        alt = (
            f"Line chart against {axis} ({scales}) of the {title}, per prompt on paired images and "
            "averaged over prompts: run A solid, run B dashed, shaded 95 % intervals."
        )
        plots.append(plot_html(p, alt, f"{title}, A vs B"))
    body = gallery(plots, "Diversity on paired images: run A solid, run B dashed.")
    body += _metric_table(
        c.diversity, "Diversity per prompt on paired images, mean over prompts (95 % t-intervals)", axis
    )
    return section("Mode collapse", body, "cdiv")


def paired_plots(
    frame: pd.DataFrame, keys: Sequence[str], labels: tuple[str, str], root: Path, stem: str, axis: str
) -> list[figures.Plot]:
    """Per key (a class or a metric): run A and run B against scale, with bands.

    `frame` columns: panel, guidance_scale, a, a_lo, a_hi, b, b_lo, b_hi.
    """
    ca, cb = figures.palette(2)[:2]
    plots = []
    for k, key in enumerate(keys):
        part = frame[frame["panel"] == key].sort_values("guidance_scale")
        if part.empty:
            continue
        fig, ax = figures.axes()
        with plt.rc_context(figures.RC):
            x = part["guidance_scale"]
            figures.band(ax, x, part["a"], part["a_lo"], part["a_hi"], ca, labels[0])
            figures.band(ax, x, part["b"], part["b_lo"], part["b_hi"], cb, labels[1], "--")
            ax.set_title(figures.short(figures.METRIC_TITLES.get(key, f"share: {key}"), 40))
            figures.legend_below(ax, 2)
            figures.scale_axis(ax, sorted(set(x)), axis)
        plots.append(figures.save(fig, root, f"figures/{stem}-{k}.png", key))
    return plots


def delta_plot(
    frame: pd.DataFrame, classes: Sequence[str], root: Path, rel: str, axis: str
) -> figures.Plot | None:
    """Paired change in share (B − A) per class against guidance, with 95 % error bars."""
    if frame.empty:
        return None
    scales = sorted(set(frame["guidance_scale"]))
    step = float(min(np.diff(scales))) if len(scales) > 1 else 1.0
    offsets = np.linspace(-0.2, 0.2, len(classes)) * step if len(classes) > 1 else np.zeros(1)
    fig, ax = figures.axes((figures.PANEL[0] * 1.3, figures.PANEL[1]))
    with plt.rc_context(figures.RC):
        ax.axhline(0.0, color="0.4", lw=0.8)
        for cls, color, off in zip(classes, figures.palette(len(classes)), offsets, strict=True):
            part = frame[frame["class"] == cls].sort_values("guidance_scale")
            x = part["guidance_scale"].to_numpy(float) + off
            y = part["delta"].to_numpy(float)
            err = np.vstack([y - part["d_lo"].to_numpy(float), part["d_hi"].to_numpy(float) - y])
            ax.errorbar(
                x, y, yerr=np.nan_to_num(err), fmt="o", ms=4, capsize=3, color=color,
                label=figures.short(cls, 16),
            )
        figures.scale_axis(ax, scales, axis)
        ax.set_ylabel("change in share (B − A)")
        ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5))
    return figures.save(fig, root, rel, "delta")
