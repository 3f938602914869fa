"""Legibility by group: how often a judge classifier is unsure, among images of the majority class and
among images of the other classes.

An overall low-confidence rate hides a model that renders its rarer groups less legibly than its
majority: a quality disparity, the "quality-of-service harm" of Shelby et al. (2023, "Sociotechnical
harms of algorithmic systems"). Here a record's group is what one classifier (the reader) reads, and its
legibility is whether another (the judge) is confident about the same attribute (`confident` in the
record: top class probability >= 0.8, docs/results-format.md). The majority class of a prompt is taken
from one reference run, so that two runs (a base model and its fine-tuned adapter) are split the same way.

`expected_low_confidence` gives a tuned model's low-confidence rate a yardstick that a collapsed base
model cannot: the rate the base model itself has when a prompt asks it for each class (a run of an
attribute-explicit battery), weighted by the mix of prompts and classes the tuned model draws.

Works on records as `records.jsonl` holds them (docs/results-format.md); reads no files itself. Entries
are read by `evalsuite.results.schema.entry`: a record without a classifier's entry for the attribute
counts as "not_measurable", so it has no label and the judge sees no one in it, and the image is
skipped. A prompt's majority class is `evalsuite.results.schema.majority_classes`.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from evalsuite.battery import split_of
from evalsuite.errors import SuiteError
from evalsuite.results.schema import entry

GROUPS = ("majority", "other")
Cell = tuple[int, int]  # (low-confidence images, images)


def low_confidence_by_group(records: Iterable[Mapping[str, Any]], majority: Mapping[str, str], reader: str,
                            judge: str, attribute: str, by_split: bool = True,
                            splits: Mapping[str, str] | None = None) -> dict[tuple[str, float, str], Cell]:
    """(split, guidance scale, group) -> (images the judge reads with low confidence, images).

    split is the record's (`split_of` with `splits`), or "all" when not `by_split`; group
    is "majority" when `reader` reads the image as its prompt's class in `majority`, else "other". An
    image counts only when `reader` gives it a label, the judge's status is "ok" and its prompt has a
    majority class; it is low-confidence when the judge's `confident` is false. The rate is the first
    number over the second; a key with no such image is absent (an empty group has no rate: show NaN).
    """
    low: dict[tuple[str, float, str], list[bool]] = defaultdict(list)
    for r in records:
        label, judged = entry(r, reader, attribute).label, entry(r, judge, attribute)
        prompt = str(r["prompt"])
        if label is None or not judged.ok or prompt not in majority:
            continue
        group = "majority" if label == majority[prompt] else "other"
        split = split_of(r, splits) if by_split else "all"
        low[(split, float(r["guidance_scale"]), group)].append(not judged.confident)
    return {k: (sum(v), len(v)) for k, v in low.items()}


@dataclass(frozen=True)
class Expected:
    """Low-confidence images of a run against what a reference run's legibility predicts for them."""

    low: int  # images the judge reads with low confidence, among the matched ones
    expected: float  # sum over the matched images of their reference cell's low-confidence rate
    matched: int  # images with a reference cell
    unmatched: int  # images without one (their slots, scale and class never met in the reference)


def _slots_key(record: Mapping[str, Any], drop: str | None = None) -> tuple[tuple[str, str], ...]:
    return tuple(sorted((str(k), str(v)) for k, v in (record.get("slots") or {}).items() if k != drop))


def expected_low_confidence(records: Iterable[Mapping[str, Any]], reference: Iterable[Mapping[str, Any]],
                            reader: str, judge: str, attribute: str, class_slot: str,
                            by_split: bool = True, splits: Mapping[str, str] | None = None
                            ) -> dict[tuple[str, float], Expected]:
    """(split, guidance scale) -> a run's low-confidence images against the reference's legibility.

    The yardstick for a model that was tuned to draw more classes: how legibly does the base model draw
    each class when the prompt asks for it? `reference` is a run of the base model on a battery whose
    prompts name the class in the slot `class_slot` (e.g. "a photo of a {occupation} with {tone} skin",
    the slot's values being the attribute's class names). Its images form cells (the other slots,
    guidance scale, class asked for), each with a low-confidence rate: images the judge is unsure about
    (`confident` false) over the cell's images the judge sees a person in (status "ok"). An image drawn
    between two classes counts against the class asked for, whatever it is read as. Each image of
    `records` that `reader` labels (judge status "ok") is matched to the cell of its slots (but
    `class_slot`), scale and the class `reader` reads; `expected` sums the matched images' cell rates,
    so expected / matched is the low-confidence rate the reference model would have drawing the run's
    mix of prompts, scales and classes, and low / matched the run's own. An image with no such cell
    counts in `unmatched` only. A key with no labelled image is absent. A reference record without
    `class_slot` raises SuiteError.
    """
    cells: dict[tuple, list[int]] = defaultdict(lambda: [0, 0])
    for r in reference:
        slots = r.get("slots") or {}
        if class_slot not in slots:
            raise SuiteError(f"reference record of '{r.get('prompt')}' has no slot '{class_slot}' (its slots: "
                             f"{', '.join(slots) or 'none'}); the reference battery must name the class in it")
        judged = entry(r, judge, attribute)
        if not judged.ok:
            continue
        cell = cells[(_slots_key(r, class_slot), float(r["guidance_scale"]), str(slots[class_slot]))]
        cell[0] += not judged.confident
        cell[1] += 1
    out: dict[tuple[str, float], list[float]] = defaultdict(lambda: [0, 0.0, 0, 0])
    for r in records:
        label, judged = entry(r, reader, attribute).label, entry(r, judge, attribute)
        if label is None or not judged.ok:
            continue
        split = split_of(r, splits) if by_split else "all"
        acc = out[(split, float(r["guidance_scale"]))]
        found = cells.get((_slots_key(r, class_slot), float(r["guidance_scale"]), label))
        if found is None:
            acc[3] += 1
            continue
        acc[0] += not judged.confident
        acc[1] += found[0] / found[1]
        acc[2] += 1
    return {k: Expected(int(v[0]), float(v[1]), int(v[2]), int(v[3])) for k, v in out.items()}
