"""Results-folder I/O: atomic image and JSON writes, appended record shards, and resume checks.

Records of each process go to `records.rank{r}.jsonl`, one fsynced append per batch; a record holds
the SHA-256 of its PNG, so a resumed run can tell a finished batch from a damaged one.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from PIL import Image

from .battery import Battery
from .errors import SuiteError

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


def append_records(path: Path, records: Sequence[dict[str, Any]]) -> None:
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(_jsonl(records))
        fh.flush()
        os.fsync(fh.fileno())


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _jsonl(records: Sequence[dict[str, Any]]) -> str:
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


def check_output_target(out: Path, marker: str, what: str) -> None:
    """Refuse an --out folder (or its `.partial` / `.old` siblings) that evalsuite did not write: only a
    folder holding `marker` (a previous `what`) or an empty one may be replaced."""
    for side in (out.with_name(out.name + ".partial"), out.with_name(out.name + ".old")):
        if (side.exists() or side.is_symlink()) and (side.is_symlink() or not (side / marker).is_file()):
            raise SuiteError(f"{side}: exists and is not a {what} build folder; remove it first")
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise SuiteError(f"{out}: exists and is not a directory; choose another --out")
    if out.is_dir() and any(out.iterdir()) and not (out / marker).is_file():
        raise SuiteError(f"{out}: exists and does not hold an evalsuite {what} "
                         f"(no {marker} file); refusing to replace it: choose another --out or remove it")


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
