"""Legibility by group: how often a judge classifier is unsure, among images of the majority class and
among images of the other classes.

An overall low-confidence rate hides a model that renders its rarer groups less legibly than its
majority: a quality disparity, the "quality-of-service harm" of Shelby et al. (2023, "Sociotechnical
harms of algorithmic systems"). Here a record's group is what one classifier (the reader) reads, and its
legibility is whether another (the judge) is confident about the same attribute (`confident` in the
record: top class probability >= 0.8, docs/results-format.md). The majority class of a prompt is taken
from one reference run, so that two runs (a base model and its fine-tuned adapter) are split the same way.

Works on records as `records.jsonl` holds them (docs/results-format.md); reads no files itself.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping
from typing import Any

GROUPS = ("majority", "other")
Cell = tuple[int, int]  # (low-confidence images, images)


def majority_classes(records: Iterable[Mapping[str, Any]], reader: str, attribute: str) -> dict[str, str]:
    """Per prompt text, the class `reader` gives most often over all its images (every guidance scale).

    Ties go to the class met first in the records' order. Images without a label (no person found, or the
    attribute not measurable) are not counted; a prompt with no labelled image has no majority.
    """
    counts: dict[str, Counter[str]] = defaultdict(Counter)
    for r in records:
        label = r["classifiers"][reader][attribute]["label"]
        if label is not None:
            counts[str(r["prompt"])][label] += 1
    return {prompt: c.most_common(1)[0][0] for prompt, c in counts.items()}


def low_confidence_by_group(records: Iterable[Mapping[str, Any]], majority: Mapping[str, str], reader: str,
                            judge: str, attribute: str, by_split: bool = True) -> dict[tuple[str, float, str], Cell]:
    """(split, guidance scale, group) -> (images the judge reads with low confidence, images).

    split is "heldout" or "train" (the record's `heldout` flag), or "all" when not `by_split`; group
    is "majority" when `reader` reads the image as its prompt's class in `majority`, else "other". An
    image counts only when `reader` gives it a label, the judge's status is "ok" and its prompt has a
    majority class; it is low-confidence when the judge's `confident` is false. The rate is the first
    number over the second; a key with no such image is absent (an empty group has no rate: show NaN).
    """
    low: dict[tuple[str, float, str], list[bool]] = defaultdict(list)
    for r in records:
        label = r["classifiers"][reader][attribute]["label"]
        entry = r["classifiers"][judge][attribute]
        prompt = str(r["prompt"])
        if label is None or entry["status"] != "ok" or prompt not in majority:
            continue
        group = "majority" if label == majority[prompt] else "other"
        split = ("heldout" if r.get("heldout") else "train") if by_split else "all"
        low[(split, float(r["guidance_scale"]), group)].append(not entry["confident"])
    return {k: (sum(v), len(v)) for k, v in low.items()}
