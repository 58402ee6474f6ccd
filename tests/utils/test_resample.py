"""utils.resample against analytic shifts and flips (scipy.ndimage.shift as the reference)."""
import numpy as np
import pytest
from scipy import ndimage

from tests.helpers import blob_labels, smooth_image
from utils.resample import resample_to_grid, same_grid

SHAPE = (13, 11, 9)
FIXED_AFFINE = np.array([[1.5, 0, 0, -10.0], [0, 1.0, 0, 4.0], [0, 0, 2.0, 7.0], [0, 0, 0, 1]])


def test_same_grid_is_the_identity():
    img = smooth_image(SHAPE, seed=1)[0, 0].numpy()
    assert same_grid(SHAPE, FIXED_AFFINE, SHAPE, FIXED_AFFINE + 1e-6)
    assert np.allclose(resample_to_grid(img, FIXED_AFFINE, SHAPE, FIXED_AFFINE), img, atol=1e-6)


def test_world_translation_moves_content_by_voxels():
    """A moving grid 3 mm further along world x (1.5 mm voxels) puts content 2 voxels later."""
    img = smooth_image(SHAPE, seed=2)[0, 0].numpy()
    moved_affine = FIXED_AFFINE.copy()
    moved_affine[0, 3] += 3.0
    assert not same_grid(SHAPE, moved_affine, SHAPE, FIXED_AFFINE)
    out = resample_to_grid(img, moved_affine, SHAPE, FIXED_AFFINE)
    ref = ndimage.shift(img.astype(np.float64), (2, 0, 0), order=1, mode="constant", cval=0)
    assert np.allclose(out, ref, atol=1e-5)


def test_flipped_axis_and_nearest_labels():
    lab = blob_labels(SHAPE, seed=3).astype(np.int32)
    flip = np.eye(4)
    flip[1, 1], flip[1, 3] = -1, SHAPE[1] - 1
    out = resample_to_grid(lab, FIXED_AFFINE @ flip, SHAPE, FIXED_AFFINE, order=0)
    assert out.dtype == lab.dtype
    assert np.array_equal(out, lab[:, ::-1, :])


def test_other_shape_and_subvoxel_offset_match_scipy_map_coordinates():
    img = smooth_image(SHAPE, seed=4)[0, 0].numpy()
    ref_affine = FIXED_AFFINE.copy()
    ref_affine[:3, 3] += (0.75, -0.4, 1.0)
    out_shape = (7, 12, 5)
    out = resample_to_grid(img, FIXED_AFFINE, out_shape, ref_affine)
    idx = np.indices(out_shape).reshape(3, -1)
    world = ref_affine[:3, :3] @ idx + ref_affine[:3, 3:]
    src = np.linalg.solve(FIXED_AFFINE[:3, :3], world - FIXED_AFFINE[:3, 3:])
    ref = ndimage.map_coordinates(img.astype(np.float64), src, order=1, mode="constant", cval=0)
    assert np.allclose(out.ravel(), ref, atol=1e-5)


@pytest.mark.parametrize("call", [
    lambda: resample_to_grid(np.zeros((3, 3)), np.eye(4), (3, 3, 3), np.eye(4)),
    lambda: resample_to_grid(np.zeros((3, 3, 3)), np.eye(4), (3, 3, 3), np.eye(4), order=3),
])
def test_bad_input_raises_value_error(call):
    with pytest.raises(ValueError):
        call()
