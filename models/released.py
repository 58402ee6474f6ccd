"""The authors' released checkpoints (``final.pth.tar`` of the released PLCReg code) as ours.

The released network holds the same weights as ``PLCReg`` under other names, with three
tensors in other shapes; it also keeps 24 LayerNorm tensors that its forward never uses
(three spare output norms per attention level). ``convert_released_state`` maps every tensor,
drops exactly those unused ones, and refuses anything else with a message naming the keys.
The converted checkpoint has ``released_compat`` on, so the network computes the released
function (``ModelConfig.released_compat``).

Released name (level l = 1..5)                           -> ours
``encoder.conv_l.conv{1,2}.*``                            -> ``encoder.levels.{l-1}.{0,1}.0.*``
``conv_l.conv{1,2}.*`` / ``conv_fine_l.conv{1,2}.*``       -> ``levels.{l-1}.conv`` / ``.fine_conv.{0,1}.0.*``
``reghead_l.reg_head.*`` / ``fine_reghead_l.reg_head.*``   -> ``levels.{l-1}.head.*`` / ``.fine_head.*``
``upsample_l.deconv.*``                                   -> ``levels.{l-1}.up_context.0.*``
``corr_l.transformer.layers.0.blocks.0.``
    ``norm1.*`` / ``norm2.*``                             -> ``levels.{l-1}.attention.norm_in`` / ``.norm_mlp``
    ``attn.{qkvg,dwc,proj}.*``                            -> ``levels.{l-1}.attention.attn.{qkvg,dwc,proj}.*``
    ``attn.power`` (1, h, 1, hd)                          -> ``...attn.power`` (h, hd)
    ``attn.scale`` (1, 1, d)                              -> ``...attn.scale`` (d)
    ``attn.positional_encoding`` (1, N, d)                -> ``...attn.positional`` (N, d)
    ``mlp.fc1.*`` / ``mlp.fc2.*``                         -> ``levels.{l-1}.attention.mlp.0`` / ``.mlp.2``
``corr_l.transformer.norm0.*``                            -> ``levels.{l-1}.attention.norm_out.*``
``corr_l.transformer.norm{1,2,3}.*``                      -> dropped (never used by the released forward)
"""
from __future__ import annotations

import re
from typing import Callable

import torch
import torch.nn as nn

from utils.checkpoint import CheckpointError
from utils.config import ModelConfig

N_LEVELS = 5
UNUSED = re.compile(r"^corr_\d\.transformer\.norm[123]\.(weight|bias)$")


def _drop_leading(shape_out):
    """A reshape of a released tensor to our shape (same elements, leading 1-axes gone)."""
    def reshape(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(shape_out(t))
    return reshape


def released_name_table(attention_levels=(2, 3, 4, 5)) -> dict[str, tuple[str, Callable | None]]:
    """{released name: (our name, reshape or None)} of every tensor the released forward uses."""
    table: dict[str, tuple[str, Callable | None]] = {}

    def add(src: str, dst: str, reshape=None, params=("weight", "bias")):
        for p in params:
            table[f"{src}.{p}" if p else src] = (f"{dst}.{p}" if p else dst, reshape)

    for lvl in range(1, N_LEVELS + 1):
        ours = f"levels.{lvl - 1}"
        for i in (1, 2):
            add(f"encoder.conv_{lvl}.conv{i}", f"encoder.levels.{lvl - 1}.{i - 1}.0")
            add(f"conv_{lvl}.conv{i}", f"{ours}.conv.{i - 1}.0")
        add(f"reghead_{lvl}.reg_head", f"{ours}.head")
        if lvl < N_LEVELS:
            for i in (1, 2):
                add(f"conv_fine_{lvl}.conv{i}", f"{ours}.fine_conv.{i - 1}.0")
            add(f"fine_reghead_{lvl}.reg_head", f"{ours}.fine_head")
            add(f"upsample_{lvl}.deconv", f"{ours}.up_context.0")
        if lvl in attention_levels:
            block, att = f"corr_{lvl}.transformer.layers.0.blocks.0", f"{ours}.attention"
            add(f"{block}.norm1", f"{att}.norm_in")
            add(f"{block}.norm2", f"{att}.norm_mlp")
            add(f"{block}.mlp.fc1", f"{att}.mlp.0")
            add(f"{block}.mlp.fc2", f"{att}.mlp.2")
            add(f"{block}.attn.qkvg", f"{att}.attn.qkvg", params=("weight",))
            add(f"{block}.attn.dwc", f"{att}.attn.dwc")
            add(f"{block}.attn.proj", f"{att}.attn.proj")
            add(f"{block}.attn.power", f"{att}.attn.power", _drop_leading(lambda t: (t.shape[1], t.shape[3])), ("",))
            add(f"{block}.attn.scale", f"{att}.attn.scale", _drop_leading(lambda t: (t.shape[-1],)), ("",))
            add(f"{block}.attn.positional_encoding", f"{att}.attn.positional",
                _drop_leading(lambda t: tuple(t.shape[-2:])), ("",))
            add(f"corr_{lvl}.transformer.norm0", f"{att}.norm_out")
    return table


def released_state_dict(obj, source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """The state dict of a released checkpoint: ``obj['state_dict']`` or a bare state dict
    (a ``module.`` prefix of DataParallel training is removed)."""
    state = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{source}: not a released PLCReg checkpoint (expected a dict with 'state_dict', "
                              f"or a state dict of tensors)")
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}


def is_released_state(obj) -> bool:
    """True for a released checkpoint (its encoder keys), False for anything else."""
    state = obj.get("state_dict", obj) if isinstance(obj, dict) else {}
    return isinstance(state, dict) and any(str(k).split("module.")[-1].startswith("encoder.conv_1.")
                                           for k in state)


def infer_config(state: dict[str, torch.Tensor], window_size=(5, 7, 6), alpha: float = 15.0) -> ModelConfig:
    """The ModelConfig of a released state dict: widths, heads, kernel, MLP ratio and attention
    levels from the tensors' shapes; ``window_size`` and ``alpha`` are not stored in the file
    (the released OASIS values by default; the window must match the positional term)."""
    try:
        widths = tuple(int(state[f"encoder.conv_{lvl}.conv1.weight"].shape[0]) for lvl in range(1, N_LEVELS + 1))
        in_channels = int(state["encoder.conv_1.conv1.weight"].shape[1])
    except KeyError as exc:
        raise CheckpointError(f"released checkpoint: missing encoder tensor {exc}") from None
    levels = tuple(lvl for lvl in range(2, N_LEVELS + 1)
                   if any(k.startswith(f"corr_{lvl}.") for k in state))
    heads, kernel, ratio = 8, 3, 4.0
    if levels:
        block = f"corr_{levels[0]}.transformer.layers.0.blocks.0"
        try:
            heads = int(state[f"{block}.attn.power"].shape[1])
            kernel = int(state[f"{block}.attn.dwc.weight"].shape[-1])
            ratio = state[f"{block}.mlp.fc1.weight"].shape[0] / state[f"{block}.mlp.fc1.weight"].shape[1]
            n_tokens = int(state[f"{block}.attn.positional_encoding"].shape[-2])
        except KeyError as exc:
            raise CheckpointError(f"released checkpoint: missing attention tensor {exc}") from None
        window = tuple(int(w) for w in window_size)
        if window[0] * window[1] * window[2] != n_tokens:
            raise CheckpointError(f"released checkpoint: its positional term has {n_tokens} tokens per window, "
                                  f"but the window {window} has {window[0] * window[1] * window[2]}; give the "
                                  f"data set's window (OASIS 5,7,6; LPBA40 5,6,5; IXI 5,6,7)")
    return ModelConfig(in_channels=in_channels, widths=widths, window_size=tuple(window_size), num_heads=heads,
                       alpha=alpha, dwc_kernel=kernel, mlp_ratio=ratio, attention_levels=levels or (2, 3, 4, 5),
                       released_compat=True)


def convert_released_state(state: dict[str, torch.Tensor], target: nn.Module,
                           source: str = "checkpoint") -> tuple[dict[str, torch.Tensor], list[str]]:
    """(our state dict for the network ``target``, dropped released keys), as timm's checkpoint
    filters take the model they fill. CheckpointError on a missing or unexpected key or a shape
    that does not fit ``target``."""
    table = released_name_table(target.config.attention_levels)
    dropped = sorted(k for k in state if UNUSED.match(k))
    missing = sorted(set(table) - set(state))
    unexpected = sorted(set(state) - set(table) - set(dropped))
    if missing or unexpected:
        raise CheckpointError(f"{source}: does not match the released network (missing {missing[:6]}"
                              f"{' ...' if len(missing) > 6 else ''}, unexpected {unexpected[:6]}"
                              f"{' ...' if len(unexpected) > 6 else ''})")
    own = target.state_dict()
    out, wrong = {}, []
    for name, (ours, reshape) in table.items():
        t = state[name]
        try:
            t = reshape(t) if reshape is not None else t
        except RuntimeError:
            pass
        if tuple(t.shape) != tuple(own[ours].shape):
            wrong.append(f"{name} {tuple(state[name].shape)} (ours {ours} {tuple(own[ours].shape)})")
            continue
        out[ours] = t.detach().clone().to(own[ours].dtype)
    if wrong:
        raise CheckpointError(f"{source}: tensors of the wrong shape: {'; '.join(wrong[:4])}")
    if set(out) != set(own):
        raise CheckpointError(f"{source}: our network has tensors the table does not fill: {sorted(set(own) - set(out))[:6]}")
    return out, dropped


__all__ = ["released_name_table", "released_state_dict", "is_released_state", "infer_config",
           "convert_released_state"]
