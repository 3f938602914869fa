"""Figures (matplotlib/seaborn, Agg backend, PNG) for the dashboard, drawn from metric tables only.

Colours come from seaborn's colour-blind-safe "colorblind" palette; heatmaps use "cividis", a map made
to read the same under colour-vision deficiencies. Mathtext is off, so a prompt holding `$` stays text.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
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

from evalsuite.analysis import t_interval  # noqa: E402

DPI = 100
HEATMAP = "cividis"
BIAS_METRICS = ("shen_gap", "mad", "dominant_share", "normalized_entropy", "kl_uniform", "kl_target")
METRIC_TITLES = {
    "shen_gap": "Shen gap (0 = balanced)",
    "mad": "MAD from uniform (0 = uniform)",
    "dominant_share": "dominant-class share",
    "normalized_entropy": "normalised entropy (1 = uniform)",
    "kl_uniform": "KL to uniform (nats)",
    "kl_target": "KL to target (nats)",
    "vendi": "Vendi score (effective no. of images)",
    "mean_pairwise_cosine": "mean pairwise cosine similarity",
    "near_duplicate_rate": "near-duplicate pair rate",
    "clip_score": "CLIP score",
}
RC: Any = {
    "text.parse_math": False,
    "svg.fonttype": "none",
    "axes.titlesize": 10,
    "axes.labelsize": 9,
    "xtick.labelsize": 8,
    "ytick.labelsize": 8,
    "legend.fontsize": 8,
}


def palette(n: int) -> list[tuple[float, float, float]]:
    return list(sns.color_palette("colorblind", n_colors=max(n, 1)))


def short(text: str, width: int = 30) -> str:
    """One line, at most `width` characters (an ellipsis marks a cut)."""
    flat = " ".join(str(text).split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"


def save(fig: Figure, path: Path) -> tuple[int, int]:
    """Write the figure as PNG and close it; returns its size in pixels."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, bbox_inches="tight", facecolor="white", metadata={"Software": None})
    plt.close(fig)
    with Image.open(path) as img:
        return img.size


def panels_grid(
    n: int, ncols: int = 2, size: tuple[float, float] = (3.2, 2.4)
) -> tuple[Figure, list[plt.Axes]]:
    cols = min(n, ncols)
    rows = math.ceil(n / cols)
    with plt.rc_context(RC):
        fig, axes = plt.subplots(rows, cols, figsize=(size[0] * cols, size[1] * rows), squeeze=False)
    flat = list(axes.ravel())
    for ax in flat[n:]:
        ax.set_visible(False)
    return fig, flat[:n]


def scale_axis(ax: plt.Axes, scales: Sequence[float]) -> None:
    ax.set_xticks(list(scales))
    ax.set_xticklabels([f"{s:g}" for s in scales])
    ax.set_xlabel("guidance scale")


def band(
    ax: plt.Axes,
    x: Sequence[float],
    y: Sequence[float],
    lo: Sequence[float],
    hi: Sequence[float],
    color: tuple[float, float, float],
    label: str,
    style: str = "-",
) -> None:
    ax.plot(x, y, style, marker="o", ms=4, color=color, label=label)
    lo_a, hi_a = np.asarray(lo, float), np.asarray(hi, float)
    ok = np.isfinite(lo_a) & np.isfinite(hi_a)
    if ok.any():
        ax.fill_between(np.asarray(x, float)[ok], lo_a[ok], hi_a[ok], color=color, alpha=0.2, linewidth=0)


def share_heatmap(
    shares: pd.DataFrame, classes: Sequence[str], rows: dict[int, str], scales: Sequence[float], path: Path
) -> tuple[int, int]:
    """One panel per class: share of the class per prompt (rows) and guidance scale (columns).

    `shares` holds groups.csv rows (prompt_index, guidance_scale, metric = share:<class>, value).
    """
    width = max(1.3, 0.42 * len(scales))
    height = max(2.0, 0.24 * len(rows) + 1.0)
    annotate = len(rows) <= 60 and len(scales) <= 8
    with plt.rc_context(RC):
        fig, axes = plt.subplots(
            1, len(classes), figsize=(2.4 + width * len(classes), height), sharey=True, squeeze=False
        )
        for k, (ax, cls) in enumerate(zip(axes[0], classes, strict=True)):
            part = shares[shares["metric"] == f"share:{cls}"]
            grid = part.pivot_table(
                index="prompt_index", columns="guidance_scale", values="value", aggfunc="first", dropna=False
            ).reindex(index=list(rows), columns=list(scales))
            sns.heatmap(
                grid.to_numpy(dtype=float),
                ax=ax,
                vmin=0.0,
                vmax=1.0,
                cmap=HEATMAP,
                cbar=k == len(classes) - 1,
                annot=annotate,
                fmt=".2f",
                annot_kws={"fontsize": 7},
                linewidths=0.5,
                linecolor="white",
                cbar_kws={"label": "share of images"},
                xticklabels=[f"{s:g}" for s in scales],
                yticklabels=[short(rows[p]) for p in rows] if k == 0 else False,
            )
            ax.set_title(short(cls, 18))
            ax.set_xlabel("guidance scale")
            ax.set_ylabel("prompt" if k == 0 else "")
            ax.tick_params(axis="y", rotation=0)
    return save(fig, path)


def pooled_heatmap(
    agg: pd.DataFrame, classes: Sequence[str], scales: Sequence[float], path: Path
) -> tuple[int, int]:
    """Pooled share (over prompts) of each joint class (rows) per guidance scale (columns)."""
    values = np.full((len(classes), len(scales)), np.nan)
    for i, cls in enumerate(classes):
        for j, scale in enumerate(scales):
            hit = agg[(agg["metric"] == f"share:{cls}") & np.isclose(agg["guidance_scale"], scale)]
            if len(hit):
                values[i, j] = float(hit["value"].iloc[0])
    with plt.rc_context(RC):
        fig, ax = plt.subplots(figsize=(2.6 + 0.5 * len(scales), 0.8 + 0.3 * len(classes)))
        sns.heatmap(
            values,
            ax=ax,
            vmin=0.0,
            vmax=1.0,
            cmap=HEATMAP,
            annot=True,
            fmt=".2f",
            annot_kws={"fontsize": 7},
            linewidths=0.5,
            linecolor="white",
            cbar_kws={"label": "share"},
            xticklabels=[f"{s:g}" for s in scales],
            yticklabels=[short(c, 24) for c in classes],
        )
        ax.set_xlabel("guidance scale")
        ax.tick_params(axis="y", rotation=0)
    return save(fig, path)


def bias_lines(agg: pd.DataFrame, classes: Sequence[str], path: Path) -> tuple[int, int] | None:
    """Pooled class shares and bias metrics against guidance scale, 95 % intervals as bands (split all)."""
    present = set(agg["metric"])
    metrics = [m for m in BIAS_METRICS if m in present]
    if "kl_target" in metrics and "kl_uniform" in metrics:
        a = agg[agg["metric"] == "kl_target"]["value"].to_numpy(float)
        b = agg[agg["metric"] == "kl_uniform"]["value"].to_numpy(float)
        if a.shape == b.shape and np.allclose(a, b, equal_nan=True):
            metrics.remove("kl_target")  # the target is uniform: the same curve twice
    if agg.empty:
        return None
    fig, axes = panels_grid(1 + len(metrics))
    colors = palette(len(classes))
    with plt.rc_context(RC):
        for cls, color in zip(classes, colors, strict=True):
            part = agg[agg["metric"] == f"share:{cls}"].sort_values("guidance_scale")
            band(
                axes[0], part["guidance_scale"], part["value"], part["lo"], part["hi"], color, short(cls, 16)
            )
        axes[0].set_title("pooled class shares")
        axes[0].set_ylim(0, 1)
        axes[0].legend(loc="best", frameon=True)
        for ax, metric in zip(axes[1:], metrics, strict=True):
            part = agg[agg["metric"] == metric].sort_values("guidance_scale")
            band(ax, part["guidance_scale"], part["value"], part["lo"], part["hi"], colors[0], metric)
            ax.set_title(METRIC_TITLES.get(metric, metric))
        scales = sorted(set(agg["guidance_scale"]))
        for ax in axes:
            scale_axis(ax, scales)
        fig.tight_layout()
    return save(fig, path)


def diversity_lines(div: pd.DataFrame, prompts: dict[int, str], path: Path) -> tuple[int, int] | None:
    """Per-prompt curves (thin, grey) and the mean over prompts with a 95 % t-band, per diversity metric."""
    metrics = [m for m in ("vendi", "mean_pairwise_cosine", "near_duplicate_rate", "clip_score") if m in div]
    if not metrics or div.empty:
        return None
    fig, axes = panels_grid(len(metrics))
    scales = sorted(set(div["guidance_scale"]))
    color = palette(1)[0]
    with plt.rc_context(RC):
        for ax, metric in zip(axes, metrics, strict=True):
            for _, part in div.groupby("prompt_index"):
                part = part.sort_values("guidance_scale")
                ax.plot(part["guidance_scale"], part[metric], color="0.6", lw=0.7, alpha=0.6)
            stats = [
                t_interval(div.loc[np.isclose(div["guidance_scale"], s), metric].to_numpy(float))
                for s in scales
            ]
            band(
                ax,
                scales,
                [s[0] for s in stats],
                [s[1] for s in stats],
                [s[2] for s in stats],
                color,
                "mean over prompts",
            )
            ax.set_title(METRIC_TITLES.get(metric, metric))
            scale_axis(ax, scales)
        axes[0].legend(loc="best")
        fig.tight_layout()
    return save(fig, path)
