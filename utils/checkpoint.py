"""Checkpoint files: safe reading, atomic writing, and the keeper of a run's checkpoint folder.

A checkpoint is a dict saved with ``torch.save``: ``format``, ``model_config``
(``ModelConfig.to_dict()``), ``model`` (the state dict) and any extra entries (optimizer,
epoch, run config, ...), all of them tensors or plain Python types (dict, list, tuple, str,
numbers, bool, None). Files are read with ``torch.load(weights_only=True)``: loading never
runs code from the file, and a file that needs anything else is refused.

Writes go to a temporary file in the same folder and are renamed over the target, so a crash
never leaves a half-written file. ``CheckpointKeeper`` owns a training run's folder: its lock,
the temporaries a killed run left, and ``last.pth`` / ``best.pth`` / the top-k files.
"""
from __future__ import annotations

import math
import os
import pickle
import re
import secrets
from pathlib import Path
from typing import Any, Callable

import torch

from .folder_lock import FolderLock
from .io import (TEMP_PREFIX, DataError, atomic_write, ensure_dir, notify_write, remove_stale_temporaries,
                 require_file)
from .outputs import MANIFEST, WriteRecorder, own_files

FORMAT = "plcreg-checkpoint-v1"
# files of a training run in its checkpoint folder (besides the top-k dsc*.pth)
RUN_FILES = ("last.pth", "best.pth", "train_log.csv", "config.json")


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used: unreadable, not ours, or of another architecture."""


def atomic_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` to ``path`` via a temporary file (flushed to disk) and an atomic rename."""
    def write(tmp):
        with open(tmp, "wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
    return atomic_write(path, write)


def checkpoint_dict(model_config: dict, state_dict: dict, **extra) -> dict:
    """The checkpoint of a model: format tag, ``model_config``, ``model`` (weights) and ``extra``
    entries (tensors and plain values only, so that it loads with ``weights_only``)."""
    return {"format": FORMAT, "model_config": model_config, "model": state_dict, **extra}


def save_checkpoint(path, model_config: dict, state_dict: dict, **extra) -> Path:
    """Save a checkpoint holding the model configuration, weights and ``extra`` entries."""
    return atomic_save(checkpoint_dict(model_config, state_dict, **extra), path)


def load_weights_only(path, map_location="cpu", what: str = "checkpoint"):
    """``torch.load`` restricted to tensors and plain Python types; CheckpointError otherwise.

    Nothing in the file is executed: a file that needs other classes (pickled objects of any
    kind) is refused with a message naming the first one it asked for.
    """
    try:
        path = require_file(path, f"{what} file")
    except DataError as exc:
        raise CheckpointError(str(exc)) from None
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
        if found:
            raise CheckpointError(f"{path}: refused: the file needs {found.group(1)}, which is neither a tensor nor "
                                  f"a plain value; loading it could run code from it") from None
        detail = re.search(r"WeightsUnpickler error:\s*(.+)", str(exc))
        raise CheckpointError(f"{path}: cannot read {what} (damaged, or not a PyTorch file: "
                              f"{detail.group(1).strip() if detail else type(exc).__name__})") from None
    except Exception as exc:  # corrupt or not a torch file
        raise CheckpointError(f"{path}: cannot read {what} ({type(exc).__name__}: {exc})") from exc


def as_checkpoint(obj, path) -> dict:
    """``obj`` (the loaded content of ``path``) when it is a PLCReg checkpoint; CheckpointError otherwise."""
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a PLCReg checkpoint (expected format {FORMAT!r})")
    return obj


def read_checkpoint(path, map_location="cpu") -> dict:
    """Load a checkpoint dict, with a clear error for a missing, unreadable, unsafe or foreign file."""
    return as_checkpoint(load_weights_only(path, map_location), path)


class CheckpointKeeper:
    """The checkpoint folder of one training run.

    ``open()`` takes the folder's lock (a second run into the same folder stops with an error
    naming the holder), deletes temporaries of killed writes, and refuses to start a fresh run
    over a previous one unless ``overwrite`` (which deletes that run's files first) or
    ``resume``. ``save(state_fn, score)`` writes ``last.pth`` every time, ``best.pth`` when the
    score improves (or always, with ``validated=False``), and keeps the ``keep_top_k`` best
    ``dsc<score>_ep<epoch>.pth`` files. ``state_fn`` builds the dict lazily, after ``best``
    and ``top`` are updated, so the files record the keeper's own state.
    """

    def __init__(self, folder, keep_top_k: int = 3, validated: bool = True):
        self.folder, self.keep_top_k, self.validated = Path(folder), keep_top_k, validated
        self.best, self.top = -math.inf, []          # best score; [(score, file name)] best first
        self.lock = FolderLock(self.folder)
        self.recorder: WriteRecorder | None = None

    def previous_run_files(self) -> list[Path]:
        if not self.folder.is_dir():
            return []
        return sorted([self.folder / n for n in RUN_FILES if (self.folder / n).exists()]
                      + list(self.folder.glob("dsc*_ep*.pth")))

    def open(self, *, resume: bool = False, overwrite: bool = False, log: Callable = print) -> "CheckpointKeeper":
        ensure_dir(self.folder)
        self.lock.acquire(log=log)
        try:
            stale = remove_stale_temporaries(self.folder)
            if stale:
                log(f"note: {self.folder}: removed {len(stale)} temporary file(s) left by an interrupted write")
            previous = self.previous_run_files()
            if previous and not resume:
                if not overwrite:
                    raise DataError(
                        f"{self.folder}: holds a previous run ({', '.join(p.name for p in previous[:6])}); "
                        f"continue it with --resume, replace it with --overwrite, or choose another "
                        f"--checkpoint-dir")
                self._remove_previous(previous, log)
            self.recorder = WriteRecorder(self.folder)
        except BaseException:
            self.lock.release()
            raise
        return self

    def _remove_previous(self, previous: list[Path], log: Callable) -> None:
        """--overwrite: the previous run's files that this project wrote and nobody changed since
        (by the folder's manifest; a folder of a version without one: every file of the run's names)."""
        legacy = not (self.folder / MANIFEST).exists()
        ours = own_files(self.folder)
        removed = [p for p in previous if (legacy and p.is_file() and not p.is_symlink()) or p.name in ours]
        for p in removed:
            p.unlink()
        log(f"note: {self.folder}: --overwrite: removed the previous run's {len(removed)} file(s)")
        kept = [p.name for p in previous if p not in removed]
        if kept:
            log(f"note: {self.folder}: kept {', '.join(kept)}: not written by this project, or changed since "
                f"(the new run writes its own files of those names)")

    def close(self) -> None:
        """Stop recording writes, keep the manifest to what the folder holds, release the folder."""
        if self.recorder is not None:
            self.recorder.close()
            self.recorder.manifest.compact()
            self.recorder = None
        self.lock.release()

    def restore(self, ckpt: dict, log: Callable = print) -> None:
        """Best score and top-k list from a resumed ``last.pth``, and the folder made to agree with it.

        A run killed while saving may have left the new epoch's top-k file and ``best.pth``
        written but not yet ``last.pth`` (the order of ``save``): that top-k file, which
        ``last.pth`` does not list, is removed (the epoch is trained again), and a ``best.pth``
        newer than ``last.pth`` is kept as the best so far, its score taken from it.
        """
        self.best = float(ckpt.get("best_val_dice", -math.inf))
        self.top = [tuple(t) for t in ckpt.get("top", []) if (self.folder / t[1]).is_file()]
        listed = {name for _, name in self.top}
        orphans = [p for p in self.folder.glob("dsc*_ep*.pth") if p.name not in listed and p.is_file()]
        for p in orphans:
            p.unlink()
        if orphans:
            log(f"note: {self.folder}: removed {', '.join(p.name for p in orphans)}, written by the interrupted "
                f"save of an epoch that is trained again")
        best = self.folder / "best.pth"
        if best.is_file():
            try:
                saved = load_weights_only(best)
            except CheckpointError:
                return
            if int(saved.get("epoch", -1)) > int(ckpt.get("epoch", 0)):
                self.best = max(self.best, float(saved.get("best_val_dice", -math.inf)))

    def save_last(self, state: dict) -> Path:
        return atomic_save(state, self.folder / "last.pth")

    def save(self, state_fn: Callable[[], dict], score: float, epoch: int) -> None:
        """Write the epoch's checkpoints so that a kill at any moment leaves them consistent:
        the new top-k file and ``best.pth`` first (one file, hard-linked where the disk allows),
        then ``last.pth`` recording them, and only then the top-k files it no longer lists are
        removed. ``last.pth`` never names a file that does not exist."""
        improved = (math.isfinite(score) and score > self.best) or not self.validated
        if improved:
            self.best = score
        name, dropped = None, []
        if self.keep_top_k > 0 and math.isfinite(score):
            name = f"dsc{score:.4f}_ep{epoch:04d}.pth"
            ranked = sorted(self.top + [(score, name)], key=lambda t: -t[0])
            self.top, dropped = ranked[:self.keep_top_k], [n for _, n in ranked[self.keep_top_k:]]
        state = state_fn()
        written = None
        if name is not None and name not in dropped:
            written = atomic_save(state, self.folder / name)
        if improved:
            best = self.folder / "best.pth"
            if written is None or not _link_over(written, best):
                atomic_save(state, best)
        self.save_last(state)
        for old in dropped:
            if old != name:
                (self.folder / old).unlink(missing_ok=True)


def _link_over(source: Path, target: Path) -> bool:
    """Make ``target`` a hard link to ``source``, replacing it atomically; False where the disk has
    no hard links (the caller writes a copy)."""
    temporary = target.with_name(f"{TEMP_PREFIX}{target.stem}.{secrets.token_hex(4)}{target.suffix}")
    notify_write(target, "start")
    try:
        os.link(source, temporary)
    except OSError:
        return False
    try:
        os.replace(temporary, target)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    notify_write(target, "done")
    return True
