"""Reading a results folder: one validated view of run.json, the battery, the records and the metric
tables, for every reader (the dashboard, `rl compare`, publish, `evalsuite.legibility`'s callers).

Only the results folder is read, never a model. Every problem is one `SuiteError` naming the file (and
the line, for records). Folders of every version in `schema.READABLE_VERSIONS` are read, their records
upgraded to the current form (`schema.upgrade_record`); any other version is refused with a message
naming it.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd

from evalsuite.battery import Battery, battery_from_dict
from evalsuite.errors import ConfigError, SuiteError
from evalsuite.results import schema

__all__ = ["RunView", "open_run"]

_DIVERSITY_KEYS = ["prompt_index", "guidance_scale"]


class RunView:
    """A results folder as readers see it. Build it with :func:`open_run`.

    Tables are pandas frames with the columns and types of `schema.TABLES` (``heldout`` is bool; NaN
    and inf are floats). Records are dicts as `records.jsonl` holds them, in unit order; read them all
    with :attr:`records` or one at a time with :meth:`iter_records`.
    """

    def __init__(self, path: Path, info: dict[str, Any], battery: Battery, groups: pd.DataFrame,
                 aggregate: pd.DataFrame, diversity: pd.DataFrame) -> None:
        self.path, self.info, self.battery = path, info, battery
        self.groups, self.aggregate, self.diversity = groups, aggregate, diversity
        self.version = int(info["schema_version"])

    # ------------------------------------------------------------ records

    def iter_records(self) -> Iterator[dict[str, Any]]:
        """The records of images one by one (streamed from the file), each checked: the keys every reader
        needs, numeric indices and scale, and an image file inside the folder. The records of images the
        source refused to make (`schema.refused_record`: no image) are not among them: :attr:`refused`."""
        return (rec for rec in self._all_records() if not schema.is_refused(rec))

    @functools.cached_property
    def refused(self) -> list[dict[str, Any]]:
        """The records of images the source refused to make (a hosted service's safety filter), in unit
        order: no image, every classifier entry "refused", and `refused`, what the service said."""
        return [rec for rec in self._all_records() if schema.is_refused(rec)]

    def _all_records(self) -> Iterator[dict[str, Any]]:
        path = self.path / "records.jsonl"
        root = self.path.resolve()
        try:
            handle = path.open("rb")
        except FileNotFoundError:
            raise SuiteError(f"{path}: required file is missing") from None
        except OSError as exc:
            raise SuiteError(f"{path}: cannot read: {exc}") from None
        with handle:
            for lineno, raw in enumerate(handle, start=1):
                if not raw.strip():
                    continue
                try:
                    rec = json.loads(raw.decode("utf-8"))
                except UnicodeDecodeError as exc:
                    raise SuiteError(f"{path}, line {lineno}: not UTF-8 text ({exc.reason})") from None
                except json.JSONDecodeError as exc:
                    raise SuiteError(f"{path}, line {lineno}: malformed JSON ({exc.msg})") from None
                yield self._checked(rec, path, lineno, root)

    def _checked(self, rec: Any, path: Path, lineno: int, root: Path) -> dict[str, Any]:
        missing = [k for k in schema.REQUIRED_KEYS if not isinstance(rec, dict) or k not in rec]
        if missing:
            raise SuiteError(f"{path}, line {lineno}: record lacks {', '.join(missing)}")
        try:
            rec["prompt_index"], rec["image_index"] = int(rec["prompt_index"]), int(rec["image_index"])
            rec["guidance_scale"] = float(rec["guidance_scale"])
        except (TypeError, ValueError):
            raise SuiteError(
                f"{path}, line {lineno}: prompt_index, image_index and guidance_scale must be numbers") from None
        if schema.is_refused(rec):
            return schema.upgrade_record(rec, self.version)
        image = (self.path / str(rec["image"])).resolve()
        if not image.is_relative_to(root) or not image.is_file():
            raise SuiteError(f"{path}, line {lineno}: image {rec['image']!r} is missing or outside the run folder")
        return schema.upgrade_record(rec, self.version)

    @functools.cached_property
    def records(self) -> list[dict[str, Any]]:
        """Every record of an image, in file order (read once, then kept)."""
        records = list(self.iter_records())
        if not records and self.refused:
            raise SuiteError(f"{self.path / 'records.jsonl'}: the source refused every image ({len(self.refused)} "
                             "refused records), so there is nothing to show")
        if not records:
            raise SuiteError(f"{self.path / 'records.jsonl'}: holds no records")
        return records

    def image_path(self, record: dict[str, Any]) -> Path:
        """The PNG file of a record (checked to lie inside the folder when the record was read)."""
        return self.path / str(record["image"])

    # ------------------------------------------------------------ what run.json says

    @property
    def source(self) -> dict[str, Any]:
        """run.json's `source`: where the images came from and what it exposes (a hosted service or a
        folder of images made elsewhere: `evalsuite.sources`); a run without one rendered its images with
        a diffusers pipeline, which exposes the guidance scale and the seed."""
        source = self.info.get("source")
        return source if isinstance(source, dict) else {"kind": "diffusers", "exposes": ["guidance_scale", "seed"]}

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

    @functools.cached_property
    def classifiers(self) -> list[str]:
        """The run's classifiers: run.json's list, then any other a record holds, in order of appearance."""
        seen = [str(c) for c in self.info.get("classifiers") or []]
        return list(dict.fromkeys(seen + [c for r in self.records for c in r.get("classifiers") or {}]))

    @property
    def primary_classifier(self) -> str:
        primary = self.info.get("primary_classifier")
        if isinstance(primary, str) and primary:
            return primary
        return self.classifiers[0] if self.classifiers else self.battery.classifier

    @property
    def exact_classifiers(self) -> list[str]:
        """The run's classifiers that read its images exactly (the truth the others are scored against):
        run.json's `exact_classifiers` (version 2; the model's profile names them). A version-1 run did not
        record them; its only exact reader was the miniature world's `oracle`."""
        recorded = self.info.get("exact_classifiers")
        if isinstance(recorded, list):
            return [str(c) for c in recorded if str(c) in self.classifiers]
        return ["oracle"] if self.version == 1 and "oracle" in self.classifiers else []

    @functools.cached_property
    def prompts(self) -> dict[int, str]:
        """prompt_index -> prompt text, in index order."""
        return dict(sorted({int(r["prompt_index"]): str(r["prompt"]) for r in self.records}.items()))

    @functools.cached_property
    def heldout(self) -> frozenset[int]:
        return frozenset(int(r["prompt_index"]) for r in self.records if r.get("heldout"))

    @functools.cached_property
    def scales(self) -> list[float]:
        return sorted({float(r["guidance_scale"]) for r in self.records})

    def attributes(self, classifier: str) -> list[tuple[str, tuple[str, ...]]]:
        """(attribute, classes) with rows in groups.csv for `classifier`: battery order, then intersections."""
        present = set(self.groups.loc[self.groups["classifier"] == classifier, "attribute"])
        return [(name, classes) for name, classes in self.battery.attribute_classes().items() if name in present]

    def detects_people(self, classifier: str) -> bool | None:
        """Whether `classifier` reports "no_person" where it finds no one: run.json's `detects_people`
        where recorded, else True if any record has a "no_person" status from it, else None (unknown: it
        found a person everywhere, or it has no person detector)."""
        recorded = self.info.get("detects_people")
        if isinstance(recorded, dict) and isinstance(recorded.get(classifier), bool):
            return bool(recorded[classifier])
        for r in self.records:
            if any(schema.entry(r, classifier, a).status == "no_person" for a in self.battery.attribute_names):
                return True
        return None

    # ------------------------------------------------------------ the rules, for this run's records

    @staticmethod
    def label(record: dict[str, Any], classifier: str, attribute: str) -> str | None:
        """The record's label for an attribute (an intersection joins its parts), None unless status ok."""
        return schema.label(record, classifier, attribute)

    @staticmethod
    def status(record: dict[str, Any], classifier: str, attribute: str) -> str:
        """The status of `classifier`'s entry for one attribute (`schema.entry`)."""
        return schema.entry(record, classifier, attribute).status

    @functools.cached_property
    def diversity_wide(self) -> pd.DataFrame:
        """diversity.csv with one row per (prompt_index, guidance_scale) and a column per metric, plus
        clip_score_lo and clip_score_hi (the interval of the mean CLIP score)."""
        table = self.diversity
        wide = table.pivot_table(index=_DIVERSITY_KEYS, columns="metric", values="value", aggfunc="first",
                                 dropna=False)
        for bound in ("lo", "hi"):
            part = table[table["metric"] == "clip_score"].set_index(_DIVERSITY_KEYS)[bound]
            wide[f"clip_score_{bound}"] = part.reindex(wide.index)
        wide.columns.name = None
        return wide.reset_index()


def open_run(path: Path | str, *, complete: bool = True) -> RunView:
    """Read and check a results folder: run.json (a readable schema version, status complete unless
    `complete` is False, a valid battery) and the three metric tables. Records are read when first used
    (:attr:`RunView.records`). A missing or malformed file is one SuiteError naming it."""
    path = Path(path)
    if not path.is_dir():
        raise SuiteError(f"{path}: not a results folder (no such directory)")
    info = _read_json(path / "run.json")
    version = info.get("schema_version")
    if version not in schema.READABLE_VERSIONS:
        readable = ", ".join(map(str, schema.READABLE_VERSIONS))
        raise SuiteError(f"{path / 'run.json'}: results format version {version!r} is not one this evalsuite "
                         f"reads ({readable}); schema_version must be one of them")
    if complete and info.get("status") != "complete":
        raise SuiteError(f"{path / 'run.json'}: the run is not complete (status {info.get('status')!r}); "
                         "finish it with the same `evalsuite run` command first")
    if not isinstance(info.get("battery"), dict):
        raise SuiteError(f"{path / 'run.json'}: 'battery' is missing or not a mapping")
    try:
        battery = battery_from_dict(info["battery"], str(path / "run.json"))
    except ConfigError as exc:
        raise SuiteError(f"{path / 'run.json'}: the recorded battery is invalid:\n{exc}") from None
    tables = {name: _read_table(path / "metrics" / f"{name}.csv", columns) for name, columns in schema.TABLES.items()}
    return RunView(path, info, battery, tables["groups"], tables["aggregate"], tables["diversity"])


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


def _read_table(path: Path, required: tuple[str, ...]) -> pd.DataFrame:
    """A metric table from its CSV, typed by `schema.COLUMN_TYPES` (NaN from ``NaN`` or an empty cell)."""
    if not path.is_file():
        raise SuiteError(f"{path}: required metric table is missing (run the analysis first)")
    numeric = [c for c, kind in schema.COLUMN_TYPES.items() if kind in ("int", "float")]
    try:
        header = pd.read_csv(path, nrows=0).columns
        na = {c: ["NaN", ""] for c in header if c in numeric}
        table = pd.read_csv(path, keep_default_na=False, na_values=na,
                            dtype={c: str for c in header if schema.COLUMN_TYPES.get(c) == "str"})
    except (OSError, ValueError, pd.errors.ParserError) as exc:
        raise SuiteError(f"{path}: cannot read CSV: {exc}") from None
    missing = [c for c in required if c not in table.columns]
    if missing:
        raise SuiteError(f"{path}: missing column{'s' if len(missing) > 1 else ''} {', '.join(missing)}")
    for column in (c for c in numeric if c in table.columns):
        try:
            table[column] = pd.to_numeric(table[column])
        except (TypeError, ValueError):
            raise SuiteError(f"{path}: column {column} must hold numbers") from None
    if "heldout" in table.columns:
        table["heldout"] = table["heldout"].astype(str).str.lower().isin(("true", "1"))
    return table
