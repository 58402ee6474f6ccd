"""Atomic checkpoint files that carry the model's configuration.

A checkpoint is a dict saved with ``torch.save``: ``format``, ``model_config``
(``ModelConfig.to_dict()``), ``model`` (the state dict) and any extra entries
(optimizer, epoch, run config, ...). Writes go to a temporary file in the same
folder and are renamed over the target, so a crash never leaves a half-written file.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from .io import atomic_write

FORMAT = "plcreg-checkpoint-v1"


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


def save_checkpoint(path, model_config: dict, state_dict: dict, **extra) -> Path:
    """Save a checkpoint holding the model configuration, weights and ``extra`` entries."""
    return atomic_save({"format": FORMAT, "model_config": model_config, "model": state_dict, **extra}, path)


def read_checkpoint(path, map_location="cpu") -> dict:
    """Load a checkpoint dict, with a clear error for a missing, unreadable or foreign file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as exc:  # corrupt or not a torch file
        raise CheckpointError(f"{path}: cannot read checkpoint ({type(exc).__name__}: {exc})") from exc
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a PLCReg checkpoint (expected format {FORMAT!r})")
    return ckpt
