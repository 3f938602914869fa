"""One writer per folder: a lock file that names its holder, taken over when the holder is gone.

`folder_lock(folder, what)` creates `folder/.lock` exclusively (O_CREAT | O_EXCL), holding the pid, the
host and the start time of the process that took it, and removes it when the block ends. A second
process finds the file and gets one message naming the holder. A lock whose holder no longer runs (a
killed run: same host, no such pid) is stale and taken over; a lock from another host cannot be checked
and is refused with a message saying how to remove it if that host is done.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from evalsuite.errors import SuiteError

__all__ = ["LOCK_NAME", "folder_lock", "lock_holder"]

LOCK_NAME = ".lock"


def _alive(pid: int) -> bool:
    """Whether a process with this pid runs on this host (a zombie or another user's process counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def lock_holder(folder: Path) -> dict[str, Any] | None:
    """The live holder of `folder`'s lock ({pid, host, started}), or None where there is no lock or it is
    stale (its process on this host is gone, or the file is unreadable half-written debris)."""
    try:
        holder = json.loads((folder / LOCK_NAME).read_text())
        pid, host = int(holder["pid"]), str(holder["host"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if host == socket.gethostname() and (pid == os.getpid() or not _alive(pid)):
        return None
    return holder


@contextlib.contextmanager
def folder_lock(folder: Path, what: str) -> Iterator[None]:
    """Hold `folder`'s lock for the block (the folder must exist). SuiteError naming the other process
    where a live one holds it; a stale lock is taken over. The lock is removed when the block ends,
    whatever ends it (a SIGKILL leaves it behind: the next run finds it stale)."""
    path = folder / LOCK_NAME
    me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                                     time.gmtime())}
    for _ in range(3):  # a stale lock is removed and the exclusive create tried again
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = lock_holder(folder)
            if holder is not None:
                where = "" if holder.get("host") == me["host"] else f" on host {holder.get('host')}"
                raise SuiteError(f"{folder}: another {what} is writing here: process {holder.get('pid')}{where}, "
                                 f"started {holder.get('started')} UTC. Wait for it, stop it, or use another "
                                 f"folder{'' if not where else f'; if it is done, remove {path}'}") from None
            with contextlib.suppress(FileNotFoundError):
                path.unlink()  # stale: its process is gone
            continue
        except OSError as exc:
            raise SuiteError(f"{folder}: cannot create its lock file ({exc.strerror or exc})") from None
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(me) + "\n")
        break
    else:
        raise SuiteError(f"{folder}: could not take its lock ({path}); another process keeps taking it")
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            if json.loads(path.read_text()).get("pid") == me["pid"]:
                path.unlink()
