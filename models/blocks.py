"""Small convolutional building blocks of the encoder and the deformation estimator.

Without autograd on the CPU they run the inference kernels of ``models/cpu_kernels.py``
(channels-last oneDNN convolutions, in-place norms); with autograd, plain PyTorch layers.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .cpu_kernels import (_HAS_FUSED_ADD, _onednn_applies, _onednn_supports, autocast_dtype, channels_last,
                          cpu_bf16_autocast, float32_conv3d_saving_input, instance_norm_relu_,
                          instance_norm_relu_channels_last, is_channels_last, onednn_conv3d, onednn_conv3d_add_,
                          onednn_conv3d_bf16)


class Conv3d(nn.Conv3d):
    """``nn.Conv3d`` that always takes oneDNN for float32 CPU inputs.

    PyTorch picks its native ``slow_conv3d`` kernel for single-sample volumes with
    batch * channels * D * H <= 20480 (a heuristic made for 2D), about 10x slower on
    the small volumes of quick runs and on the coarse levels. Same weights, same result.
    Without autograd it takes and returns channels-last (see :func:`channels_last`); under
    ``torch.autocast("cpu", dtype=torch.bfloat16)`` it then computes in bf16. Under
    ``torch.compile`` the call goes through the :func:`onednn_conv3d` operator.
    """

    def _eager_onednn(self, x: torch.Tensor) -> bool:
        """Whether this CPU input can go to oneDNN directly, outside ``torch.compile`` tracing."""
        return (_onednn_supports(x, self.padding_mode, self.padding) and torch.backends.mkldnn.enabled
                and not torch.compiler.is_compiling())

    def _bf16_inference(self, x: torch.Tensor) -> bool:
        """The eager bf16 oneDNN path (under ``torch.compile`` autocast's convolution is traced instead)."""
        return not torch.is_grad_enabled() and cpu_bf16_autocast() and self._eager_onednn(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_with(x, self.weight, self.bias)

    def forward_with(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """This convolution's geometry with the given weight and bias."""
        if torch.compiler.is_compiling():
            if _onednn_applies(x, self.padding_mode, self.padding):
                return onednn_conv3d(x, weight, bias, list(self.padding), list(self.stride),
                                     list(self.dilation), self.groups)
        elif self._bf16_inference(x):
            return onednn_conv3d_bf16(x, weight, bias, self.padding, self.stride, self.dilation, self.groups)
        elif _onednn_applies(x, self.padding_mode, self.padding) and torch.backends.mkldnn.enabled:
            if torch.is_grad_enabled():
                return torch.mkldnn_convolution(x, weight, bias, self.padding, self.stride, self.dilation, self.groups)
            # inference: channels-last in and out
            y = torch.mkldnn_convolution(channels_last(x), weight, bias, self.padding, self.stride, self.dilation,
                                         self.groups)
            return channels_last(y)
        return self._conv_forward(x, weight, bias)

    def add_to_(self, out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """``out += conv(x)`` with the given weight and no bias; in place, fused into the
        convolution for CPU inference (bf16 under CPU autocast, else float32, out channels-last)."""
        if self._bf16_inference(x):
            fusable = out.dtype == torch.bfloat16
        else:
            fusable = (out.dtype == torch.float32 and _onednn_applies(x, self.padding_mode, self.padding)
                       and not torch.is_grad_enabled() and torch.backends.mkldnn.enabled)
        if (fusable and _HAS_FUSED_ADD and not torch.compiler.is_compiling()
                and out.is_contiguous(memory_format=torch.channels_last_3d)):
            return onednn_conv3d_add_(out, x, weight, self.padding, self.stride, self.dilation, self.groups)
        return out.add_(self.forward_with(x, weight, None))


class _LayerNormAct(nn.Sequential):
    """layer -> InstanceNorm3d -> ReLU; without autograd the norm and ReLU run in place, and
    CPU training keeps a channels-last layer output channels-last through them."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        layer, norm, act = self
        if norm.affine or norm.track_running_stats:
            return super().forward(x)
        y = layer(x)
        if not torch.is_grad_enabled():
            return instance_norm_relu_(y, norm.eps)
        if y.device.type == "cpu" and is_channels_last(y) and not torch.compiler.is_compiling():
            return instance_norm_relu_channels_last(y, norm.eps)
        return act(norm(y))


class ConvNormAct(_LayerNormAct):
    """Conv3d 3^3 -> InstanceNorm3d -> ReLU. (B, C_in, D, H, W) -> (B, C_out, D, H, W)."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(
            Conv3d(in_channels, out_channels, 3, padding=1),
            nn.InstanceNorm3d(out_channels),
            nn.ReLU(inplace=True),
        )


def _materialised(parts: list) -> list[torch.Tensor]:
    return [part() if callable(part) else part for part in parts]


def conv_of_parts(conv: nn.Conv3d, parts: list) -> torch.Tensor:
    """``conv(torch.cat(parts, dim=1))`` without building the concatenation: one convolution per
    part with its slice of the weights, each added in place to the first one's result (fused into
    the convolution on the CPU; same values; no full-size input copy).

    Consumes the list: each entry is let go once its convolution is done, and an entry may be
    a function that makes the part, called only when its turn comes, so that a part the caller
    no longer holds is freed before the next one exists."""
    out, start = None, 0
    for i in range(len(parts)):
        part = parts[i]() if callable(parts[i]) else parts[i]
        parts[i] = None
        stop = start + part.shape[1]
        weight = conv.weight[:, start:stop]
        if out is None:
            out = (conv.forward_with(part, weight, conv.bias) if isinstance(conv, Conv3d)
                   else conv._conv_forward(part, weight, conv.bias))
        elif isinstance(conv, Conv3d):
            out = conv.add_to_(out, part, weight)
        else:
            out = out.add_(conv._conv_forward(part, weight, None))
        del part
        start = stop
    if start != conv.in_channels:
        raise ValueError(f"conv_of_parts: parts have {start} channels, the convolution takes {conv.in_channels}")
    return out


class DoubleConv(nn.Sequential):
    """Two ConvNormAct units: the unit of every encoder level and estimator stage."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(ConvNormAct(in_channels, out_channels), ConvNormAct(out_channels, out_channels))

    def forward_parts(self, parts: list) -> torch.Tensor:
        """``self(torch.cat(parts, dim=1))`` (an entry may be a function making the part); without
        autograd the concatenation is never built and the list is consumed (:func:`conv_of_parts`)."""
        if torch.is_grad_enabled():
            parts = _materialised(parts)
            # under autocast the convolution rounds its input to that dtype anyway: the same
            # values, and no float32 concatenation (float32 parts such as fields would promote
            # the whole). On the CPU, channels-last: one part in the default layout (a field)
            # would make the concatenation so, and every layer after it slower in oneDNN.
            dtype = autocast_dtype(parts[0].device.type)
            layout = torch.channels_last_3d if parts[0].device.type == "cpu" else torch.preserve_format
            parts = [part.to(dtype=dtype or part.dtype, memory_format=layout) for part in parts]
            return self(torch.cat(parts, dim=1))
        first, second = self
        conv, norm, _ = first
        return second(instance_norm_relu_(conv_of_parts(conv, parts), norm.eps))


class UpConv(_LayerNormAct):
    """ConvTranspose3d (kernel 2, stride 2) -> InstanceNorm3d -> ReLU: doubles the spatial size."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(
            nn.ConvTranspose3d(in_channels, out_channels, 2, stride=2),
            nn.InstanceNorm3d(out_channels),
            nn.ReLU(inplace=True),
        )


class FlowHead(Conv3d):
    """3^3 conv to a 3-channel displacement, weights N(0, 1e-5) and zero bias (near-identity start).

    Returns float32 under mixed precision too: fields are summed over levels and warp with
    sub-voxel precision. In bf16 CPU inference the products run in bf16 through oneDNN
    (float32 accumulation; the 3-channel result rounded to bf16, a relative 0.4 %, then the
    bias added in float32): computing it in float32 cost as much as four bf16 convolutions of
    the level. Elsewhere under autocast it computes in float32."""

    def __init__(self, in_channels: int):
        super().__init__(in_channels, 3, 3, padding=1)
        with torch.no_grad():
            self.weight.normal_(0.0, 1e-5)
            self.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._bf16_inference(x):
            y = onednn_conv3d_bf16(x, self.weight, None, self.padding, self.stride, self.dilation, self.groups)
            return y.float().add_(self.bias.view(1, -1, 1, 1, 1))
        if x.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
            if (torch.is_grad_enabled() and x.dtype in (torch.bfloat16, torch.float16)
                    and self.weight.dtype == torch.float32 and self._eager_onednn(x)):
                return float32_conv3d_saving_input(x, self.weight, self.bias, self.padding, self.stride, self.dilation,
                                                   self.groups)
            with torch.autocast("cpu", enabled=False):
                return super().forward(x.float())
        return super().forward(x)
