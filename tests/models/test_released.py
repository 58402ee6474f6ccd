"""The released-compatible mode against float64 numpy references of the released formulas,
and the converter against a released-layout state dict written from its model code."""
import numpy as np
import pytest
import torch
from scipy import ndimage
from scipy.special import erf

from models import build_model, load_model
from models.polaca import PoLaCA, PolarityAttention, window_partition, window_reverse, window_reverse_released
from models.factory import convert_released, load_released
from models.released import convert_released_state, infer_config
from tests.helpers import smooth_field, smooth_image
from tests.released_format import released_state
from utils.checkpoint import CheckpointError
from utils.config import ModelConfig
from utils.spatial import (released_sampling_field, resize_displacement, upsample_displacement_released, warp)

WINDOW = (2, 3, 2)


# ---------------------------------------------------------------------------
# numpy references of the released code's formulas (float64)
# ---------------------------------------------------------------------------
def _np(t):
    return t.detach().numpy().astype(np.float64)


def released_reverse_np(windows, window, size):
    """Released window_reverse: windows viewed as (B, nD, nH, nW, wd, wh, ww, C), axes (0,1,3,5,2,4,6,7)."""
    (d, h, w), (wd, wh, ww) = size, window
    x = windows.reshape(-1, d // wd, h // wh, w // ww, wd, wh, ww, windows.shape[-1])
    return x.transpose(0, 1, 3, 5, 2, 4, 6, 7).reshape(-1, d, h, w, windows.shape[-1])


def partition_np(x, window):
    b, d, h, w, c = x.shape
    wd, wh, ww = window
    x = x.reshape(b, d // wd, wd, h // wh, wh, w // ww, ww, c).transpose(0, 1, 3, 5, 2, 4, 6, 7)
    return x.reshape(-1, wd * wh * ww, c)


def attention_np(att: PolarityAttention, fixed, moving, released_layout: bool):
    """The released PolaLinearAttention forward in numpy (queries from ``fixed``)."""
    b, n, d = moving.shape
    h, hd = att.num_heads, att.head_dim
    w = _np(att.qkvg.weight)
    kvg = (moving @ w.T).reshape(b, n, 4, d)
    k, v, g = kvg[:, :, 1], kvg[:, :, 2], kvg[:, :, 3]
    q = (fixed @ w.T).reshape(b, n, 4, d)[:, :, 0]
    k = k + _np(att.positional)[None]
    scale = np.log1p(np.exp(_np(att.scale)))
    power = (1 + att.alpha / (1 + np.exp(-_np(att.power))))[None, :, None, :]

    def heads(t):
        return t.reshape(b, n, h, hd).transpose(0, 2, 1, 3)
    q, k, v = heads(q / scale), heads(k / scale), heads(v)
    relu = lambda t: np.maximum(t, 0)  # noqa: E731
    qp, qn, kp, kn = relu(q) ** power, relu(-q) ** power, relu(k) ** power, relu(-k) ** power
    kk = np.concatenate([kp, kn], -1)
    v1, v2 = np.split(v, 2, axis=-1)
    outs = []
    for qq, vv in ((np.concatenate([qp, qn], -1), v1), (np.concatenate([qn, qp], -1), v2)):
        z = 1 / (qq @ kk.mean(-2, keepdims=True).swapaxes(-2, -1) + 1e-6)
        kv = (kk.swapaxes(-2, -1) * n ** -0.5) @ (vv * n ** -0.5)
        outs.append(qq @ kv * z)
    x = np.concatenate(outs, -1).transpose(0, 2, 1, 3).reshape(b, n, d)
    vs = v.reshape(b * h, *att.window, hd)                     # (B*h, wd, wh, ww, hd): tokens in order
    kern, bias = _np(att.dwc.weight), _np(att.dwc.bias)
    conv = np.stack([ndimage.correlate(vs[..., c], kern[c, 0][None], mode="constant") + bias[c]
                     for c in range(hd)], -1)
    if released_layout:
        vsp = conv.reshape(b, n, d)                            # the released straight reshape
    else:
        vsp = conv.reshape(b, h, n, hd).transpose(0, 2, 1, 3).reshape(b, n, d)
    return ((x + vsp) * g) @ _np(att.proj.weight).T + _np(att.proj.bias)


def layer_norm_np(x, ln):
    mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + ln.eps) * _np(ln.weight) + _np(ln.bias)


def polaca_np(block: PoLaCA, moving, fixed, released: bool):
    """The released block: shared LN, windows, attention, reverse, residual, MLP, final LN."""
    m, f = _np(moving).transpose(0, 2, 3, 4, 1), _np(fixed).transpose(0, 2, 3, 4, 1)
    size = m.shape[1:4]
    attn = attention_np(block.attn, partition_np(layer_norm_np(f, block.norm_in), block.window),
                        partition_np(layer_norm_np(m, block.norm_in), block.window), released)
    rev = released_reverse_np if released else None
    x = m + (rev(attn, block.window, size) if released else _np(window_reverse(torch.from_numpy(attn),
                                                                               block.window, size)))
    hdn = layer_norm_np(x, block.norm_mlp) @ _np(block.mlp[0].weight).T + _np(block.mlp[0].bias)
    hdn = 0.5 * hdn * (1 + erf(hdn / np.sqrt(2)))
    x = x + hdn @ _np(block.mlp[2].weight).T + _np(block.mlp[2].bias)
    return layer_norm_np(x, block.norm_out).transpose(0, 4, 1, 2, 3)


def _randomise(module, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return module


# ---------------------------------------------------------------------------
# each released behaviour
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("released", [False, True])
def test_attention_value_layout_matches_reference(released):
    att = _randomise(PolarityAttention(16, WINDOW, num_heads=4, released_layout=released).double())
    fixed, moving = torch.randn(3, 12, 16, dtype=torch.float64), torch.randn(3, 12, 16, dtype=torch.float64)
    with torch.no_grad():
        out = att(fixed, moving).numpy()
    assert np.abs(out - attention_np(att, _np(fixed), _np(moving), released)).max() < 1e-10
    other = attention_np(att, _np(fixed), _np(moving), not released)
    assert np.abs(out - other).max() > 1e-3                    # the two layouts really differ


def test_released_window_reverse_is_the_partition_permutation_again():
    x = torch.randn(2, 4, 6, 4, 3, dtype=torch.float64)
    win = window_partition(x, WINDOW)
    assert torch.equal(window_reverse(win, WINDOW, (4, 6, 4)), x)              # ours inverts
    rel = window_reverse_released(win, WINDOW, (4, 6, 4))
    assert np.array_equal(rel.numpy(), released_reverse_np(win.numpy(), WINDOW, (4, 6, 4)))
    assert not torch.equal(rel, x)


@pytest.mark.parametrize("released", [False, True])
def test_polaca_block_matches_reference(released):
    block = _randomise(PoLaCA(16, WINDOW, num_heads=4, released_compat=released).double(), seed=1)
    moving, fixed = torch.randn(1, 16, 4, 6, 4, dtype=torch.float64), torch.randn(1, 16, 4, 6, 4, dtype=torch.float64)
    for grad in (True, False):                              # the chunked inference path too
        with torch.set_grad_enabled(grad):
            out = block(moving, fixed).detach().numpy()
        assert np.abs(out - polaca_np(block, moving, fixed, released)).max() < 1e-10


def test_released_upsampling_is_twice_align_corners_interpolation():
    u = smooth_field((5, 6, 4), 2.0, sigma=1.5, dtype=torch.float64)
    up = upsample_displacement_released(u).numpy()[0]
    coords = np.meshgrid(*[np.arange(2 * n) * (n - 1) / (2 * n - 1) for n in (5, 6, 4)], indexing="ij")
    ref = np.stack([2 * ndimage.map_coordinates(_np(u)[0, i], coords, order=1) for i in range(3)])
    assert np.abs(up - ref).max() < 1e-10
    assert np.abs(up - resize_displacement(u, (10, 12, 8), align_corners=False).numpy()[0]).max() > 1e-2


def test_released_sampling_field_reproduces_the_released_transformer():
    shape = (9, 11, 8)
    img = smooth_image(shape, seed=3, dtype=torch.float64)
    idx = np.indices(shape).astype(np.float64)
    u = np.stack([0.8 * np.sin(idx[1] / 3), -0.6 * np.cos(idx[2] / 2), 0.05 * idx[0] + 0.3])   # analytic
    # the released transformer: normalise x+u for align_corners=True, sample with align_corners=False
    locs = idx + u
    norm = [2 * (locs[i] / (n - 1) - 0.5) for i, n in enumerate(shape)]
    sample_at = [((g + 1) * n - 1) / 2 for g, n in zip(norm, shape)]
    ref = ndimage.map_coordinates(_np(img)[0, 0], sample_at, order=1, mode="grid-constant", cval=0.0)
    ours = warp(img, released_sampling_field(torch.from_numpy(u)[None])).numpy()[0, 0]
    assert np.abs(ours - ref).max() < 1e-5
    assert np.abs(warp(img, torch.from_numpy(u)[None]).numpy()[0, 0] - ref).max() > 1e-2


# ---------------------------------------------------------------------------
# converter
# ---------------------------------------------------------------------------
def test_released_state_converts_loads_strictly_and_round_trips(tmp_path):
    state = released_state(seed=4)
    config = infer_config(state)
    assert config.released_compat and config.widths == (16, 32, 64, 128, 256) and config.num_heads == 8
    ours, dropped = convert_released_state(state, build_model(config))
    assert len(dropped) == 24 and all(".norm1." in k or ".norm2." in k or ".norm3." in k for k in dropped)
    model = build_model(config)
    model.load_state_dict(ours, strict=True)
    assert sum(p.numel() for p in model.parameters()) == sum(t.numel() for t in state.values()) - 2880 == 16_386_747
    block = "corr_3.transformer.layers.0.blocks.0"
    assert torch.equal(model.levels[2].attention.attn.power, state[f"{block}.attn.power"][0, :, 0, :])
    assert torch.equal(model.levels[2].attention.attn.positional, state[f"{block}.attn.positional_encoding"][0])
    assert torch.equal(model.levels[0].up_context[0].weight, state["upsample_1.deconv.weight"])
    torch.save({"state_dict": state, "epoch": 7}, tmp_path / "final.pth.tar")
    path, _ = convert_released(tmp_path / "final.pth.tar", tmp_path / "ours.pth")
    loaded, ckpt = load_model(path)
    assert loaded.config.released_compat and ckpt["epoch"] == 7
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in ours.items())


@pytest.mark.parametrize("change,message", [
    (lambda s: s.pop("conv_fine_2.conv1.bias"), "missing \\['conv_fine_2.conv1.bias'\\]"),
    (lambda s: s.__setitem__("corr_2.transformer.extra.weight", torch.zeros(3)), "unexpected \\['corr_2.transformer.extra"),
    (lambda s: s.__setitem__("reghead_3.reg_head.weight", torch.zeros(3, 60, 3, 3, 3)), "wrong shape.*reghead_3"),
])
def test_released_state_refusals_name_the_keys(change, message):
    state = released_state(seed=5)
    change(state)
    with pytest.raises(CheckpointError, match=message):
        convert_released_state(state, build_model(infer_config(released_state(seed=5))))


def test_released_window_must_fit_the_positional_term(tmp_path):
    torch.save(released_state(seed=6, window=(5, 6, 5)), tmp_path / "lpba.pth")
    with pytest.raises(CheckpointError, match="150 tokens per window"):
        load_released(tmp_path / "lpba.pth")
    assert load_released(tmp_path / "lpba.pth", window_size=(5, 6, 5))[0]["model_config"]["window_size"] == [5, 6, 5]


def test_released_compat_network_differs_only_by_the_three_behaviours():
    cfg = dict(widths=(8, 16, 16, 32, 32), num_heads=4, window_size=(2, 2, 2))
    ours, compat = build_model(ModelConfig(**cfg)), build_model(ModelConfig(**cfg, released_compat=True))
    compat.load_state_dict(ours.state_dict())
    assert set(ours.state_dict()) == set(compat.state_dict())
    x, y = smooth_image((32, 32, 32), seed=1), smooth_image((32, 32, 32), seed=2)
    with torch.no_grad():
        assert not torch.allclose(ours(x, y), compat(x, y), atol=1e-4)
