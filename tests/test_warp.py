"""register.py's transform outputs used by other programs: SimpleITK, the Learn2Reg warping
(numpy) and warp.py reproduce register.py's own warped outputs; warp.py's errors."""
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

import register
import warp
from tests.forked_scripts import run_script
from tests.helpers import blob_labels

ROOT = Path(__file__).resolve().parents[1]
SHAPE = (30, 34, 28)
FIXED_AFFINE = np.array([[0.0, -1.2, 0, 30.0], [1.1, 0, 0, -20.0], [0, 0, 1.3, 5.0], [0, 0, 0, 1]])
CASE = "moving_to_fixed"


def _save(array, path, affine):
    nib.save(nib.Nifti1Image(array, affine), str(path))
    return str(path)


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    """A pair on two different grids whose moving content is rotated by 6 degrees and shifted,
    registered with pre-alignment, every export and the inverse."""
    d = tmp_path_factory.mktemp("pair")
    lab = blob_labels(SHAPE, n_labels=4, sigma=3.0, seed=21)
    img = ndimage.gaussian_filter(np.array([0, 40, 80, 120, 160.0])[lab], 1.0).astype(np.float32)
    a = np.radians(6.0)
    rot = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    centre = (np.array(SHAPE) - 1) / 2
    offset = centre - rot @ centre + [1.5, -1.0, 0.5]
    moved_img = ndimage.affine_transform(img, rot, offset, order=1)
    moved_lab = ndimage.affine_transform(lab, rot, offset, order=0)
    moving_affine = FIXED_AFFINE.copy()
    moving_affine[:3, 3] += [0.7, -0.4, 1.1]                 # another grid, world-shifted
    files = {"fixed": _save(img, d / "fixed.nii.gz", FIXED_AFFINE),
             "fixed_label": _save(lab.astype(np.int16), d / "fixed_seg.nii.gz", FIXED_AFFINE),
             "moving": _save(moved_img, d / "moving.nii.gz", moving_affine),
             "moving_label": _save(moved_lab.astype(np.int16), d / "moving_seg.nii.gz", moving_affine)}
    out = d / "out"
    assert register.main(["--moving", files["moving"], "--fixed", files["fixed"], "--moving-label",
                          files["moving_label"], "--fixed-label", files["fixed_label"], "--checkpoint", "none",
                          "--io-steps", "30", "--affine", "affine", "--export", "itk,l2r", "--inverse",
                          "--out-dir", str(out), "--no-progress"]) == 0
    return {**files, "out": out, "dir": d}


def _array(path):
    return np.asarray(nib.load(str(path)).dataobj)


def test_pre_alignment_improves_the_start_and_is_recorded(result):
    import csv
    with open(result["out"] / "per_case.csv") as fh:
        row = next(csv.DictReader(fh))
    assert float(row["dice_affine"]) > float(row["dice_initial"]) + 0.1
    assert float(row["dice"]) >= float(row["dice_affine"]) - 0.01
    assert float(row["inverse_consistency_mean"]) < 0.1
    assert (result["out"] / f"{CASE}_affine.txt").is_file()


def test_simpleitk_reproduces_the_warped_image(result):
    sitk = pytest.importorskip("SimpleITK")
    out = result["out"]
    field = sitk.ReadImage(str(out / f"{CASE}_itk_displacement.nii.gz"))
    composite = sitk.CompositeTransform(3)
    composite.AddTransform(sitk.ReadTransform(str(out / f"{CASE}_affine.txt")))
    composite.AddTransform(sitk.DisplacementFieldTransform(sitk.Cast(field, sitk.sitkVectorFloat64)))
    fixed = sitk.ReadImage(result["fixed"])
    theirs = sitk.Resample(sitk.ReadImage(result["moving"], sitk.sitkFloat64), fixed, composite, sitk.sitkLinear, 0.0)
    theirs = np.transpose(sitk.GetArrayFromImage(theirs), (2, 1, 0))
    ours = _array(out / f"{CASE}_warped.nii.gz")
    inside = ndimage.binary_erosion(ours > 1.0, iterations=2)
    assert np.corrcoef(ours[inside], theirs[inside])[0, 1] >= 0.999
    assert np.abs(ours[inside] - theirs[inside]).max() < 0.05 * ours.max()


def test_learn2reg_warping_reproduces_the_warped_label(result):
    disp = nib.load(str(result["out"] / "disp_fixed_moving.nii.gz")).get_fdata()
    assert disp.shape == (*SHAPE, 3)
    moving = _array(result["moving_label"])
    theirs = ndimage.map_coordinates(moving, np.indices(SHAPE) + disp.transpose(3, 0, 1, 2), order=0)
    ours = _array(result["out"] / f"{CASE}_warped_label.nii.gz")
    assert set(np.unique(theirs)) == set(np.unique(ours))
    assert (theirs == ours).mean() > 0.999


def test_warp_py_reproduces_register_outputs(result, tmp_path):
    out = result["out"]
    forward = ["-t", str(out / f"{CASE}_displacement.nii.gz"), "-t", str(out / f"{CASE}_affine.txt")]
    assert warp.main(["--input", result["moving_label"], "--label", "--reference", result["fixed"], "--out",
                      str(tmp_path / "label.nii.gz"), *forward]) == 0
    theirs, ours = _array(tmp_path / "label.nii.gz"), _array(out / f"{CASE}_warped_label.nii.gz")
    assert set(np.unique(theirs)) == set(np.unique(ours)) and (theirs == ours).mean() > 0.999
    # the same with the ITK/ANTs field in millimetres
    itk = ["-t", str(out / f"{CASE}_itk_displacement.nii.gz"), "-t", str(out / f"{CASE}_affine.txt")]
    assert warp.main(["--input", result["moving"], "--reference", result["fixed"], "--out",
                      str(tmp_path / "image.nii.gz"), *itk]) == 0
    ours = _array(out / f"{CASE}_warped.nii.gz")
    assert np.abs(_array(tmp_path / "image.nii.gz") - ours).max() < 1e-3 * ours.max()
    assert np.allclose(nib.load(str(tmp_path / "image.nii.gz")).affine, FIXED_AFFINE)


def test_warp_py_inverse_brings_the_fixed_image_onto_the_moving_grid(result, tmp_path):
    out = result["out"]
    assert warp.main(["--input", result["fixed"], "--reference", result["moving"], "--out",
                      str(tmp_path / "back.nii.gz"), "-t", f"[{out / f'{CASE}_affine.txt'},1]",
                      "-t", str(out / f"{CASE}_inverse_displacement.nii.gz")]) == 0
    back = _array(tmp_path / "back.nii.gz")
    assert np.allclose(back, _array(out / f"{CASE}_inverse_warped.nii.gz"), atol=1e-3)
    moving = _array(result["moving"])
    inside = ndimage.binary_erosion(moving > 1.0, iterations=3) & (back > 1.0)
    assert np.corrcoef(back[inside], moving[inside])[0, 1] > 0.97


@pytest.mark.parametrize("extra, expected", [
    (["-t", "[{field},1]"], "cannot be inverted"),
    (["-t", "{dir}/nope.txt"], "nope.txt: transform file not found"),
    (["-t", "{fixed}"], "not a 3D displacement field"),
    (["-t", "{dir}/x.h5"], "unknown transform file"),
])
def test_warp_py_bad_input(result, tmp_path, extra, expected):
    values = {"field": result["out"] / f"{CASE}_displacement.nii.gz", "dir": result["dir"], "fixed": result["fixed"]}
    args = [a.format(**values) for a in extra]
    res = run_script("warp.py", ["--input", result["moving"], "--reference", result["fixed"], "--out",
                                 str(tmp_path / "o.nii.gz"), *args], cwd=ROOT)
    assert res.returncode == 2 and expected in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "o.nii.gz").exists()


def test_warp_py_keeps_an_existing_output(result, tmp_path):
    target = tmp_path / "kept.nii.gz"
    target.write_bytes(b"earlier")
    assert warp.main(["--input", result["moving"], "--reference", result["fixed"], "--out", str(target)]) == 2
    assert target.read_bytes() == b"earlier"
    assert warp.main(["--input", result["moving"], "--reference", result["fixed"], "--out", str(target),
                      "--overwrite"]) == 0
    assert nib.load(str(target)).shape == SHAPE


def test_warp_py_reads_a_composite_affine_file_in_itk_order(result, tmp_path):
    """The register.py affine split into two factors written as one CompositeTransform file."""
    sitk = pytest.importorskip("SimpleITK")
    out = result["out"]
    whole = sitk.ReadTransform(str(out / f"{CASE}_affine.txt"))
    whole = sitk.AffineTransform(whole)
    a = np.radians(20.0)
    inner = sitk.AffineTransform(3)              # acts on the point first: the file's last transform
    inner.SetMatrix((np.cos(a), -np.sin(a), 0, np.sin(a), np.cos(a), 0, 0, 0, 1))
    inner.SetTranslation((3.0, -1.0, 2.0))
    m_inner = np.eye(4)
    m_inner[:3, :3], m_inner[:3, 3] = np.reshape(inner.GetMatrix(), (3, 3)), inner.GetTranslation()
    m_whole = np.eye(4)
    m_whole[:3, :3] = np.reshape(whole.GetMatrix(), (3, 3))
    m_whole[:3, 3] = np.array(whole.GetTranslation()) + whole.GetCenter() - m_whole[:3, :3] @ whole.GetCenter()
    m_outer = m_whole @ np.linalg.inv(m_inner)
    outer = sitk.AffineTransform(3)
    outer.SetMatrix(m_outer[:3, :3].ravel().tolist())
    outer.SetTranslation(m_outer[:3, 3].tolist())
    sitk.WriteTransform(sitk.CompositeTransform([outer, inner]), str(tmp_path / "composite.txt"))
    assert warp.main(["--input", result["moving"], "--reference", result["fixed"], "--out",
                      str(tmp_path / "image.nii.gz"), "-t", str(out / f"{CASE}_displacement.nii.gz"),
                      "-t", str(tmp_path / "composite.txt")]) == 0
    ours = _array(out / f"{CASE}_warped.nii.gz")
    assert np.abs(_array(tmp_path / "image.nii.gz") - ours).max() < 1e-3 * ours.max()


def test_warp_py_asks_the_units_of_a_field_that_does_not_say_them(result, tmp_path):
    img = nib.load(str(result["out"] / f"{CASE}_displacement.nii.gz"))
    bare = tmp_path / "bare_field.nii.gz"              # (X, Y, Z, 3) in voxels, no intent: voxelmorph-like
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj)[:, :, :, 0, :], img.affine), str(bare))
    args = ["--input", result["moving"], "--reference", result["fixed"], "--out", str(tmp_path / "o.nii.gz"),
            "-t", str(bare), "-t", str(result["out"] / f"{CASE}_affine.txt")]
    res = run_script("warp.py", args, cwd=ROOT)
    assert res.returncode == 2 and "bare_field.nii.gz: a field of shape (30, 34, 28, 3)" in res.stderr
    assert "--field-units" in res.stderr and "Traceback" not in res.stderr and not (tmp_path / "o.nii.gz").exists()
    assert warp.main([*args, "--field-units", "voxels"]) == 0
    ours = _array(result["out"] / f"{CASE}_warped.nii.gz")
    assert np.abs(_array(tmp_path / "o.nii.gz") - ours).max() < 1e-3 * ours.max()


def test_warp_py_warns_when_nothing_overlaps(result, tmp_path):
    far = np.eye(4)
    far[:3, 3] = [500.0, 0.0, 0.0]
    from utils.itk import write_itk_affine
    write_itk_affine(tmp_path / "far.txt", far)
    res = run_script("warp.py", ["--input", result["moving"], "--reference", result["fixed"], "--out",
                                 str(tmp_path / "o.nii.gz"), "-t", str(tmp_path / "far.txt")], cwd=ROOT)
    assert res.returncode == 0 and "warning:" in res.stderr and "no voxel of the reference grid maps inside" in res.stderr
    assert not _array(tmp_path / "o.nii.gz").any()
