"""Building blocks: the reference layers, and the CPU kernels' versions of them against float64."""
import pytest
import torch
import torch.nn.functional as F

from models.blocks import ConvNormAct, FlowHead
from models.kernels import CpuInference, CpuTraining


def test_flow_head_starts_near_zero():
    head = FlowHead(16)
    assert head.weight.std().item() < 1e-4 and torch.all(head.bias == 0)
    assert head(torch.rand(1, 16, 8, 8, 8)).abs().max().item() < 1e-2


def _random_head(channels, g):
    head = FlowHead(channels)
    with torch.no_grad():
        head.weight.copy_(torch.randn(head.weight.shape, generator=g))
        head.bias.copy_(torch.randn(3, generator=g))
    return head


def test_flow_head_under_autocast_computes_in_float32():
    """The reference head gives a float32 field from bf16 features, computed in float32."""
    g = torch.Generator().manual_seed(1)
    head = _random_head(6, g)
    x = torch.randn(1, 6, 7, 8, 9, generator=g).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = head(x)
    ref = F.conv3d(x.double(), head.weight.double(), head.bias.double(), padding=1)
    assert y.dtype == torch.float32 and (y.double() - ref).abs().max() < 1e-4


def test_training_flow_head_of_bf16_features_keeps_no_float32_copy():
    """The training kernel's head computes in float32 from bf16 features: output and the
    gradients of input, weight and bias against float64 of the same (rounded) input; what
    autograd saves is the bf16 input itself, no float32 copy of it."""
    g = torch.Generator().manual_seed(2)
    head = _random_head(6, g)
    x = torch.randn(2, 6, 7, 8, 9, generator=g).bfloat16().contiguous(memory_format=torch.channels_last_3d)
    x.requires_grad_(True)
    saved = []

    def keep(t):
        saved.append((t.dtype, tuple(t.shape)))
        return t
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16):
        y = CpuTraining(torch.bfloat16).head(head, x)
    assert (torch.float32, tuple(x.shape)) not in saved and (torch.bfloat16, tuple(x.shape)) in saved
    grad = torch.randn(y.shape, generator=g)
    y.backward(grad)
    x64 = x.detach().double().requires_grad_(True)
    w64, b64 = head.weight.detach().double().requires_grad_(True), head.bias.detach().double().requires_grad_(True)
    ref = F.conv3d(x64, w64, b64, padding=1)
    ref.backward(grad.double())
    assert y.dtype == torch.float32 and (y.double() - ref).abs().max() < 1e-4
    assert x.grad.dtype == torch.bfloat16 and x.grad.is_contiguous(memory_format=torch.channels_last_3d)
    assert ((x.grad.double() - x64.grad).abs() <= x64.grad.abs() * 2.0 ** -8 + 1e-4).all()
    assert (head.weight.grad.double() - w64.grad).abs().max() < 1e-4 * w64.grad.abs().max()
    assert (head.bias.grad.double() - b64.grad).abs().max() < 1e-4 * b64.grad.abs().max()


@pytest.mark.parametrize("in_channels", [1, 6])
def test_inference_convolution_runs_channels_last_with_the_same_values(in_channels):
    torch.manual_seed(0)
    unit = ConvNormAct(in_channels, 4)
    conv = unit[0]
    x = torch.randn(1, in_channels, 9, 10, 11)
    with torch.inference_mode():
        y = CpuInference(torch.float32).layer(conv, x)          # a contiguous input is converted
    assert y.is_contiguous(memory_format=torch.channels_last_3d) and not y.is_contiguous()
    ref = F.conv3d(x.double(), conv.weight.double(), conv.bias.double(), padding=1)
    assert torch.allclose(y.double(), ref, atol=1e-5)


@pytest.mark.parametrize("table", [CpuInference, CpuTraining])
def test_conv_norm_act_kernels_equal_the_reference_unit(table):
    torch.manual_seed(0)
    unit = ConvNormAct(4, 8)
    x = torch.randn(2, 4, 9, 10, 11).contiguous(memory_format=torch.channels_last_3d)
    ref = unit.double()(x.double())
    unit.float()
    with torch.inference_mode(table is CpuInference):
        out = table(torch.float32).layer_norm_act(unit, x)
    assert (out.double() - ref).abs().max().item() < 1e-5
