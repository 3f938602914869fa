"""The output folder of `rl finetune`: claimed before anything loads, written by one training at a time.

A folder is an RL output folder when it holds the marker file `MARKER` (``rl-output.json``, written when
`rl finetune` first claims the folder), or, for a folder written before the marker existed, a
``config.json`` holding an RL training config (every top-level key of `rl.config.TrainConfig`) beside a
``log.jsonl`` or a ``checkpoints/`` folder. `rl finetune` writes only into a folder that does not exist
yet (it creates it), an empty one, or an RL output folder (which it resumes: `rl.train`); it refuses an
existing file and any other folder, so it never overwrites files it did not write.

While it trains, the main process holds the folder's lock (`evalsuite.locks.folder_lock`), so a second
training of the same folder is refused with a message naming the first one's process. Under
``accelerate launch`` only the main process claims the folder; `on_main` carries its refusal to every
process, so that all of them end with the same message.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from evalsuite.errors import SuiteError
from evalsuite.locks import LOCK_NAME, folder_lock

if TYPE_CHECKING:
    from accelerate import Accelerator

__all__ = ["MARKER", "claim_output", "on_main", "output_problem"]

MARKER = "rl-output.json"
WHAT = "rl finetune"
# the top-level keys of an RL config.json (rl.config.TrainConfig.to_dict) that mark a folder written before
# the marker file existed
_CONFIG_KEYS = frozenset({"model", "battery", "output_dir", "sampling", "training", "lora", "rewards"})

T = TypeVar("T")


def _legacy_rl_folder(out: Path) -> bool:
    """Whether `out` is an RL output folder from before the marker: an RL config.json and a log or checkpoints."""
    try:
        saved = json.loads((out / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return (isinstance(saved, dict) and _CONFIG_KEYS <= saved.keys()
            and ((out / "log.jsonl").is_file() or (out / "checkpoints").is_dir()))


def output_problem(out: Path) -> str | None:
    """Why `rl finetune` may not write into `out` (None: it may). Reads only."""
    if out.exists() and not out.is_dir():
        return f"output_dir: '{out}' exists and is a file, not a folder; choose another output_dir"
    if not out.is_dir() or (out / MARKER).is_file() or _legacy_rl_folder(out):
        return None
    try:
        entries = sorted(p.name for p in out.iterdir() if p.name != LOCK_NAME)
    except OSError as exc:
        return f"output_dir: cannot read the folder '{out}' ({exc.strerror or exc})"
    if not entries:
        return None
    shown = ", ".join(entries[:3]) + (f" and {len(entries) - 3} more" if len(entries) > 3 else "")
    return (f"output_dir: '{out}' is a folder that {WHAT} did not write (it holds {shown}, and no {MARKER}); "
            "refusing to write into it: choose a new or empty output_dir, or one an earlier rl finetune wrote")


def _mark(out: Path) -> None:
    """Write the marker file (once: a resumed run keeps the first one), atomically."""
    marker = out / MARKER
    if marker.is_file():
        return
    tmp = out / f".{MARKER}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps({"tool": WHAT, "format": 1,
                               "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}) + "\n")
    os.replace(tmp, marker)


def _drop_if_unused(out: Path) -> None:
    """Remove a folder this training created when nothing but its marker ended up in it (a run refused
    after the claim, e.g. a model that does not load, leaves no trace)."""
    with contextlib.suppress(OSError):
        if {p.name for p in out.iterdir()} <= {MARKER}:
            shutil.rmtree(out)


def claim_output(out: Path, stack: contextlib.ExitStack) -> None:
    """Check `out` (`output_problem`), create it if needed, mark it as an RL output folder and take its lock
    for as long as `stack` stays open. One SuiteError, and nothing written, when the folder is refused; a
    folder this call created is removed again when the stack closes with nothing else in it."""
    if problem := output_problem(out):
        raise SuiteError(problem)
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SuiteError(f"output_dir: cannot create the folder '{out}' ({exc.strerror or exc}); choose a "
                         "place you can write") from None
    if created:
        stack.callback(_drop_if_unused, out)
    try:
        _mark(out)
    except OSError as exc:
        raise SuiteError(f"output_dir: cannot write in the folder '{out}' ({exc.strerror or exc}); choose a "
                         "place you can write") from None
    stack.enter_context(folder_lock(out, WHAT))


def on_main(acc: Accelerator, action: Callable[[], T]) -> T | None:
    """Run `action` on the main process only and return its result there (None elsewhere). A SuiteError it
    raises is raised on every process of the launch, with the same message, so that a refusal ends them
    all; the processes wait for the main one either way."""
    result: T | None = None
    error: str | None = None
    if acc.is_main_process:
        try:
            result = action()
        except SuiteError as exc:
            error = str(exc)
    if acc.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        error = broadcast_object_list([error], from_process=0)[0]
    if error is not None:
        raise SuiteError(error)
    return result
