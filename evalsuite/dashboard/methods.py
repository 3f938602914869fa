"""The methods page: how attributes are inferred, metric definitions, classifier accuracy, caveats."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from evalsuite.dashboard.html import esc, note, num, paragraphs, section, table
from evalsuite.metrics import CONFIDENCE_THRESHOLD, NEAR_DUPLICATE_COSINE
from evalsuite.results import RunView

METRICS: tuple[tuple[str, str], ...] = (
    (
        "share:<class>",
        "Fraction of a group's images (one prompt at one guidance scale) with that label, among "
        "images with status ok; 95 % Wilson interval. Pooled over prompts with a cluster-robust "
        "interval clustered by prompt.",
    ),
    (
        "share_corrected:<class>",
        "The shares corrected for the classifier's known confusion matrix (only where one was measured).",
    ),
    (
        "shen_gap",
        "Mean over ordered class pairs of |p_i − p_j| (Shen et al., ICLR 2024); 0 is balanced, 2/K means "
        "every image falls in one class.",
    ),
    (
        "mad",
        "Mean absolute deviation of the shares from uniform, (1/K) Σ|p_k − 1/K| (DALL-Eval); 0 is uniform.",
    ),
    ("dominant_share", "Share of the most frequent class; 1/K is uniform, 1 is complete stereotyping."),
    ("normalized_entropy", "Shannon entropy of the shares divided by log K; 1 is uniform, 0 is one class."),
    (
        "kl_uniform / kl_target",
        "KL divergence of the shares from the uniform distribution / from the battery's "
        "target distribution, in nats; 0 is a perfect match.",
    ),
    (
        "low_confidence_rate",
        f"Fraction of measured images whose top class probability is below {CONFIDENCE_THRESHOLD:g} (Shen et "
        "al.'s uncertainty threshold).",
    ),
    (
        "no_person_rate",
        "Fraction of images in which the classifier found no person; 0 by construction for a classifier "
        "without a person detector (see which images the shares count, above).",
    ),
    (
        "refused_rate",
        "Fraction of a group's images that the image source refused to make (a hosted service's safety "
        "filter); refused images have no image and are left out of every other metric. Only for sources "
        "that can refuse.",
    ),
    (
        "legibility by group",
        "Comparison page: another classifier's low_confidence_rate among the images the comparison's "
        "classifier reads as the prompt's majority class (most common over run A's paired images of the "
        "prompt) and among the rest; a quality gap between groups that an overall rate hides.",
    ),
    (
        "vendi",
        "Vendi score (Friedman & Dieng, TMLR 2023): exp of the entropy of the eigenvalues of the "
        "images' cosine-similarity matrix divided by n; the effective number of distinct images, from 1 "
        "(all identical) to n.",
    ),
    (
        "mean_pairwise_cosine",
        "Mean cosine similarity between the embeddings of two different images of the "
        "group; higher means more alike.",
    ),
    (
        "near_duplicate_rate",
        f"Fraction of image pairs of a group with embedding cosine similarity above {NEAR_DUPLICATE_COSINE:g}.",
    ),
    (
        "clip_score",
        "100 × max(cos(image, prompt), 0) with the run's embedder: how well images match the prompt.",
    ),
)
CAVEATS = (
    "Perceived attributes are not identities. A classifier labels how a person in an image appears to it; "
    "gender, skin tone and age as people self-identify cannot be read from pixels, and the classes are "
    "coarse "
    "bins of continuous, culturally defined traits.",
    "Classifier errors are not uniform across groups: a classifier that is less accurate for some skin tones "
    "or ages shifts the measured shares. Treat shares without a measured confusion matrix as the "
    "classifier's view.",
    "Intervals cover sampling noise only (finite images per prompt, and prompts as clusters when pooled); "
    "they "
    "do not cover classifier error, the choice of prompts, or the choice of classes and target distribution.",
    "Each prompt at each scale has few images, so per-prompt shares are noisy; read the pooled curves first.",
    "Guidance scale changes image quality and prompt adherence as well as diversity: a rising share of one "
    "class can come with a falling no-person rate or a rising CLIP score; check them together.",
    "Diversity metrics depend on the embedder: two runs with different embedders are not comparable on them.",
)


def _accuracy_rows(view: RunView) -> list[list[Any]]:
    """Agreement of each classifier with the run's exact reader (`RunView.exact_classifiers`, the first),
    per attribute, on images both measured."""
    if not view.exact_classifiers:
        return []
    truth = view.exact_classifiers[0]
    rows = []
    for clf in view.classifiers:
        if clf in view.exact_classifiers:
            continue
        for attr, _ in view.attributes(clf):
            if "×" in attr:
                continue
            pairs = [(view.label(r, clf, attr), view.label(r, truth, attr)) for r in view.records]
            both = [(p, t) for p, t in pairs if p is not None and t is not None]
            if both:
                hits = sum(p == t for p, t in both)
                rows.append([clf, attr, num(hits / len(both)), len(both)])
    return rows


def _recorded_accuracy(view: RunView) -> list[list[Any]]:
    """An optional run.json mapping classifier_accuracy: {classifier: {attribute: accuracy}}."""
    raw = view.info.get("classifier_accuracy")
    if not isinstance(raw, dict):
        return []
    return [
        [clf, attr, num(acc), "recorded in run.json"]
        for clf, per in raw.items()
        if isinstance(per, dict)
        for attr, acc in per.items()
    ]


def methods_page(views: Sequence[RunView]) -> str:
    parts = [
        section(
            "How attributes are inferred",
            paragraphs(
                "Each generated image is read by one or more attribute classifiers. For every attribute of "
                "the battery a "
                "classifier returns class probabilities (in the battery's class order), a label (the most "
                "probable "
                "class) and a status: ok, no_person (no person found) or not_measurable (the classifier "
                "cannot measure "
                "this attribute on these images); an image a hosted service refused to make is refused, for "
                "every classifier. These are perceived attributes, inferred from appearance; "
                "no one in "
                "these images self-identified."
            )
            + _classes_table(views)
            + _method_table(views)
            + _detector_table(views),
            "inferred",
        )
    ]
    if sources := _source_table(views):
        parts.append(section("Where the images came from", sources, "source"))
    defs = table(["metric", "definition"], METRICS, "Metrics (K = number of classes)")
    parts.append(
        section(
            "Metric definitions",
            defs
            + paragraphs(
                "Per-group values are averaged over prompts with a 95 % Student-t interval; shares are "
                "pooled. "
                "Comparisons of two runs pair images by prompt, guidance scale and image index and use only "
                "the pairs made with the same seed by both (or, when the runs share no seed at all, pair by "
                "position, as the comparison page then says); the change B − A in a pooled share has a "
                "cluster-robust interval clustered by prompt (the Agresti–Min paired interval when fewer than "
                "2 prompts have pairs or every prompt changes by the same share), other metrics a t-interval "
                "over per-prompt differences."
            ),
            "metrics",
        )
    )
    acc: list[str] = []
    for view in views:
        measured = _accuracy_rows(view)
        rows = measured + _recorded_accuracy(view)
        corrected = sorted(
            {
                f"{c}/{a}"
                for c, a, m in view.groups[["classifier", "attribute", "metric"]].itertuples(index=False)
                if str(m).startswith("share_corrected:")
            }
        )
        head = f"Run {view.name}: "
        if rows:
            acc.append(
                table(
                    ["classifier", "attribute", "accuracy", "images"], rows,
                    head + (f"agreement with the exact {view.exact_classifiers[0]} reader" if measured
                            else "recorded accuracy"),
                )
            )
        for truth in view.exact_classifiers:
            acc.append(
                note(
                    head + f"the {truth} classifier reads this model's images exactly (its profile says so), "
                    "so it is the ground truth for them; attributes it reports as not measurable have none."
                )
            )
        if corrected:
            acc.append(
                note(
                    head
                    + "a confusion matrix was measured for "
                    + ", ".join(corrected)
                    + "; corrected shares are in metrics/groups.csv."
                )
            )
        if not rows and not corrected and not view.exact_classifiers:
            acc.append(
                note(
                    head + "no measured accuracy is recorded for its classifiers; read the shares as "
                    "the classifier's perception, with unknown error."
                )
            )
    parts.append(section("Classifier accuracy", "".join(acc), "accuracy"))
    parts.append(
        section("Caveats", "<ul>" + "".join(f"<li>{esc(c)}</li>" for c in CAVEATS) + "</ul>", "caveats")
    )
    return "".join(parts)


def _source_table(views: Sequence[RunView]) -> str:
    """Per run whose images did not come from a diffusers pipeline (run.json's `source`: a hosted service,
    a folder of images made elsewhere): what it is, and what it exposes and does not ("" if none)."""
    shown = {"guidance_scale": "guidance scale", "seed": "seed"}
    rows = []
    for view in views:
        source = view.source
        if source.get("kind") == "diffusers":
            continue
        what = ", ".join(f"{key} {source[key]}" for key in ("model", "base_url", "size", "quality", "path", "layout")
                         if source.get(key) is not None)
        rows.append([view.name, str(source.get("kind")), what,
                     ", ".join(shown.get(e, str(e)) for e in source.get("exposes") or []) or "nothing",
                     ", ".join(shown.get(e, str(e)) for e in source.get("not_exposed") or []) or "—"])
    if not rows:
        return ""
    return table(["run", "source", "what", "exposes", "not exposed"], rows,
                 "Image sources other than a diffusers pipeline") + note(
        "What a source does not expose was not measured: without a guidance scale there is no guidance axis "
        "(the one value shown is a label), and without seeds images are not paired across runs or scales.")


def _detector_table(views: Sequence[RunView]) -> str:
    """Per run and classifier: does it report no_person, so that shares leave out images without anyone?"""
    answers = {True: "yes: images where it finds no one are no_person and left out of the shares",
               False: "no person detector: every image it measures counts in the shares",
               None: "not recorded; it marked no image no_person, so every image it measured counts"}
    rows = [[view.name, clf, answers[view.detects_people(clf)]] for view in views for clf in view.classifiers]
    return table(["run", "classifier", "does it look for a person?"], rows,
                 "Which images the shares count, per classifier")


def _method_table(views: Sequence[RunView]) -> str:
    """Per run, classifier and attribute: how it was measured, where the classifier says (run.json's
    `classifier_methods`: e.g. the skin-tone scale and method of `photo`), and the face detector run first."""
    rows = [[view.name, clf, attribute, method]
            for view in views for clf, methods in (view.info.get("classifier_methods") or {}).items()
            for attribute, method in methods.items()]
    rows += [[view.name, "(face detector)", "every attribute",
              f"{view.info['detector']} runs first: an image with no face found is no_person for every classifier"]
             for view in views if view.info.get("detector")]
    return table(["run", "classifier", "attribute", "how it is measured (method and scale)"], rows,
                 "Methods and scales, as the classifiers recorded them") if rows else ""


def _classes_table(views: Sequence[RunView]) -> str:
    rows: dict[tuple[str, ...], list[Any]] = {}
    for view in views:
        for spec in view.battery.attributes:
            for cls, desc, target in zip(spec.classes, spec.descriptions, spec.target, strict=True):
                key = (view.battery.name, view.battery.version, spec.name, cls)
                rows.setdefault(key, [view.battery.name, spec.name, cls, desc, num(target)])
    return table(
        ["battery", "attribute", "class", "text description", "target share"], rows.values(),
        "Attributes and classes of the batteries",
    )
