"""What a stopped run and its continuation must share, recorded by content.

A run that is continued (``Train_<Set>.py --resume``, ``Infer_<Set>.py --resume``) must use
the same weights, the same settings and the same data as the run that stopped, or its
results would mix two experiments. ``resume_key`` gathers them as digests and values:

* ``weights``: SHA-256 of the network's tensors (names, dtypes, shapes and bytes), so a
  checkpoint file replaced in place under the same name is caught;
* ``settings``: every config value that changes results (``FREE_SETTINGS`` lists those that
  may change: more epochs, another device, a moved data folder, cache sizes, ...);
* ``data``: SHA-256 of the data list: each file's path relative to the data folder and size.

``changes(saved, now)`` names what differs, e.g. ``['weights', 'train.lr']``.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Iterable

import torch

from utils.config import RunConfig

# settings that may differ between a stopped run and its continuation (dotted names; a section
# name frees the whole section)
FREE_SETTINGS = {
    "training": ("train.epochs", "train.max_minutes", "train.keep_top_k", "data.root", "data.cache_mb",
                 "data.loader_workers", "device", "checkpoint_dir", "output_dir", "eval",
                 "model.grad_checkpointing"),
    "inference": ("eval.background", "eval.max_pairs", "eval.compile", "data.root", "data.cache_mb",
                  "data.loader_workers", "device", "checkpoint_dir", "output_dir", "train", "model"),
}


def weights_digest(state_dict: dict | None, model_config: dict | None = None) -> str:
    """SHA-256 of a state dict's tensors in name order, and of the network's configuration
    ('none' without a network)."""
    if state_dict is None:
        return "none"
    h = hashlib.sha256(json.dumps(model_config, sort_keys=True, default=str).encode())
    for name in sorted(state_dict):
        t = state_dict[name]
        if not isinstance(t, torch.Tensor):
            continue
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def data_digest(files: Iterable[str], root) -> str:
    """SHA-256 of a list of files: each one's path relative to ``root`` (absolute elsewhere) and size."""
    root = Path(root).resolve()
    h = hashlib.sha256()
    for f in sorted(set(files)):
        path = Path(f).resolve()
        try:
            name = str(path.relative_to(root))
        except ValueError:
            name = str(path)
        size = os.path.getsize(path) if path.is_file() else -1
        h.update(f"{name}|{size}\n".encode())
    return h.hexdigest()


def pair_files(pairs) -> list[str]:
    """The image and label files of a list of pairs (utils.datasets.Pair)."""
    return [f for p in pairs for side in (p.moving, p.fixed) for f in (side.image, side.label) if f]


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        name = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, name + "."))
        else:
            out[name] = list(v) if isinstance(v, tuple) else v
    return out


def settings_of(run: RunConfig | dict, kind: str) -> dict:
    """The dotted config values that must not change for a run of ``kind`` ('training', 'inference')."""
    free = FREE_SETTINGS[kind]
    flat = _flat(run.to_dict() if isinstance(run, RunConfig) else run)
    kept = {k: v for k, v in flat.items() if not any(k == f or k.startswith(f + ".") for f in free)}
    return json.loads(json.dumps(kept, default=str))


def resume_key(kind: str, run: RunConfig, files: Iterable[str], model=None) -> dict:
    """{'weights', 'settings', 'data'} of a run; ``weights`` (of ``model``, None without a
    network) only for inference: training continues from its own last.pth."""
    key = {"settings": settings_of(run, kind), "data": data_digest(files, run.data.root)}
    if kind == "inference":
        key["weights"] = weights_digest(model.state_dict(), model.config.to_dict()) if model is not None else "none"
    return key


def changes(saved: dict, now: dict) -> list[str]:
    """What differs between two resume keys: 'weights', 'data list', or the settings' names."""
    out = [name for name, field in (("weights", "weights"), ("data list", "data"))
           if field in now and saved.get(field) != now[field]]
    before, after = saved.get("settings", {}), now.get("settings", {})
    for name in sorted(set(before) | set(after)):
        if before.get(name) != after.get(name):
            out.append(f"{name} ({before.get(name, '(unset)')!r} -> {after.get(name, '(unset)')!r})")
    return out


def describe(what: list[str], limit: int = 5) -> str:
    """'weights, train.lr (0.1 -> 0.2)' with at most ``limit`` entries."""
    shown = ", ".join(what[:limit])
    return shown + (f" and {len(what) - limit} more" if len(what) > limit else "")


__all__ = ["FREE_SETTINGS", "weights_digest", "data_digest", "pair_files", "settings_of", "resume_key", "changes",
           "describe"]
