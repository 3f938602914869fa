"""Figures (matplotlib/seaborn, Agg backend, PNG) for the dashboard, drawn from metric tables only.

Colours come from seaborn's colour-blind-safe "colorblind" palette; heatmaps use "cividis", a map made
to read the same under colour-vision deficiencies. Mathtext is off, so a prompt holding `$` stays text.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from PIL import Image  # noqa: E402

from evalsuite.metrics import mean_interval, metric_bounds  # noqa: E402

DPI = 144  # pixels per inch of the PNG; pages show figures at 96 per inch, so they stay sharp on phones
SHOWN = 96 / DPI
HEATMAP = "cividis"
PANEL = (3.4, 2.6)  # inches: one panel per image, so a phone shows each at full width
BIAS_METRICS = ("shen_gap", "mad", "dominant_share", "normalized_entropy", "kl_uniform", "kl_target")
DIVERSITY_METRICS = ("vendi", "mean_pairwise_cosine", "near_duplicate_rate", "clip_score", "on_prompt_rate")
METRIC_TITLES = {
    "shen_gap": "Shen gap (0 = balanced)", "mad": "MAD from uniform (0 = uniform)",
    "dominant_share": "dominant-class share", "normalized_entropy": "normalised entropy (1 = uniform)",
    "kl_uniform": "KL to uniform (nats)", "kl_target": "KL to target (nats)",
    "vendi": "Vendi score (effective no. of images)",
    "mean_pairwise_cosine": "mean pairwise cosine similarity",
    "near_duplicate_rate": "near-duplicate pair rate", "clip_score": "CLIP score",
    "on_prompt_rate": "on-prompt rate (exact reader)",
}
RC: Any = {
    "text.parse_math": False, "axes.titlesize": 10, "axes.labelsize": 9, "xtick.labelsize": 8,
    "ytick.labelsize": 8, "legend.fontsize": 8, "font.size": 9,
}


@dataclass(frozen=True)
class Plot:
    """A written figure: its path relative to the site root and its display size in CSS pixels."""

    src: str
    size: tuple[int, int]
    key: str  # what it shows: a class, a metric name, "shares", ...


def palette(n: int) -> list[tuple[float, float, float]]:
    return list(sns.color_palette("colorblind", n_colors=max(n, 1)))


def short(text: str, width: int = 30) -> str:
    """One line, at most `width` characters (an ellipsis marks a cut)."""
    flat = " ".join(str(text).split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"


def axes(size: tuple[float, float] = PANEL) -> tuple[Figure, Any]:
    with plt.rc_context(RC):
        return plt.subplots(figsize=size)


def save(fig: Figure, root: Path, rel: str, key: str) -> Plot:
    """Write the figure as PNG under `root` and close it."""
    (root / rel).parent.mkdir(parents=True, exist_ok=True)
    with plt.rc_context(RC):
        fig.savefig(root / rel, dpi=DPI, bbox_inches="tight", facecolor="white", metadata={"Software": None})
    plt.close(fig)
    with Image.open(root / rel) as img:
        return Plot(rel, (round(img.width * SHOWN), round(img.height * SHOWN)), key)


def scale_axis(ax: Any, scales: Sequence[float], axis: str) -> None:
    """Ticks at the run's guidance values, labelled with the guidance axis's name (`guidance.axis_name`)."""
    ax.set_xticks(list(scales))
    ax.set_xticklabels([f"{s:g}" for s in scales])
    ax.set_xlabel(axis)


def band(ax: Any, x: Any, y: Any, lo: Any, hi: Any, color: Any, label: str, style: str = "-") -> None:
    """A line with markers and a shaded interval where its bounds are known."""
    ax.plot(x, y, style, marker="o", ms=4, color=color, label=label)
    xs, lo_a, hi_a = np.asarray(x, float), np.asarray(lo, float), np.asarray(hi, float)
    ok = np.isfinite(lo_a) & np.isfinite(hi_a)
    if ok.any():
        ax.fill_between(xs[ok], lo_a[ok], hi_a[ok], color=color, alpha=0.2, linewidth=0)


def legend_below(ax: Any, n: int) -> None:
    """A legend under the axes, so it never hides a curve."""
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.22), ncol=min(max(n, 1), 4), frameon=False)


def _heat(
    values: np.ndarray, xlabels: list[str], ylabels: list[str], size: tuple[float, float], title: str, axis: str
) -> Figure:
    fig, ax = axes(size)
    with plt.rc_context(RC):
        sns.heatmap(
            values, ax=ax, vmin=0.0, vmax=1.0, cmap=HEATMAP, annot=values.size <= 600, fmt=".2f",
            annot_kws={"fontsize": 7}, linewidths=0.5, linecolor="white", cbar_kws={"label": "share"},
            xticklabels=xlabels, yticklabels=ylabels,
        )
        ax.set_xlabel(axis)
        ax.set_title(title)
        ax.tick_params(axis="y", rotation=0)
    return fig


def share_heatmaps(
    shares: pd.DataFrame,
    classes: Sequence[str],
    rows: dict[int, str],
    scales: Sequence[float],
    root: Path,
    stem: str,
    *,
    axis: str,
) -> list[Plot]:
    """Per class: its share per prompt (rows) and guidance value (columns), from groups.csv rows."""
    size = (2.6 + 0.45 * len(scales), 1.0 + 0.25 * len(rows))
    plots = []
    for k, cls in enumerate(classes):
        part = shares[shares["metric"] == f"share:{cls}"]
        grid = part.pivot_table(
            index="prompt_index", columns="guidance_scale", values="value", aggfunc="first", dropna=False
        ).reindex(index=list(rows), columns=list(scales))
        fig = _heat(
            grid.to_numpy(dtype=float), [f"{s:g}" for s in scales], [short(rows[p]) for p in rows], size,
            f"share: {short(cls, 24)}", axis,
        )
        plots.append(save(fig, root, f"figures/{stem}-{k}.png", cls))
    return plots


def pooled_heatmap(
    agg: pd.DataFrame, classes: Sequence[str], scales: Sequence[float], root: Path, rel: str, *, axis: str
) -> Plot:
    """Pooled share (over prompts) of each joint class (rows) per guidance value (columns)."""
    values = np.full((len(classes), len(scales)), np.nan)
    for i, cls in enumerate(classes):
        for j, scale in enumerate(scales):
            hit = agg[(agg["metric"] == f"share:{cls}") & np.isclose(agg["guidance_scale"], scale)]
            if len(hit):
                values[i, j] = float(hit["value"].iloc[0])
    size = (2.6 + 0.45 * len(scales), 1.0 + 0.28 * len(classes))
    fig = _heat(values, [f"{s:g}" for s in scales], [short(c, 24) for c in classes], size, "pooled share", axis)
    return save(fig, root, rel, "pooled")


def bias_plots(agg: pd.DataFrame, classes: Sequence[str], root: Path, stem: str, *, axis: str) -> list[Plot]:
    """Pooled class shares, then each bias metric, against guidance with 95 % bands (split all)."""
    if agg.empty:
        return []
    present = set(agg["metric"])
    metrics = [m for m in BIAS_METRICS if m in present]
    if "kl_target" in metrics and "kl_uniform" in metrics:
        a = agg[agg["metric"] == "kl_target"].sort_values("guidance_scale")["value"].to_numpy(float)
        b = agg[agg["metric"] == "kl_uniform"].sort_values("guidance_scale")["value"].to_numpy(float)
        if a.shape == b.shape and np.allclose(a, b, equal_nan=True):
            metrics.remove("kl_target")  # the target is uniform: the same curve twice
    scales = sorted(set(agg["guidance_scale"]))
    fig, ax = axes()
    with plt.rc_context(RC):
        for cls, color in zip(classes, palette(len(classes)), strict=True):
            part = agg[agg["metric"] == f"share:{cls}"].sort_values("guidance_scale")
            band(ax, part["guidance_scale"], part["value"], part["lo"], part["hi"], color, short(cls, 16))
        ax.set_title("pooled class shares")
        ax.set_ylim(0, 1)
        legend_below(ax, len(classes))
        scale_axis(ax, scales, axis)
    plots = [save(fig, root, f"figures/{stem}-shares.png", "shares")]
    for k, metric in enumerate(metrics):
        part = agg[agg["metric"] == metric].sort_values("guidance_scale")
        fig, ax = axes()
        with plt.rc_context(RC):
            band(ax, part["guidance_scale"], part["value"], part["lo"], part["hi"], palette(1)[0], metric)
            infinite = part.loc[np.isinf(part["value"].to_numpy(float)), "guidance_scale"]
            if len(infinite):  # matplotlib drops ±inf silently: say where they are
                where = ", ".join(f"{s:g}" for s in infinite)
                ax.text(0.5, 0.97, f"∞ at scale {where} (not drawn)", transform=ax.transAxes, ha="center",
                        va="top", fontsize=8)
            ax.set_title(METRIC_TITLES.get(metric, metric))
            scale_axis(ax, scales, axis)
        plots.append(save(fig, root, f"figures/{stem}-m{k}.png", metric))
    return plots


def diversity_plots(div: pd.DataFrame, root: Path, stem: str, images: int, *, axis: str) -> list[Plot]:
    """Per metric: per-prompt curves (thin, grey) and the mean over prompts with a 95 % t-band within the
    metric's range for groups of `images` images (`metrics.mean_interval`)."""
    if div.empty:
        return []
    scales = sorted(set(div["guidance_scale"]))
    plots = []
    for k, metric in enumerate(m for m in DIVERSITY_METRICS if m in div):
        fig, ax = axes()
        with plt.rc_context(RC):
            for _, part in div.groupby("prompt_index"):
                part = part.sort_values("guidance_scale")
                ax.plot(part["guidance_scale"], part[metric], color="0.65", lw=0.7, alpha=0.7)
            stats = [
                mean_interval(div.loc[np.isclose(div["guidance_scale"], s), metric].to_numpy(float),
                              metric_bounds(metric, images))
                for s in scales
            ]
            band(
                ax, scales, [s[0] for s in stats], [s[1] for s in stats], [s[2] for s in stats],
                palette(1)[0], "mean over prompts",
            )
            ax.set_title(METRIC_TITLES.get(metric, metric))
            legend_below(ax, 1)
            scale_axis(ax, scales, axis)
        plots.append(save(fig, root, f"figures/{stem}-{k}.png", metric))
    return plots
