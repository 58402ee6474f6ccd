"""Learn2Reg export: the file the challenge's evaluation reads, checked against a direct numpy
implementation of its warping, and named as its file lookup (stated below in our words) finds it."""
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from scipy import ndimage

import register
from engine.exports import l2r_file_name, l2r_id, l2r_names, parse_l2r_id, write_l2r
from tests.helpers import blob_labels
from tests.layouts import AFFINE
from utils.io import Volume
from utils.spatial import warp_labels

SHAPE = (20, 24, 18)


def _analytic_field():
    idx = np.indices(SHAPE).astype(np.float64)
    return np.stack([1.3 * np.sin(idx[1] / 4) + 0.37, -0.9 * np.cos(idx[2] / 3) - 1.21, 0.08 * idx[0] - 0.6])


def test_l2r_file_warps_labels_as_our_convention(tmp_path):
    u = _analytic_field()
    moving = blob_labels(SHAPE, n_labels=5, seed=4)
    fixed = Volume(np.zeros(SHAPE, np.float32), AFFINE, None, "fixed.nii.gz")
    name, = l2r_names([("x/AbdomenCTCT_0007_0000.nii.gz", "x/AbdomenCTCT_0012_0000.nii.gz")])
    path = write_l2r(tmp_path, name, torch.from_numpy(u)[None].float(), fixed)
    assert evaluation_finds(tmp_path, "imagesTr/AbdomenCTCT_0007_0000.nii.gz", "imagesTr/AbdomenCTCT_0012_0000.nii.gz")
    disp = nib.load(str(path)).get_fdata()
    assert disp.shape == (*SHAPE, 3) and np.allclose(nib.load(str(path)).affine, AFFINE)
    # the challenge: identity + disp.transpose(3, 0, 1, 2), nearest neighbour
    identity = np.meshgrid(*[np.arange(n) for n in SHAPE], indexing="ij")
    theirs = ndimage.map_coordinates(moving, identity + disp.transpose(3, 0, 1, 2), order=0)
    ours = warp_labels(torch.from_numpy(moving)[None, None], torch.from_numpy(u)[None].float())[0, 0].numpy()
    assert set(np.unique(theirs)) == set(np.unique(ours))
    assert (theirs == ours).mean() > 0.999


def evaluation_finds(folder, fixed: str, moving: str) -> bool:
    """The challenge's evaluation, as documented, looking up the field of one pair of its config
    (image paths ending ``<case>_<modality>.nii.gz``): the long name
    ``disp_<fixed case>_<fixed modality>_<moving case>_<moving modality>.nii.gz`` always, the short
    ``disp_<fixed case>_<moving case>.nii.gz`` only for fixed modality 0000 and moving 0001."""
    (fixed_case, fixed_mod), (moving_case, moving_mod) = (Path(p).name.split("_")[-2:] for p in (fixed, moving))
    fixed_mod, moving_mod = fixed_mod[:4], moving_mod[:4]
    candidates = [f"disp_{fixed_case}_{fixed_mod}_{moving_case}_{moving_mod}.nii.gz"]
    if (fixed_mod, moving_mod) == ("0000", "0001"):
        candidates.append(f"disp_{fixed_case}_{moving_case}.nii.gz")
    return any((Path(folder) / c).is_file() for c in candidates)


@pytest.mark.parametrize("fixed, moving, config_fixed, config_moving, atlas_id", [
    # OASIS: the atlas 'fixed.nii.gz' is OASIS_0395_0000 in the challenge's config
    ("data/fixed.nii.gz", "data/Test/OASIS_0396_0000.nii.gz", "imagesTr/OASIS_0395_0000.nii.gz",
     "imagesTr/OASIS_0396_0000.nii.gz", "0395"),
    ("d/AbdomenCTCT_0001_0000.nii.gz", "d/AbdomenCTCT_0002_0000.nii.gz", "imagesTr/AbdomenCTCT_0001_0000.nii.gz",
     "imagesTr/AbdomenCTCT_0002_0000.nii.gz", ""),
    # a CT-MR pair: MR (0000) fixed, CT (0001) moving, where the short name is allowed
    ("d/AbdomenMRCT_0005_0000.nii.gz", "d/AbdomenMRCT_0005_0001.nii.gz", "imagesTr/AbdomenMRCT_0005_0000.nii.gz",
     "imagesTr/AbdomenMRCT_0005_0001.nii.gz", ""),
])
def test_names_we_write_are_the_ones_the_evaluation_looks_up(tmp_path, fixed, moving, config_fixed, config_moving,
                                                             atlas_id):
    fixed_volume = Volume(np.zeros((4, 5, 6), np.float32), AFFINE, None, "fixed.nii.gz")
    name, = l2r_names([(fixed, moving)], parse_l2r_id(atlas_id) if atlas_id else "")
    write_l2r(tmp_path, name, torch.zeros(1, 3, 4, 5, 6), fixed_volume)
    assert evaluation_finds(tmp_path, config_fixed, config_moving)
    assert [p.name for p in tmp_path.iterdir()] == [name]
    # the lookup rule itself is not lenient: a same-modality short name is not found
    assert not evaluation_finds(tmp_path, "imagesTr/OASIS_0395_0000.nii.gz", "imagesTr/OASIS_0397_0000.nii.gz")
    (tmp_path / "disp_0395_0397.nii.gz").write_bytes(b"")
    assert not evaluation_finds(tmp_path, "imagesTr/OASIS_0395_0000.nii.gz", "imagesTr/OASIS_0397_0000.nii.gz")


def test_ids_names_and_refusals():
    assert l2r_id("AbdomenCTCT_0001_0000.nii.gz") == "0001_0000" and l2r_id("/d/OASIS_0395_0000.nii") == "0395_0000"
    assert l2r_id("subject_a.nii.gz") is None and l2r_id("fixed.nii.gz") is None
    assert parse_l2r_id("0395") == "0395_0000" and parse_l2r_id(" 0395_0001 ") == "0395_0001"
    for bad in ("395", "OASIS_0395", "0395_00", ""):
        with pytest.raises(ValueError, match="--l2r-fixed-id"):
            parse_l2r_id(bad)
    assert l2r_file_name("0395_0000", "0396_0000") == "disp_0395_0000_0396_0000.nii.gz"
    assert l2r_file_name("0005_0000", "0005_0001") == "disp_0005_0005.nii.gz"
    assert l2r_file_name("0005_0001", "0005_0000") == "disp_0005_0001_0005_0000.nii.gz"
    # an atlas without an id: refused naming the file, unless its id is given
    with pytest.raises(ValueError, match=r"fixed\.nii\.gz.*--l2r-fixed-id"):
        l2r_names([("d/fixed.nii.gz", "d/OASIS_0396_0000.nii.gz")])
    with pytest.raises(ValueError, match=r"subject\.nii\.gz"):
        l2r_names([("d/OASIS_0395_0000.nii.gz", "d/subject.nii.gz")], "0395_0000")
    # two pairs that would share one file: refused before any work, naming both
    with pytest.raises(ValueError, match="disp_0001_0000_0002_0000.nii.gz"):
        l2r_names([("a/X_0001_0000.nii.gz", "a/X_0002_0000.nii.gz"), ("b/Y_0001_0000.nii.gz", "b/Y_0002_0000.nii.gz")])
    # register.py's own images: stems, said to be outside the challenge's names
    assert l2r_names([("d/fixed.nii.gz", "d/moving.nii")], require_ids=False) == ["disp_fixed_moving.nii.gz"]


def test_register_exports_l2r(tmp_path):
    lab = blob_labels(SHAPE, n_labels=3, seed=1)
    img = ndimage.gaussian_filter(lab.astype(np.float32) * 40, 0.8)
    for name, arr in (("AbdomenCTCT_0001_0000", img), ("AbdomenCTCT_0002_0000", np.roll(img, 1, axis=0))):
        nib.save(nib.Nifti1Image(arr, AFFINE), str(tmp_path / f"{name}.nii.gz"))
    out = tmp_path / "out"
    assert register.main(["--moving", str(tmp_path / "AbdomenCTCT_0002_0000.nii.gz"), "--fixed",
                          str(tmp_path / "AbdomenCTCT_0001_0000.nii.gz"), "--checkpoint", "none", "--io-steps", "2",
                          "--affine", "none", "--out-dir", str(out), "--export", "l2r", "--no-progress"]) == 0
    assert evaluation_finds(out, "imagesTr/AbdomenCTCT_0001_0000.nii.gz", "imagesTr/AbdomenCTCT_0002_0000.nii.gz")
    disp = nib.load(str(out / "disp_0001_0000_0002_0000.nii.gz"))
    ours = np.asarray(nib.load(str(out / "AbdomenCTCT_0002_0000_to_AbdomenCTCT_0001_0000_displacement.nii.gz")).dataobj)
    assert disp.shape == (*SHAPE, 3) and np.allclose(disp.get_fdata(), ours[..., 0, :], atol=1e-5)
    assert register.main(["--moving", str(tmp_path / "AbdomenCTCT_0002_0000.nii.gz"), "--fixed",
                          str(tmp_path / "AbdomenCTCT_0001_0000.nii.gz"), "--checkpoint", "none", "--io-steps", "2",
                          "--out-dir", str(tmp_path / "o2"), "--export", "itk,bogus"]) == 2
