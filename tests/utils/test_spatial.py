"""Pins the displacement convention of utils.spatial against scipy and analytic fields."""
import numpy as np
import pytest
import torch
from scipy import ndimage

from tests.helpers import smooth_field, smooth_image
from utils import spatial
from utils.spatial import (LabelWarper, ResizeDisplacement, SpatialTransformer, VecInt, compose, inverse_consistency,
                           invert_displacement,
                           integrate_velocity, resize_displacement, warp, warp_labels)

SHAPE = (12, 14, 10)


def _scipy_warp(img, u, order, mode="grid-constant"):
    """Reference: out(x) = img(x + u(x)) with scipy's map_coordinates, float64."""
    img = img.numpy().astype(np.float64)[0, 0]
    u = u.numpy().astype(np.float64)[0]
    coords = np.indices(img.shape, dtype=np.float64) + u
    return ndimage.map_coordinates(img, coords, order=order, mode=mode, cval=0.0)


def test_zero_displacement_is_identity_exactly():
    img = torch.rand(2, 3, *SHAPE)
    u = torch.zeros(2, 3, *SHAPE)
    assert torch.equal(warp(img, u), img)
    assert torch.equal(warp(img, u, mode="nearest"), img)
    lab = torch.randint(0, 7, (2, 1, *SHAPE))
    assert torch.equal(warp_labels(lab, u), lab)
    assert torch.equal(warp_labels(lab, u, "onehot"), lab)


def test_zero_displacement_still_gives_a_gradient():
    """Optimising a field from zero (instance optimisation) needs d warp / d u at u = 0."""
    img = smooth_image(SHAPE, dtype=torch.float64)
    u = torch.zeros(1, 3, *SHAPE, dtype=torch.float64, requires_grad=True)
    warp(img, u).sum().backward()
    # d/du_0 of sum(img(x + u)) at u = 0 is the sum of the trilinear image gradient: non-zero
    assert u.grad is not None and u.grad.abs().sum().item() > 0


@pytest.mark.parametrize("axis", [0, 1, 2])
@pytest.mark.parametrize("k", [1, 2, -3])
def test_constant_displacement_moves_content_by_minus_k(axis, k):
    """u = +k along axis i samples moving(x + k e_i): a bright voxel at c appears at c - k e_i."""
    img = torch.zeros(1, 1, *SHAPE)
    c = [6, 7, 5]
    img[0, 0, c[0], c[1], c[2]] = 1.0
    u = torch.zeros(1, 3, *SHAPE)
    u[0, axis] = k
    out = warp(img, u)[0, 0]
    expected = list(c)
    expected[axis] -= k
    assert out.sum().item() == pytest.approx(1.0, abs=1e-6)
    assert tuple(torch.nonzero(out > 0.5)[0].tolist()) == tuple(expected)


def test_trilinear_warp_matches_scipy_order1():
    img = smooth_image(SHAPE, seed=1, sigma=1.0)
    u = smooth_field(SHAPE, amplitude=3.0, seed=2)
    ours = warp(img, u)[0, 0].numpy()
    ref = _scipy_warp(img, u, order=1)
    assert np.abs(ours - ref).max() < 1e-5


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_warps_match_scipy():
    """The same convention on a GPU: images against scipy's trilinear interpolation, labels
    against its nearest neighbour (inside the volume, away from rounding ties)."""
    img = smooth_image(SHAPE, seed=1, sigma=1.0)
    u = smooth_field(SHAPE, amplitude=3.0, seed=2)
    ours = warp(img.cuda(), u.cuda())[0, 0].cpu().numpy()
    assert np.abs(ours - _scipy_warp(img, u, order=1)).max() < 1e-5
    lab = torch.randint(0, 7, (1, 1, *SHAPE))
    warped = warp_labels(lab.cuda(), u.cuda())[0, 0].cpu().numpy()
    ref = _scipy_warp(lab.float(), u, order=0)
    loc = np.indices(SHAPE) + u.numpy()[0]
    inside = np.all([(loc[i] >= 0) & (loc[i] <= SHAPE[i] - 1) for i in range(3)], axis=0)
    sel = inside & np.all(np.abs(loc - np.floor(loc) - 0.5) > 1e-3, axis=0)
    assert sel.mean() > 0.5 and np.array_equal(warped[sel], ref[sel].astype(warped.dtype))


def test_nearest_warp_matches_scipy_order0():
    img = smooth_image(SHAPE, seed=3, sigma=1.0)
    u = smooth_field(SHAPE, amplitude=3.0, seed=4)
    ours = warp(img, u, mode="nearest")[0, 0].numpy()
    ref = _scipy_warp(img, u, order=0)
    # compare where the sampling point is inside the volume and not on a rounding tie
    loc = np.indices(SHAPE) + u.numpy()[0]
    inside = np.all([(loc[i] >= 0) & (loc[i] <= SHAPE[i] - 1) for i in range(3)], axis=0)
    away_from_tie = np.all(np.abs(loc - np.floor(loc) - 0.5) > 1e-3, axis=0)
    sel = inside & away_from_tie
    assert sel.mean() > 0.5
    assert np.abs(ours[sel] - ref[sel]).max() < 1e-5


def test_warp_float64_and_batch_broadcast():
    img = smooth_image(SHAPE, seed=5, dtype=torch.float64)
    u = torch.cat([smooth_field(SHAPE, 2.0, seed=s, dtype=torch.float64) for s in (6, 7)])
    out = warp(img, u)
    assert out.shape == (2, 1, *SHAPE) and out.dtype == torch.float64
    for b in range(2):
        assert np.abs(out[b, 0].numpy() - _scipy_warp(img, u[b:b + 1], 1)).max() < 1e-10


def test_half_precision_inputs_warp_in_float32():
    img = smooth_image(SHAPE).to(torch.bfloat16)
    u = smooth_field(SHAPE, 2.0).to(torch.bfloat16)
    assert warp(img, u).dtype == torch.float32


def _blob_labels(shape, n_labels=5, seed=0):
    rng = np.random.default_rng(seed)
    noise = ndimage.gaussian_filter(rng.standard_normal((n_labels, *shape)), 2.0)
    lab = np.argmax(noise, axis=0) * 3 + 2  # values 2, 5, 8, ... (non-contiguous)
    lab[:2] = 0
    return torch.tensor(lab[None, None], dtype=torch.int64)


def test_nearest_label_warp_keeps_label_set():
    lab = _blob_labels(SHAPE)
    u = smooth_field(SHAPE, 4.0, seed=8)
    out = warp_labels(lab, u)
    assert out.dtype == lab.dtype
    assert set(torch.unique(out).tolist()) <= set(torch.unique(lab).tolist()) | {0}
    out1 = warp_labels(lab, u, "onehot")
    assert set(torch.unique(out1).tolist()) <= set(torch.unique(lab).tolist()) | {0}


def test_onehot_agrees_with_nearest_on_label_interiors():
    lab = _blob_labels(SHAPE, seed=1)
    u = smooth_field(SHAPE, 3.0, seed=9)
    near = warp_labels(lab, u).numpy()[0, 0]
    soft = warp_labels(lab, u, "onehot").numpy()[0, 0]
    # interior: all 8 voxels around the sampling point exist and carry the same label
    loc = np.indices(SHAPE) + u.numpy()[0]
    lo = np.floor(loc).astype(int)
    lab_np = lab.numpy()[0, 0]
    inside = np.all([(lo[i] >= 0) & (lo[i] + 1 <= SHAPE[i] - 1) for i in range(3)], axis=0)
    corners = []
    for dz in (0, 1):
        for dy in (0, 1):
            for dx in (0, 1):
                idx = [np.clip(lo[0] + dz, 0, SHAPE[0] - 1), np.clip(lo[1] + dy, 0, SHAPE[1] - 1),
                       np.clip(lo[2] + dx, 0, SHAPE[2] - 1)]
                corners.append(lab_np[idx[0], idx[1], idx[2]])
    corners = np.stack(corners)
    interior = inside & np.all(corners == corners[0], axis=0)
    assert interior.mean() > 0.3
    assert np.array_equal(near[interior], corners[0][interior])
    assert np.array_equal(soft[interior], corners[0][interior])


def test_compose_equals_sequential_warps():
    img = smooth_image((16, 16, 16), seed=10, sigma=2.0, dtype=torch.float64)
    a = smooth_field((16, 16, 16), 1.5, sigma=4, seed=11, dtype=torch.float64)
    b = smooth_field((16, 16, 16), 1.5, sigma=4, seed=12, dtype=torch.float64)
    once = warp(img, compose(a, b))
    twice = warp(warp(img, b), a)
    inner = (slice(None), slice(None), slice(3, -3), slice(3, -3), slice(3, -3))
    err = (once - twice)[inner].abs().max().item()
    change = (twice - img)[inner].abs().max().item()
    assert err < 0.1 * change


def test_compose_of_translations_is_their_sum():
    a = torch.zeros(1, 3, *SHAPE)
    b = torch.zeros(1, 3, *SHAPE)
    a[:, 0] = 1.0
    b[:, 1] = -2.0
    c = compose(a, b)
    expected = torch.tensor([1.0, -2.0, 0.0]).view(1, 3, 1, 1, 1).expand_as(c)
    assert torch.allclose(c, expected, atol=1e-5)


def test_scaling_and_squaring_inverse_and_constant():
    shape = (16, 16, 16)
    v = smooth_field(shape, 1.5, sigma=4, seed=13, dtype=torch.float64)
    fwd, bwd = integrate_velocity(v, 7), integrate_velocity(-v, 7)
    residual = compose(fwd, bwd)
    inner = (slice(None), slice(None), slice(3, -3), slice(3, -3), slice(3, -3))
    assert residual[inner].abs().max().item() < 0.05 * v.abs().max().item()
    # a constant velocity integrates to itself
    vc = torch.zeros(1, 3, *shape, dtype=torch.float64)
    vc[:, 2] = 2.5
    assert torch.allclose(integrate_velocity(vc, 5), vc, atol=1e-9)
    assert torch.allclose(VecInt(5)(vc), vc, atol=1e-9)
    # zero steps: the velocity itself
    assert torch.equal(integrate_velocity(v, 0), v)


def test_resize_linear_field_align_corners_true():
    """u = A x on a 9^3 grid, resized to 17^3 (twice the spacing ratio), is A x' on the new grid."""
    A = np.array([[0.10, -0.05, 0.02], [0.03, 0.08, -0.04], [-0.06, 0.01, 0.05]])
    def linear(shape):
        x = np.indices(shape, dtype=np.float64)
        return torch.tensor(np.einsum("ij,j...->i...", A, x)[None])
    out = resize_displacement(linear((9, 9, 9)), (17, 17, 17), align_corners=True)
    assert torch.allclose(out, linear((17, 17, 17)), atol=1e-10)
    # and back down
    back = resize_displacement(linear((17, 17, 17)), (9, 9, 9), align_corners=True)
    assert torch.allclose(back, linear((9, 9, 9)), atol=1e-10)


def test_resize_constant_field_scales_per_axis():
    u = torch.ones(1, 3, 4, 5, 6, dtype=torch.float64)
    out = resize_displacement(u, (8, 10, 12), align_corners=False)
    assert torch.allclose(out, torch.full_like(out, 2.0))
    out = ResizeDisplacement(2.0, align_corners=True)(u)
    expect = torch.tensor([7 / 3, 9 / 4, 11 / 5], dtype=torch.float64).view(1, 3, 1, 1, 1)
    assert torch.allclose(out, expect.expand_as(out))


def test_module_wrappers_match_functional_and_hold_no_state():
    img = smooth_image(SHAPE)
    u = smooth_field(SHAPE, 2.0)
    st = SpatialTransformer()
    assert torch.equal(st(img, u), warp(img, u))
    assert len(st.state_dict()) == 0
    # the cached grid follows a new size
    img2, u2 = smooth_image((8, 9, 10)), smooth_field((8, 9, 10), 1.0)
    assert torch.equal(st(img2, u2), warp(img2, u2))
    lab = _blob_labels(SHAPE)
    assert torch.equal(LabelWarper("onehot")(lab, u), warp_labels(lab, u, "onehot"))


def test_grid_cache_is_per_shape_device_dtype():
    g1 = spatial.cached_sampling_grid((4, 5, 6), "cpu", torch.float32)
    g2 = spatial.cached_sampling_grid((4, 5, 6), "cpu", torch.float32)
    g3 = spatial.cached_sampling_grid((4, 5, 6), "cpu", torch.float64)
    assert g1 is g2 and g3.dtype == torch.float64 and g1.shape == (1, 4, 5, 6, 3)


@pytest.mark.parametrize("call", [
    lambda: warp(torch.rand(1, 1, 8, 8), torch.zeros(1, 3, 8, 8, 8)),           # image not 5D
    lambda: warp(torch.rand(1, 1, 8, 8, 8), torch.zeros(1, 2, 8, 8, 8)),        # 2-channel field
    lambda: warp(torch.rand(1, 1, 8, 8, 8), torch.zeros(1, 3, 8, 8, 9)),        # size mismatch
    lambda: warp(torch.rand(2, 1, 8, 8, 8), torch.zeros(3, 3, 8, 8, 8)),        # batch mismatch
    lambda: warp(torch.rand(1, 1, 8, 8, 8), torch.zeros(1, 3, 8, 8, 8), mode="bicubic"),
    lambda: warp_labels(torch.zeros(1, 2, 8, 8, 8), torch.zeros(1, 3, 8, 8, 8)),
    lambda: warp_labels(torch.zeros(1, 1, 8, 8, 8), torch.zeros(1, 3, 8, 8, 8), "linear"),
    lambda: resize_displacement(torch.zeros(1, 3, 8, 8, 8), (8, 8)),
    lambda: compose(torch.zeros(1, 3, 8, 8, 8), torch.zeros(1, 3, 8, 8, 7)),
    lambda: integrate_velocity(torch.zeros(3, 8, 8, 8)),
    lambda: integrate_velocity(torch.zeros(1, 3, 8, 8, 8), steps=-1),
])
def test_malformed_input_raises_value_error(call):
    with pytest.raises(ValueError, match=r"expected|must"):
        call()


def _analytic_diffeomorphism(shape):
    """A smooth displacement of up to ~2.5 voxels whose Jacobian stays positive (|grad u| < 0.6)."""
    idx = np.indices(shape).astype(np.float64)
    return torch.tensor(np.stack([2.0 * np.sin(idx[1] / 5.0), 1.5 * np.cos(idx[2] / 4.0) * np.sin(idx[0] / 6.0),
                                  1.2 * np.sin(idx[0] / 5.0 + idx[1] / 7.0)])[None], dtype=torch.float32)


def test_inverse_displacement_undoes_the_warp():
    shape = (28, 32, 30)
    u = _analytic_diffeomorphism(shape)
    v = invert_displacement(u)
    # the defining identity, evaluated with scipy (an independent interpolator), in float64
    un, vn = u[0].double().numpy(), v[0].double().numpy()
    points = np.indices(shape).astype(np.float64) + un
    v_at = np.stack([ndimage.map_coordinates(vn[i], points, order=1, mode="nearest") for i in range(3)])
    residual = np.linalg.norm(un + v_at, axis=0)
    inside = np.all((points >= 0) & (points <= np.array(shape)[:, None, None, None] - 1), axis=0)
    assert residual[inside].mean() <= 0.1
    stats = inverse_consistency(u, v)
    assert stats["mean"] == pytest.approx(residual[inside].mean(), abs=0.02)
    assert stats["max"] >= stats["mean"]
    image = smooth_image(shape, seed=2, sigma=2.5)
    back = warp(warp(image, u, padding_mode="border"), v, padding_mode="border")
    core = (slice(None), slice(None), slice(4, -4), slice(4, -4), slice(4, -4))
    assert np.corrcoef(back[core].flatten().numpy(), image[core].flatten().numpy())[0, 1] >= 0.995
    # and not by accident: the field itself does move the image
    assert np.corrcoef(warp(image, u)[core].flatten().numpy(), image[core].flatten().numpy())[0, 1] < 0.95


def test_inverse_of_a_translation_is_its_negative():
    u = torch.zeros(1, 3, 12, 14, 10)
    u[:, 0] = 1.5
    u[:, 2] = -0.75
    assert torch.allclose(invert_displacement(u), -u, atol=1e-5)
