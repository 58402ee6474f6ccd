"""Affine pre-alignment: known rotations, translations and scalings are recovered from a synthetic
pair made with scipy (an independent resampler); an aligned pair stays aligned."""
import numpy as np
import pytest
from scipy import ndimage

from utils.affine import (AlignmentSettings, align_volumes, masked_ncc, mutual_information, rotation_angle_deg,
                          rotation_matrix)
from utils.demo_data import load_template


def _rotation(deg, axis):
    a = np.radians(deg)
    i, j = [k for k in range(3) if k != axis]
    r = np.eye(3)
    r[i, i] = r[j, j] = np.cos(a)
    r[i, j], r[j, i] = -np.sin(a), np.sin(a)
    return r


@pytest.fixture(scope="module")
def template():
    t1, labels, affine = load_template()
    return t1, labels, affine


def _moving(t1, affine, linear, shift_mm):
    """The template under a known world transform T (fixed point p <-> moving point T p), and T."""
    centre = affine[:3, :3] @ ((np.array(t1.shape) - 1) / 2) + affine[:3, 3]
    truth = np.eye(4)
    truth[:3, :3] = linear
    truth[:3, 3] = centre - linear @ centre + np.asarray(shift_mm)
    to_fixed = np.linalg.inv(affine) @ np.linalg.inv(truth) @ affine      # moving voxel -> fixed voxel
    return ndimage.affine_transform(t1, to_fixed[:3, :3], to_fixed[:3, 3], order=1), truth


def _errors(estimate, truth, labels, affine):
    """Mean and max point error (voxels of 2 mm) over the brain, rotation error (degrees), scale errors."""
    points = np.argwhere(labels > 0)[::20].astype(np.float64) @ affine[:3, :3].T + affine[:3, 3]
    diff = points @ (estimate[:3, :3] - truth[:3, :3]).T + (estimate[:3, 3] - truth[:3, 3])
    dist = np.linalg.norm(diff, axis=1) / 2.0
    u_e, s_e, vt_e = np.linalg.svd(estimate[:3, :3])
    u_t, s_t, vt_t = np.linalg.svd(truth[:3, :3])
    rotation_error = rotation_angle_deg((u_e @ vt_e) @ (u_t @ vt_t).T)
    return dist.mean(), dist.max(), rotation_error, np.abs(s_e / s_t - 1).max()


@pytest.mark.parametrize("kind, linear, shift", [
    ("affine", _rotation(10, 2) @ _rotation(4, 0) @ np.diag([1.04, 0.97, 1.0]), [16.0, -6.0, 4.0]),
    ("rigid", _rotation(-8, 1) @ _rotation(5, 2), [-10.0, 12.0, 0.0]),
])
def test_known_transform_is_recovered(template, kind, linear, shift):
    t1, labels, affine = template
    moving, truth = _moving(t1, affine, linear, shift)
    result = align_volumes(moving, affine, t1, affine, kind)
    mean, worst, rotation, scale = _errors(result.matrix, truth, labels, affine)
    assert mean < 0.5 and worst < 1.0, (mean, worst)
    assert rotation < 0.5
    assert scale < 0.01
    assert result.similarity_after > result.similarity_before
    if kind == "rigid":
        assert np.allclose(result.matrix[:3, :3] @ result.matrix[:3, :3].T, np.eye(3), atol=1e-9)


def test_aligned_pair_stays_aligned(template):
    import torch
    t1, labels, affine = template
    with torch.inference_mode():                 # as inside an inference loop: it still optimises
        result = align_volumes(t1, affine, t1, affine, "affine")
    mean, worst, _, _ = _errors(result.matrix, np.eye(4), labels, affine)
    assert mean < 0.1 and worst < 0.25


def test_mutual_information_aligns_inverted_contrast(template):
    """Another 'modality': intensities inverted inside the head; NCC cannot align it, MI can."""
    t1, labels, affine = template
    other = np.where(t1 > 0.05, 1.2 - t1, 0.0).astype(np.float32)
    moving, truth = _moving(other, affine, _rotation(6, 2), [8.0, -6.0, 4.0])
    mi = align_volumes(moving, affine, t1, affine, "rigid", AlignmentSettings(metric="mi"))
    assert _errors(mi.matrix, truth, labels, affine)[0] < 0.5
    ncc = align_volumes(moving, affine, t1, affine, "rigid", AlignmentSettings(metric="ncc"))
    assert _errors(ncc.matrix, truth, labels, affine)[0] > 1.0


def test_none_is_the_identity(template):
    t1, _, affine = template
    assert np.array_equal(align_volumes(t1, affine, t1, affine, "none").matrix, np.eye(4))
    with pytest.raises(ValueError, match="rigid"):
        align_volumes(t1, affine, t1, affine, "similarity")


def test_similarity_measures_and_rotation_convention():
    import torch
    rng = np.random.default_rng(0)
    a = torch.tensor(rng.random(5000))
    mask = torch.ones_like(a)
    assert float(masked_ncc(a, a, mask)) == pytest.approx(1.0, abs=1e-9)
    assert float(masked_ncc(a, 2 - 3 * a, mask)) == pytest.approx(-1.0, abs=1e-9)
    b = torch.tensor(rng.random(5000))
    # a deterministic function of a shares far more information with a than independent noise
    assert float(mutual_information(a, 1 - a, mask)) > 10 * float(mutual_information(a, b, mask))
    r = rotation_matrix(torch.tensor([0.0, 0.0, np.pi / 2], dtype=torch.float64)).numpy()
    assert np.allclose(r @ [1.0, 0, 0], [0, 1.0, 0], atol=1e-12)       # about z: x -> y
