"""PoLaCA's kernels against float64: the polarity split into buffers, the value convolution as
a band-matrix product. (The whole block through both kernel tables: tests/models/test_polaca.py.)"""
import pytest
import torch

from models.kernels.attention import band_applies, polarity_split_into, value_conv_as_product
from models.polaca import PolarityAttention, polarity_split


def test_polarity_split_against_float64_powers_in_every_path():
    """``[ReLU(x)**p, ReLU(-x)**p]``: the reference form, and the kernel writing bf16 or float32
    input into a float32 buffer, or float32 powers into a bf16 buffer (rounded once: within
    bf16's relative precision)."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(3, 7, 6, generator=g)
    x[0, 0, :2] = 0.0                                               # zeros go to neither half
    p = 1.0 + 9.0 * torch.rand(6, generator=g)
    for dtype in (torch.float32, torch.bfloat16):
        given = x.to(dtype)
        xd, pd = given.double(), p.double()
        ref = torch.cat([xd.clamp_min(0) ** pd, (-xd).clamp_min(0) ** pd], dim=-1)
        reference = polarity_split(given.float(), p)
        with torch.inference_mode():
            own = polarity_split_into(given.float(), p)
            buffer = torch.full((3, 7, 12), float("nan"))
            into = polarity_split_into(given, p, out=buffer)
            narrow = torch.full((3, 7, 12), float("nan"), dtype=torch.bfloat16)
            work = torch.full((3, 7, 6), float("nan"))
            rounded = polarity_split_into(given, p, out=narrow, work=work)
        assert into.data_ptr() == buffer.data_ptr() and rounded.data_ptr() == narrow.data_ptr()
        for out in (reference, own, into):
            assert out.dtype == torch.float32
            assert torch.allclose(out.double(), ref, rtol=1e-5, atol=1e-30)
        assert rounded.dtype == torch.bfloat16
        assert torch.allclose(rounded.double(), ref, rtol=2 ** -8, atol=1e-30)
        assert torch.equal(rounded == 0, ref == 0)


@pytest.mark.parametrize("kernel, window", [(3, (2, 3, 2)), (5, (3, 4, 5))])
def test_value_conv_as_product_matches_the_depthwise_convolution(kernel, window):
    """Values and gradients (of values and taps) against the reference's depthwise convolution
    of each head's values inside the window, both in float64."""
    torch.manual_seed(1)
    attn = PolarityAttention(dim=8, window=window, num_heads=2, dwc_kernel=kernel).double()
    assert band_applies(attn)
    n = window[0] * window[1] * window[2]
    v = torch.randn(3, n, 8, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(3, n, 8, dtype=torch.float64)
    outs = []
    for fn in (attn.value_conv, lambda x: value_conv_as_product(attn, x)):
        attn.zero_grad()
        v.grad = None
        y = fn(v)
        y.backward(grad)
        outs.append((y.detach(), v.grad.clone(), attn.dwc.weight.grad.clone(), attn.dwc.bias.grad.clone()))
    for ref, got in zip(*outs):
        assert torch.allclose(got, ref, atol=1e-12)
    assert outs[0][0].abs().max() > 0.1


def test_band_product_declines_what_it_does_not_compute():
    attn = PolarityAttention(dim=8, window=(2, 2, 2), num_heads=2, dwc_kernel=3)
    attn.dwc.padding_mode = "circular"
    assert not band_applies(attn)
