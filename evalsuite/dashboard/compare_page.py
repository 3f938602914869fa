"""The comparison page of two runs: shares, bias metrics and diversity on paired seeds, with intervals."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from evalsuite.dashboard import figures
from evalsuite.dashboard.compare import Comparison
from evalsuite.dashboard.html import definition_list, figure, interval, note, num, paragraphs, section, table

FIGURE_METRICS = ("shen_gap", "dominant_share", "normalized_entropy")


def _frame(rows: pd.DataFrame, key: str, prefix: str = "") -> pd.DataFrame:
    out = rows.rename(columns={key: "panel"}).copy()
    out["panel"] = prefix + out["panel"].astype(str)
    return out


def _fig(root: Path, name: str, size: tuple[int, int] | None, alt: str, caption: str) -> str:
    return figure(f"figures/{name}.png", alt, caption, size) if size else note("No data to plot.")


def _scales(c: Comparison) -> str:
    return ", ".join(f"{s:g}" for s in c.scales)


def compare_page(c: Comparison, root: Path) -> str:
    la, lb = f"A: {c.a.name}", f"B: {c.b.name}"
    facts = [
        ("Run A", f"{c.a.name} — model {c.a.model_label}, battery {c.a.battery.name} v{c.a.battery.version}"),
        ("Run B", f"{c.b.name} — model {c.b.model_label}, battery {c.b.battery.name} v{c.b.battery.version}"),
        ("Classifier", c.classifier),
        ("Prompts in common", str(len(c.prompts))),
        ("Guidance scales in common", _scales(c)),
        ("Paired images", f"{c.n_pairs} (same prompt, scale, image index and seed)"),
    ]
    parts = [
        definition_list(facts),
        paragraphs(
            "Every comparison below uses only the paired images, so the two runs differ only in the model. "
            "Changes are B − A with 95 % intervals; an interval that excludes 0 marks a change larger than "
            "seed-to-seed noise."
        ),
    ]
    parts += [note(n, "alert") for n in c.notes]
    for i, (attr, shares) in enumerate(c.shares.groupby("attribute", sort=False)):
        classes = list(dict.fromkeys(shares["class"]))
        mets = c.metrics[c.metrics["attribute"] == attr]
        frame = pd.concat(
            [_frame(shares, "class", "share: "), _frame(mets[mets["metric"].isin(FIGURE_METRICS)], "metric")]
        )
        panels = [(f"share: {k}", f"share of {figures.short(k, 18)}") for k in classes]
        panels += [(m, figures.METRIC_TITLES.get(m, m)) for m in FIGURE_METRICS if m in set(mets["metric"])]
        size = paired_lines(
            frame,
            panels,
            (figures.short(la, 24), figures.short(lb, 24)),
            root / f"figures/compare-lines{i}.png",
        )
        alt = (
            f"Line charts against guidance scale ({_scales(c)}) comparing run A (solid) and run B (dashed) "
            "on "
            f"{attr}: the share of each class ({', '.join(classes)}) and the bias metrics "
            f"{', '.join(FIGURE_METRICS)}, with shaded 95 % intervals, on paired seeds."
        )
        body = _fig(
            root, f"compare-lines{i}", size, alt, f"{attr}: run A (solid) vs run B (dashed), paired seeds."
        )
        size = delta_points(shares, classes, root / f"figures/compare-delta{i}.png")
        alt = (
            f"Dot plot of the paired change in share (B minus A) of each {attr} class at each guidance "
            "scale, "
            f"with 95 % error bars; the horizontal line marks no change. {_biggest(shares)}"
        )
        body += _fig(
            root, f"compare-delta{i}", size, alt, f"{attr}: change in share, B − A, with 95 % intervals."
        )
        body += table(
            ["scale", "class", "A", "B", "B − A", "pairs", "prompts"],
            [
                [
                    f"{r.guidance_scale:g}",
                    r["class"],
                    interval(r.a, r.a_lo, r.a_hi),
                    interval(r.b, r.b_lo, r.b_hi),
                    interval(r.delta, r.d_lo, r.d_hi),
                    r.n_pairs,
                    r.n_prompts,
                ]
                for _, r in shares.iterrows()
            ],
            "Pooled shares on paired images (cluster-robust 95 % intervals)",
        )
        body += _metric_table(
            mets, "Bias metrics per prompt on paired images, mean over prompts (95 % t-intervals)"
        )
        flips = c.flips[c.flips["attribute"] == attr]
        body += table(
            ["scale", "label changed", "pairs"],
            [[f"{r.guidance_scale:g}", num(r.rate), r.n_pairs] for r in flips.itertuples()],
            "Fraction of paired images whose label differs between A and B",
        )
        parts.append(section(f"Attribute: {attr}", body, f"c{i}"))
    parts.append(_diversity(c, root, (la, lb)))
    return "".join(parts)


def _biggest(shares: pd.DataFrame) -> str:
    if shares.empty or shares["delta"].abs().isna().all():
        return ""
    r = shares.loc[shares["delta"].abs().idxmax()]
    return (
        f"Largest change: {r['class']} at scale {r['guidance_scale']:g}, "
        f"{interval(r['delta'], r['d_lo'], r['d_hi'])}."
    )


def _metric_table(rows: pd.DataFrame, caption: str) -> str:
    body = [
        [
            f"{r.guidance_scale:g}",
            r.metric,
            interval(r.a, r.a_lo, r.a_hi),
            interval(r.b, r.b_lo, r.b_hi),
            interval(r.delta, r.d_lo, r.d_hi),
            r.n_prompts,
        ]
        for r in rows.itertuples()
    ]
    return table(["scale", "metric", "A", "B", "B − A", "prompts"], body, caption)


def _diversity(c: Comparison, root: Path, labels: tuple[str, str]) -> str:
    if c.diversity.empty:
        return section("Mode collapse", note("No diversity comparison (see the notes above)."), "cdiv")
    metrics = list(dict.fromkeys(c.diversity["metric"]))
    panels = [(m, figures.METRIC_TITLES.get(m, m)) for m in metrics]
    size = paired_lines(
        _frame(c.diversity, "metric"),
        panels,
        (figures.short(labels[0], 24), figures.short(labels[1], 24)),
        root / "figures/compare-diversity.png",
    )
    alt = (
        f"Line charts against guidance scale ({_scales(c)}) of the Vendi score and mean pairwise cosine "
        "similarity, run A (solid) vs run B (dashed), per-prompt values on paired images averaged over "
        "prompts, "
        "with shaded 95 % intervals."
    )
    body = _fig(
        root, "compare-diversity", size, alt, "Diversity on paired images: run A (solid) vs run B (dashed)."
    )
    body += _metric_table(
        c.diversity, "Diversity per prompt on paired images, mean over prompts (95 % t-intervals)"
    )
    return section("Mode collapse", body, "cdiv")


def paired_lines(
    frame: pd.DataFrame, panels: Sequence[tuple[str, str]], labels: tuple[str, str], path: Path
) -> tuple[int, int] | None:
    """Comparison: for each (column value of `panel`, title) a panel of run A and run B against scale.

    `frame` columns: panel, guidance_scale, a, a_lo, a_hi, b, b_lo, b_hi.
    """
    if frame.empty or not panels:
        return None
    fig, axes = figures.panels_grid(len(panels))
    ca, cb = figures.palette(2)[:2]
    with plt.rc_context(figures.RC):
        for ax, (key, title) in zip(axes, panels, strict=True):
            part = frame[frame["panel"] == key].sort_values("guidance_scale")
            figures.band(ax, part["guidance_scale"], part["a"], part["a_lo"], part["a_hi"], ca, labels[0])
            figures.band(
                ax, part["guidance_scale"], part["b"], part["b_lo"], part["b_hi"], cb, labels[1], "--"
            )
            ax.set_title(title)
            figures.scale_axis(ax, sorted(set(part["guidance_scale"])))
        axes[0].legend(loc="best")
        fig.tight_layout()
    return figures.save(fig, path)


def delta_points(frame: pd.DataFrame, classes: Sequence[str], path: Path) -> tuple[int, int] | None:
    """Paired change in share (B − A) per class against guidance scale, with 95 % error bars."""
    if frame.empty:
        return None
    scales = sorted(set(frame["guidance_scale"]))
    step = min(np.diff(scales)) if len(scales) > 1 else 1.0
    offsets = np.linspace(-0.25, 0.25, len(classes)) * step if len(classes) > 1 else [0.0]
    with plt.rc_context(figures.RC):
        fig, ax = plt.subplots(figsize=(6.4, 3.0))
        ax.axhline(0.0, color="0.4", lw=0.8)
        for cls, color, off in zip(classes, figures.palette(len(classes)), offsets, strict=True):
            part = frame[frame["class"] == cls].sort_values("guidance_scale")
            x = part["guidance_scale"].to_numpy(float) + off
            y = part["delta"].to_numpy(float)
            err = np.vstack([y - part["d_lo"].to_numpy(float), part["d_hi"].to_numpy(float) - y])
            ax.errorbar(
                x,
                y,
                yerr=np.nan_to_num(err),
                fmt="o",
                ms=4,
                capsize=3,
                color=color,
                label=figures.short(cls, 16),
            )
        figures.scale_axis(ax, scales)
        ax.set_ylabel("change in share (B − A)")
        ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5))
        fig.tight_layout()
    return figures.save(fig, path)
