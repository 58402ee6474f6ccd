"""Building blocks: the oneDNN-routed convolution against PyTorch's native kernel; the in-place inference norm."""
import torch
import torch.nn.functional as F

import pytest

from models.blocks import (Conv3d, ConvNormAct, FlowHead, avg_pool2_channels_last, channels_last, instance_norm_relu_,
                           onednn_conv3d)


def test_conv3d_matches_native_kernel_forward_and_backward():
    torch.manual_seed(0)
    conv = Conv3d(5, 4, 3, padding=1)
    x = torch.randn(1, 5, 9, 10, 11, requires_grad=True)
    y = conv(x)
    ref = F.conv3d(x.double(), conv.weight.double(), conv.bias.double(), padding=1)
    assert torch.allclose(y.double(), ref, atol=1e-5)
    g = torch.randn_like(y)
    (y * g).sum().backward()
    gx, gw = x.grad.clone(), conv.weight.grad.clone()
    x.grad = None
    conv.weight.grad = None
    (ref * g.double()).sum().backward()
    assert torch.allclose(gx.double(), x.grad.double(), atol=1e-5)
    assert torch.allclose(gw.double(), conv.weight.grad.double(), atol=1e-4)


def test_flow_head_starts_near_zero():
    head = FlowHead(16)
    assert head.weight.std().item() < 1e-4 and torch.all(head.bias == 0)
    assert head(torch.rand(1, 16, 8, 8, 8)).abs().max().item() < 1e-2


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


def test_conv3d_inference_runs_channels_last_with_the_same_values():
    torch.manual_seed(0)
    conv = Conv3d(1, 6, 3, padding=1)
    x = torch.randn(1, 1, 9, 10, 11)
    ref = F.conv3d(x.double(), conv.weight.double(), conv.bias.double(), padding=1)
    with torch.inference_mode():
        y = conv(x)                                           # one channel: both layouts
        z = Conv3d(6, 4, 3, padding=1)(y.contiguous())        # a contiguous input is converted
    assert y.is_contiguous(memory_format=torch.channels_last_3d) and not y.is_contiguous()
    assert z.is_contiguous(memory_format=torch.channels_last_3d)
    assert torch.allclose(y.double(), ref, atol=1e-5)


def test_conv_norm_act_inference_path_equals_autograd_path():
    torch.manual_seed(0)
    block = ConvNormAct(4, 8).eval()
    x = torch.randn(1, 4, 9, 10, 11)
    with torch.enable_grad():
        ref = block(x)
    with torch.inference_mode():
        fast = block(x)
    assert (fast - ref).abs().max().item() < 1e-5


def test_onednn_operator_passes_torch_opcheck():
    # schema, fake (shape-only) kernel, autograd registration: what torch.compile relies on
    torch.manual_seed(0)
    x = torch.randn(1, 3, 6, 7, 5, requires_grad=True)
    w = torch.randn(4, 3, 3, 3, 3, requires_grad=True)
    b = torch.randn(4, requires_grad=True)
    for args in ((x, w, b, [1, 1, 1], [1, 1, 1], [1, 1, 1], 1), (x, w, None, [0, 1, 2], [2, 1, 1], [1, 1, 1], 1)):
        torch.library.opcheck(onednn_conv3d, args)


def test_onednn_operator_matches_conv3d_in_float64_forward_and_backward():
    torch.manual_seed(0)
    x = torch.randn(1, 6, 8, 9, 7, requires_grad=True)
    w = torch.randn(4, 3, 3, 3, 3, requires_grad=True)           # groups 2
    b = torch.randn(4, requires_grad=True)
    y = onednn_conv3d(x.permute(0, 2, 3, 4, 1).contiguous().permute(0, 4, 1, 2, 3), w, b,
                      [1, 0, 1], [1, 2, 1], [1, 1, 2], 2)          # answered channels-last, as its fake kernel says
    assert y.is_contiguous(memory_format=torch.channels_last_3d)
    x64, w64, b64 = (t.detach().double().requires_grad_() for t in (x, w, b))
    ref = F.conv3d(x64, w64, b64, stride=(1, 2, 1), padding=(1, 0, 1), dilation=(1, 1, 2), groups=2)
    assert y.shape == ref.shape and torch.allclose(y.double(), ref, atol=1e-4)
    g = torch.randn(ref.shape, dtype=torch.float64)
    grads = torch.autograd.grad((y.double() * g).sum(), (x, w, b))
    refs = torch.autograd.grad((ref * g).sum(), (x64, w64, b64))
    for got, want in zip(grads, refs):
        assert torch.allclose(got.double(), want, atol=1e-4)
