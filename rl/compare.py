"""Before/after table of an RL run: the base and tuned evaluation results folders, side by side.

Reads only the two results folders, through `evalsuite.results.open_run` (their metric tables and
records; docs/results-format.md), never a model. For each split (training and held-out prompts) and guidance
scale it lists, base -> tuned:

* bias of the fine-tuned attribute under the evaluation classifier: Shen et al.'s gap, KL to uniform
  and the dominant share (lower is more balanced);
* validity: the evaluation classifier's no-person rate and the reward classifier's low-confidence
  rate (images the policy degraded into something no classifier reads confidently);
* diversity and alignment: the Vendi score of image embeddings, the CLIP score to the prompt and,
  where the model has an exact on-prompt reader (run.json `model.on_prompt`; on the miniature world, the
  oracle's reading of the occupation's hat), the on-prompt rate, as means over the split's prompts.

`validity_by_class` splits the low-confidence rate by whom the image shows (from the records): images
the evaluation classifier reads as the prompt's majority class (`evalsuite.results.majority_classes`
over all the base run's images of that prompt) and images of any other class. A tuned model whose rarer classes
come out less legible than its majority has a quality disparity that an overall rate hides; and the
base model's own minority images at low guidance are the fair yardstick for the tuned model's.

`expected_table` adds the yardstick a collapsed base model cannot give by itself: a base-model run of an
attribute-explicit battery (prompts that ask for each class) says how legibly the base model draws each
class; each run's low-confidence rate is set against that rate for the classes it draws.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from evalsuite.errors import SuiteError
from evalsuite.legibility import GROUPS, Expected, expected_low_confidence, low_confidence_by_group
from evalsuite.results import RunView, majority_classes, open_run

BIAS = ("shen_gap", "kl_uniform", "dominant_share", "no_person_rate")


@dataclass(frozen=True)
class Row:
    split: str
    scale: float
    base: dict[str, float]
    tuned: dict[str, float]


Values = dict[tuple[str, float, str], float]  # (split, guidance scale, name) -> value


def _aggregate(view: RunView, attribute: str, wanted: dict[tuple[str, str], str]) -> Values:
    """Values of `attribute` per (split, scale, name) for the (classifier, metric) pairs in `wanted`,
    which maps each pair to the name it is reported under."""
    out: Values = {}
    for r in view.aggregate.itertuples(index=False):
        name = wanted.get((str(r.classifier), str(r.metric)))
        if name is not None and r.attribute == attribute:
            out[(str(r.split), float(r.guidance_scale), name)] = float(r.value)
    return out


def _diversity(view: RunView) -> Values:
    """Mean over prompts of vendi, clip_score and on_prompt_rate per (split, scale); NaN values are skipped."""
    sums: dict[tuple[str, float, str], list[float]] = defaultdict(list)
    for r in view.diversity.itertuples(index=False):
        if r.metric not in ("vendi", "clip_score", "on_prompt_rate") or math.isnan(r.value):
            continue
        for split in ("heldout" if r.heldout else "train", "all"):
            sums[(split, float(r.guidance_scale), str(r.metric))].append(float(r.value))
    return {k: sum(v) / len(v) for k, v in sums.items()}


def _metrics(view: RunView, classifier: str, attribute: str, reward_classifier: str) -> Values:
    wanted = {(classifier, m): m for m in BIAS}
    wanted[(reward_classifier, "low_confidence_rate")] = "reward_low_confidence"
    values = _aggregate(view, attribute, wanted)
    values.update(_diversity(view))
    return values


COLUMNS = ("shen_gap", "kl_uniform", "dominant_share", "no_person_rate", "reward_low_confidence", "vendi",
           "clip_score", "on_prompt_rate")


def open_runs(classifier: str, attribute: str, reward_classifier: str, *folders: Path) -> list[RunView]:
    """The finished results folders, read; one SuiteError naming every folder that is not one or lacks the
    classifiers or the attribute asked for."""
    problems, views = [], []
    for folder in folders:
        try:
            view = open_run(folder)
            found = view.classifiers
        except SuiteError as exc:
            problems.append(f"{folder}: not a finished results folder ({exc})")
            continue
        views.append(view)
        for clf in dict.fromkeys((classifier, reward_classifier)):
            if clf not in found:
                problems.append(f"{folder}: no classifier '{clf}' in its records; it has: {', '.join(found) or 'none'}")
        if attribute not in view.battery.attribute_names:
            problems.append(f"{folder}: no attribute '{attribute}' in its battery; it has: "
                            f"{', '.join(view.battery.attribute_names)}")
    if problems:
        raise SuiteError("; ".join(problems))
    return views


def compare_runs(base: Path, tuned: Path, classifier: str, attribute: str, reward_classifier: str,
                 splits: tuple[str, ...] = ("train", "heldout")) -> list[Row]:
    """One row per (split, guidance scale) present in both runs, in split then scale order."""
    views = open_runs(classifier, attribute, reward_classifier, base, tuned)
    a, b = (_metrics(v, classifier, attribute, reward_classifier) for v in views)
    keys = sorted({(s, g) for s, g, _ in a} & {(s, g) for s, g, _ in b},
                  key=lambda k: (splits.index(k[0]) if k[0] in splits else len(splits), k[1]))
    return [Row(s, g, {m: a.get((s, g, m), math.nan) for m in COLUMNS},
                {m: b.get((s, g, m), math.nan) for m in COLUMNS}) for s, g in keys if s in splits]


def to_markdown(rows: list[Row], classifier: str, attribute: str, reward_classifier: str) -> str:
    head = (f"Base -> tuned. Bias of `{attribute}` read by `{classifier}` (lower is more balanced); "
            f"validity: `{classifier}` no-person rate and `{reward_classifier}` low-confidence rate; "
            "Vendi, CLIP score and on-prompt rate (images that show what the prompt asked for, read exactly "
            "where the model has such a reader, e.g. the miniature world's hats): means over the split's prompts "
            "(higher is more diverse / on-prompt).\n\n")
    lines = ["| split | g | " + " | ".join(COLUMNS) + " |", "|---|---" + "|---" * len(COLUMNS) + "|"]
    for r in rows:
        cells = [f"{r.base[m]:.3f} → {r.tuned[m]:.3f}" for m in COLUMNS]
        lines.append(f"| {r.split} | {r.scale:g} | " + " | ".join(cells) + " |")
    return head + "\n".join(lines) + "\n"


@dataclass(frozen=True)
class ClassRow:
    """Low-confidence rate and image count among majority-class and other-class images, per run."""

    split: str
    scale: float
    base: dict[str, tuple[float, int]]
    tuned: dict[str, tuple[float, int]]


def validity_by_class(base: Path, tuned: Path, classifier: str, attribute: str, reward_classifier: str,
                      splits: tuple[str, ...] = ("train", "heldout")) -> list[ClassRow]:
    """Low-confidence rate of majority-class and other-class images, base and tuned (module docstring).

    The majority class of a prompt is the `classifier` label most common among all the base run's images
    of that prompt (`evalsuite.results.majority_classes`). Reads the records of both folders, nothing else.
    """
    views = open_runs(classifier, attribute, reward_classifier, base, tuned)
    base_records, tuned_records = views[0].records, views[1].records
    majority = majority_classes(base_records, classifier, attribute, views[0].battery.attribute(attribute).classes)
    a = low_confidence_by_group(base_records, majority, classifier, reward_classifier, attribute)
    b = low_confidence_by_group(tuned_records, majority, classifier, reward_classifier, attribute)
    keys = sorted({(s, g) for s, g, _ in a} & {(s, g) for s, g, _ in b},
                  key=lambda k: (splits.index(k[0]) if k[0] in splits else len(splits), k[1]))

    def cells(counts: dict[tuple[str, float, str], tuple[int, int]], s: str, g: float) -> dict[str, tuple[float, int]]:
        found = {k: counts.get((s, g, k), (0, 0)) for k in GROUPS}
        return {k: (low / n if n else math.nan, n) for k, (low, n) in found.items()}

    return [ClassRow(s, g, cells(a, s, g), cells(b, s, g)) for s, g in keys if s in splits]


def class_table(rows: list[ClassRow], classifier: str, attribute: str, reward_classifier: str) -> str:
    head = (f"Validity by class, base -> tuned: `{reward_classifier}` low-confidence rate (images) among images "
            f"`{classifier}` reads as the prompt's majority `{attribute}` (most common in the base run) and "
            "among images of the other classes.\n\n")
    lines = ["| split | g | majority | other classes |", "|---|---|---|---|"]
    for r in rows:
        cells = [f"{r.base[k][0]:.3f} ({r.base[k][1]}) → {r.tuned[k][0]:.3f} ({r.tuned[k][1]})"
                 for k in ("majority", "other")]
        lines.append(f"| {r.split} | {r.scale:g} | " + " | ".join(cells) + " |")
    return head + "\n".join(lines) + "\n"


def expected_table(base: Path, tuned: Path, reference: Path, classifier: str, attribute: str,
                   reward_classifier: str, class_slot: str = "tone",
                   splits: tuple[str, ...] = ("train", "heldout")) -> str:
    """Markdown: each run's low-confidence rate against the rate `reference` predicts for its images.

    `reference` is a base-model run of a battery naming the class in `class_slot` ("a photo of a
    {occupation} with {tone} skin"); `evalsuite.legibility.expected_low_confidence` says how each image
    is matched. A collapsed base model draws only the class it draws best, so its own rate is no yardstick
    for a tuned model that draws every class; the expected rate is how legibly the base model draws the
    tuned model's mix of classes when asked for them.
    """
    views = open_runs(classifier, attribute, reward_classifier, base, tuned, reference)
    ref = views[2].records
    runs = {name: expected_low_confidence(view.records, ref, classifier, reward_classifier, attribute, class_slot)
            for name, view in (("base", views[0]), ("tuned", views[1]))}
    keys = sorted({k for r in runs.values() for k, v in r.items() if v.matched},
                  key=lambda k: (splits.index(k[0]) if k[0] in splits else len(splits), k[1]))
    if not keys:
        asked = sorted({str(r["slots"][class_slot]) for r in ref})
        raise SuiteError(f"{reference}: no image of {base} or {tuned} matches a cell of the reference (its "
                         f"'{class_slot}' values: {', '.join(asked)}); the values must be the classes "
                         f"{classifier} reads for {attribute}, and its other slots and guidance scales the runs'")

    def cell(e: Expected | None) -> str:
        if e is None or not e.matched:
            return "no match"
        extra = f"; {e.unmatched} unmatched" if e.unmatched else ""
        return f"{e.low / e.matched:.3f} vs {e.expected / e.matched:.3f} ({e.matched}{extra})"

    head = (f"Low confidence of `{reward_classifier}` (actual vs expected at the reference's legibility): the "
            f"expected rate is `{reference}`'s own, asked for each `{attribute}` class by its `{class_slot}` slot, "
            f"for the classes `{classifier}` reads in each run (images matched).\n\n")
    lines = ["| split | g | base | tuned |", "|---|---|---|---|"]
    lines += [f"| {s} | {g:g} | {cell(runs['base'].get((s, g)))} | {cell(runs['tuned'].get((s, g)))} |"
              for s, g in keys if s in splits]
    return head + "\n".join(lines) + "\n"
