"""CPU inference kernels behind the blocks (models/blocks.py): oneDNN convolutions that
``torch.compile`` keeps whole, channels-last 2x average pooling, and the in-place blocked
InstanceNorm+ReLU. Each computes what a plain PyTorch call computes (tested against it in
float64); they exist for speed and memory on the CPU, never for other results.
"""
from __future__ import annotations

import torch


def channels_last(x: torch.Tensor) -> torch.Tensor:
    """(B, C, D, H, W) in channels-last memory order (no copy when it already is). The CPU
    inference path runs in it: oneDNN convolutions and trilinear sampling are markedly faster
    on it at full resolution, and PoLaCA's token layout is a view of it."""
    return x.contiguous(memory_format=torch.channels_last_3d)


@torch.library.custom_op("plcreg::onednn_conv3d", mutates_args=())
def onednn_conv3d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, padding: list[int],
                  stride: list[int], dilation: list[int], groups: int) -> torch.Tensor:
    """``torch.mkldnn_convolution`` as an operator ``torch.compile`` keeps whole: traced through,
    the compiler would hand the convolution back to PyTorch's kernel selection (and its slow
    kernel on small volumes). (B, C_in, D, H, W) -> (B, C_out, D', H', W'), computed and
    answered channels-last whatever the input's layout, so the compiler can foresee it."""
    return channels_last(torch.mkldnn_convolution(channels_last(x), weight, bias, padding, stride, dilation, groups))


@onednn_conv3d.register_fake
def _onednn_conv3d_shape(x, weight, bias, padding, stride, dilation, groups):
    spatial = [(n + 2 * p - d * (k - 1) - 1) // s + 1
               for n, k, p, s, d in zip(x.shape[2:], weight.shape[2:], padding, stride, dilation)]
    return x.new_empty((x.shape[0], weight.shape[0], *spatial)).contiguous(memory_format=torch.channels_last_3d)


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


def avg_pool2_channels_last(x: torch.Tensor) -> torch.Tensor:
    """``F.avg_pool3d(x, 2)`` for a channels-last (B, C, D, H, W) with even D, H, W, answered
    channels-last: three pairwise sums over the (B, D, H, W, C) view. PyTorch's CPU kernel
    would copy a channels-last input to contiguous first (4x slower at full resolution)."""
    t = x.permute(0, 2, 3, 4, 1)
    b, d, h, w, c = t.shape
    v = t.view(b, d // 2, 2, h // 2, 2, w // 2, 2, c)
    s = v[:, :, 0] + v[:, :, 1]
    s = s[:, :, :, 0] + s[:, :, :, 1]
    s = s[:, :, :, :, 0] + s[:, :, :, :, 1]
    return s.mul_(0.125).permute(0, 4, 1, 2, 3)


_HAS_ONEDNN = torch.backends.mkldnn.is_available()


def cpu_bf16_autocast() -> bool:
    """True inside ``torch.autocast("cpu", dtype=torch.bfloat16)``."""
    return torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16


def onednn_conv3d_bf16(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, padding, stride, dilation,
                       groups: int) -> torch.Tensor:
    """A oneDNN convolution in bf16, channels-last in and out (inference under CPU autocast):
    input and weights rounded to bf16, products accumulated in float32 by oneDNN, output bf16."""
    bf16 = torch.bfloat16
    y = torch.mkldnn_convolution(channels_last(x.to(bf16)), weight.to(bf16), None if bias is None else bias.to(bf16),
                                 padding, stride, dilation, groups)
    return channels_last(y)


def _onednn_supports(x: torch.Tensor, padding_mode: str, padding) -> bool:
    """Whether oneDNN can run a convolution of this CPU input with this padding."""
    return _HAS_ONEDNN and x.device.type == "cpu" and padding_mode == "zeros" and isinstance(padding, tuple)


def _onednn_applies(x: torch.Tensor, padding_mode: str, padding) -> bool:
    """Whether a float32 convolution (no autocast) can go to oneDNN directly."""
    return (_onednn_supports(x, padding_mode, padding) and x.dtype == torch.float32
            and not torch.is_autocast_enabled("cpu"))


_STAT_BLOCK = 4096          # voxels per partial sum of the in-place instance norm


def _voxels_by_channels(x: torch.Tensor) -> torch.Tensor | None:
    """A (B, N, C) view of a contiguous or channels-last (B, C, D, H, W) tensor (None otherwise)."""
    b, c = x.shape[:2]
    if x.is_contiguous():
        return x.view(b, c, -1).transpose(1, 2)
    if x.is_contiguous(memory_format=torch.channels_last_3d):
        return x.permute(0, 2, 3, 4, 1).view(b, -1, c)
    return None


def _sum_over_voxels(f: torch.Tensor, squares: bool = False) -> torch.Tensor:
    """Per-channel sum (of squares) of f (B, N, C) in float64 (B, C): float32 sums within
    blocks of ``_STAT_BLOCK`` voxels (and the remainder), float64 across them."""
    def part(t: torch.Tensor, dim: int) -> torch.Tensor:       # block sums accumulate in float32 at least
        acc = torch.promote_types(t.dtype, torch.float32)
        if squares:
            return torch.linalg.vector_norm(t, 2, dim=dim, dtype=acc).double().square_()
        return t.sum(dim=dim, dtype=acc).double()

    n = f.shape[1]
    blocks = n // _STAT_BLOCK
    total = part(f[:, :blocks * _STAT_BLOCK].unflatten(1, (blocks, _STAT_BLOCK)), 2).sum(dim=1) if blocks else 0.0
    if n % _STAT_BLOCK:
        total = total + part(f[:, blocks * _STAT_BLOCK:], 1)
    return total


def _instance_norm_relu_bf16(x: torch.Tensor, eps: float) -> torch.Tensor:
    """bf16 (B, C, D, H, W), one sample at a time: PyTorch's fused batch norm in training mode
    over a single sample is the instance norm; its bf16 kernel gathers the statistics in
    float32 in one pass over the channels-last data (no float32 copy of the features: about
    4x faster than block sums at full size). Returns a new tensor for one sample, writes in
    place for several."""
    def one(sample):
        return torch.native_batch_norm(sample, None, None, None, None, True, 0.0, eps)[0].relu_()

    if x.shape[0] == 1:
        return one(x)
    for b in range(x.shape[0]):
        x[b:b + 1].copy_(one(x[b:b + 1]))
    return x


def instance_norm_relu_(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """In place: ReLU(InstanceNorm(x)) over the spatial axes of (B, C, D, H, W), no affine.

    The same values as ``nn.InstanceNorm3d`` + ``nn.ReLU`` without a second full-size tensor;
    for inference only (it overwrites its input, which autograd may need). Contiguous and
    channels-last inputs keep their layout. A single bf16 sample is normalised into a new
    tensor (``_instance_norm_relu_bf16``): use the returned tensor.
    """
    f = _voxels_by_channels(x)
    if x.dtype == torch.bfloat16:
        return _instance_norm_relu_bf16(x, eps)
    if f is None:
        var, mean = torch.var_mean(x, dim=(2, 3, 4), unbiased=False, keepdim=True)
        return x.sub_(mean).mul_(torch.rsqrt(var + eps)).relu_()
    # statistics by blocks (two passes: mean, then squares about it): several times faster than
    # var_mean over the spatial axes on large volumes (most of all channels-last), as accurate
    n = f.shape[1]
    mean = _sum_over_voxels(f) / n
    f.sub_(mean.to(x.dtype).unsqueeze(1))
    var = _sum_over_voxels(f, squares=True) / n
    f.mul_(torch.rsqrt(var + eps).to(x.dtype).unsqueeze(1)).clamp_min_(0)
    return x
