"""The PLCReg network, top-down: encoder, one estimator level, full model.

``PLCReg(config)(moving, fixed)`` returns the full-resolution displacement
(B, 3, D, H, W) in the project's convention (``utils.spatial``): voxel units,
component i along axis i, ``warped(x) = moving(x + u(x))``.

Inputs of any size are zero-padded at the far end of each axis to a multiple of
16 (the five-level pyramid halves four times), and to at least 32 so that the
coarsest level has more than one voxel for instance normalisation; the field is
cropped back. Inside,
a coarse field is carried to the next finer level by trilinear upsampling with the
geometry of the 2x average-pooling pyramid (``align_corners=False``; values x2).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from utils.config import ModelConfig
from utils.spatial import (SpatialTransformer, compose, integrate_velocity, released_sampling_field, resize_displacement,
                           upsample_displacement_released)

from .backend import select_kernels
from .blocks import DoubleConv, FlowHead, UpConv
from .polaca import PoLaCA
from .registry import register_model

N_LEVELS = 5
SIZE_MULTIPLE = 2 ** (N_LEVELS - 1)
MIN_SIZE = 2 * SIZE_MULTIPLE


def padded_size(size: Sequence[int]) -> tuple[int, ...]:
    """Grid the network computes on for an input of ``size``: multiples of 16, at least 32."""
    return tuple(max(MIN_SIZE, -(-int(n) // SIZE_MULTIPLE) * SIZE_MULTIPLE) for n in size)


def pad_far_end(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Zero-pad (B, C, D, H, W) at the far end of each axis up to ``size`` (no copy when equal)."""
    pads = [int(s) - n for s, n in zip(size, x.shape[2:])]
    return F.pad(x, (0, pads[2], 0, pads[1], 0, pads[0])) if any(pads) else x


class Encoder(nn.Module):
    """Five levels of DoubleConv with AvgPool3d(2) between them.

    (B, C_in, D, H, W) -> [level 1 (B, w1, D, H, W), ..., level 5 (B, w5, D/16, H/16, W/16)].
    """

    def __init__(self, in_channels: int, widths: Sequence[int]):
        super().__init__()
        chans = [in_channels, *widths]
        self.levels = nn.ModuleList(DoubleConv(chans[i], chans[i + 1]) for i in range(len(widths)))
        self.pool = nn.AvgPool3d(2)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = []
        for i, level in enumerate(self.levels):
            x = level(x if i == 0 else self.pool(x))
            feats.append(x)
        return feats


class EstimatorLevel(nn.Module):
    """One level of the coarse-to-fine estimator.

    ``c = DoubleConv(cat[m, PoLaCA(m, f), f])`` (or ``cat[m, f]`` without attention);
    ``phi = head(c) (+) phi_up``; with a finer-level context (all but the coarsest level)
    a fine branch ``DoubleConv(cat[phi, c, UpConv(context)])`` adds a residual field.
    ``(+)`` is addition, or composition with ``compose_levels``.
    """

    def __init__(self, width: int, attention: PoLaCA | None, context_width: int | None,
                 compose_levels: bool):
        super().__init__()
        self.attention = attention
        self.compose_levels = compose_levels
        in_ch = width * (3 if attention is not None else 2)
        self.conv = DoubleConv(in_ch, width)
        self.head = FlowHead(width)
        if context_width is not None:
            self.up_context = UpConv(context_width, width)
            self.fine_conv = DoubleConv(3 + 2 * width, width)
            self.fine_head = FlowHead(width)
        else:
            self.up_context = None

    def combine(self, residual: torch.Tensor, base: torch.Tensor | None) -> torch.Tensor:
        """``residual (+) base`` (a residual alone at the coarsest level)."""
        if base is None:
            return residual
        return compose(residual, base) if self.compose_levels else residual + base

    def forward(self, moving: torch.Tensor, fixed: torch.Tensor, phi_up: torch.Tensor | None,
                context: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """moving, fixed: (B, w, d, h, w') level features (moving already warped by phi_up).

        Returns (phi (B, 3, d, h, w'), features passed on as the next level's context).
        """
        parts = [moving, fixed] if self.attention is None else [moving, self.attention(moving, fixed), fixed]
        c = self.conv(torch.cat(parts, dim=1))
        phi = self.combine(self.head(c), phi_up)
        if self.up_context is None:
            return phi, c
        fine = self.fine_conv(torch.cat([phi, c, self.up_context(context)], dim=1))
        return self.combine(self.fine_head(fine), phi), fine


class PLCReg(nn.Module):
    """Dual-stream encoder + PoLaCA + coarse-to-fine estimator.

    Forward:
        moving, fixed: (B, C, D, H, W) with C = config.in_channels, any spatial size.
        return_levels: also return the per-level fields.
    Returns:
        displacement (B, 3, D, H, W); with ``return_levels`` a tuple
        (displacement, [phi_5, ..., phi_1]) where phi_l lives on the (padded) grid of level l
        in that level's voxel units (before any diffeomorphic integration).

    The modules state the network in plain PyTorch; on the CPU the kernel runner of
    ``models/kernels`` computes the same function from their weights where it applies
    (``models/backend.py`` decides, once per call).

    With ``config.released_compat`` the network computes the released code's function (its
    weights convert with ``scripts/convert_released.py``) and the returned field is corrected
    by ``utils.spatial.released_sampling_field``: ``warp(moving, u)`` then equals the released
    spatial transformer's warped image.
    """

    def __init__(self, config: ModelConfig | None = None):
        super().__init__()
        self.config = config = config or ModelConfig()
        widths = config.level_widths
        self.encoder = Encoder(config.in_channels, widths)
        levels = []
        for lvl in range(1, N_LEVELS + 1):
            w = widths[lvl - 1]
            attention = None
            if lvl in config.attention_levels:
                attention = PoLaCA(w, config.window_size, config.num_heads, config.alpha,
                                   config.dwc_kernel, config.mlp_ratio, released_compat=config.released_compat)
            context = widths[lvl] if lvl < N_LEVELS else None
            levels.append(EstimatorLevel(w, attention, context, config.compose_levels))
        self.levels = nn.ModuleList(levels)           # index 0 = level 1 (finest)
        self.transformer = SpatialTransformer()
        self.freeze_encoder(config.freeze_encoder)
        self.freeze_upsampling(config.freeze_upsampling)

    def freeze_encoder(self, frozen: bool = True) -> None:
        """Stop (or restart) gradients to the encoder: multi-task fine-tuning trains only the estimator."""
        for p in self.encoder.parameters():
            p.requires_grad_(not frozen)

    def freeze_upsampling(self, frozen: bool = True) -> None:
        """Stop (or restart) gradients to the estimator's transposed convolutions (``up_context``)."""
        for level in self.levels:
            if level.up_context is not None:
                for p in level.up_context.parameters():
                    p.requires_grad_(not frozen)

    def _check_inputs(self, moving: torch.Tensor, fixed: torch.Tensor) -> None:
        c = self.config.in_channels
        for name, x in (("moving", moving), ("fixed", fixed)):
            if x.ndim != 5 or x.shape[1] != c:
                raise ValueError(f"PLCReg: {name} must be (B, {c}, D, H, W), got shape {tuple(x.shape)}")
        if moving.shape != fixed.shape:
            raise ValueError(f"PLCReg: moving and fixed must have the same shape, got "
                             f"{tuple(moving.shape)} and {tuple(fixed.shape)}")

    def input_size(self, size: Sequence[int]) -> tuple[int, ...]:
        """The grid the network computes on for inputs of ``size`` (padded, field cropped back)."""
        return padded_size(size)

    def checkpointed(self) -> bool:
        """Whether each estimator level recomputes its activations in the backward pass."""
        return self.config.grad_checkpointing and self.training

    def forward(self, moving: torch.Tensor, fixed: torch.Tensor, return_levels: bool = False):
        self._check_inputs(moving, fixed)
        size = moving.shape[2:]
        moving, fixed = pad_far_end(moving, padded_size(size)), pad_far_end(fixed, padded_size(size))
        kernels = select_kernels(moving)
        fields = self.level_fields(moving, fixed) if kernels is None else kernels.level_fields(self, moving, fixed)
        flow = fields[-1]
        if self.config.diffeomorphic:
            flow = integrate_velocity(flow, self.config.int_steps)
        flow = flow[:, :, :size[0], :size[1], :size[2]].contiguous()
        if self.config.released_compat:
            flow = released_sampling_field(flow)
        return (flow, fields) if return_levels else flow

    def level_fields(self, moving: torch.Tensor, fixed: torch.Tensor) -> list[torch.Tensor]:
        """The reference pass on padded inputs: [phi_5, ..., phi_1]."""
        b = moving.shape[0]
        feats = self.encoder(torch.cat([moving, fixed]))          # shared weights: one pass over both
        phi, context, fields = None, None, []
        for lvl in range(N_LEVELS, 0, -1):
            m, f = feats[lvl - 1].split(b)
            if phi is not None:
                phi = self.upsample_field(phi, m.shape[2:])
                m = self.transformer(m, phi)
            level = self.levels[lvl - 1]
            if self.checkpointed():
                phi, context = checkpoint(level, m, f, phi, context, use_reentrant=False)
            else:
                phi, context = level(m, f, phi, context)
            fields.append(phi)
        return fields

    def upsample_field(self, phi: torch.Tensor, size) -> torch.Tensor:
        """The coarse field on the next finer level's grid, in that level's voxels."""
        if self.config.released_compat:
            return upsample_displacement_released(phi)
        return resize_displacement(phi, size, align_corners=False)


@register_model("plcreg", display="PLCReg")
def build_plcreg(config: ModelConfig) -> PLCReg:
    return PLCReg(config)
