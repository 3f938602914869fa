"""The per-run mode-collapse page (diversity against guidance scale, near-duplicate alerts) and the image
grids page."""

from __future__ import annotations

from evalsuite.dashboard import figures, images
from evalsuite.dashboard.guidance import axis_name
from evalsuite.dashboard.html import esc, gallery, interval, note, num, paragraphs, section, table
from evalsuite.dashboard.pages import Site, div_mean, plot_html
from evalsuite.metrics import NEAR_DUPLICATE_COSINE
from evalsuite.results import RunView


def diversity_page(view: RunView, site: Site, writer: images.ThumbWriter) -> str:
    div, scales, axis = view.diversity_wide, view.scales, axis_name(view)
    plots = []
    for p in figures.diversity_plots(div, site.root, f"{site.slug}-div", view.battery.images_per_prompt,
                                     axis=axis):
        title = figures.METRIC_TITLES.get(p.key, p.key)
        means = ", ".join(f"{num(div_mean(view, s, p.key)[0])} at scale {s:g}" for s in scales)
        alt = (
            f"Line chart of the {title} against {axis}: a thin grey line per prompt and the mean over "
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
    parts.append(table([axis, *metrics], rows, "Means over prompts with 95 % t-intervals"))
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
                ["prompt", axis, "vendi", "mean cosine", "near-dup rate"], rows,
                f"The ten least diverse (prompt, {axis}) groups",
            )
        )
    alerts, total = images.near_duplicates(view)
    if total:
        head = (
            f"{total} near-duplicate pair{'s' if total != 1 else ''} (embedding cosine similarity above "
            f"{NEAR_DUPLICATE_COSINE:g}) within a prompt and scale; the {len(alerts)} most similar:"
        )
        parts.append(
            section("Near-duplicate alerts", note(head, "alert") + images.alerts_html(view, alerts, writer, axis))
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


def images_page(view: RunView, writer: images.ThumbWriter, max_rows: int) -> str:
    """Per prompt, a seed × scale grid of its first `max_rows` image indices (`images.seed_grids`)."""
    clf, axis = view.primary_classifier, axis_name(view)
    attrs = tuple(a for a, _ in view.attributes(clf) if "×" not in a)
    detector = view.info.get("detector")
    named = f"face detector ({detector})" if isinstance(detector, str) and detector else "face detector"
    has_faces = any(images.face_list(r) is not None for r in view.records)
    faces = (f"Outlines mark the faces the {named} found (the largest solid, any other dashed); "
             "“no face found” where it found none." if has_faces
             else "The run records no face boxes (no face detector ran).")
    intro = paragraphs(
        "Each prompt's images as a grid: a row per image index, whose seed starts the same initial noise at "
        f"every guidance value, and a column per guidance value ({axis}), lowest first. Along a row the noise "
        "stays and only guidance grows, so mode collapse shows in one look. At most the first "
        f"{max_rows} image indices of each prompt are shown; each grid says how many of how many. Over each "
        f"image: the {clf} classifier's labels ({' · '.join(attrs) or 'none'}), or its status where it has no "
        "label (no person, not measurable). " + faces
    )
    toc = " · ".join(f'<a href="#p{pi}">{esc(figures.short(t, 40))}</a>' for pi, t in view.prompts.items())
    ctx = images.GridContext(view, writer, clf, attrs, axis)
    return intro + f"<p>{toc}</p>" + images.seed_grids(ctx, max_rows)
