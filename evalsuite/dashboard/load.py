"""Read one results folder (docs/results-format.md) into a typed, validated `RunView`.

Only the results folder is read, never a model. Every problem is one `SuiteError` naming the file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from evalsuite.battery import Battery, battery_from_dict
from evalsuite.errors import ConfigError, SuiteError

SCHEMA_VERSION = 1
JOINER = "×"
GROUP_COLUMNS = (
    "classifier", "attribute", "prompt_index", "prompt", "heldout", "guidance_scale", "metric", "value",
    "lo", "hi", "n",
)
AGGREGATE_COLUMNS = (
    "classifier", "attribute", "split", "guidance_scale", "metric", "value", "lo", "hi", "n_prompts",
)
DIVERSITY_KEYS = ("prompt_index", "guidance_scale")
DIVERSITY_COLUMNS = (*DIVERSITY_KEYS, "metric", "value", "lo", "hi")
RECORD_KEYS = ("prompt_index", "prompt", "guidance_scale", "image_index", "seed", "image", "classifiers")
_NUMERIC = ("value", "lo", "hi", "n", "n_prompts", "guidance_scale", "prompt_index")


@dataclass(frozen=True)
class RunView:
    """A complete run as the dashboard sees it: run.json, the battery, records and the metric tables."""

    path: Path
    info: dict[str, Any]
    battery: Battery
    records: list[dict[str, Any]]
    groups: pd.DataFrame
    aggregate: pd.DataFrame
    diversity: pd.DataFrame  # wide: prompt_index, guidance_scale, one column per metric (+ clip_score_lo/hi)
    prompts: dict[int, str] = field(default_factory=dict)  # prompt_index -> text, in index order
    heldout: frozenset[int] = frozenset()

    @property
    def name(self) -> str:
        return str(self.info.get("run_name") or self.info.get("name") or self.path.name)

    @property
    def model(self) -> dict[str, Any]:
        model = self.info.get("model")
        return model if isinstance(model, dict) else {"id": str(model or "unknown")}

    @property
    def model_label(self) -> str:
        lora = self.model.get("lora")
        scale = self.model.get("lora_scale", 1.0)
        strength = f" at strength {scale:g}" if isinstance(scale, (int, float)) and scale != 1.0 else ""
        return str(self.model.get("id", "unknown")) + (f" + LoRA {lora}{strength}" if lora else "")

    @property
    def classifiers(self) -> list[str]:
        seen = [str(c) for c in self.info.get("classifiers") or []]
        return list(dict.fromkeys(seen + [c for r in self.records for c in r.get("classifiers") or {}]))

    @property
    def primary_classifier(self) -> str:
        primary = self.info.get("primary_classifier")
        if isinstance(primary, str) and primary:
            return primary
        return self.classifiers[0] if self.classifiers else self.battery.classifier

    @property
    def scales(self) -> list[float]:
        return sorted({float(r["guidance_scale"]) for r in self.records})

    def attributes(self, classifier: str) -> list[tuple[str, tuple[str, ...]]]:
        """(attribute, classes) with rows in groups.csv for `classifier`: battery order, then "
        "intersections."""
        specs = {a.name: a.classes for a in self.battery.attributes}
        for members in self.battery.intersections:
            joint: list[str] = [""]
            for m in members:
                joint = [f"{j}{JOINER}{c}" if j else c for j in joint for c in specs[m]]
            specs[JOINER.join(members)] = tuple(joint)
        present = set(self.groups.loc[self.groups["classifier"] == classifier, "attribute"])
        return [(name, classes) for name, classes in specs.items() if name in present]

    def label(self, record: dict[str, Any], classifier: str, attribute: str) -> str | None:
        """The record's label for an attribute (an intersection joins its parts), None unless status ok."""
        entries = (record.get("classifiers") or {}).get(classifier) or {}
        parts = []
        for part in attribute.split(JOINER):
            entry = entries.get(part) or {}
            if entry.get("status") != "ok" or entry.get("label") is None:
                return None
            parts.append(str(entry["label"]))
        return JOINER.join(parts)

    def detects_people(self, classifier: str) -> bool | None:
        """Whether `classifier` reports "no_person" where it finds no one: run.json's `detects_people`
        where recorded, else True if any record has a "no_person" status from it, else None (unknown: it
        found a person everywhere, or it has no person detector)."""
        recorded = self.info.get("detects_people")
        if isinstance(recorded, dict) and isinstance(recorded.get(classifier), bool):
            return bool(recorded[classifier])
        for r in self.records:
            entries = (r.get("classifiers") or {}).get(classifier) or {}
            if any(isinstance(e, dict) and e.get("status") == "no_person" for e in entries.values()):
                return True
        return None

    def status(self, record: dict[str, Any], classifier: str, attribute: str) -> str:
        entry = ((record.get("classifiers") or {}).get(classifier) or {}).get(attribute) or {}
        return str(entry.get("status", "not_measurable"))


def load_run(path: Path) -> RunView:
    """Read and validate a results folder; a missing or malformed file is one SuiteError naming it."""
    path = Path(path)
    if not path.is_dir():
        raise SuiteError(f"{path}: not a results folder (no such directory)")
    info = _read_json(path / "run.json")
    if info.get("schema_version") != SCHEMA_VERSION:
        raise SuiteError(
            f"{path / 'run.json'}: schema_version must be {SCHEMA_VERSION}, "
            f"got {info.get('schema_version')!r}; this evalsuite cannot read these results"
        )
    if info.get("status") != "complete":
        raise SuiteError(
            f"{path / 'run.json'}: the run is not complete (status {info.get('status')!r}); "
            "finish it with `evalsuite run` before building a dashboard"
        )
    if not isinstance(info.get("battery"), dict):
        raise SuiteError(f"{path / 'run.json'}: 'battery' is missing or not a mapping")
    try:
        battery = battery_from_dict(info["battery"], str(path / "run.json"))
    except ConfigError as exc:
        raise SuiteError(f"{path / 'run.json'}: the recorded battery is invalid:\n{exc}") from None
    records = _read_records(path)
    groups = _read_table(path / "metrics" / "groups.csv", GROUP_COLUMNS)
    aggregate = _read_table(path / "metrics" / "aggregate.csv", AGGREGATE_COLUMNS)
    diversity = _wide_diversity(_read_table(path / "metrics" / "diversity.csv", DIVERSITY_COLUMNS))
    prompts = {int(r["prompt_index"]): str(r["prompt"]) for r in records}
    heldout = frozenset(int(r["prompt_index"]) for r in records if r.get("heldout"))
    return RunView(
        path, info, battery, records, groups, aggregate, diversity, dict(sorted(prompts.items())), heldout
    )


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SuiteError(f"{path}: required file is missing; is this a results folder?") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SuiteError(f"{path}: cannot read JSON: {exc}") from None
    if not isinstance(data, dict):
        raise SuiteError(f"{path}: must hold a JSON object, got {type(data).__name__}")
    return data


def _read_records(run: Path) -> list[dict[str, Any]]:
    path = run / "records.jsonl"
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise SuiteError(f"{path}: required file is missing") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SuiteError(f"{path}: cannot read: {exc}") from None
    records: list[dict[str, Any]] = []
    root = run.resolve()
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            raise SuiteError(f"{path}, line {lineno}: malformed JSON ({exc.msg})") from None
        missing = [k for k in RECORD_KEYS if not isinstance(rec, dict) or k not in rec]
        if missing:
            raise SuiteError(f"{path}, line {lineno}: record lacks {', '.join(missing)}")
        try:
            rec["prompt_index"], rec["image_index"] = int(rec["prompt_index"]), int(rec["image_index"])
            rec["guidance_scale"] = float(rec["guidance_scale"])
        except (TypeError, ValueError):
            raise SuiteError(
                f"{path}, line {lineno}: prompt_index, image_index and guidance_scale must be numbers"
            ) from None
        image = (run / str(rec["image"])).resolve()
        if not image.is_relative_to(root) or not image.is_file():
            raise SuiteError(
                f"{path}, line {lineno}: image {rec['image']!r} is missing or outside the run folder"
            )
        rec["_image_path"] = image
        records.append(rec)
    if not records:
        raise SuiteError(f"{path}: holds no records")
    return records


def _read_table(path: Path, required: tuple[str, ...]) -> pd.DataFrame:
    if not path.is_file():
        raise SuiteError(f"{path}: required metric table is missing (run the analysis first)")
    try:
        header = pd.read_csv(path, nrows=0).columns
        na = {c: ["NaN", ""] for c in header if c in _NUMERIC}
        table = pd.read_csv(path, keep_default_na=False, na_values=na, dtype={"prompt": str, "metric": str})
    except (OSError, ValueError, pd.errors.ParserError) as exc:
        raise SuiteError(f"{path}: cannot read CSV: {exc}") from None
    missing = [c for c in required if c not in table.columns]
    if missing:
        raise SuiteError(f"{path}: missing column{'s' if len(missing) > 1 else ''} {', '.join(missing)}")
    for column in (c for c in _NUMERIC if c in table.columns):
        try:
            table[column] = pd.to_numeric(table[column])
        except (TypeError, ValueError):
            raise SuiteError(f"{path}: column {column} must hold numbers") from None
    if "heldout" in table.columns:
        table["heldout"] = table["heldout"].astype(str).str.lower().isin(("true", "1"))
    return table


def _wide_diversity(table: pd.DataFrame) -> pd.DataFrame:
    """diversity.csv (long: metric, value, lo, hi) -> one row per (prompt, scale), a column per metric."""
    keys = list(DIVERSITY_KEYS)
    wide = table.pivot_table(index=keys, columns="metric", values="value", aggfunc="first", dropna=False)
    for bound in ("lo", "hi"):
        part = table[table["metric"] == "clip_score"].set_index(keys)[bound]
        wide[f"clip_score_{bound}"] = part.reindex(wide.index)
    wide.columns.name = None
    return wide.reset_index()

