"""The results format: its version, the record and classifier-entry types, the table columns, and the
rules every reader applies to a record (which label an entry gives, which class dominates).

docs/results-format.md describes the same format for people; this module is its one definition in code.
Writers (`evalsuite.results.store`, `evalsuite.analysis`) build records and tables with it, and every
reader (`evalsuite.results.reader`, the dashboard, `rl compare`, `evalsuite.legibility`, publish) reads
entries through :func:`entry` and :func:`label`, never by hand.

Versions: 2 is written. 1 (before 2026-12) is read: its records carried the miniature world's
``oracle_hat`` where version 2 has the generic ``on_prompt``; :func:`upgrade_record` renames it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypedDict

import numpy as np

from evalsuite.battery import JOINER
from evalsuite.errors import SuiteError
from evalsuite.metrics import CONFIDENCE_THRESHOLD

__all__ = [
    "AGGREGATE_COLUMNS", "COLUMN_TYPES", "CONFIDENCE_THRESHOLD", "DIVERSITY_COLUMNS", "GROUP_COLUMNS", "JOINER",
    "NOT_MEASURABLE", "READABLE_VERSIONS", "RECORD_KEYS", "REQUIRED_KEYS", "SCHEMA_VERSION", "STATUSES", "TABLES",
    "Entry", "OnPrompt", "Record", "Status", "classifier_entry", "dominant_class", "entry", "label", "label_index",
    "is_refused", "majority_classes", "make_record", "refused_record", "upgrade_record",
]

SCHEMA_VERSION = 2
READABLE_VERSIONS = (1, 2)

# "refused": the image source declined to make the image (a hosted service's safety filter): the record
# has no image, and every classifier entry of it carries this status (`refused_record`)
Status = Literal["ok", "no_person", "not_measurable", "refused"]
STATUSES: tuple[Status, ...] = ("ok", "no_person", "not_measurable", "refused")

# ---------------------------------------------------------------- metric tables (metrics/<name>.csv|parquet)

_VALUES = ("metric", "value", "lo", "hi")
DIVERSITY_COLUMNS = ("prompt_index", "prompt", "heldout", "guidance_scale", *_VALUES, "n")
GROUP_COLUMNS = ("classifier", "attribute", *DIVERSITY_COLUMNS)
AGGREGATE_COLUMNS = ("classifier", "attribute", "split", "guidance_scale", *_VALUES, "n_prompts")
TABLES: dict[str, tuple[str, ...]] = {"groups": GROUP_COLUMNS, "aggregate": AGGREGATE_COLUMNS,
                                      "diversity": DIVERSITY_COLUMNS}
# column -> dtype, for every table that has it ("value", "lo" and "hi" may hold NaN and inf)
COLUMN_TYPES: dict[str, str] = {
    "classifier": "str", "attribute": "str", "prompt_index": "int", "prompt": "str", "heldout": "bool",
    "split": "str", "guidance_scale": "float", "metric": "str", "value": "float", "lo": "float", "hi": "float",
    "n": "int", "n_prompts": "int",
}

# ---------------------------------------------------------------- records (one line of records.jsonl)

RECORD_KEYS = ("unit", "prompt_index", "prompt", "heldout", "slots", "guidance_scale", "image_index", "seed",
               "image", "sha256", "embedding", "clip_score", "classifiers")  # what the runner writes
REQUIRED_KEYS = ("prompt_index", "prompt", "guidance_scale", "image_index", "seed", "image",
                 "classifiers")  # what every reader relies on: a record without one is refused


class OnPrompt(TypedDict):
    """What an exact reader found in an image (`read`; None where it found no one) and what the prompt
    asked for (`wanted`): the truth behind `on_prompt_rate`."""

    read: str | None
    wanted: str


class Record(TypedDict, total=False):
    """One image. Every key of RECORD_KEYS is present; `on_prompt` only where the model under audit has
    an exact reader of what its images show (the built-in miniature model: the occupation's hat); `faces`
    only where a face detector ran: its boxes `[x0, y0, x1, y1, score]` in pixels, largest first ([]: none
    found, and every classifier's entries are "no_person"); `refused` only where the image source refused
    to make the image (`refused_record`: what the service said; no image, no embedding)."""

    unit: int
    prompt_index: int
    prompt: str
    heldout: bool
    slots: dict[str, str]
    guidance_scale: float
    image_index: int
    seed: int
    image: str | None
    sha256: str | None
    embedding: list[float] | None
    clip_score: float | None
    classifiers: dict[str, dict[str, dict[str, Any]]]
    on_prompt: OnPrompt
    faces: list[list[float]]
    refused: str


def make_record(*, unit: int, prompt_index: int, prompt: str, heldout: bool, slots: Mapping[str, str],
                guidance_scale: float, image_index: int, seed: int, image: str, sha256: str,
                embedding: Sequence[float], clip_score: float, classifiers: Mapping[str, Mapping[str, Any]],
                on_prompt: OnPrompt | None = None, faces: Sequence[Sequence[float]] | None = None) -> Record:
    """A record as the runner writes it: the embedding rounded to 6 decimals, the CLIP score to 4."""
    record: Record = {
        "unit": unit, "prompt_index": prompt_index, "prompt": prompt, "heldout": heldout, "slots": dict(slots),
        "guidance_scale": guidance_scale, "image_index": image_index, "seed": seed, "image": image,
        "sha256": sha256, "embedding": [round(float(v), 6) for v in embedding],
        "clip_score": round(float(clip_score), 4), "classifiers": {k: dict(v) for k, v in classifiers.items()},
    }
    if on_prompt is not None:
        record["on_prompt"] = on_prompt
    if faces is not None:
        record["faces"] = [[round(float(v), 2) for v in box] for box in faces]
    return record


def refused_record(*, unit: int, prompt_index: int, prompt: str, heldout: bool, slots: Mapping[str, str],
                   guidance_scale: float, image_index: int, seed: int,
                   classifiers: Mapping[str, Sequence[str]], reason: str) -> Record:
    """The record of an image the source refused to make (a hosted service's safety filter): no image,
    sha256, embedding or CLIP score (null), every attribute of every classifier (`classifiers`: spec ->
    attribute names) "refused", and `refused`, what the service said. Readers leave it out of the shares
    and count it in `refused_rate`; `evalsuite.results.RunView` keeps it apart from the records with images."""
    return {
        "unit": unit, "prompt_index": prompt_index, "prompt": prompt, "heldout": heldout, "slots": dict(slots),
        "guidance_scale": guidance_scale, "image_index": image_index, "seed": seed, "image": None,
        "sha256": None, "embedding": None, "clip_score": None,
        "classifiers": {name: {a: classifier_entry((), "refused", ()) for a in attributes}
                        for name, attributes in classifiers.items()},
        "refused": reason,
    }


def is_refused(record: Any) -> bool:
    """Whether a record is that of an image the source refused to make (no image; `refused_record`)."""
    return isinstance(record, dict) and record.get("image") is None and "refused" in record


def upgrade_record(record: dict[str, Any], version: int) -> dict[str, Any]:
    """A record of results version `version` (READABLE_VERSIONS) in the current version's form."""
    if version == 1 and "oracle_hat" in record:
        record = dict(record)
        record["on_prompt"] = record.pop("oracle_hat")
    return record


# ---------------------------------------------------------------- classifier entries and the rules on them


@dataclass(frozen=True)
class Entry:
    """One classifier's reading of one attribute of one image.

    `probs` follow the battery's class order; `label` is the class of the largest probability
    (:func:`label_index`); `confident` is max(probs) >= CONFIDENCE_THRESHOLD (0.8). `probs` and `label`
    are None unless `status` is "ok".
    """

    status: Status
    label: str | None
    probs: tuple[float, ...] | None
    confident: bool

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def top(self) -> float:
        """The largest class probability (NaN where there are none)."""
        return max(self.probs) if self.probs else float("nan")


NOT_MEASURABLE = Entry("not_measurable", None, None, False)


def label_index(probs: Sequence[float] | np.ndarray) -> int:
    """The label rule: the index of the largest probability, the first in class order on ties."""
    return int(np.argmax(np.asarray(probs, dtype=np.float64)))


def classifier_entry(probs: Sequence[float] | np.ndarray, status: str, classes: Sequence[str]) -> dict[str, Any]:
    """The JSON form of one entry (``{probs, label, status, confident}``) from a classifier's probability
    row (battery class order) and status; probs and label are null unless the status is "ok"."""
    if status not in STATUSES:
        raise ValueError(f"status must be one of {', '.join(STATUSES)}, got {status!r}")
    if status != "ok":
        return {"probs": None, "label": None, "status": status, "confident": False}
    row = [float(p) for p in probs]
    k = label_index(row)
    return {"probs": row, "label": classes[k], "status": status, "confident": bool(row[k] >= CONFIDENCE_THRESHOLD)}


def entry(record: Mapping[str, Any], classifier: str, attribute: str) -> Entry:
    """The record's entry of `classifier` for one attribute (not an intersection); a missing one is
    NOT_MEASURABLE. An entry with an unknown status, or an "ok" one without a label, is a SuiteError
    naming the record's unit. `confident`, where a hand-made record lacks it, follows the rule above."""
    raw = ((record.get("classifiers") or {}).get(classifier) or {}).get(attribute)
    if raw is None:
        return NOT_MEASURABLE
    status = raw.get("status") if isinstance(raw, Mapping) else None
    if status not in STATUSES:
        raise SuiteError(f"record unit {record.get('unit')}: {classifier}/{attribute} has unknown status "
                         f"{status!r}; expected {', '.join(STATUSES)}")
    if status != "ok":
        return Entry(status, None, None, False)
    probs, found = raw.get("probs"), raw.get("label")
    if found is None:
        raise SuiteError(f"record unit {record.get('unit')}: {classifier}/{attribute} has status ok but no label")
    row = tuple(float(p) for p in probs) if probs is not None else None
    confident = raw.get("confident")
    if not isinstance(confident, bool):
        confident = row is not None and max(row) >= CONFIDENCE_THRESHOLD
    return Entry("ok", str(found), row, confident)


def label(record: Mapping[str, Any], classifier: str, attribute: str) -> str | None:
    """The class `classifier` reads for `attribute` (an intersection ``a×b`` joins its parts' labels
    with ×), or None unless every part's status is "ok"."""
    parts = []
    for part in attribute.split(JOINER):
        found = entry(record, classifier, part)
        if not found.ok or found.label is None:
            return None
        parts.append(found.label)
    return JOINER.join(parts)


def dominant_class(counts: Sequence[float] | np.ndarray) -> int | None:
    """The dominant-class rule: the index of the largest count (or share), the first in class order on
    ties; None when there is nothing to count (every count 0 or NaN)."""
    values = np.nan_to_num(np.asarray(counts, dtype=np.float64), nan=0.0)
    if values.size == 0 or not np.any(values > 0):
        return None
    return int(np.argmax(values))


def majority_classes(records: Iterable[Mapping[str, Any]], reader: str, attribute: str,
                     classes: Sequence[str]) -> dict[str, str]:
    """Per prompt text, the dominant class (:func:`dominant_class`) of the labels `reader` gives its
    images (every guidance scale). Images without a label are not counted; a prompt with no labelled
    image has no majority."""
    counts: dict[str, np.ndarray] = {}
    index = {c: i for i, c in enumerate(classes)}
    for r in records:
        found = label(r, reader, attribute)
        if found is None or found not in index:
            continue
        counts.setdefault(str(r["prompt"]), np.zeros(len(classes)))[index[found]] += 1
    out: dict[str, str] = {}
    for prompt, c in counts.items():
        k = dominant_class(c)
        if k is not None:
            out[prompt] = classes[k]
    return out
