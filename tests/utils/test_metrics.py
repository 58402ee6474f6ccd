"""utils.metrics against hand-built volumes, brute-force references and analytic fields."""
import numpy as np
import pytest
import torch
from scipy.spatial.distance import cdist

from tests.helpers import smooth_field
from utils.metrics import (dice_per_label, hd95_masks, hd95_per_label, jacobian_determinant, jacobian_stats,
                           mean_dice, sdlogj, sdlogj_l2r)


def _boxes():
    a = np.zeros((10, 10, 10), dtype=np.int32)
    b = np.zeros_like(a)
    a[0:4, 0:4, 0:4] = 1        # 64 voxels
    b[2:6, 0:4, 0:4] = 1        # 64 voxels, 32 shared
    a[6:9, 6:9, 6:9] = 2        # only in a
    b[5:7, 5:7, 5:7] = 4        # only in b
    return a, b


def test_dice_known_overlaps_and_missing_labels():
    a, b = _boxes()
    d = dice_per_label(a, b, [0, 1, 2, 3, 4])
    # background dropped; label 3 is in neither volume -> NaN
    assert d.shape == (4,)
    assert d[0] == pytest.approx(0.5)
    assert d[1] == 0.0 and d[3] == 0.0
    assert np.isnan(d[2])
    assert mean_dice(a, b, [1, 2, 3, 4]) == pytest.approx(0.5 / 3)
    assert dice_per_label(a, a, [1, 2]).tolist() == [1.0, 1.0]


def test_dice_accepts_torch_with_leading_axes():
    a, b = _boxes()
    ta, tb = torch.tensor(a)[None, None], torch.tensor(b)[None]
    assert np.allclose(dice_per_label(ta, tb, [1, 2, 4]), dice_per_label(a, b, [1, 2, 4]), equal_nan=True)


def _surface_reference(mask):
    """Voxels of the mask with a 6-neighbour outside the mask or outside the volume."""
    p = np.pad(mask, 1, constant_values=False)
    inner = p[1:-1, 1:-1, 1:-1]
    all_in = inner.copy()
    for ax in range(3):
        for s in (1, -1):
            all_in &= np.roll(p, s, axis=ax)[1:-1, 1:-1, 1:-1]
    return inner & ~all_in


def _hd95_reference(a, b, spacing=(1.0, 1.0, 1.0)):
    pa = np.argwhere(_surface_reference(a)) * np.asarray(spacing)
    pb = np.argwhere(_surface_reference(b)) * np.asarray(spacing)
    dist = cdist(pa, pb)
    return np.percentile(np.concatenate([dist.min(1), dist.min(0)]), 95)


def _ball(shape, centre, radius):
    idx = np.indices(shape)
    return sum((idx[i] - centre[i]) ** 2 for i in range(3)) <= radius ** 2


def test_hd95_concentric_spheres_is_radius_difference():
    inner, outer = _ball((26, 26, 26), (13, 13, 13), 4), _ball((26, 26, 26), (13, 13, 13), 9)
    assert hd95_masks(inner, outer) == pytest.approx(5.0, abs=1.0)


@pytest.mark.parametrize("spacing", [None, (1.0, 1.5, 0.8)])
def test_hd95_matches_brute_force(spacing):
    rng = np.random.default_rng(0)
    a = _ball((20, 18, 16), (9, 8, 7), 5) | (rng.random((20, 18, 16)) > 0.97)
    b = _ball((20, 18, 16), (11, 9, 8), 6)
    ref = _hd95_reference(a, b, spacing or (1.0, 1.0, 1.0))
    assert hd95_masks(a, b, spacing) == pytest.approx(ref, abs=1e-9)


def test_hd95_per_label_identical_zero_and_missing_nan():
    a, b = _boxes()
    h = hd95_per_label(a, b, [1, 2, 3])
    assert h[0] == pytest.approx(_hd95_reference(a == 1, b == 1))
    assert np.isnan(h[1]) and np.isnan(h[2])
    assert hd95_per_label(a, a, [1, 2]).tolist() == [0.0, 0.0]


def test_jacobian_identity_is_one():
    det = jacobian_determinant(torch.zeros(1, 3, 6, 7, 8))
    assert det.shape == (6, 7, 8) and np.all(det == 1.0)
    stats = jacobian_stats(np.zeros((3, 6, 7, 8)))
    assert stats["pct_nonpos_jac"] == 0.0 and stats["n_nonpos_jac"] == 0 and stats["sdlogj"] == 0.0


def test_jacobian_of_linear_field_is_det_of_identity_plus_a():
    A = np.array([[0.2, -0.1, 0.05], [0.3, -0.4, 0.1], [0.0, 0.25, 0.15]])
    x = np.indices((7, 8, 9), dtype=np.float64)
    u = np.einsum("ij,j...->i...", A, x)
    assert np.allclose(jacobian_determinant(u), np.linalg.det(np.eye(3) + A), atol=1e-12)


def _jacobian_reference(u):
    """Interior determinant by explicit central differences and np.linalg.det."""
    d = np.zeros(u.shape[1:]) * np.nan
    core = tuple(slice(1, -1) for _ in range(3))
    J = np.zeros(tuple(s - 2 for s in u.shape[1:]) + (3, 3))
    for i in range(3):
        for j in range(3):
            hi = [slice(1, -1)] * 3
            lo = [slice(1, -1)] * 3
            hi[j], lo[j] = slice(2, None), slice(None, -2)
            J[..., i, j] = (u[i][tuple(hi)] - u[i][tuple(lo)]) / 2 + (i == j)
    d[core] = np.linalg.det(J)
    return d


def test_jacobian_matches_reference_and_detects_fold():
    shape = (16, 16, 16)
    idx = np.indices(shape, dtype=np.float64)
    bump = np.exp(-sum((idx[i] - 8.0) ** 2 for i in range(3)) / (2 * 2.0 ** 2))
    u = np.zeros((3,) + shape)
    u[0] = 6.0 * bump  # d(x0 + u0)/dx0 = 1 - 6 (x0 - 8) / 4 exp(...) < 0 near x0 = 10
    u += smooth_field(shape, 0.3, seed=1).numpy()[0]
    det = jacobian_determinant(u)
    ref = _jacobian_reference(u)
    core = (slice(1, -1),) * 3
    assert np.allclose(det[core], ref[core], atol=1e-12)
    stats = jacobian_stats(u)
    assert stats["n_nonpos_jac"] == int((det <= 0).sum()) > 0
    assert stats["pct_nonpos_jac"] == pytest.approx(100.0 * (det <= 0).mean())
    assert stats["pct_neg_jac"] <= stats["pct_nonpos_jac"]


def test_sdlogj_definitions():
    det = np.full((10, 10, 10), 2.0)
    assert sdlogj(det) == pytest.approx(0.0)
    det[5, 5, 5] = 4.0
    logs = np.log(det)
    assert sdlogj(det) == pytest.approx(logs.std())
    # the Learn2Reg variant shifts by 3 and ignores a 2-voxel border
    border = np.full((10, 10, 10), 1.0)
    border[0, 0, 0] = -5.0
    assert sdlogj_l2r(border) == pytest.approx(0.0)
    # here the clipped log(1e-9) of one voxel in 1000 counts: std = |log 1e-9| sqrt(p (1 - p))
    p = 1e-3
    assert sdlogj(border) == pytest.approx(-np.log(1e-9) * np.sqrt(p * (1 - p)), rel=1e-9)


@pytest.mark.parametrize("call", [
    lambda: dice_per_label(np.zeros((4, 4, 4)), np.zeros((4, 4, 5)), [1]),
    lambda: dice_per_label(np.zeros((4, 4)), np.zeros((4, 4)), [1]),
    lambda: hd95_masks(np.zeros((4, 4, 4)), np.zeros((4, 4, 5))),
    lambda: hd95_per_label(np.zeros((4, 4, 4)), np.zeros((4, 4, 4)), [1], spacing=(1, 1)),
    lambda: jacobian_determinant(np.zeros((2, 4, 4, 4))),
    lambda: jacobian_determinant(np.zeros((2, 3, 4, 4, 4))),
    lambda: jacobian_determinant(np.zeros((3, 4, 4, 1))),
])
def test_malformed_input_raises_value_error(call):
    with pytest.raises(ValueError, match=r"expected|must|needs"):
        call()
