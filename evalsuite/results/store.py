"""Writing a results folder: who may write where, atomic image, JSON and table writes, appended record
shards, and what a resumed run may keep.

Records of each process go to `records.rank{r}.jsonl`, one fsynced append per batch; a record holds
the SHA-256 of its PNG, so a resumed run can tell a finished batch from a damaged one. When every batch
is done the shards are merged into `records.jsonl` in unit order. The folder's layout and the record's
fields are `evalsuite.results.schema`'s; reading a finished folder is `evalsuite.results.reader`'s.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import shutil
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml
from PIL import Image

from evalsuite.battery import Battery
from evalsuite.errors import SuiteError
from evalsuite.results.schema import SCHEMA_VERSION, TABLES

log = logging.getLogger(__name__)


def read_shard(path: Path) -> list[dict[str, Any]]:
    """Records of one shard file, read only; a torn last line (killed mid-write) is left out."""
    return _parse_records(path.read_bytes(), path) if path.exists() else []


def _parse_records(raw: bytes, path: Path) -> list[dict[str, Any]]:
    records = []
    for n, line in enumerate(raw[:raw.rfind(b"\n") + 1].splitlines(), 1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise SuiteError(f"{path}:{n}: not a JSON record ({exc.msg}); the results folder is damaged") from exc
    return records


def repair_shards(run_dir: Path, batch_sizes: Sequence[int], batch_size: int) -> None:
    """Cut every shard back to whole batches, before a resume reads them (one process, while the others wait).

    A batch's records are appended in one write, but a kill can still cut that write between lines (or
    mid-line), and a kill between merging into records.jsonl and deleting the shards leaves records twice.
    Each shard keeps only the records of batches that are complete in it and not already merged; the
    rest is regenerated."""
    merged = {r["unit"] for r in read_shard(run_dir / "records.jsonl")}
    for shard in sorted(run_dir.glob("records.rank*.jsonl")):
        raw = shard.read_bytes()
        records = _parse_records(raw, shard)
        count: dict[int, int] = {}
        for r in records:
            count[r["unit"] // batch_size] = count.get(r["unit"] // batch_size, 0) + 1
        keep = [r for r in records if r["unit"] not in merged
                and count[r["unit"] // batch_size] == batch_sizes[r["unit"] // batch_size]]
        if len(keep) == len(records) and (not raw or raw.endswith(b"\n")):
            continue
        log.warning("%s: dropping %d records of batches cut off by an interrupted write or already merged, "
                    "and any torn last line", shard, len(records) - len(keep))
        _replace_text(shard, _jsonl(keep))


def done_batches(run_dir: Path, batch_sizes: Sequence[int], batch_size: int) -> set[int]:
    """Batches whose every record is present and whose images match their recorded SHA-256 (read only:
    `repair_shards` has dropped partial batches)."""
    by_batch: dict[int, int] = {}
    for shard in record_files(run_dir):
        for rec in read_shard(shard):
            path = run_dir / rec["image"]
            try:
                digest = hashlib.sha256(path.read_bytes()).hexdigest()
            except OSError:
                digest = None
            if digest != rec.get("sha256"):
                raise SuiteError(f"{path}: image is missing or corrupt (its SHA-256 differs from the record in "
                                 f"{shard.name}); rerun with --overwrite to start this run afresh")
            b = rec["unit"] // batch_size
            by_batch[b] = by_batch.get(b, 0) + 1
    return {b for b, n in by_batch.items() if n == batch_sizes[b]}


def write_png(path: Path, image: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    data = buf.getvalue()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return hashlib.sha256(data).hexdigest()


def append_records(path: Path, records: Sequence[Mapping[str, Any]]) -> None:
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(_jsonl(records))
        fh.flush()
        os.fsync(fh.fileno())


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _jsonl(records: Sequence[Mapping[str, Any]]) -> str:
    """One compact JSON line per record: the format of every records file."""
    return "".join(json.dumps(r, separators=(",", ":")) + "\n" for r in records)


def _replace_text(path: Path, text: str) -> None:
    """Write `text` beside `path` and rename it into place, so `path` is never half-written."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    _replace_text(path, json.dumps(data, indent=1))


def save_battery(path: Path, battery: Battery) -> None:
    path.write_text(yaml.safe_dump(battery.to_dict(), sort_keys=False, allow_unicode=True))


def record_files(run_dir: Path) -> list[Path]:
    """records.jsonl (a finished run's merged records) and every process's shard."""
    merged = run_dir / "records.jsonl"
    return ([merged] if merged.exists() else []) + sorted(run_dir.glob("records.rank*.jsonl"))


def merge_shards(run_dir: Path, n_units: int) -> list[dict[str, Any]]:
    """Merged and shard records in unit order, written to records.jsonl (shards removed afterwards);
    every unit 0 .. n_units - 1 must be there exactly once."""
    records = sorted((r for shard in record_files(run_dir) for r in read_shard(shard)), key=lambda r: r["unit"])
    units = [r["unit"] for r in records]
    if units != list(range(n_units)):
        missing = sorted(set(range(n_units)) - set(units))
        raise SuiteError(f"{run_dir}: {len(units)} records for {n_units} units ({len(missing)} missing, "
                         f"{len(units) - len(set(units))} duplicated); the results folder is damaged: run the "
                         "same command again to regenerate what is missing, or pass --overwrite")
    _replace_text(run_dir / "records.jsonl", _jsonl(records))
    for shard in run_dir.glob("records.rank*.jsonl"):
        shard.unlink()
    return records


def write_tables(run_dir: Path, tables: dict[str, pd.DataFrame]) -> dict[str, Path]:
    """Write each metric table (`schema.TABLES`: groups, aggregate, diversity) as metrics/<name>.csv
    (NaN written ``NaN``, floats to 6 significant digits) and metrics/<name>.parquet (full precision,
    typed columns); returns the paths by file name."""
    out_dir = Path(run_dir) / "metrics"
    out_dir.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    for name, table in tables.items():
        if name not in TABLES or tuple(table.columns) != TABLES[name]:
            raise ValueError(f"table {name!r} with columns {list(table.columns)} is not one of the results "
                             f"tables {dict(TABLES)}")
        paths[f"{name}.csv"] = out_dir / f"{name}.csv"
        table.to_csv(paths[f"{name}.csv"], index=False, na_rep="NaN", float_format="%.6g")
        paths[f"{name}.parquet"] = out_dir / f"{name}.parquet"
        table.to_parquet(paths[f"{name}.parquet"], index=False)
    return paths


def check_writable(folder: Path) -> None:
    """SuiteError unless `folder` (created if missing) accepts a new file."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise SuiteError(f"cannot write results to '{folder}': {exc.strerror or exc}") from exc


def check_run_folder(run_dir: Path, fingerprint: str, overwrite: bool) -> None:
    """Refuse a folder that is not a results folder (even with `overwrite`: only a folder holding a
    run.json, or an empty one, is ever deleted) or that holds a run of another configuration (another
    `fingerprint`) unless `overwrite`. Every process checks, so that a refusal ends them all."""
    run_json = run_dir / "run.json"
    if run_dir.is_symlink() or (run_dir.exists() and not run_dir.is_dir()):
        raise SuiteError(f"{run_dir} exists and is not a folder; choose another --name")
    if not run_json.is_file():
        if run_dir.exists() and any(run_dir.iterdir()):
            raise SuiteError(f"{run_dir} exists and is not a results folder (no run.json); choose another "
                             "--name or remove it")
        return
    if overwrite:
        return
    info = json.loads(run_json.read_text())
    if info.get("fingerprint") != fingerprint:
        raise SuiteError(f"{run_dir} holds a run with another configuration (battery, model or options "
                         "differ); choose another --name or pass --overwrite")
    version = info.get("schema_version")
    if version != SCHEMA_VERSION:
        raise SuiteError(f"{run_dir} holds a run in results format version {version}; this evalsuite writes "
                         f"version {SCHEMA_VERSION} and cannot add to it: choose another --name or pass "
                         "--overwrite (the folder stays readable by the dashboard and rl compare)")


def prepare_run_folder(run_dir: Path, overwrite: bool) -> None:
    """One process, after `check_run_folder` passed on every process: start afresh (`overwrite`) or keep
    the folder to resume."""
    if run_dir.exists() and overwrite:
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
