"""CPU kernels against plain PyTorch or scipy in float64: the in-place norm, the training
norm, channels-last pooling (and its gradient), bf16 convolutions and warping by row gathers."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.ndimage import map_coordinates

import models.kernels.ops as ops
from models.kernels.ops import (avg_pool2_channels_last, channels_last, instance_norm_relu_,
                                instance_norm_relu_channels_last, onednn_conv3d_bf16, warp_by_gather,
                                warp_by_gather_with_grad)
from tests.helpers import needs_native_bf16
from utils.spatial import warp

CL = torch.channels_last_3d


@pytest.mark.parametrize("shape", [(2, 3, 5, 6, 7), (1, 4, 20, 16, 16), (1, 2, 17, 16, 16)])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
def test_in_place_instance_norm_relu_matches_torch_in_float64(shape, layout):
    # (1, 4, 20, 16, 16) is 5120 voxels: one block of partial sums and a remainder; 17x16x16 is 4352
    x = torch.randn(*shape, dtype=torch.float64) * 3 + 1
    ref = torch.relu(torch.nn.functional.instance_norm(x, eps=1e-5))
    y = {"contiguous": x.clone(), "channels_last": x.clone(memory_format=torch.channels_last_3d),
         "strided": x.transpose(2, 4).clone().transpose(2, 4)}[layout]
    strides = y.stride()
    out = instance_norm_relu_(y)
    assert out is y and out.stride() == strides                # in place, layout kept
    assert torch.allclose(out, ref, atol=1e-12)


def test_channels_last_pooling_matches_avg_pool3d_in_float64():
    x = torch.randn(2, 5, 6, 8, 4, dtype=torch.float64)
    out = avg_pool2_channels_last(channels_last(x))
    assert out.is_contiguous(memory_format=torch.channels_last_3d)
    assert torch.allclose(out, F.avg_pool3d(x, 2), atol=1e-14)


@pytest.mark.parametrize("channels", [1, 5, 16])
@pytest.mark.parametrize("dtype", [torch.float32, pytest.param(torch.bfloat16, marks=needs_native_bf16)])
def test_channels_last_pooling_in_float32_and_bf16_against_float64(channels, dtype):
    x = torch.randn(2, channels, 10, 8, 6, dtype=torch.float64) * 3 + 1
    low = x.to(dtype)
    ref = F.avg_pool3d(low.double(), 2)                    # the exact mean of the inputs as given
    out = avg_pool2_channels_last(channels_last(low))
    assert out.dtype == dtype and out.shape == ref.shape
    assert out.is_contiguous(memory_format=torch.channels_last_3d)
    if dtype == torch.float32:
        assert torch.allclose(out.double(), ref, atol=1e-6)
    else:                                                  # float32 sums, rounded once to bf16
        assert torch.equal(out, ref.to(dtype))


def _float64_norm_relu_and_gradient(x: torch.Tensor, grad: torch.Tensor):
    ref_x = x.detach().to(torch.float64, copy=True).requires_grad_(True)
    normalised = F.instance_norm(ref_x, eps=1e-5)
    torch.relu(normalised).backward(grad.double())
    return normalised.detach(), ref_x.grad


@pytest.mark.parametrize("batch", [1, 2])
def test_training_norm_relu_in_float32_against_float64(batch):
    # a channel with a large mean: PyTorch's channels-last batch norm, summing in one float32
    # pass, is off by 4e-5 there (this size), the block sums by 3e-6
    torch.manual_seed(0)
    x = torch.randn(batch, 3, 32, 32, 32, dtype=torch.float64) * 3 + 1
    x[:, 2] += 100
    grad = torch.randn_like(x)
    normalised, ref_grad = _float64_norm_relu_and_gradient(x, grad)
    inp = channels_last(x.float()).requires_grad_(True)
    out = instance_norm_relu_channels_last(inp)
    out.backward(channels_last(grad.float()))
    assert out.is_contiguous(memory_format=CL) and inp.grad.is_contiguous(memory_format=CL)
    assert (out.double() - normalised.relu()).abs().max() < 1e-5
    assert (inp.grad.double() - ref_grad).abs().max() < 1e-4 * ref_grad.abs().max()


def test_training_norm_relu_in_bf16_against_float64():
    # bf16 inputs as given (rounded once), float64 reference of those values: the result is off
    # by the output's rounding, and the gradient by that of bf16 arithmetic (compared where the
    # ReLU's decision is clear: a value rounded across zero passes or stops its whole gradient)
    torch.manual_seed(1)
    x = (torch.randn(2, 4, 12, 10, 8, dtype=torch.float64) * 3 + 1).bfloat16()
    grad = torch.randn(x.shape, dtype=torch.float64).bfloat16()
    normalised, ref_grad = _float64_norm_relu_and_gradient(x, grad)
    inp = channels_last(x).requires_grad_(True)
    out = instance_norm_relu_channels_last(inp)
    out.backward(channels_last(grad))
    assert out.dtype == torch.bfloat16 and out.is_contiguous(memory_format=CL)
    assert inp.grad.is_contiguous(memory_format=CL)
    assert (out.double() - normalised.relu()).abs().max() < 0.02
    clear = normalised.abs() > 0.05
    assert clear.float().mean() > 0.9
    assert (inp.grad.double() - ref_grad)[clear].abs().max() < 0.02 * ref_grad.abs().max()


def test_channels_last_pooling_gradient_matches_float64():
    torch.manual_seed(2)
    x = torch.randn(2, 3, 6, 8, 4, dtype=torch.float64)
    grad = torch.randn(2, 3, 3, 4, 2, dtype=torch.float64)
    ref_x = x.clone().requires_grad_(True)
    F.avg_pool3d(ref_x, 2).backward(grad)
    for dtype in (torch.float32, torch.float64):
        inp = channels_last(x.to(dtype)).requires_grad_(True)
        avg_pool2_channels_last(inp).backward(grad.to(dtype))
        assert inp.grad.is_contiguous(memory_format=CL)
        assert torch.allclose(inp.grad.double(), ref_x.grad, atol=1e-6)


def _scipy_warp(features: torch.Tensor, u: torch.Tensor) -> np.ndarray:
    """out(x) = features(x + u(x)), trilinear, zero outside the volume: scipy in float64."""
    f, d = features.double().numpy(), u.double().numpy()
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in f.shape[2:]], indexing="ij"))
    out = np.empty(f.shape)
    for b in range(f.shape[0]):
        coords = grid + d[b]
        for c in range(f.shape[1]):
            out[b, c] = map_coordinates(f[b, c], coords, order=1, mode="grid-constant", cval=0.0)
    return out


def _field_partly_outside(shape, seed):
    g = torch.Generator().manual_seed(seed)
    u = torch.randn((2, 3, *shape), generator=g) * 2.5            # many samples leave the volume
    u[0, :, 0, 0, 0] = torch.tensor([-0.5, 0.25, 0.0])             # half a voxel before the first slice
    u[1, 2, 1, 2, 3] = float("nan")                                 # not finite: read as outside
    return u


@pytest.mark.parametrize("chunk", [1 << 16, 7])
def test_warp_by_gather_matches_scipy_in_float32(chunk, monkeypatch):
    monkeypatch.setattr(ops, "_GATHER_CHUNK", chunk)       # 7: one slice per chunk
    shape = (5, 7, 6)
    features = torch.randn(2, 3, *shape, generator=torch.Generator().manual_seed(1))
    u = _field_partly_outside(shape, 2)
    with torch.inference_mode():
        out = warp_by_gather(channels_last(features), u)
    assert out.dtype == torch.float32 and out.is_contiguous(memory_format=torch.channels_last_3d)
    ref = _scipy_warp(features, torch.nan_to_num(u, nan=-10.0))
    assert np.abs(out.double().numpy() - ref).max() < 1e-5
    assert torch.equal(out[1, :, 1, 2, 3], torch.zeros(3))


def test_warp_by_gather_in_bf16_rounds_only_its_output():
    """bf16 features: weights kept to 16 bits, float32 sums, so the result is the exact warp of
    the bf16 features up to the output's own rounding (2**-8 relative)."""
    shape = (6, 5, 7)
    features = torch.randn(2, 4, *shape, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    u = _field_partly_outside(shape, 4)
    with torch.inference_mode():
        out = warp_by_gather(channels_last(features), u)
    assert out.dtype == torch.bfloat16
    ref = _scipy_warp(features, torch.nan_to_num(u, nan=-10.0))
    err = np.abs(out.double().numpy() - ref)
    assert (err <= np.abs(ref) * 2.0 ** -8 + 1e-6).all()
    # nearly every voxel is the exact value rounded once to bf16 (8-bit weights would miss often)
    rounded = torch.from_numpy(ref).to(torch.bfloat16).double().numpy()
    assert (out.double().numpy() == rounded).mean() > 0.98


def test_warp_by_gather_identity_and_translation():
    features = torch.randn(1, 2, 4, 5, 6)
    with torch.inference_mode():
        assert torch.equal(warp_by_gather(features, torch.zeros(1, 3, 4, 5, 6)), features)
        u = torch.zeros(1, 3, 4, 5, 6)
        u[:, 1] = 1.0                                               # sample one voxel further along H
        out = warp_by_gather(features, u)
    assert torch.equal(out[:, :, :, :4], features[:, :, :, 1:])
    assert torch.equal(out[:, :, :, 4], torch.zeros(1, 2, 4, 6))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch, threads", [(2, 2), (1, 2), (1, 3)])
def test_training_gather_warp_matches_grid_sample_in_float64_values_and_both_gradients(dtype, batch, threads):
    """The training feature warp: float32 output, gradients for the features (channels-last, in
    their dtype) and for the displacement, all against ``grid_sample``'s autograd in float64 of
    the same (rounded) features; the field leaves the volume at its edges (zero padding). A batch
    of one runs its backward as slabs along D, one per thread (6 slices: 2 or 3 slabs)."""
    g = torch.Generator().manual_seed(5)
    shape = (6, 7, 5)
    features = torch.randn(batch, 4, *shape, generator=g).to(dtype)
    u = torch.randn(batch, 3, *shape, generator=g) * 1.5
    grad = torch.randn(batch, 4, *shape, generator=g)
    x, uu = channels_last(features).requires_grad_(True), u.clone().requires_grad_(True)
    out = warp_by_gather_with_grad(x, uu)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out.backward(grad)
    finally:
        torch.set_num_threads(before)
    x64, u64 = features.double().requires_grad_(True), u.double().requires_grad_(True)
    ref = warp(x64, u64)
    ref.backward(grad.double())
    assert out.dtype == torch.float32 and out.is_contiguous(memory_format=CL)
    assert (out.double() - ref).abs().max() < 1e-5
    assert x.grad.dtype == dtype and x.grad.is_contiguous(memory_format=CL)
    rel = 2.0 ** -8 if dtype == torch.bfloat16 else 1e-6         # the gradient's own rounding
    assert ((x.grad.double() - x64.grad).abs() <= x64.grad.abs() * rel + 1e-5).all()
    assert (uu.grad.double() - u64.grad).abs().max() < 1e-4 * u64.grad.abs().max()
    assert u64.grad[:, 0].abs().max() > 0 and u64.grad[:, 2].abs().max() > 0     # every axis exercised


@needs_native_bf16
@pytest.mark.parametrize("channels", [1, 3, 5])
def test_bf16_convolution_of_few_channels_matches_float64(channels):
    """Inputs with fewer than 4 channels get zero channels added (a faster oneDNN kernel): the
    same convolution of the bf16-rounded inputs, up to the output's bf16 rounding."""
    g = torch.Generator().manual_seed(channels)
    x = torch.randn(1, channels, 6, 7, 5, generator=g).to(torch.bfloat16)
    w = torch.randn(8, channels, 3, 3, 3, generator=g).to(torch.bfloat16)
    b = torch.randn(8, generator=g).to(torch.bfloat16)
    with torch.inference_mode():
        y = onednn_conv3d_bf16(x, w, b, (1, 1, 1), (1, 1, 1), (1, 1, 1), 1)
    ref = F.conv3d(x.double(), w.double(), b.double(), padding=1)
    assert y.shape == ref.shape and y.is_contiguous(memory_format=torch.channels_last_3d)
    assert ((y.double() - ref).abs() <= ref.abs() * 2.0 ** -8 + 1e-3).all()
