"""The walk through the network that both CPU kernel tables share.

It follows the reference modules of ``models/plcreg.py`` step by step and asks the table
(a subclass) for each operation. Every operation first checks that its kernel supports the
module it is given (:func:`fused_norm_act`, :func:`direct_conv`) and otherwise calls the
module: a network changed in the reference (another activation, an affine norm) runs
correctly here too, only without that kernel.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .ops import avg_pool2_channels_last, is_channels_last


def fused_norm_act(norm: nn.Module, act: nn.Module) -> bool:
    """Whether the fused InstanceNorm+ReLU kernels compute ``act(norm(y))``: a plain instance
    norm (no affine, no running statistics) followed by ReLU."""
    return (type(norm) is nn.InstanceNorm3d and not norm.affine and not norm.track_running_stats
            and type(act) is nn.ReLU)


def direct_conv(layer: nn.Module) -> bool:
    """Whether oneDNN's convolution can run ``layer`` directly: a 3D convolution (not
    transposed) with zero padding given as numbers."""
    return isinstance(layer, nn.Conv3d) and layer.padding_mode == "zeros" and isinstance(layer.padding, tuple)


def plain_pool(pool: nn.Module, x: torch.Tensor) -> bool:
    """Whether ``pool(x)`` is a 2x average pooling the channels-last kernel computes."""
    return (type(pool) is nn.AvgPool3d and pool.kernel_size in (2, (2, 2, 2)) and pool.stride in (2, (2, 2, 2))
            and pool.padding in (0, (0, 0, 0)) and not pool.ceil_mode and is_channels_last(x)
            and all(n % 2 == 0 for n in x.shape[2:]))


class CpuKernels:
    """A pass of PLCReg on the CPU in ``precision`` (float32, or bf16 under CPU autocast).

    Subclasses give the operations: ``encode``, ``double_conv``, ``layer``, ``norm_act``,
    ``head``, ``warp``, ``attention``, ``estimate``.
    """

    def __init__(self, precision: torch.dtype):
        self.precision = precision
        self.bf16 = precision == torch.bfloat16

    def level_fields(self, model, moving: torch.Tensor, fixed: torch.Tensor) -> list[torch.Tensor]:
        """``model.level_fields(moving, fixed)`` computed by this table: [phi_5, ..., phi_1]."""
        mov, fix = self.encode(model.encoder, moving, fixed)
        phi, context, fields = None, None, []
        for lvl in range(len(model.levels), 0, -1):
            m, f = mov.pop(), fix.pop()          # coarsest first; a used level is let go at once
            if phi is not None:
                phi = model.upsample_field(phi, m.shape[2:])
                m = self.warp(model, m, phi)
            pair = [m, f]
            del m, f
            phi, context = self.estimate(model, model.levels[lvl - 1], pair, phi, context)
            fields.append(phi)
        return fields

    def encode_image(self, encoder, x: torch.Tensor) -> list[torch.Tensor]:
        """The encoder's level features of ``x``, as ``Encoder.forward``."""
        feats = []
        for i, level in enumerate(encoder.levels):
            x = self.double_conv(level, [x if i == 0 else self.pool(encoder.pool, x)])
            feats.append(x)
        return feats

    def pool(self, pool: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return avg_pool2_channels_last(x) if plain_pool(pool, x) else pool(x)

    def layer_norm_act(self, unit: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
        """A (layer, norm, activation) unit: ConvNormAct or UpConv."""
        layer, norm, act = unit
        return self.norm_act(norm, act, self.layer(layer, x))

    def estimator_level(self, level, pair: list, phi_up: torch.Tensor | None, context: torch.Tensor | None):
        """``level(*pair, phi_up, context)``; empties ``pair`` so that the level's input features
        can be freed once they are used."""
        moving, fixed = pair
        pair.clear()
        parts = [moving, fixed] if level.attention is None else [moving, self.attention(level.attention, moving, fixed),
                                                                 fixed]
        del moving, fixed
        c = self.double_conv(level.conv, parts)
        del parts
        phi = self.combine(level, self.head(level.head, c), phi_up)
        if level.up_context is None:
            return phi, c
        # the upsampled context is made only once c has been used (and, without autograd, freed)
        fine_parts = [phi, c, lambda: self.layer_norm_act(level.up_context, context)]
        del c
        fine = self.double_conv(level.fine_conv, fine_parts)
        return self.combine(level, self.head(level.fine_head, fine), phi), fine

    def combine(self, level, residual: torch.Tensor, base: torch.Tensor | None) -> torch.Tensor:
        """``level.combine(residual, base)``."""
        return level.combine(residual, base)
