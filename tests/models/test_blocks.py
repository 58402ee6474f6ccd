"""Building blocks: the oneDNN-routed convolution against PyTorch's native kernel; the inference path of the blocks."""
import torch
import torch.nn.functional as F


from models.blocks import Conv3d, ConvNormAct, FlowHead


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


def test_flow_head_under_cpu_bf16_autocast_trains_in_float32_and_keeps_no_float32_copy():
    """The flow head computes in float32 from bf16 features: output and the gradients of input,
    weight and bias against float64 of the same (rounded) input; what autograd saves is the bf16
    input itself, no float32 copy of it."""
    g = torch.Generator().manual_seed(2)
    head = FlowHead(6)
    with torch.no_grad():
        head.weight.copy_(torch.randn(head.weight.shape, generator=g))
        head.bias.copy_(torch.randn(3, generator=g))
    x = torch.randn(2, 6, 7, 8, 9, generator=g).bfloat16().contiguous(memory_format=torch.channels_last_3d)
    x.requires_grad_(True)
    saved = []

    def keep(t):
        saved.append((t.dtype, tuple(t.shape)))
        return t
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16):
        y = head(x)
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


def test_flow_head_starts_near_zero():
    head = FlowHead(16)
    assert head.weight.std().item() < 1e-4 and torch.all(head.bias == 0)
    assert head(torch.rand(1, 16, 8, 8, 8)).abs().max().item() < 1e-2



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
