"""Output folders that evalsuite builds whole and swaps into place: the dashboard site and the published
dataset.

A build goes into OUT.partial, marked as ours by a marker file; only when it is complete does it replace
OUT (the old one briefly kept as OUT.old), so a reader never sees a half-written folder and a crash
leaves OUT as it was. A folder that evalsuite did not write (no marker file) is never replaced.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from evalsuite.errors import SuiteError

__all__ = ["building", "check_output_target", "replace_folder"]


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


@contextlib.contextmanager
def building(out: Path, marker: str, what: str, tool: str) -> Iterator[tuple[Path, dict[str, Any]]]:
    """Build `out` (a `what`, e.g. "dashboard") in OUT.partial, yielded with a dict the caller may fill;
    when the block ends without an error the dict (plus ``tool``) becomes the marker file's JSON and the
    folder replaces `out`. On any error the partial folder is removed and `out` is left as it was."""
    check_output_target(out, marker, what)
    partial = out.with_name(out.name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)  # a crash's leftover: check_output_target made sure it is marked as ours
    partial.mkdir(parents=True)
    (partial / marker).write_text(json.dumps({"tool": tool, "state": "building"}) + "\n")
    info: dict[str, Any] = {}
    try:
        yield partial, info
        (partial / marker).write_text(json.dumps({"tool": tool, **info}) + "\n")
        replace_folder(partial, out, out.with_name(out.name + ".old"))
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise


def replace_folder(src: Path, dst: Path, old: Path | None = None) -> None:
    """Rename the finished folder `src` to `dst`. An existing `dst` is first renamed to `old` (default: a
    hidden sibling named after this process) and removed once `src` is in place, so `dst` is at every
    moment either the old folder or the new one, never a mix."""
    old = old if old is not None else dst.with_name(f".{dst.name}.old-{os.getpid()}")
    if old.exists():
        shutil.rmtree(old)
    if dst.exists():
        os.replace(dst, old)
    os.replace(src, dst)
    shutil.rmtree(old, ignore_errors=True)
