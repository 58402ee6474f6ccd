"""PoLaCA against an independent float64 loop reference, and its polarity / ALS properties."""
import itertools

import numpy as np
import pytest
import torch

from models.kernels import CpuInference, CpuTraining
from models.polaca import PoLaCA, PolarityAttention, pad_to_multiple, window_partition, window_reverse


def test_window_partition_and_reverse_are_inverse():
    x = torch.randn(2, 6, 9, 8, 5)
    win = (3, 3, 4)
    w = window_partition(x, win)
    assert w.shape == (2 * 2 * 3 * 2, 36, 5)
    assert torch.equal(window_reverse(w, win, (6, 9, 8)), x)
    # token order inside a window is row-major (wd, wh, ww) of the volume
    assert torch.equal(w[0, 1], x[0, 0, 0, 1])
    assert torch.equal(w[0, 4], x[0, 0, 1, 0])
    assert torch.equal(w[1, 0], x[0, 0, 0, 4])


def test_padding_is_cropped_back_exactly():
    x = torch.randn(1, 5, 7, 4, 3)
    p = pad_to_multiple(x, (2, 3, 4))
    assert p.shape == (1, 6, 9, 4, 3)
    assert torch.equal(p[:, :5, :7, :4], x)
    assert p[:, 5:].abs().sum() == 0 and p[:, :, 7:].abs().sum() == 0
    assert pad_to_multiple(x, (5, 7, 4)) is x


# ---------------------------------------------------------------------------
# independent reference: plain loops over windows and tokens, numpy float64
# ---------------------------------------------------------------------------
def _layer_norm(x, w, b, eps=1e-5):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w + b


def _gelu(x):
    from scipy.special import erf
    return 0.5 * x * (1 + erf(x / np.sqrt(2)))


def _reference_polaca(block: PoLaCA, moving, fixed):
    P = {k: v.detach().numpy().astype(np.float64) for k, v in block.state_dict().items()}
    attn = block.attn
    C, h, hd = attn.dim, attn.num_heads, attn.head_dim
    wd, wh, ww = attn.window
    N = wd * wh * ww
    m = moving[0].numpy().astype(np.float64).transpose(1, 2, 3, 0)   # (D, H, W, C)
    f = fixed[0].numpy().astype(np.float64).transpose(1, 2, 3, 0)
    D, H, W, _ = m.shape
    mn = _layer_norm(m, P["norm_in.weight"], P["norm_in.bias"])
    fn = _layer_norm(f, P["norm_in.weight"], P["norm_in.bias"])
    Dp, Hp, Wp = [-(-n // w) * w for n, w in zip((D, H, W), attn.window)]
    mp = np.zeros((Dp, Hp, Wp, C))
    fp = np.zeros((Dp, Hp, Wp, C))
    mp[:D, :H, :W], fp[:D, :H, :W] = mn, fn
    Wqkvg = P["attn.qkvg.weight"]
    Wq, Wk, Wv, Wg = Wqkvg[:C], Wqkvg[C:2 * C], Wqkvg[2 * C:3 * C], Wqkvg[3 * C:]
    scale = np.log1p(np.exp(P["attn.scale"]))
    power = 1 + attn.alpha / (1 + np.exp(-P["attn.power"]))            # (h, hd)
    kern, kb = P["attn.dwc.weight"][:, 0], P["attn.dwc.bias"]           # (hd, k, k, k)
    r = kern.shape[-1] // 2
    out = np.zeros((Dp, Hp, Wp, C))
    offsets = list(itertools.product(range(wd), range(wh), range(ww)))
    for a, b, c in itertools.product(range(0, Dp, wd), range(0, Hp, wh), range(0, Wp, ww)):
        Ft = np.array([fp[a + i, b + j, c + k] for i, j, k in offsets])   # (N, C)
        Mt = np.array([mp[a + i, b + j, c + k] for i, j, k in offsets])
        q = Ft @ Wq.T / scale
        kk = (Mt @ Wk.T + P["attn.positional"]) / scale
        v = Mt @ Wv.T
        g = Mt @ Wg.T
        x = np.zeros((N, C))
        for head in range(h):
            sl = slice(head * hd, (head + 1) * hd)
            p = power[head]
            qp, qn = np.maximum(q[:, sl], 0) ** p, np.maximum(-q[:, sl], 0) ** p
            kc = np.concatenate([np.maximum(kk[:, sl], 0) ** p, np.maximum(-kk[:, sl], 0) ** p], 1)
            kmean = kc.mean(0)
            vh = v[:, sl]
            v1, v2 = vh[:, :hd // 2], vh[:, hd // 2:]
            for t in range(N):
                qs = np.concatenate([qp[t], qn[t]])
                qo = np.concatenate([qn[t], qp[t]])
                same = sum((qs @ kc[j]) * v1[j] for j in range(N)) / N / (qs @ kmean + 1e-6)
                opp = sum((qo @ kc[j]) * v2[j] for j in range(N)) / N / (qo @ kmean + 1e-6)
                # depthwise conv of v inside the window (zero outside it), shared by heads
                ti, tj, tk = offsets[t]
                conv = kb.copy()
                for di, dj, dk in itertools.product(range(-r, r + 1), repeat=3):
                    si, sj, sk = ti + di, tj + dj, tk + dk
                    if 0 <= si < wd and 0 <= sj < wh and 0 <= sk < ww:
                        conv += kern[:, di + r, dj + r, dk + r] * vh[offsets.index((si, sj, sk))]
                x[t, sl] = np.concatenate([same, opp]) + conv
        x = (x * g) @ P["attn.proj.weight"].T + P["attn.proj.bias"]
        for t, (i, j, k) in enumerate(offsets):
            out[a + i, b + j, c + k] = x[t]
    y = m + out[:D, :H, :W]
    z = _layer_norm(y, P["norm_mlp.weight"], P["norm_mlp.bias"])
    z = _gelu(z @ P["mlp.0.weight"].T + P["mlp.0.bias"]) @ P["mlp.2.weight"].T + P["mlp.2.bias"]
    y = _layer_norm(y + z, P["norm_out.weight"], P["norm_out.bias"])
    return y.transpose(3, 0, 1, 2)


def _randomise(module, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * (0.3 if "power" not in name else 1.0))


def _block_pass(path: str):
    """A PoLaCA pass: the reference module, the training kernels, or the inference kernels
    (attention in chunks of 2 windows, or of 5 with a last chunk of 2: buffers kept from one
    chunk to the next)."""
    if path == "reference":
        return lambda block, m, f: block(m, f)
    if path == "training":
        return CpuTraining(torch.float32).attention
    inference = CpuInference(torch.float32)
    inference.chunk_tokens = int(path.split("-")[1])
    return lambda block, m, f: _no_grad(inference.attention, block, m, f)


def _no_grad(fn, *args):
    with torch.inference_mode():
        return fn(*args)


@pytest.mark.parametrize("path", ["reference", "training", "inference-24", "inference-60"])
def test_polaca_matches_loop_reference_with_padding(path):
    torch.manual_seed(0)
    block = PoLaCA(dim=16, window=(2, 3, 2), num_heads=4, alpha=3.0, dwc_kernel=3).double()
    _randomise(block)
    moving = torch.randn(1, 16, 3, 4, 5, dtype=torch.float64)   # pads to (4, 6, 6)
    fixed = torch.randn(1, 16, 3, 4, 5, dtype=torch.float64)
    ours = _block_pass(path)(block, moving, fixed)[0].detach().numpy()
    ref = _reference_polaca(block, moving, fixed)
    assert ours.shape == ref.shape == (16, 3, 4, 5)
    assert np.abs(ours - ref).max() < 1e-6


def test_opposite_stream_silent_for_positive_queries_and_keys():
    """All q, k entries positive: q- = k- = 0, so the opposite stream [q-, q+].[k+, k-] is 0
    and the values it reads (second half of each head) cannot change the output."""
    torch.manual_seed(1)
    attn = PolarityAttention(dim=8, window=(2, 2, 2), num_heads=2, alpha=4.0).double()
    with torch.no_grad():
        attn.qkvg.weight.uniform_(0.1, 1.0)
        attn.dwc.weight.zero_()
        attn.dwc.bias.zero_()
    fixed = torch.rand(3, 8, 8, dtype=torch.float64) + 0.1
    moving = torch.rand(3, 8, 8, dtype=torch.float64) + 0.1
    base = attn(fixed, moving)
    # rows of W_v feeding the opposite stream: second half of every head's values
    hd = attn.head_dim
    opp_rows = [16 + hh * hd + i for hh in range(2) for i in range(hd // 2, hd)]
    with torch.no_grad():
        attn.qkvg.weight[opp_rows] = torch.randn(len(opp_rows), 8, dtype=torch.float64)
    assert torch.allclose(attn(fixed, moving), base, atol=1e-12)
    # positive control: with mixed-sign inputs the same change does matter
    mixed_f, mixed_m = torch.randn(3, 8, 8, dtype=torch.float64), torch.randn(3, 8, 8, dtype=torch.float64)
    before = attn(mixed_f, mixed_m)
    with torch.no_grad():
        attn.qkvg.weight[opp_rows] = torch.randn(len(opp_rows), 8, dtype=torch.float64)
    assert not torch.allclose(attn(mixed_f, mixed_m), before, atol=1e-6)


def test_als_exponent_stays_in_range():
    attn = PolarityAttention(dim=16, window=(2, 2, 2), num_heads=4, alpha=15.0).double()
    assert torch.allclose(attn.exponent(), torch.full((4, 4), 8.5, dtype=torch.float64))
    with torch.no_grad():
        attn.power.copy_(torch.linspace(-30, 30, 16, dtype=torch.float64).view(4, 4))
    p = attn.exponent()
    assert torch.all(p > 1.0) and torch.all(p < 16.0)


def test_polaca_any_size_and_half_inputs_finite():
    block = PoLaCA(dim=16, window=(5, 7, 6), num_heads=8)
    for size in [(3, 3, 3), (5, 7, 6), (11, 9, 13)]:
        out = block(torch.randn(2, 16, *size), torch.randn(2, 16, *size))
        assert out.shape == (2, 16, *size) and torch.isfinite(out).all()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = block(torch.randn(1, 16, 5, 7, 6), torch.randn(1, 16, 5, 7, 6))
    assert torch.isfinite(out.float()).all()


@pytest.mark.parametrize("kwargs", [dict(dim=12, num_heads=8), dict(dim=8, num_heads=8)])
def test_head_split_validated(kwargs):
    with pytest.raises(ValueError, match="heads"):
        PolarityAttention(window=(2, 2, 2), **kwargs)


def test_float16_autocast_keeps_the_polarity_products_finite():
    """x**p with p near 16 passes float16's largest value (65504) for |x| > 2: under float16
    autocast the polarity products run in float32, so the block stays finite and close to its
    float32 output, with autograd and without."""
    torch.manual_seed(2)
    block = PoLaCA(dim=16, window=(5, 7, 6), num_heads=8)
    with torch.no_grad():
        block.attn.power.fill_(3.0)                                 # p = 1 + 15 sigmoid(3) ~ 15.3
        block.attn.qkvg.weight.mul_(4.0)
    moving, fixed = torch.randn(1, 16, 5, 7, 6), torch.randn(1, 16, 5, 7, 6)
    reference = block(moving, fixed).detach()
    for inference in (False, True):
        with torch.inference_mode(inference), torch.autocast("cpu", dtype=torch.float16):
            out = block(moving, fixed).float()
        assert torch.isfinite(out).all()
        assert (out - reference).abs().max() < 0.05


def test_polaca_runs_on_the_meta_device():
    """Shapes only (the FLOP count of bench_inference.py): no autocast to query there."""
    block = PoLaCA(dim=16, window=(2, 3, 2), num_heads=4).to("meta")
    with torch.inference_mode():
        out = block(torch.empty(1, 16, 3, 4, 5, device="meta"), torch.empty(1, 16, 3, 4, 5, device="meta"))
    assert out.shape == (1, 16, 3, 4, 5) and out.device.type == "meta"
