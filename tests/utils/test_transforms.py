"""World-space transform chains: pinned against scipy and the voxel-space warp convention."""
import numpy as np
import torch
from scipy import ndimage

from tests.helpers import blob_labels, smooth_field, smooth_image
from utils.transforms import AffineMap, FieldMap, resample_image, resample_labels

SHAPE = (14, 16, 12)
AFFINE = np.array([[0.0, -1.5, 0, 10.0], [1.2, 0, 0, -8.0], [0, 0, 2.0, 3.0], [0, 0, 0, 1]])


def test_empty_chain_is_header_resampling_as_scipy_does_it():
    image = smooth_image(SHAPE, seed=1)[0, 0].numpy()
    other = AFFINE.copy()
    other[:3, :3] *= 0.8
    other[:3, 3] += [1.0, -2.0, 0.5]
    ours = resample_image(image, AFFINE, SHAPE, other)
    to_source = np.linalg.inv(AFFINE) @ other
    ref = ndimage.affine_transform(image.astype(np.float64), to_source[:3, :3], to_source[:3, 3], order=1,
                                   mode="constant", cval=0.0)
    inside = ndimage.binary_erosion(ref > 0, iterations=1)
    assert np.abs(ours - ref)[inside].max() < 1e-5


def test_field_on_the_same_grid_is_the_voxel_warp_convention():
    image = smooth_image(SHAPE, seed=2)[0, 0].numpy().astype(np.float64)
    u = smooth_field(SHAPE, 2.0, seed=3)[0].numpy().astype(np.float64)
    ours = resample_image(image, AFFINE, SHAPE, AFFINE, [FieldMap(torch.from_numpy(u).float(), AFFINE)])
    ref = ndimage.map_coordinates(image, np.indices(SHAPE) + u, order=1, mode="grid-constant", cval=0.0)
    assert np.abs(ours - ref).max() < 1e-4


def test_world_translation_moves_content_the_expected_way():
    """T(p) = p + t reads the source at p + t: content moves by -t in world space."""
    image = np.zeros(SHAPE, np.float32)
    image[7, 8, 6] = 1.0
    step = AFFINE[:3, :3] @ np.array([0.0, 2.0, 0.0])      # two voxels along array axis 1, in mm
    shift = np.eye(4)
    shift[:3, 3] = step
    out = resample_image(image, AFFINE, SHAPE, AFFINE, [AffineMap(shift)])
    assert np.unravel_index(out.argmax(), SHAPE) == (7, 6, 6)
    assert out.max() > 0.999
    back = resample_image(out, AFFINE, SHAPE, AFFINE, [AffineMap(shift).inverse()])
    assert np.unravel_index(back.argmax(), SHAPE) == (7, 8, 6)


def test_labels_keep_their_values():
    labels = (blob_labels(SHAPE, n_labels=4, seed=5) * 7).astype(np.int32)
    u = smooth_field(SHAPE, 1.5, seed=6)[0]
    for interpolation in ("nearest", "onehot"):
        out = resample_labels(labels, AFFINE, SHAPE, AFFINE, [FieldMap(u, AFFINE)], interpolation)
        assert out.dtype == labels.dtype
        assert set(np.unique(out)) <= set(np.unique(labels))
        assert len(set(np.unique(out))) == len(set(np.unique(labels)))
