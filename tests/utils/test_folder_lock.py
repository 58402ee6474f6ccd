"""The folder lock: a live holder is named and refused, a dead one is taken over."""
import json
import os
import socket
import subprocess
import sys

import pytest

from utils.folder_lock import FolderBusy, FolderLock


def _write_lock(folder, pid, **extra):
    folder.mkdir(exist_ok=True)
    (folder / ".lock").write_text(json.dumps({"pid": pid, "host": socket.gethostname(), "since": "then",
                                              "command": "Train_OASIS.py", **extra}))


def test_live_holder_refused_with_its_pid(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        _write_lock(tmp_path, holder.pid)
        with pytest.raises(FolderBusy, match=f"in use by process {holder.pid}"):
            FolderLock(tmp_path).acquire()
        assert json.loads((tmp_path / ".lock").read_text())["pid"] == holder.pid   # untouched
    finally:
        holder.kill()
        holder.wait()


def test_stale_lock_taken_over_with_a_note(tmp_path):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    _write_lock(tmp_path, gone.pid)
    notes = []
    lock = FolderLock(tmp_path).acquire(log=notes.append)
    assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()
    assert notes and "stale lock" in notes[0] and str(gone.pid) in notes[0]
    lock.release()
    assert not (tmp_path / ".lock").exists()


def test_reused_process_id_is_stale(tmp_path):
    _write_lock(tmp_path, os.getppid(), start="1")       # alive, but started at another time
    notes = []
    FolderLock(tmp_path).acquire(log=notes.append).release()
    assert "now belongs to another process" in notes[0]
