"""Small convolutional building blocks of the encoder and the deformation estimator."""
from __future__ import annotations

import torch
import torch.nn as nn


@torch.library.custom_op("plcreg::onednn_conv3d", mutates_args=())
def onednn_conv3d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, padding: list[int],
                  stride: list[int], dilation: list[int], groups: int) -> torch.Tensor:
    """``torch.mkldnn_convolution`` as an operator ``torch.compile`` keeps whole: traced through,
    the compiler would hand the convolution back to PyTorch's kernel selection (and its slow
    kernel on small volumes). (B, C_in, D, H, W) -> (B, C_out, D', H', W'), always contiguous
    (oneDNN would answer a channels-last input in kind, which the compiler cannot foresee)."""
    return torch.mkldnn_convolution(x.contiguous(), weight, bias, padding, stride, dilation, groups).contiguous()


@onednn_conv3d.register_fake
def _onednn_conv3d_shape(x, weight, bias, padding, stride, dilation, groups):
    spatial = [(n + 2 * p - d * (k - 1) - 1) // s + 1
               for n, k, p, s, d in zip(x.shape[2:], weight.shape[2:], padding, stride, dilation)]
    return x.new_empty((x.shape[0], weight.shape[0], *spatial))


def _onednn_conv3d_save(ctx, inputs, output):
    x, weight, bias, padding, stride, dilation, groups = inputs
    ctx.save_for_backward(x, weight)
    ctx.geometry = (bias is not None, padding, stride, dilation, groups)


def _onednn_conv3d_backward(ctx, grad):
    x, weight = ctx.saved_tensors
    has_bias, padding, stride, dilation, groups = ctx.geometry
    gx, gw, gb = torch.ops.aten.convolution_backward(
        grad, x, weight, [weight.shape[0]] if has_bias else None, stride, padding, dilation,
        False, [0, 0, 0], groups, [ctx.needs_input_grad[0], ctx.needs_input_grad[1], has_bias])
    return gx, gw, gb, None, None, None, None


onednn_conv3d.register_autograd(_onednn_conv3d_backward, setup_context=_onednn_conv3d_save)


_HAS_ONEDNN = torch.backends.mkldnn.is_available()


def _onednn_applies(x: torch.Tensor, padding_mode: str, padding) -> bool:
    """Whether a convolution with this input and padding can go to oneDNN directly."""
    return (_HAS_ONEDNN and x.device.type == "cpu" and x.dtype == torch.float32 and padding_mode == "zeros"
            and isinstance(padding, tuple) and not torch.is_autocast_enabled("cpu"))


class Conv3d(nn.Conv3d):
    """``nn.Conv3d`` that always takes oneDNN for float32 CPU inputs.

    PyTorch picks its native ``slow_conv3d`` kernel for single-sample volumes with
    batch * channels * D * H <= 20480 (a heuristic made for 2D), about 10x slower on
    the small volumes of quick runs and on the coarse levels. Same weights, same result.
    Under ``torch.compile`` the call goes through the :func:`onednn_conv3d` operator.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_with(x, self.weight, self.bias)

    def forward_with(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """This convolution's geometry with the given weight and bias."""
        if torch.compiler.is_compiling():
            if _onednn_applies(x, self.padding_mode, self.padding):
                return onednn_conv3d(x, weight, bias, list(self.padding), list(self.stride),
                                     list(self.dilation), self.groups)
        elif _onednn_applies(x, self.padding_mode, self.padding) and torch.backends.mkldnn.enabled:
            return torch.mkldnn_convolution(x, weight, bias, self.padding, self.stride, self.dilation, self.groups)
        return self._conv_forward(x, weight, bias)


_STAT_BLOCK = 4096          # voxels per partial sum of the in-place instance norm


def instance_norm_relu_(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """In place: ReLU(InstanceNorm(x)) over the spatial axes of (B, C, D, H, W), no affine.

    The same values as ``nn.InstanceNorm3d`` + ``nn.ReLU`` without a second full-size tensor;
    for inference only (it overwrites its input, which autograd may need).
    """
    b, c = x.shape[:2]
    n = x[0, 0].numel()
    if n % _STAT_BLOCK or not x.is_contiguous():
        var, mean = torch.var_mean(x, dim=(2, 3, 4), unbiased=False, keepdim=True)
        return x.sub_(mean).mul_(torch.rsqrt(var + eps)).relu_()
    # statistics by blocks: float32 sums within blocks, float64 across them; about 3.5x faster
    # than var_mean over the spatial axes on large volumes, and at least as accurate
    f = x.view(b * c, n // _STAT_BLOCK, _STAT_BLOCK)
    mean = f.sum(dim=2).double().sum(dim=1) / n
    f.sub_(mean.to(x.dtype).view(-1, 1, 1))
    var = torch.linalg.vector_norm(f, 2, dim=2).double().square_().sum(dim=1) / n
    f.mul_(torch.rsqrt(var + eps).to(x.dtype).view(-1, 1, 1)).clamp_min_(0)
    return x


class _LayerNormAct(nn.Sequential):
    """layer -> InstanceNorm3d -> ReLU; without autograd the norm and ReLU run in place."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        layer, norm, _ = self
        if torch.is_grad_enabled() or norm.affine or norm.track_running_stats:
            return super().forward(x)
        return instance_norm_relu_(layer(x), norm.eps)


class ConvNormAct(_LayerNormAct):
    """Conv3d 3^3 -> InstanceNorm3d -> ReLU. (B, C_in, D, H, W) -> (B, C_out, D, H, W)."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(
            Conv3d(in_channels, out_channels, 3, padding=1),
            nn.InstanceNorm3d(out_channels),
            nn.ReLU(inplace=True),
        )


def conv_of_parts(conv: nn.Conv3d, parts: list[torch.Tensor]) -> torch.Tensor:
    """``conv(torch.cat(parts, dim=1))`` without building the concatenation: one convolution per
    part with its slice of the weights, summed in place (same values; no full-size input copy)."""
    out, start = None, 0
    for part in parts:
        stop = start + part.shape[1]
        weight, bias = conv.weight[:, start:stop], conv.bias if out is None else None
        y = conv.forward_with(part, weight, bias) if isinstance(conv, Conv3d) else conv._conv_forward(part, weight, bias)
        out = y if out is None else out.add_(y)
        del y
        start = stop
    if start != conv.in_channels:
        raise ValueError(f"conv_of_parts: parts have {start} channels, the convolution takes {conv.in_channels}")
    return out


class DoubleConv(nn.Sequential):
    """Two ConvNormAct units: the unit of every encoder level and estimator stage."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(ConvNormAct(in_channels, out_channels), ConvNormAct(out_channels, out_channels))

    def forward_parts(self, parts: list[torch.Tensor]) -> torch.Tensor:
        """``self(torch.cat(parts, dim=1))``; without autograd the concatenation is never built."""
        if torch.is_grad_enabled():
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
    """3^3 conv to a 3-channel displacement, weights N(0, 1e-5) and zero bias (near-identity start)."""

    def __init__(self, in_channels: int):
        super().__init__(in_channels, 3, 3, padding=1)
        with torch.no_grad():
            self.weight.normal_(0.0, 1e-5)
            self.bias.zero_()
