"""CPU inference kernels against plain PyTorch in float64: the in-place norm, channels-last
pooling, and the oneDNN convolution operator."""
import pytest
import torch
import torch.nn.functional as F

from models.cpu_kernels import avg_pool2_channels_last, channels_last, instance_norm_relu_, onednn_conv3d


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
