"""ITK/ANTs transform files, checked with SimpleITK as the consumer: it applies the exported
displacement field and affine to the moving image, and the result must be our warped image."""
import numpy as np
import pytest
import torch
from scipy import ndimage

from tests.helpers import smooth_image
from utils.io import DataError, Volume
from utils.itk import RAS_TO_LPS, read_itk_affine, voxel_displacement, write_itk_affine, write_itk_displacement
from utils.transforms import AffineMap, FieldMap, resample_image

sitk = pytest.importorskip("SimpleITK")

FIXED_SHAPE = (26, 30, 22)
# permuted, flipped, anisotropic and oblique: far from RAS
_R = np.array([[np.cos(0.3), -np.sin(0.3), 0], [np.sin(0.3), np.cos(0.3), 0], [0, 0, 1]])
FIXED_AFFINE = np.eye(4)
FIXED_AFFINE[:3, :3] = _R @ np.array([[0.0, -1.2, 0], [1.1, 0, 0], [0, 0, 1.6]])
FIXED_AFFINE[:3, 3] = [20.0, -15.0, 4.0]
MOVING_SHAPE = (30, 28, 24)
MOVING_AFFINE = np.diag([-1.0, 1.3, 1.4, 1.0])
# centred on the fixed image's centre, so that the two grids overlap
MOVING_AFFINE[:3, 3] = FIXED_AFFINE[:3, :3] @ ((np.array(FIXED_SHAPE) - 1) / 2) + FIXED_AFFINE[:3, 3] \
    - MOVING_AFFINE[:3, :3] @ ((np.array(MOVING_SHAPE) - 1) / 2)


def _analytic_u(shape):
    idx = np.indices(shape).astype(np.float64)
    return np.stack([1.4 * np.sin(idx[1] / 5.0) + 0.3, -1.1 * np.cos(idx[2] / 4.0), 0.05 * idx[0] - 0.4])


def _pre_alignment():
    angle = np.radians(7.0)
    m = np.eye(4)
    m[:3, :3] = np.array([[1, 0, 0], [0, np.cos(angle), -np.sin(angle)], [0, np.sin(angle), np.cos(angle)]]) * 1.03
    m[:3, 3] = [2.0, -3.0, 1.5]
    return m


def _sitk_image(array, affine):
    """A SimpleITK image of an (i, j, k) array with a RAS voxel-to-world affine."""
    img = sitk.GetImageFromArray(np.ascontiguousarray(np.transpose(array, (2, 1, 0))))
    lps = RAS_TO_LPS @ affine
    spacing = np.sqrt((lps[:3, :3] ** 2).sum(0))
    img.SetSpacing(spacing.tolist())
    img.SetDirection((lps[:3, :3] / spacing).ravel().tolist())
    img.SetOrigin(lps[:3, 3].tolist())
    return img


def test_simpleitk_applies_exported_field_and_affine_like_us(tmp_path):
    moving = smooth_image(MOVING_SHAPE, seed=3, sigma=2.0)[0, 0].numpy().astype(np.float64)
    u = _analytic_u(FIXED_SHAPE)
    matrix = _pre_alignment()
    fixed = Volume(np.zeros(FIXED_SHAPE, np.float32), FIXED_AFFINE, None, "fixed.nii.gz")
    chain = [FieldMap(torch.from_numpy(u).float(), FIXED_AFFINE), AffineMap(matrix)]
    ours = resample_image(moving, MOVING_AFFINE, FIXED_SHAPE, FIXED_AFFINE, chain)

    field_path = write_itk_displacement(tmp_path / "disp.nii.gz", torch.from_numpy(u)[None], fixed)
    affine_path = write_itk_affine(tmp_path / "affine.txt", matrix)
    field = sitk.ReadImage(str(field_path))
    assert field.GetNumberOfComponentsPerPixel() == 3 and field.GetSize() == FIXED_SHAPE
    composite = sitk.CompositeTransform(3)
    composite.AddTransform(sitk.ReadTransform(str(affine_path)))          # applied second to points
    composite.AddTransform(sitk.DisplacementFieldTransform(sitk.Cast(field, sitk.sitkVectorFloat64)))
    reference = _sitk_image(np.zeros(FIXED_SHAPE), FIXED_AFFINE)
    theirs = sitk.Resample(_sitk_image(moving, MOVING_AFFINE), reference, composite, sitk.sitkLinear, 0.0)
    theirs = np.transpose(sitk.GetArrayFromImage(theirs), (2, 1, 0))
    inside = ndimage.binary_erosion(ours > 0, iterations=2)        # away from the moving image's border
    assert inside.mean() > 0.3
    assert np.corrcoef(ours[inside], theirs[inside])[0, 1] >= 0.999
    assert np.abs(ours[inside] - theirs[inside]).max() < 1e-3


def test_itk_field_values_are_lps_millimetres():
    u = np.zeros((3, *FIXED_SHAPE))
    u[0] = 1.0                                            # one voxel along array axis 0
    from utils.itk import itk_displacement
    d = itk_displacement(u, FIXED_AFFINE)[0, 0, 0, 0]
    expected = RAS_TO_LPS[:3, :3] @ FIXED_AFFINE[:3, 0]  # that voxel step in world RAS, flipped to LPS
    assert np.allclose(d, expected, atol=1e-6)
    back = voxel_displacement(itk_displacement(u, FIXED_AFFINE), FIXED_AFFINE)
    assert np.allclose(back, u, atol=1e-5)


def test_affine_file_is_read_by_simpleitk_and_back(tmp_path):
    matrix = _pre_alignment()
    path = write_itk_affine(tmp_path / "a.txt", matrix)
    transform = sitk.ReadTransform(str(path))
    p_ras = np.array([10.0, -4.0, 7.0])
    p_lps = RAS_TO_LPS[:3, :3] @ p_ras
    q_lps = np.array(transform.TransformPoint(p_lps.tolist()))
    assert np.allclose(RAS_TO_LPS[:3, :3] @ q_lps, matrix[:3, :3] @ p_ras + matrix[:3, 3], atol=1e-9)
    assert np.allclose(read_itk_affine(path), matrix, atol=1e-12)
    # a centred affine as ANTs writes it, in both of its file formats
    centred = sitk.AffineTransform(3)
    centred.SetMatrix((1.02, 0.05, 0, -0.04, 0.98, 0.01, 0, 0.02, 1.01))
    centred.SetTranslation((1.5, -2.0, 0.5))
    centred.SetCenter((12.0, -7.0, 3.0))
    for name in ("c.txt", "c.mat"):
        sitk.WriteTransform(centred, str(tmp_path / name))
        read = read_itk_affine(tmp_path / name)
        q = RAS_TO_LPS[:3, :3] @ (read[:3, :3] @ p_ras + read[:3, 3])
        assert np.allclose(q, centred.TransformPoint(p_lps.tolist()), atol=1e-6), name


def test_a_composite_of_affines_acts_as_simpleitk_applies_it(tmp_path):
    first, second = sitk.AffineTransform(3), sitk.AffineTransform(3)
    first.SetMatrix((1.1, 0.0, 0.05, 0.0, 0.9, 0.0, 0.0, 0.1, 1.0))
    first.SetCenter((4.0, -2.0, 1.0))
    second.SetMatrix((0.0, -1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0))     # order matters: a rotation
    second.SetTranslation((10.0, -3.0, 2.0))
    path = tmp_path / "composite.txt"
    sitk.WriteTransform(sitk.CompositeTransform([first, second]), str(path))
    read = read_itk_affine(path)
    theirs = sitk.ReadTransform(str(path))
    for p_ras in ([10.0, -4.0, 7.0], [-3.0, 8.0, 0.5]):
        q_lps = np.array(theirs.TransformPoint((RAS_TO_LPS[:3, :3] @ p_ras).tolist()))
        assert np.allclose(RAS_TO_LPS[:3, :3] @ q_lps, read[:3, :3] @ p_ras + read[:3, 3], atol=1e-9)


def test_several_transforms_without_a_composite_header_are_refused(tmp_path):
    one = write_itk_affine(tmp_path / "one.txt", _pre_alignment()).read_text()
    two = one + one.replace("#Insight Transform File V1.0\n", "").replace("#Transform 0", "#Transform 1")
    (tmp_path / "two.txt").write_text(two)
    with pytest.raises(DataError, match="two.txt: holds 2 transforms without a CompositeTransform"):
        read_itk_affine(tmp_path / "two.txt")
    field_in_composite = ("#Insight Transform File V1.0\n#Transform 0\nTransform: CompositeTransform_double_3_3\n"
                          "#Transform 1\nTransform: DisplacementFieldTransform_double_3_3\n")
    (tmp_path / "field.txt").write_text(field_in_composite)
    with pytest.raises(DataError, match="transform 1 of the composite: transform type "
                                        "'DisplacementFieldTransform_double_3_3' is not supported"):
        read_itk_affine(tmp_path / "field.txt")
