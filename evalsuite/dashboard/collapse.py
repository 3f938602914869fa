"""The per-run mode-collapse page (diversity against guidance scale, near-duplicate alerts) and the image
grids page."""

from __future__ import annotations

from evalsuite.dashboard import figures, images
from evalsuite.dashboard.html import esc, gallery, interval, note, num, paragraphs, section, table
from evalsuite.dashboard.pages import Site, div_mean, plot_html
from evalsuite.metrics import NEAR_DUPLICATE_COSINE
from evalsuite.results import RunView


def diversity_page(view: RunView, site: Site, writer: images.ThumbWriter) -> str:
    div, scales = view.diversity_wide, view.scales
    plots = []
    for p in figures.diversity_plots(div, site.root, f"{site.slug}-div", view.battery.images_per_prompt):
        title = figures.METRIC_TITLES.get(p.key, p.key)
        means = ", ".join(f"{num(div_mean(view, s, p.key)[0])} at scale {s:g}" for s in scales)
        alt = (
            f"Line chart of the {title} against guidance scale: a thin grey line per prompt and the mean "
            "over "
            f"prompts with a shaded 95 % interval. Mean: {means}."
        )
        plots.append(plot_html(p, alt, title))
    parts = [
        paragraphs(
            "Mode collapse shows as a falling Vendi score (the effective number of distinct images "
            "among a prompt's images) and a rising pairwise similarity as guidance grows."
        ),
        gallery(plots, "Per prompt (grey) and mean over prompts (colour) with 95 % t-intervals."),
    ]
    metrics = [m for m in figures.DIVERSITY_METRICS if m in div]
    rows = [[f"{s:g}", *[interval(*div_mean(view, s, m)) for m in metrics]] for s in scales]
    parts.append(table(["scale", *metrics], rows, "Means over prompts with 95 % t-intervals"))
    if "vendi" in div and not div.empty:
        low = div.sort_values("vendi").head(10)
        rows = [
            [
                view.prompts.get(int(r["prompt_index"]), ""), f"{r['guidance_scale']:g}", num(r["vendi"]),
                num(r.get("mean_pairwise_cosine")), num(r.get("near_duplicate_rate")),
            ]
            for _, r in low.iterrows()
        ]
        parts.append(
            table(
                ["prompt", "scale", "vendi", "mean cosine", "near-dup rate"], rows,
                "The ten least diverse (prompt, scale) groups",
            )
        )
    alerts, total = images.near_duplicates(view)
    if total:
        head = (
            f"{total} near-duplicate pair{'s' if total != 1 else ''} (embedding cosine similarity above "
            f"{NEAR_DUPLICATE_COSINE:g}) within a prompt and scale; the {len(alerts)} most similar:"
        )
        parts.append(
            section("Near-duplicate alerts", note(head, "alert") + images.alerts_html(view, alerts, writer))
        )
    else:
        parts.append(
            section(
                "Near-duplicate alerts",
                note(
                    f"No pair of images of one prompt and scale has "
                    f"embedding cosine similarity above {NEAR_DUPLICATE_COSINE:g}."
                ),
            )
        )
    return "".join(parts)


def images_page(view: RunView, writer: images.ThumbWriter, max_per_cell: int) -> str:
    clf = view.primary_classifier
    attrs = [a for a, _ in view.attributes(clf) if "×" not in a]
    intro = paragraphs(
        f"Up to {max_per_cell} images per prompt and guidance scale, sampled with a fixed seed. "
        f"Under each image: the {clf} classifier's labels ({' · '.join(attrs) or 'none'}), the image "
        "index and its seed."
    )
    toc = " · ".join(f'<a href="#p{pi}">{esc(figures.short(t, 40))}</a>' for pi, t in view.prompts.items())
    return intro + f"<p>{toc}</p>" + images.grid_html(view, writer, clf, attrs, max_per_cell)
