"""Convolutional building blocks of the encoder and the deformation estimator (reference).

Plain PyTorch layers; the CPU kernels (``models/kernels``) read these modules' weights and
settings and compute the same function faster where they apply.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn as nn


def activation() -> nn.Module:
    """The nonlinearity after every instance norm."""
    return nn.ReLU(inplace=True)


def autocast_off(device_type: str):
    """A context without autocast on ``device_type`` (nothing to switch off on a device that has
    none, such as "meta")."""
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


class ConvNormAct(nn.Sequential):
    """Conv3d 3^3 -> InstanceNorm3d -> activation. (B, C_in, D, H, W) -> (B, C_out, D, H, W)."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(nn.Conv3d(in_channels, out_channels, 3, padding=1), nn.InstanceNorm3d(out_channels),
                         activation())


class DoubleConv(nn.Sequential):
    """Two ConvNormAct units: the unit of every encoder level and estimator stage."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(ConvNormAct(in_channels, out_channels), ConvNormAct(out_channels, out_channels))


class UpConv(nn.Sequential):
    """ConvTranspose3d (kernel 2, stride 2) -> InstanceNorm3d -> activation: doubles the spatial size."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(nn.ConvTranspose3d(in_channels, out_channels, 2, stride=2), nn.InstanceNorm3d(out_channels),
                         activation())


class FlowHead(nn.Conv3d):
    """3^3 conv to a 3-channel displacement, weights N(0, 1e-5) and zero bias (near-identity
    start). (B, C, D, H, W) -> (B, 3, D, H, W) in the weights' dtype: under mixed precision the
    field stays float32, as fields are summed over levels and warp with sub-voxel precision."""

    def __init__(self, in_channels: int):
        super().__init__(in_channels, 3, 3, padding=1)
        with torch.no_grad():
            self.weight.normal_(0.0, 1e-5)
            self.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with autocast_off(x.device.type):
            return super().forward(x.to(self.weight.dtype))
