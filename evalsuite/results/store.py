"""Writing a results folder: who may write where, atomic image, JSON and table writes, appended record
shards, and what a resumed run may keep.

Records of each process go to `records.rank{r}.jsonl`, one fsynced append per batch; a record holds
the SHA-256 of its PNG, so a resumed run can tell a finished batch from a damaged one. When every batch
is done the shards are merged into `records.jsonl` in unit order. The folder's layout and the record's
fields are `evalsuite.results.schema`'s; reading a finished folder is `evalsuite.results.reader`'s.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import shutil
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml
from PIL import Image

from evalsuite.battery import Battery
from evalsuite.errors import SuiteError
from evalsuite.locks import LOCK_NAME
from evalsuite.results.schema import SCHEMA_VERSION, TABLES, is_refused

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


def batch_len(batch: int, n_units: int, batch_size: int) -> int:
    """How many units batch `batch` has: `batch_size`, but the last may be shorter."""
    return min(batch_size, n_units - batch * batch_size)


def repair_shards(run_dir: Path, n_units: int, batch_size: int) -> None:
    """Cut every records file back to whole batches, before a resume reads them (one process, while the
    others wait).

    A batch's records are appended in one write, but a kill (or a full disk) can still cut that write
    between lines or mid-line; a kill between merging into records.jsonl and deleting the shards leaves
    records twice; and records.jsonl itself can end in a torn line. A batch is whole when its every unit
    is in some file; the records of a batch that is not are dropped from every file, records.jsonl
    included (so that one rerun regenerates the batch whole, never beside a part of it), and a shard
    keeps no unit that an earlier file already holds. Torn last lines go too."""
    files = [(path, path.read_bytes()) for path in record_files(run_dir)]
    parsed = [(path, raw, _parse_records(raw, path)) for path, raw in files]
    units: dict[int, set[int]] = {}
    for _, _, records in parsed:
        for r in records:
            units.setdefault(r["unit"] // batch_size, set()).add(r["unit"])
    whole = {b for b, found in units.items() if len(found) == batch_len(b, n_units, batch_size)}
    seen: set[int] = set()
    for path, raw, records in parsed:
        keep = []
        for r in records:
            if r["unit"] // batch_size in whole and r["unit"] not in seen:
                seen.add(r["unit"])
                keep.append(r)
        if len(keep) == len(records) and (not raw or raw.endswith(b"\n")):
            continue
        log.warning("%s: dropping %d records of batches cut off by an interrupted write or already merged, "
                    "and any torn last line", path, len(records) - len(keep))
        _replace_text(path, _jsonl(keep))


def done_batches(run_dir: Path, n_units: int, batch_size: int) -> set[int]:
    """Batches whose every record is present and whose images match their recorded SHA-256 (read only:
    `repair_shards` has dropped partial batches). A refused image's record (`schema.refused_record`) has
    no image to check."""
    by_batch: dict[int, set[int]] = {}
    for shard in record_files(run_dir):
        for rec in read_shard(shard):
            if is_refused(rec):
                by_batch.setdefault(rec["unit"] // batch_size, set()).add(rec["unit"])
                continue
            path = run_dir / rec["image"]
            try:
                digest = hashlib.sha256(path.read_bytes()).hexdigest()
            except OSError:
                digest = None
            if digest != rec.get("sha256"):
                raise SuiteError(f"{path}: image is missing or corrupt (its SHA-256 differs from the record in "
                                 f"{shard.name}); rerun with --overwrite to start this run afresh")
            by_batch.setdefault(rec["unit"] // batch_size, set()).add(rec["unit"])
    return {b for b, found in by_batch.items() if len(found) == batch_len(b, n_units, batch_size)}


def _write_failed(path: Path, exc: OSError) -> SuiteError:
    """The one message for a write that failed (a full disk, a permission, a quota)."""
    return SuiteError(f"{path}: cannot write ({exc.strerror or exc}); nothing was left half-written: free "
                      "space or fix the permission, then run the same command again to resume")


@contextlib.contextmanager
def _atomic(path: Path) -> Iterator[Path]:
    """A temporary path beside `path` to write; renamed onto `path` when the block ends without error.
    An OSError (no space, no permission) removes the temporary file and becomes one SuiteError."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        yield tmp
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise _write_failed(path, exc) from None


def _write_file(path: Path, data: bytes) -> None:
    """Write `data` to a new file `path` (the one low-level write of images and text files)."""
    with open(path, "wb") as fh:
        fh.write(data)


def write_png(path: Path, image: np.ndarray) -> str:
    """Write `image` as a PNG (renamed into place); returns the file's SHA-256."""
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    data = buf.getvalue()
    with _atomic(path) as tmp:
        _write_file(tmp, data)
    return hashlib.sha256(data).hexdigest()


def append_records(path: Path, records: Sequence[Mapping[str, Any]]) -> None:
    """Append the records of one batch in one fsynced write; on failure the file is cut back to its size
    before, so no partial line stays."""
    data = memoryview(_jsonl(records).encode())
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            size = os.fstat(fd).st_size
            try:
                while data:  # unbuffered: nothing is left to flush after a cut-back
                    data = data[os.write(fd, data):]
                os.fsync(fd)
            except OSError:
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, size)
                raise
        finally:
            os.close(fd)
    except OSError as exc:
        raise _write_failed(path, exc) from None


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _jsonl(records: Sequence[Mapping[str, Any]]) -> str:
    """One compact JSON line per record: the format of every records file."""
    return "".join(json.dumps(r, separators=(",", ":")) + "\n" for r in records)


def _replace_text(path: Path, text: str) -> None:
    """Write `text` beside `path` and rename it into place, so `path` is never half-written."""
    with _atomic(path) as tmp:
        _write_file(tmp, text.encode())


def write_text(path: Path, text: str) -> None:
    """A text file of the results folder (summary.txt), written whole or not at all."""
    _replace_text(path, text)


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    _replace_text(path, json.dumps(data, indent=1))


def save_battery(path: Path, battery: Battery) -> None:
    _replace_text(path, yaml.safe_dump(battery.to_dict(), sort_keys=False, allow_unicode=True))


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
    paths: dict[str, Path] = {}
    for name, table in tables.items():
        if name not in TABLES or tuple(table.columns) != TABLES[name]:
            raise ValueError(f"table {name!r} with columns {list(table.columns)} is not one of the results "
                             f"tables {dict(TABLES)}")
        paths[f"{name}.csv"] = out_dir / f"{name}.csv"
        with _atomic(paths[f"{name}.csv"]) as tmp:
            table.to_csv(tmp, index=False, na_rep="NaN", float_format="%.6g")
        paths[f"{name}.parquet"] = out_dir / f"{name}.parquet"
        with _atomic(paths[f"{name}.parquet"]) as tmp:
            table.to_parquet(tmp, index=False)
    return paths


def check_writable(folder: Path) -> None:
    """SuiteError unless `folder` could take a new file: it, or where it would be created (its nearest
    existing ancestor), is a writable folder. Nothing is created: a run that fails later, loading its
    model say, leaves no empty folder behind."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise SuiteError(f"cannot write results to '{folder}': '{existing}' is not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise SuiteError(f"cannot write results to '{folder}': '{existing}' is not writable (permission denied)")


def check_run_folder(run_dir: Path, fingerprint: str, overwrite: bool,
                     differences: Callable[[dict[str, Any]], list[str]] | None = None) -> None:
    """Refuse a folder that is not a results folder (even with `overwrite`: only a folder holding a
    run.json, or an empty one, is ever deleted) or that holds a run of another configuration (another
    `fingerprint`) unless `overwrite`; `differences(run.json)` says what differs ("key: old -> new").
    Every process checks, so that a refusal ends them all."""
    run_json = run_dir / "run.json"
    if run_dir.is_symlink() or (run_dir.exists() and not run_dir.is_dir()):
        raise SuiteError(f"{run_dir} exists and is not a folder; choose another --name")
    if not run_json.is_file():
        if run_dir.exists() and any(p.name != LOCK_NAME for p in run_dir.iterdir()):
            raise SuiteError(f"{run_dir} exists and is not a results folder (no run.json); choose another "
                             "--name or remove it")
        return
    if overwrite:
        return
    try:
        info = json.loads(run_json.read_text())
    except (OSError, ValueError) as exc:
        raise SuiteError(f"{run_json}: cannot read JSON ({exc}); pass --overwrite to start this run afresh, "
                         "or choose another --name") from None
    if info.get("fingerprint") != fingerprint:
        found = differences(info) if differences is not None else []
        what = ("; ".join(found) if found else "battery, model or options differ")
        raise SuiteError(f"{run_dir} holds a run with another configuration ({what}); choose another --name "
                         "or pass --overwrite")
    version = info.get("schema_version")
    if version != SCHEMA_VERSION:
        raise SuiteError(f"{run_dir} holds a run in results format version {version}; this evalsuite writes "
                         f"version {SCHEMA_VERSION} and cannot add to it: choose another --name or pass "
                         "--overwrite (the folder stays readable by the dashboard and rl compare)")


def prepare_run_folder(run_dir: Path, overwrite: bool) -> None:
    """One process, holding the folder's lock, after `check_run_folder` passed on every process: start
    afresh (`overwrite`: everything but the lock goes) or keep the folder to resume."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        if overwrite:
            for entry in run_dir.iterdir():
                if entry.name == LOCK_NAME:
                    continue
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()
    except OSError as exc:
        raise SuiteError(f"{run_dir}: cannot prepare the results folder ({exc.strerror or exc})") from None
