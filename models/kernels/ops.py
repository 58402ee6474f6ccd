"""CPU kernels: oneDNN convolutions (bf16, fused sums), channels-last 2x average pooling, the
in-place blocked InstanceNorm+ReLU, and trilinear warping of channels-last features by row
gathers for inference; for training, a channels-last InstanceNorm+ReLU and the pieces that keep
gradients channels-last. Each computes what a plain PyTorch call computes (tested against it in
float64); they exist for speed and memory on the CPU (figures: ``benchmarks/RESULTS.md``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from utils.spatial import displacement_to_grid


def is_channels_last(x: torch.Tensor) -> bool:
    """Whether (B, C, D, H, W) ``x`` is laid out channels-last and not also in the default order."""
    return x.is_contiguous(memory_format=torch.channels_last_3d) and not x.is_contiguous()


def channels_last(x: torch.Tensor) -> torch.Tensor:
    """(B, C, D, H, W) in channels-last memory order (no copy when it already is). The CPU
    inference path runs in it: oneDNN convolutions and trilinear sampling are markedly faster
    on it at full resolution, and PoLaCA's token layout is a view of it."""
    if x.shape[1] == 1 and x.is_contiguous():
        # one channel: the same memory is channels-last, but its strides do not say so, and
        # oneDNN would answer a contiguous output (a full-size reorder afterwards)
        b, _, d, h, w = x.shape
        return x.as_strided(x.shape, (d * h * w, 1, h * w, w, 1))
    return x.contiguous(memory_format=torch.channels_last_3d)


def _convolution_backward(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, has_bias: bool, geometry,
                          mask: list[bool]):
    """Gradients (x, weight, bias) of a convolution (not transposed) with ``geometry`` = (padding,
    stride, dilation, groups), each computed where ``mask`` asks for it (None otherwise)."""
    padding, stride, dilation, groups = geometry
    return torch.ops.aten.convolution_backward(grad, x, weight, [weight.shape[0]] if has_bias else None, stride,
                                               padding, dilation, False, [0] * len(padding), groups, mask)


def avg_pool2_channels_last(x: torch.Tensor) -> torch.Tensor:
    """``F.avg_pool3d(x, 2)`` for a channels-last (B, C, D, H, W) with even D, H, W, answered
    channels-last (PyTorch's kernel would copy it to contiguous first, and has no bf16 kernel).
    Float32 and bf16 go through oneDNN as a depthwise stride-2 convolution with taps 1/8
    (float32 sums, one rounding); other dtypes take three pairwise sums. With autograd the
    gradient is spread back by one broadcast copy."""
    if torch.is_grad_enabled() and x.requires_grad:
        return _AvgPool2ChannelsLast.apply(x)
    return _avg_pool2_channels_last(x)


class _AvgPool2ChannelsLast(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return _avg_pool2_channels_last(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        b, c, d, h, w = grad.shape
        out = torch.empty((b, c, 2 * d, 2 * h, 2 * w), dtype=grad.dtype, device=grad.device,
                          memory_format=torch.channels_last_3d)
        spread = out.permute(0, 2, 3, 4, 1).view(b, d, 2, h, 2, w, 2, c)
        spread.copy_((grad * 0.125).permute(0, 2, 3, 4, 1).view(b, d, 1, h, 1, w, 1, c).expand_as(spread))
        return out


def _avg_pool2_channels_last(x: torch.Tensor) -> torch.Tensor:
    c = x.shape[1]
    if x.dtype in (torch.float32, torch.bfloat16) and _HAS_ONEDNN and torch.backends.mkldnn.enabled:
        taps = torch.full((c, 1, 2, 2, 2), 0.125, dtype=x.dtype)
        return channels_last(torch.mkldnn_convolution(channels_last(x), taps, None, (0, 0, 0), (2, 2, 2), (1, 1, 1), c))
    t = x.permute(0, 2, 3, 4, 1)
    b, d, h, w, c = t.shape
    v = t.view(b, d // 2, 2, h // 2, 2, w // 2, 2, c)
    s = v[:, :, 0] + v[:, :, 1]
    s = s[:, :, :, 0] + s[:, :, :, 1]
    s = s[:, :, :, :, 0] + s[:, :, :, :, 1]
    return s.mul_(0.125).permute(0, 4, 1, 2, 3)


_HAS_ONEDNN = torch.backends.mkldnn.is_available()


def onednn_conv3d_bf16(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, padding, stride, dilation,
                       groups: int) -> torch.Tensor:
    """A oneDNN convolution in bf16, channels-last in and out (inference under CPU autocast):
    input and weights rounded to bf16, products accumulated in float32 by oneDNN, output bf16."""
    bf16 = torch.bfloat16
    if groups == 1 and x.shape[1] < _MIN_BF16_CHANNELS:
        x, weight = _zero_channels(x, weight, _MIN_BF16_CHANNELS)
    y = torch.mkldnn_convolution(channels_last(x.to(bf16)), weight.to(bf16), None if bias is None else bias.to(bf16),
                                 padding, stride, dilation, groups)
    return channels_last(y)


_MIN_BF16_CHANNELS = 4      # with fewer input channels oneDNN's bf16 kernels are slower


def _zero_channels(x: torch.Tensor, weight: torch.Tensor, channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x (B, C, D, H, W) and weight (O, C, k, k, k) with zero input channels added up to
    ``channels`` (bf16, x channels-last): the same convolution, a faster oneDNN kernel."""
    b, c = x.shape[:2]
    padded = torch.zeros((b, *x.shape[2:], channels), dtype=torch.bfloat16, device=x.device)
    padded[..., :c] = x.permute(0, 2, 3, 4, 1)
    extra = weight.new_zeros((weight.shape[0], channels - c, *weight.shape[2:]))
    return padded.permute(0, 4, 1, 2, 3), torch.cat([weight, extra], dim=1)


_HAS_FUSED_ADD = _HAS_ONEDNN and hasattr(torch.ops.mkldnn, "_convolution_pointwise_")


def onednn_conv3d_add_(out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, padding, stride, dilation,
                       groups: int) -> torch.Tensor:
    """``out += conv3d(x, weight)`` in place (no bias), by oneDNN's convolution with a fused sum:
    no new tensor for the product (a fresh full-size output costs its page faults) and no
    second pass to add it. ``out``: channels-last (B, C_out, D', H', W'), float32 or bf16;
    x and weight are taken in out's dtype."""
    dtype = out.dtype
    return torch.ops.mkldnn._convolution_pointwise_.binary(
        out, channels_last(x.to(dtype)), weight.to(dtype), None, list(padding), list(stride), list(dilation), groups,
        "add", 1.0, None, [], None)


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
    blocks of ``_STAT_BLOCK`` voxels (and the remainder), float64 across them. Sums of squares
    of channels-last float data are the diagonals of the blocks' Gram matrices (one matrix
    product per block: faster than ``vector_norm`` and more accurate)."""
    gram = squares and f.stride(-1) == 1 and f.dtype in (torch.float32, torch.float64)

    def part(t: torch.Tensor, dim: int) -> torch.Tensor:       # block sums accumulate in float32 at least
        acc = torch.promote_types(t.dtype, torch.float32)
        if gram:
            return torch.matmul(t.mT, t).diagonal(dim1=-2, dim2=-1).double()
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
    """bf16 (B, C, D, H, W) in place, one sample at a time: PyTorch's fused batch norm in
    training mode over a single sample is the instance norm; its bf16 kernel gathers the
    statistics in float32 in one pass over the channels-last data (no float32 copy) and, given
    its input as ``out``, writes each value where it read it."""
    mean, invstd = x.new_empty(x.shape[1]), x.new_empty(x.shape[1])
    for b in range(x.shape[0]):
        sample = x[b:b + 1]
        torch.ops.aten.native_batch_norm.out(sample, None, None, None, None, True, 0.0, eps,
                                             out=sample, save_mean=mean, save_invstd=invstd)
    return x.relu_()


def instance_norm_relu_(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """In place: ReLU(InstanceNorm(x)) over the spatial axes of (B, C, D, H, W), no affine.

    The same values as ``nn.InstanceNorm3d`` + ``nn.ReLU`` without a second full-size tensor;
    for inference only (it overwrites its input, which autograd may need). Contiguous and
    channels-last inputs keep their layout.
    """
    f = _voxels_by_channels(x)
    if x.dtype == torch.bfloat16 and f is not None:
        return _instance_norm_relu_bf16(x, eps)
    if f is None:
        var, mean = torch.var_mean(x, dim=(2, 3, 4), unbiased=False, keepdim=True)
        return x.sub_(mean).mul_(torch.rsqrt(var + eps)).relu_()
    return _normalise_by_blocks(x, eps, in_place=True)[0].relu_()


def _normalise_by_blocks(x: torch.Tensor, eps: float, in_place: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x - mean) / std`` per sample and channel of a contiguous or channels-last (B, C, D, H, W)
    (in ``x`` itself, or a new tensor of its layout), and 1/std (B, C) in float64. Statistics by
    blocks (two passes: mean, then squares about it): several times faster than var_mean over
    the spatial axes on large volumes (most of all channels-last), as accurate."""
    n = x[0, 0].numel()
    mean = (_sum_over_voxels(_voxels_by_channels(x)) / n).to(x.dtype)[:, :, None, None, None]
    y = x.sub_(mean) if in_place else x - mean
    rstd = torch.rsqrt(_sum_over_voxels(_voxels_by_channels(y), squares=True) / n + eps)
    y.mul_(rstd.to(x.dtype)[:, :, None, None, None])
    return y, rstd


class _InstanceNormReLUFloat32(torch.autograd.Function):
    """ReLU(InstanceNorm(x)) of a float32 channels-last (B, C, D, H, W) with statistics by
    blocks (:func:`_normalise_by_blocks`, as the inference norm); saves only the normalised
    values and 1/std. With g' = g [x_hat > 0] the gradient is
    (g' - mean(g') - x_hat mean(g' x_hat)) / std."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, eps: float) -> torch.Tensor:
        x_hat, rstd = _normalise_by_blocks(x, eps, in_place=False)
        rstd = rstd.to(x.dtype)
        ctx.save_for_backward(x_hat, rstd)
        return x_hat.relu()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x_hat, rstd = ctx.saved_tensors
        g = torch.ops.aten.threshold_backward(grad, x_hat, 0.0)
        # PyTorch's fused batch-norm backward of a sample with mean 0, 1/std 1 and weight 1/std
        # is that formula in one pass (its sums in float32, fine for a gradient)
        c = x_hat.shape[1]
        zeros, ones = x_hat.new_zeros(c), x_hat.new_ones(c)
        parts = [torch.ops.aten.native_batch_norm_backward(g[b:b + 1], x_hat[b:b + 1], rstd[b], None, None, zeros,
                                                           ones, True, 0.0, [True, False, False])[0]
                 for b in range(x_hat.shape[0])]
        return (parts[0] if len(parts) == 1 else torch.cat(parts)), None


def instance_norm_relu_channels_last(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """ReLU(InstanceNorm(x)) (no affine) of a channels-last (B, C, D, H, W) tensor with autograd,
    answered channels-last (``F.instance_norm`` would copy it to contiguous). In bf16, PyTorch's
    batch norm of one sample with batch statistics; in float32 block sums
    (:class:`_InstanceNormReLUFloat32`), as that kernel's one-pass float32 sums lose accuracy
    on channels with a large mean."""
    if x.dtype == torch.float32:
        return _InstanceNormReLUFloat32.apply(x, eps)
    if x.shape[0] == 1:
        return F.batch_norm(x, None, None, training=True, eps=eps).relu_()
    # split rather than indexed: the samples' gradients meet in one concatenation, where slices
    # would each fill a full-size zero tensor (in the default layout) and sum them
    return torch.cat([F.batch_norm(sample, None, None, training=True, eps=eps) for sample in x.split(1)]).relu_()


class _Float32ConvOfLowPrecision(torch.autograd.Function):
    """A float32 convolution of a bf16/fp16 input that saves the input, not its float32 copy."""

    @staticmethod
    def forward(ctx, x, weight, bias, padding, stride, dilation, groups):
        ctx.save_for_backward(x, weight)
        ctx.geometry, ctx.has_bias = (list(padding), list(stride), list(dilation), groups), bias is not None
        with torch.autocast("cpu", enabled=False):
            return torch.mkldnn_convolution(x.float(), weight, bias, padding, stride, dilation, groups)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        wants = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.has_bias and ctx.needs_input_grad[2]]
        grad_x, grad_w, grad_b = _convolution_backward(grad, x.float(), weight, ctx.has_bias, ctx.geometry, wants)
        return (grad_x.to(x.dtype) if grad_x is not None else None), grad_w, grad_b, None, None, None, None


def float32_conv3d_saving_input(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, padding,
                                stride, dilation, groups: int) -> torch.Tensor:
    """``F.conv3d(x.float(), weight, bias, ...)`` through oneDNN for a bf16 (or fp16) ``x`` on the
    CPU, whose backward makes the float32 copy again instead of keeping it (the flow heads
    under CPU autocast: a float32 copy of full-size features held until the backward pass).
    The input's gradient comes back in its dtype. x: (B, C_in, D, H, W); float32 weight and bias."""
    return _Float32ConvOfLowPrecision.apply(x, weight, bias, padding, stride, dilation, groups)


_GATHER_CHUNK = 1 << 16     # output voxels per chunk of warp_by_gather (whole slices along D)


def _axis_corners(s: torch.Tensor, size: int, stride: int):
    """Both trilinear corners of sampling coordinates ``s`` (n,) along one axis of ``size``
    voxels: weights ``(w0, w1)`` float32 and row offsets ``(o0, o1)`` int32 (index x ``stride``).
    A corner outside [0, size - 1] gets weight 0 (zero padding) and a clamped offset;
    coordinates that are not finite sample outside the volume."""
    s = s.nan_to_num(nan=-2.0, posinf=size + 1.0, neginf=-2.0).clamp_(-2.0, size + 1.0)
    fl = s.floor()
    fr = s.sub_(fl)
    inside0 = (fl + 1).clamp_(0, 1).mul_((size - fl).clamp_(0, 1))          # 0 <= fl <= size - 1
    inside1 = (fl + 2).clamp_(0, 1).mul_((size - 1 - fl).clamp_(0, 1))      # 0 <= fl + 1 <= size - 1
    weights = ((1 - fr).mul_(inside0), fr.mul_(inside1))
    offsets = (fl.clamp(0, size - 1).to(torch.int32), fl.add_(1).clamp_(0, size - 1).to(torch.int32))
    if stride != 1:
        offsets = (offsets[0].mul_(stride), offsets[1].mul_(stride))
    return weights, offsets


def warp_by_gather(features: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """``utils.spatial.warp(features, u)`` (trilinear, zero padding) for CPU inference, in the
    features' dtype (float32 or bf16), answered channels-last.

    features: (B, C, D, H, W); u: (B, 3, D, H, W) float32 displacement in voxels. Each output
    voxel is a weighted sum of 8 rows of the channels-last (voxels, C) table, which
    ``F.embedding_bag`` computes in one pass (float32 accumulation): faster than
    ``grid_sample``, and no float32 copy of bf16 features. For bf16 features each weight is
    passed as the sum of two bf16 numbers (the second the first's rounding error), so the
    weights hold 16 significant bits and the only bf16 rounding left is the output's.
    """
    if u.dtype != torch.float32:
        raise ValueError(f"warp_by_gather: expected a float32 displacement, got {u.dtype}")
    b, c, d, h, w = features.shape
    if u.shape != (b, 3, d, h, w):
        raise ValueError(f"warp_by_gather: expected a displacement of shape {(b, 3, d, h, w)}, got {tuple(u.shape)}")
    if d * h * w >= 2 ** 31:
        raise ValueError(f"warp_by_gather: volumes of at most 2**31 voxels, got {(d, h, w)}")
    hw = h * w
    in_plane = (torch.arange(h, dtype=torch.float32).repeat_interleave(w), torch.arange(w, dtype=torch.float32).repeat(h))
    slab = max(1, _GATHER_CHUNK // hw)
    split = features.dtype in (torch.bfloat16, torch.float16)
    bag = 16 if split else 8
    out = torch.empty((b, d, h, w, c), dtype=features.dtype)
    # per-chunk buffers made once: a new tensor of a megabyte or more is fresh memory, whose
    # page faults would cost more than the arithmetic
    most = slab * hw
    corner_w_buf, corner_o_buf = torch.empty((8, most)), torch.empty((8, most), dtype=torch.int32)
    index_buf, weights_buf = torch.empty((most, bag), dtype=torch.int32), torch.empty((most, bag), dtype=features.dtype)
    high_buf = torch.empty((8, most), dtype=features.dtype) if split else None
    for i in range(b):
        table = features[i].permute(1, 2, 3, 0).reshape(-1, c)      # a view when channels-last
        rows = out[i].view(-1, c)
        for d0 in range(0, d, slab):
            d1 = min(d, d0 + slab)
            n = (d1 - d0) * hw
            field = u[i, :, d0:d1].reshape(3, -1, hw)
            z = field[0] + torch.arange(d0, d1, dtype=torch.float32).unsqueeze(1)
            (wz, oz), (wy, oy), (wx, ox) = (_axis_corners(z.view(-1), d, hw),
                                            _axis_corners((field[1] + in_plane[0]).view(-1), h, w),
                                            _axis_corners((field[2] + in_plane[1]).view(-1), w, 1))
            # the 8 corners as rows, then one transposing copy into (n, bag) bags
            corner_w, corner_o = corner_w_buf[:, :n], corner_o_buf[:, :n]
            for k, (a, b_) in enumerate((a, b_) for a in range(2) for b_ in range(2)):
                wzy, ozy = wz[a] * wy[b_], oz[a] + oy[b_]
                for cc in range(2):
                    torch.mul(wzy, wx[cc], out=corner_w[2 * k + cc])
                    torch.add(ozy, ox[cc], out=corner_o[2 * k + cc])
            index, weights = index_buf[:n], weights_buf[:n]
            index.t()[:8].copy_(corner_o)
            if split:
                index.t()[8:].copy_(corner_o)
                high = high_buf[:, :n]
                high.copy_(corner_w)
                weights.t()[:8].copy_(high)
                weights.t()[8:].copy_(corner_w.sub_(high))
            else:
                weights.t().copy_(corner_w)
            rows[d0 * hw:d1 * hw] = F.embedding_bag(index, table, per_sample_weights=weights, mode="sum")
    return out.permute(0, 4, 1, 2, 3)


def _grid_sample_backward_threaded(grad: torch.Tensor, features: torch.Tensor, grid: torch.Tensor,
                                   mask: list[bool]):
    """``aten.grid_sampler_3d_backward`` (trilinear, zero padding, aligned corners) on all threads:
    PyTorch's CPU kernel shares out only the batch, so the output slabs along D become a batch
    of ``t`` (the features broadcast, not copied), and the ``t`` partial feature gradients are
    summed. grad (1, C, D, H, W), features (1, C, d, h, w), grid (1, D, H, W, 3)."""
    threads, depth = torch.get_num_threads(), grid.shape[1]
    t = max(n for n in range(1, threads + 1) if depth % n == 0) if features.shape[0] == 1 else 1
    if t == 1:
        return torch.ops.aten.grid_sampler_3d_backward(grad, features, grid, 0, 0, True, mask)
    grad_features, grad_grid = torch.ops.aten.grid_sampler_3d_backward(
        torch.cat(grad.chunk(t, 2)), features.expand(t, -1, -1, -1, -1), torch.cat(grid.chunk(t, 1)), 0, 0, True, mask)
    if grad_features is not None:
        grad_features = grad_features.sum(0, keepdim=True)
    if grad_grid is not None:
        grad_grid = torch.cat(grad_grid.unbind(0)).unsqueeze(0)
    return grad_features, grad_grid


class _GatherWarpFloat32(torch.autograd.Function):
    """Forward: ``warp_by_gather`` of the features in float32. Backward: PyTorch's
    ``grid_sampler_3d`` backward (the same trilinear function) on all threads, the features'
    gradient returned channels-last in their dtype. Saves only the features and the
    displacement, which their other uses hold anyway, not the float32 copy and grid
    ``grid_sample`` saves."""

    @staticmethod
    def forward(ctx, features: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(features, u)
        return warp_by_gather(features.float(), u)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        features, u = ctx.saved_tensors
        wants_features, wants_u = ctx.needs_input_grad[:2]
        with torch.enable_grad():
            u_ = u.detach().requires_grad_(wants_u)
            grid = displacement_to_grid(u_)
        grad_features, grad_grid = _grid_sample_backward_threaded(grad, features.float(), grid.detach(),
                                                                  [wants_features, wants_u])
        grad_u = torch.autograd.grad(grid, u_, grad_grid)[0] if wants_u else None
        if wants_features:
            grad_features = grad_features.to(dtype=features.dtype, memory_format=torch.channels_last_3d)
        return grad_features, grad_u


def warp_by_gather_with_grad(features: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """``utils.spatial.warp(features, u)`` for CPU training: float32 output (as autocast's
    ``grid_sample`` gives), computed by ``warp_by_gather`` and differentiable in both
    arguments, the features' gradient channels-last.

    features: (B, C, D, H, W) float32 or bf16 (channels-last for speed); u: (B, 3, D, H, W)
    float32 displacement in voxels. Returns (B, C, D, H, W) float32, channels-last."""
    return _GatherWarpFloat32.apply(features, u)
