"""Result folders: one run at a time, and no file lost that the user did not ask to replace.

``with ResultFolder.claim(path, overwrite) as folder:`` opens a run's writing, before it reads
any data, and ``folder.finish()`` ends it. Claiming takes the folder's lock
(``utils/folder_lock.py``: a second live run into the same folder is refused and named, a dead
holder's lock is taken over) and reads the folder's manifest,
``.plcreg-manifest.jsonl``: one line per file this project wrote there (its relative path
before the write; its inode, size and modification time after it), appended as each file is
written, so a killed run's files are listed too.

When the folder already holds results (files of the manifest, or files named as this project
names its results, ``RESULT_PATTERNS``, from an older version), the run stops unless
``overwrite`` is given. With ``overwrite`` nothing is deleted up front (a run that then fails
on bad input loses nothing); ``finish()`` removes the earlier run's files that the new run did
not write again, and only those that are certainly its own: listed in the manifest,
unchanged since, not behind a symbolic link, and not an input of the new run
(``protect``). Files of other tools or of the user are never removed, even when their names
look like results.
"""
from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Callable, Iterable

from .folder_lock import FolderLock
from .io import DataError, atomic_write, ensure_dir, observe_writes, remove_stale_temporaries, unobserve_writes

MANIFEST = ".plcreg-manifest.jsonl"
# (sub-folder, glob) of every file a results run writes
RESULT_PATTERNS = (
    ("", "per_case*.csv"), ("", "summary.csv"), ("", "summary.json"), ("", "comparison.*"), ("", "pvalues.*"),
    ("", "*_warped.nii.gz"), ("", "*_warped_label.nii.gz"), ("", "*_displacement.nii.gz"),
    ("", "disp_*.nii.gz"), ("", "*_affine.txt"), ("nifti", "*.nii.gz"), ("figures", "*.png"),
)
SUBFOLDERS = ("", "nifti", "figures", "partial")


def result_files(folder: Path) -> list[Path]:
    """The files in ``folder`` named as a results run of this project names its files."""
    found = set()
    for sub, pattern in RESULT_PATTERNS:
        base = folder / sub if sub else folder
        if base.is_dir():
            found.update(p for p in base.glob(pattern) if p.is_file())
    return sorted(found)


def _identity(path: Path) -> list | None:
    try:
        st = path.lstat()
    except OSError:
        return None
    return [st.st_ino, st.st_size, st.st_mtime_ns]


def plain_inside(folder: Path, relative: str) -> bool:
    """True when ``folder/relative`` is a regular file reached without a symbolic link or '..'."""
    parts = Path(relative).parts
    if not parts or Path(relative).is_absolute() or ".." in parts:
        return False
    current = folder
    for part in parts:
        current = current / part
        if current.is_symlink():
            return False
    return current.is_file()


class Manifest:
    """The ``.plcreg-manifest.jsonl`` of a folder: what this project wrote there."""

    def __init__(self, folder: Path):
        self.folder, self.path = folder, folder / MANIFEST
        self._lock = threading.Lock()

    def read(self) -> dict[str, dict]:
        """{relative path: {'started': ns} or {'identity': [ino, size, mtime_ns]}}, the last line of each wins."""
        entries: dict[str, dict] = {}
        try:
            lines = self.path.read_text().splitlines()
        except (OSError, UnicodeDecodeError):
            return entries
        for line in lines:
            try:
                record = json.loads(line)
                entries[str(record["file"])] = record
            except (ValueError, KeyError, TypeError):
                continue                               # a line cut by a kill
        return entries

    def append(self, record: dict) -> None:
        line = json.dumps(record) + "\n"
        with self._lock, open(self.path, "a") as fh:
            fh.write(line)

    def compact(self) -> None:
        """Keep one line per file that this project wrote and that is still as it was written."""
        self.rewrite({rel: {"file": rel, "identity": ident} for rel, ident in own_files(self.folder).items()})

    def rewrite(self, entries: dict[str, dict]) -> None:
        text = "".join(json.dumps(e) + "\n" for e in entries.values())
        with self._lock:
            atomic_write(self.path, lambda tmp: Path(tmp).write_text(text))


def _made_here(folder: Path, relative: str, record: dict) -> bool:
    """The file of a manifest record is still the one this project wrote."""
    path = folder / relative
    if not plain_inside(folder, relative):
        return False
    now = _identity(path)
    if "identity" in record:
        return now == record["identity"]
    return now is not None and now[2] >= int(record.get("started", 0))     # killed before its 'done' line


class WriteRecorder:
    """Appends every file ``atomic_write`` writes inside ``folder`` to the folder's manifest,
    until ``close()``: a line before the write and one with its identity after it."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.manifest = Manifest(self.folder)
        self.written: set[str] = set()
        observe_writes(self._observe)

    def _relative(self, path: Path) -> str | None:
        folder = os.path.abspath(self.folder)
        target = os.path.abspath(path)
        if not target.startswith(folder + os.sep):
            return None
        return os.path.relpath(target, folder)

    def _observe(self, path: Path, phase: str) -> None:
        rel = self._relative(path)
        if rel is None or Path(rel).name == MANIFEST:       # manifests are not results
            return
        if phase == "start":
            self.manifest.append({"file": rel, "started": time.time_ns() - 10**9})   # a second of clock slack
        else:
            self.written.add(rel)
            self.manifest.append({"file": rel, "identity": _identity(Path(path))})

    def close(self) -> None:
        unobserve_writes(self._observe)


def own_files(folder: Path) -> dict[str, list]:
    """{relative path: identity} of the files in ``folder`` that this project wrote there and
    nobody changed since (by its manifest)."""
    return {rel: _identity(folder / rel) for rel, record in Manifest(folder).read().items()
            if _made_here(folder, rel, record)}


class ResultFolder:
    """An output folder claimed by one run (see the module docstring)."""

    def __init__(self, path: Path, previous: dict[str, list], lock: FolderLock | None):
        self.path, self.previous, self.lock = path, previous, lock
        self.recorder = WriteRecorder(path)
        self.protected: set[tuple] = set()

    def __enter__(self) -> "ResultFolder":
        return self

    def __exit__(self, *exc) -> bool:
        self.close()                       # after finish() as well: closing twice is harmless
        return False

    @classmethod
    def claim(cls, path, overwrite: bool = False, resume: bool = False, lock: bool = True,
              log: Callable | None = None) -> "ResultFolder":
        """``resume``: the folder holds a stopped run that this one continues; its files are kept.
        ``lock``: False for the ranks of a torchrun other than the first (which holds it)."""
        path = ensure_dir(path)
        held = FolderLock(path).acquire(log=log) if lock else None
        try:
            if held is not None:
                for sub in SUBFOLDERS:
                    remove_stale_temporaries(path / sub if sub else path)
            ours = own_files(path)
            # named like results but not (or no longer) as this project wrote them: kept, yet a reason to stop
            foreign = [p for p in result_files(path) if str(p.relative_to(path)) not in ours]
            if resume:
                return cls(path, {}, held)
            shown_files = sorted(ours) + [str(p.relative_to(path)) for p in foreign]
            if shown_files and not overwrite:
                shown = ", ".join(shown_files[:4])
                more = f" and {len(shown_files) - 4} more" if len(shown_files) > 4 else ""
                raise DataError(f"{path}: holds results of a previous run ({shown}{more}); replace them with "
                                f"--overwrite, or choose another output folder")
            return cls(path, ours, held)
        except BaseException:
            if held is not None:
                held.release()
            raise

    def protect(self, paths: Iterable) -> None:
        """Files this run reads (its inputs): never removed by ``finish``, whatever the manifest says."""
        for p in paths:
            try:
                st = os.stat(p)
            except (OSError, TypeError):
                continue
            self.protected.add((st.st_dev, st.st_ino))

    def _is_protected(self, path: Path) -> bool:
        try:
            st = os.stat(path)
        except OSError:
            return False
        return (st.st_dev, st.st_ino) in self.protected

    def finish(self, log: Callable | None = None) -> list[Path]:
        """Delete the earlier run's files that this run did not rewrite (see the module
        docstring), rewrite the manifest to what the folder now holds, and release the folder."""
        stale = []
        try:
            for rel, ident in self.previous.items():
                path = self.path / rel
                if rel in self.recorder.written or not plain_inside(self.path, rel) or _identity(path) != ident \
                        or self._is_protected(path):
                    continue
                path.unlink(missing_ok=True)
                stale.append(path)
            if stale and log is not None:
                log(f"note: {self.path}: removed {len(stale)} result file(s) of the previous run")
            self.recorder.manifest.compact()
        finally:
            self.close()
        return stale

    def close(self) -> None:
        """Stop recording writes and release the folder (``finish`` and leaving a ``with`` block do both)."""
        self.recorder.close()
        if self.lock is not None:
            self.lock.release()
