"""Build the network from a config, and rebuild it from a checkpoint alone."""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from utils.checkpoint import (CheckpointError, as_checkpoint, checkpoint_dict, load_weights_only, read_checkpoint,
                              save_checkpoint)
from utils.config import ModelConfig, architecture_fields

from .plcreg import PLCReg
from .released import convert_released_state, infer_config, is_released_state, released_state_dict
from .registry import model_entry


def build_model(config: ModelConfig | dict | None = None) -> nn.Module:
    """The network of a ModelConfig (or its dict form), built by its registry entry
    (``models/registry.py``; defaults: the OASIS PLCReg)."""
    if isinstance(config, dict):
        config = ModelConfig.from_dict(config)
    config = config or ModelConfig()
    return model_entry(config.arch).builder(config)


def save_model(path, model: PLCReg, **extra):
    """Checkpoint with the model's config and weights (plus ``extra`` entries), written atomically."""
    return save_checkpoint(path, model.config.to_dict(), model.state_dict(), **extra)


def check_compatible(model: nn.Module, ckpt: dict, source: str = "checkpoint") -> None:
    """Raise CheckpointError unless ``ckpt`` holds weights of ``model``'s architecture."""
    # a field added after a checkpoint was written reads as its default (e.g. arch = 'plcreg')
    saved = {**ModelConfig().to_dict(), **(ckpt.get("model_config") or {})}
    ours = model.config.to_dict()
    diff = [f"{k}: checkpoint {saved.get(k)!r} vs model {ours.get(k)!r}"
            for k in architecture_fields() if saved.get(k) != ours.get(k)]
    if diff:
        raise CheckpointError(f"{source}: checkpoint of another architecture ({'; '.join(diff)})")
    state, own = ckpt.get("model", {}), model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if tuple(own[k].shape) != tuple(state[k].shape))
    if missing or unexpected or wrong:
        raise CheckpointError(
            f"{source}: weights do not match the network (missing {missing[:5]}, unexpected {unexpected[:5]}, "
            f"wrong shape {wrong[:5]})")
    broken = sorted(k for k, v in state.items() if torch.is_tensor(v) and v.is_floating_point()
                    and not bool(torch.isfinite(v).all()))
    if broken:
        raise CheckpointError(f"{source}: weights that are not finite (NaN or inf) in {broken[:5]}"
                              f"{' ...' if len(broken) > 5 else ''}")


def load_weights(model: PLCReg, ckpt: dict, source: str = "checkpoint") -> PLCReg:
    """Load a checkpoint's weights into ``model`` after checking the architecture."""
    check_compatible(model, ckpt, source)
    model.load_state_dict(ckpt["model"])
    return model


def read_weights(path, config: ModelConfig | None = None) -> dict:
    """A checkpoint dict from our format or, converted on the fly, from the released code's
    (``models.released``; its window and ALS range, which the file does not hold, are taken
    from ``config``). Nothing in the file is executed."""
    obj = load_weights_only(path)
    if not is_released_state(obj):
        return as_checkpoint(obj, path)
    if config is not None and not config.released_compat:
        raise CheckpointError(f"{path}: a released checkpoint gives the released network's fields only with "
                              f"model.released_compat on: add --set model.released_compat=true")
    config = config or ModelConfig()
    return load_released(path, config.window_size, config.alpha, obj=obj)[0]


def load_model(path, map_location="cpu", **overrides) -> tuple[PLCReg, dict]:
    """Rebuild the network from a checkpoint file alone; ``overrides`` set run-time options
    (e.g. ``grad_checkpointing=True``, ``freeze_encoder=True``). Returns (model, checkpoint dict)."""
    ckpt = read_checkpoint(path, map_location)
    cfg = dict(ckpt["model_config"])
    runtime = set(ModelConfig.__dataclass_fields__) - set(architecture_fields())
    bad = set(overrides) - runtime
    if bad:
        raise ValueError(f"load_model: only run-time options can be overridden ({sorted(runtime)}), got {sorted(bad)}")
    cfg.update(overrides)
    try:
        model = build_model(cfg)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: model configuration cannot be built ({exc})") from exc
    return load_weights(model, ckpt, str(path)), ckpt


def load_released(path, window_size=(5, 7, 6), alpha: float = 15.0, obj=None) -> tuple[dict, list[str]]:
    """A released checkpoint file as our checkpoint dict (in memory), and the dropped keys.
    Read with ``weights_only`` (nothing in the file is executed), unless its content ``obj``
    was already read."""
    if obj is None:
        obj = load_weights_only(path, what="released checkpoint")
    state = released_state_dict(obj, str(path))
    config = infer_config(state, window_size, alpha)
    ours, dropped = convert_released_state(state, build_model(config), str(path))
    extra = {k: obj[k] for k in ("epoch",) if isinstance(obj, dict) and isinstance(obj.get(k), (int, float))}
    return checkpoint_dict(config.to_dict(), ours, converted_from=str(path), dropped_released_keys=dropped,
                           **extra), dropped


def convert_released(src, dst, window_size=(5, 7, 6), alpha: float = 15.0) -> tuple[Path, list[str]]:
    """Convert a released checkpoint file into our format at ``dst`` (written atomically)."""
    ckpt, dropped = load_released(src, window_size, alpha)
    model_config, model = ckpt.pop("model_config"), ckpt.pop("model")
    ckpt.pop("format")
    return save_checkpoint(dst, model_config, model, **ckpt), dropped
