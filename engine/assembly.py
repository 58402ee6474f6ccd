"""One place that turns a data set's preset and the user's choices into a checked RunConfig.

Every entry point (``Train_<Set>.py``/``Infer_<Set>.py``, ``compare.py``, ``demo.py``, the
benchmarks) calls ``assemble_run``: the preset of the data set, the network's registry
defaults, ``section.field=value`` overrides, then explicit settings; the result is validated
before any data is read. Unset checkpoint and output folders are derived where they are used
(``checkpoint_dir``, ``output_dir`` below).
"""
from __future__ import annotations

from pathlib import Path

from models.registry import DEFAULT_MODEL, checkpoint_folder, default_config, model_entry
from utils.config import RunConfig, apply_override, preset
from utils.datasets import check_layout

SECTIONS = ("data", "model", "train", "eval")


def assemble_run(dataset: str, *, model: str = DEFAULT_MODEL, overrides=(), settings: dict | None = None) -> RunConfig:
    """The checked RunConfig of a run.

    Args:
        dataset: a preset name (``utils.config.PRESETS``).
        model: a registered network (``models/registry.py``); other than PLCReg it starts from
            its registry defaults and its own checkpoint folder ``Checkpoint/<Set>_<model>``.
        overrides: ``section.field=value`` strings (``--set``), applied in order.
        settings: explicit values, ``{"train.lr": 1e-4, "device": "cpu", ...}``; ``None`` values
            are skipped (a flag that was not given).
    Raises ValueError naming the setting when a value is out of range.
    """
    run = preset(dataset)
    model_entry(model)
    if model != DEFAULT_MODEL:
        run.model = default_config(model)
    for assignment in overrides:
        apply_override(run, assignment)
    for key, value in (settings or {}).items():
        if value is None:
            continue
        section, _, name = key.rpartition(".")
        target = getattr(run, section) if section else run
        if section and section not in SECTIONS or not hasattr(target, name):
            raise ValueError(f"unknown setting {key!r}")
        setattr(target, name, value)
    model_entry(run.model.arch)
    check_layout(run.data.layout)
    return run.validate()


def checkpoint_dir(run: RunConfig) -> Path:
    """The run's checkpoint folder (``Checkpoint/<Set>`` unless set)."""
    return Path(run.checkpoint_dir or checkpoint_folder(run.data.name, run.model.arch))


def output_dir(run: RunConfig) -> Path:
    """The run's results folder (``Results/<Set>`` unless set)."""
    return Path(run.output_dir or f"Results/{run.data.name}")


def default_checkpoint(run: RunConfig) -> Path:
    """The checkpoint inference uses when none is given: ``best.pth`` of the run's checkpoint folder."""
    return checkpoint_dir(run) / "best.pth"
