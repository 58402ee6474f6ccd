"""Small convolutional building blocks of the encoder and the deformation estimator."""
from __future__ import annotations

import torch
import torch.nn as nn


class Conv3d(nn.Conv3d):
    """``nn.Conv3d`` that always takes oneDNN for float32 CPU inputs.

    PyTorch picks its native ``slow_conv3d`` kernel for single-sample volumes with
    batch * channels * D * H <= 20480 (a heuristic made for 2D), about 10x slower on
    the small volumes of quick runs and on the coarse levels. Same weights, same result.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (x.device.type == "cpu" and x.dtype == torch.float32 and self.padding_mode == "zeros"
                and isinstance(self.padding, tuple) and torch.backends.mkldnn.is_available()
                and torch.backends.mkldnn.enabled and not torch.is_autocast_enabled("cpu")):
            return torch.mkldnn_convolution(x, self.weight, self.bias, self.padding, self.stride,
                                            self.dilation, self.groups)
        return super().forward(x)


class ConvNormAct(nn.Sequential):
    """Conv3d 3^3 -> InstanceNorm3d -> ReLU. (B, C_in, D, H, W) -> (B, C_out, D, H, W)."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(
            Conv3d(in_channels, out_channels, 3, padding=1),
            nn.InstanceNorm3d(out_channels),
            nn.ReLU(inplace=True),
        )


class DoubleConv(nn.Sequential):
    """Two ConvNormAct units: the unit of every encoder level and estimator stage."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(ConvNormAct(in_channels, out_channels), ConvNormAct(out_channels, out_channels))


class UpConv(nn.Sequential):
    """ConvTranspose3d (kernel 2, stride 2) -> InstanceNorm3d -> ReLU: doubles the spatial size."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(
            nn.ConvTranspose3d(in_channels, out_channels, 2, stride=2),
            nn.InstanceNorm3d(out_channels),
            nn.ReLU(inplace=True),
        )


class FlowHead(Conv3d):
    """3^3 conv to a 3-channel displacement, weights N(0, 1e-5) and zero bias (near-identity start)."""

    def __init__(self, in_channels: int):
        super().__init__(in_channels, 3, 3, padding=1)
        with torch.no_grad():
            self.weight.normal_(0.0, 1e-5)
            self.bias.zero_()
