"""utils.losses against numpy/scipy float64 references and analytic values."""
import itertools

import numpy as np
import pytest
import torch
from scipy import ndimage

from tests.helpers import smooth_image
from utils.losses import (MINDSSC, NCC, Grad, box_sum, dice_loss, grad_loss, mind_loss, mind_ssc, mse_loss, ncc_loss,
                          one_hot)

SHAPE = (14, 12, 10)


def _ncc_reference(p, t, win, eps=1e-5):
    """Plain-loop local NCC over the in-volume part of each window, float64."""
    p, t = p.astype(np.float64), t.astype(np.float64)
    r = win // 2
    cc = np.zeros(p.shape)
    for z, y, x in itertools.product(*map(range, p.shape)):
        sl = tuple(slice(max(c - r, 0), c + r + 1) for c in (z, y, x))
        a, b = p[sl].ravel(), t[sl].ravel()
        a, b = a - a.mean(), b - b.mean()
        cc[z, y, x] = (a @ b) ** 2 / ((a @ a) * (b @ b) + eps)
    return -cc.mean()


def test_ncc_matches_loop_reference():
    p = smooth_image((7, 6, 5), seed=1, sigma=0.7, dtype=torch.float64)
    t = smooth_image((7, 6, 5), seed=2, sigma=0.7, dtype=torch.float64)
    for win in (3, 5):
        ours = ncc_loss(p, t, win=win).item()
        assert ours == pytest.approx(_ncc_reference(p[0, 0].numpy(), t[0, 0].numpy(), win), abs=1e-10)


def test_ncc_float32_close_to_float64_on_a_brain_sized_axis():
    """Running sums in float32 along long axes must not lose the local statistics."""
    rng = np.random.default_rng(0)
    p = torch.from_numpy(rng.random((1, 1, 24, 160, 20)))
    t = (p + 0.3 * torch.from_numpy(rng.random(p.shape))).clamp(0, 1)
    ref = ncc_loss(p, t, win=9).item()
    assert ncc_loss(p.float(), t.float(), win=9).item() == pytest.approx(ref, abs=1e-4)
    # the window sums themselves, against scipy's uniform filter in float64
    ours = box_sum(p.float(), 9)[0, 0].double().numpy()
    assert np.allclose(ours, ndimage.uniform_filter(p[0, 0].numpy(), 9, mode="constant") * 729, atol=2e-3)


def test_ncc_of_identical_images_is_minus_one():
    x = smooth_image(SHAPE, seed=3, sigma=1.0)
    assert ncc_loss(x, x).item() == pytest.approx(-1.0, abs=1e-3)
    assert NCC(9)(x, x).item() == pytest.approx(-1.0, abs=1e-3)


@pytest.mark.parametrize("scale,offset", [(2.5, 0.3), (0.2, -1.0), (-1.5, 4.0)])
def test_ncc_invariant_to_affine_intensity_change(scale, offset):
    x = smooth_image(SHAPE, seed=4, sigma=1.0, dtype=torch.float64)
    y = smooth_image(SHAPE, seed=5, sigma=1.0, dtype=torch.float64)
    base = ncc_loss(x, y).item()
    assert ncc_loss(x, scale * y + offset).item() == pytest.approx(base, abs=1e-4)
    assert ncc_loss(scale * x + offset, y).item() == pytest.approx(base, abs=1e-4)


def test_ncc_prefers_aligned_images_and_gradchecks():
    x = smooth_image(SHAPE, seed=6, sigma=1.0)
    shifted = torch.roll(x, 2, dims=2)
    assert ncc_loss(x, x).item() < ncc_loss(x, shifted).item()
    p = smooth_image((5, 4, 4), seed=7, sigma=0.7, dtype=torch.float64).requires_grad_(True)
    t = smooth_image((5, 4, 4), seed=8, sigma=0.7, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda a: ncc_loss(a, t, win=3), (p,))


def test_mse_matches_numpy():
    x, y = torch.rand(2, 1, *SHAPE), torch.rand(2, 1, *SHAPE)
    ref = np.mean((x.numpy().astype(np.float64) - y.numpy()) ** 2)
    assert mse_loss(x, y).item() == pytest.approx(ref, rel=1e-5)


def _linear_field(A, shape):
    x = np.indices(shape, dtype=np.float64)
    return torch.tensor(np.einsum("ij,j...->i...", A, x)[None])


def test_grad_loss_constant_and_linear_fields():
    u = torch.full((1, 3, *SHAPE), 2.0)
    assert grad_loss(u).item() == 0.0 and grad_loss(u, "l1").item() == 0.0
    A = np.array([[0.3, -0.2, 0.1], [0.05, 0.4, -0.1], [0.2, 0.0, -0.5]])
    u = _linear_field(A, SHAPE)
    # forward difference along axis j of component i is A[i, j]: mean over i, then mean over j
    assert grad_loss(u, "l2").item() == pytest.approx((A ** 2).sum() / 9, rel=1e-10)
    assert grad_loss(u, "l1").item() == pytest.approx(np.abs(A).sum() / 9, rel=1e-10)
    assert Grad("l2")(u).item() == pytest.approx((A ** 2).sum() / 9, rel=1e-10)


def test_dice_loss_known_overlaps():
    a = torch.zeros(1, 1, 8, 8, 8)
    b = torch.zeros(1, 1, 8, 8, 8)
    a[..., 0:4, 0:4, 0:4] = 1
    b[..., 2:6, 0:4, 0:4] = 1  # 32 of 64 voxels shared
    assert dice_loss(a, a).item() == pytest.approx(0.0, abs=1e-6)
    assert dice_loss(a, b).item() == pytest.approx(0.5, abs=1e-6)
    c = torch.zeros_like(a)
    c[..., 5:8, 5:8, 5:8] = 1
    assert dice_loss(a, c).item() == pytest.approx(1.0, abs=1e-6)


def test_one_hot_selects_given_labels():
    lab = torch.tensor([0, 3, 3, 7, 9]).view(1, 1, 5, 1, 1)
    oh = one_hot(lab, [3, 7])
    assert oh.shape == (1, 2, 5, 1, 1)
    assert oh[0, :, :, 0, 0].tolist() == [[0, 1, 1, 0, 0], [0, 0, 0, 1, 0]]


def _mind_reference(img, radius=1, dilation=2):
    """MIND-SSC written with numpy/scipy: shifted copies with edge padding, scipy box filter."""
    img = img.astype(np.float64)
    six = [(1, 0, 0), (-1, 0, 0), (0, 1, 0), (0, -1, 0), (0, 0, 1), (0, 0, -1)]
    pairs = [(a, b) for i, a in enumerate(six) for b in six[i + 1:]
             if np.sum((np.array(a) - np.array(b)) ** 2) == 2]
    assert len(pairs) == 12
    padded = np.pad(img, dilation, mode="edge")
    d, h, w = img.shape

    def shifted(o):
        o = [dilation + dilation * s for s in o]
        return padded[o[0]:o[0] + d, o[1]:o[1] + h, o[2]:o[2] + w]

    ssd = np.stack([ndimage.uniform_filter((shifted(a) - shifted(b)) ** 2, 2 * radius + 1, mode="nearest")
                    for a, b in pairs])
    var = ssd.mean(0)
    m = var.mean()
    var = np.clip(var, 0.001 * m, 1000 * m) + 1e-6
    mind = np.exp(-ssd / var)
    return mind / mind.max(0)


def test_mind_ssc_matches_numpy_reference():
    x = smooth_image((9, 10, 8), seed=9, sigma=1.0, dtype=torch.float64)
    ours = mind_ssc(x)[0].numpy()
    ref = _mind_reference(x[0, 0].numpy())
    # channel order may differ: compare the sorted descriptor at each voxel
    assert np.allclose(np.sort(ours, 0), np.sort(ref, 0), atol=1e-10)


def test_mind_loss_zero_for_same_and_affine_images_positive_for_shift():
    x = smooth_image(SHAPE, seed=10, sigma=1.0, dtype=torch.float64)
    assert mind_loss(x, x).item() == 0.0
    assert mind_loss(x, 3.0 * x + 1.0).item() < 1e-6
    assert MINDSSC()(x, torch.roll(x, 2, dims=3)).item() > 1e-3


def test_losses_accept_float64_and_bfloat16():
    x = smooth_image(SHAPE, seed=11)
    y = smooth_image(SHAPE, seed=12)
    for dtype in (torch.float64, torch.bfloat16):
        v = ncc_loss(x.to(dtype), y.to(dtype))
        assert torch.isfinite(v) and v.dtype in (torch.float64, torch.float32)
        assert torch.isfinite(mind_loss(x.to(dtype), y.to(dtype)))


@pytest.mark.parametrize("call", [
    lambda: ncc_loss(torch.rand(1, 8, 8, 8), torch.rand(1, 8, 8, 8)),
    lambda: ncc_loss(torch.rand(1, 1, 8, 8, 8), torch.rand(1, 1, 8, 8, 7)),
    lambda: ncc_loss(torch.rand(1, 1, 8, 8, 8), torch.rand(1, 1, 8, 8, 8), win=4),
    lambda: mse_loss(torch.rand(1, 1, 8, 8, 8), torch.rand(2, 1, 8, 8, 8)),
    lambda: grad_loss(torch.rand(1, 2, 8, 8, 8)),
    lambda: grad_loss(torch.rand(1, 3, 8, 8, 8), "l3"),
    lambda: dice_loss(torch.rand(1, 3, 8, 8, 8), torch.rand(1, 2, 8, 8, 8)),
    lambda: mind_ssc(torch.rand(1, 2, 8, 8, 8)),
    lambda: one_hot(torch.zeros(1, 2, 4, 4, 4), [1]),
])
def test_malformed_input_raises_value_error(call):
    with pytest.raises(ValueError, match=r"expected|must"):
        call()
