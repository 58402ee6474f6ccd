"""One process at a time in a folder: a lock file that names its holder.

``FolderLock(folder).acquire()`` creates ``<folder>/.lock`` atomically (``O_EXCL``) with the
holder's process id, host, process start time and command. A second process that finds the
lock held by a live process gets a ``FolderBusy`` error naming that process; a lock whose
process is gone (killed, crashed, or another process now wearing the same id) is taken over
with a note. The lock is re-entrant within one process and is released on ``release()`` or
at interpreter exit.
"""
from __future__ import annotations

import atexit
import json
import os
import socket
import sys
import time
from pathlib import Path

from .io import DataError, ensure_dir

LOCK_NAME = ".lock"


class FolderBusy(DataError):
    """Another live process holds the folder."""


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux), to tell a reused id apart."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:      # alive, owned by someone else
        return True
    return True


class FolderLock:
    """Exclusive use of a folder by one process (see the module docstring)."""

    def __init__(self, folder):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.held = False

    def _holder(self) -> dict:
        try:
            return json.loads(self.path.read_text() or "{}")
        except (OSError, ValueError):
            return {}

    def _stale_reason(self, holder: dict) -> str | None:
        """Why the current lock may be taken over, or None while its holder runs."""
        pid = holder.get("pid")
        if not isinstance(pid, int):
            return "unreadable lock file"
        if holder.get("host") != socket.gethostname():
            return None                     # another machine: cannot tell, so it stays held
        if pid == os.getpid():
            return "held by this process"
        if not _alive(pid):
            return f"process {pid} is gone"
        if holder.get("start") and _start_time(pid) not in (None, holder["start"]):
            return f"process id {pid} now belongs to another process"
        return None

    def acquire(self, log=None) -> "FolderLock":
        """Take the lock; FolderBusy when a live process holds it (log notes a takeover)."""
        ensure_dir(self.folder)
        record = {"pid": os.getpid(), "host": socket.gethostname(), "start": _start_time(os.getpid()),
                  "since": time.strftime("%Y-%m-%d %H:%M:%S"), "command": " ".join(sys.argv)}
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                reason = self._stale_reason(holder)
                if reason is None:
                    raise FolderBusy(
                        f"{self.folder}: in use by process {holder.get('pid')} on {holder.get('host')} since "
                        f"{holder.get('since')} ({holder.get('command', '')!r}); wait for it to finish, or remove "
                        f"{self.path} if that process is certainly gone") from None
                if reason != "held by this process" and log is not None:
                    log(f"note: {self.folder}: taking over a stale lock ({reason})")
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as fh:
                json.dump(record, fh)
            self.held = True
            atexit.register(self.release)
            return self
        raise FolderBusy(f"{self.folder}: could not take the lock {self.path}")

    def release(self) -> None:
        """Remove the lock if this process holds it."""
        if self.held and self._holder().get("pid") == os.getpid():
            self.path.unlink(missing_ok=True)
        if self.held:
            atexit.unregister(self.release)
        self.held = False

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()
        return False
