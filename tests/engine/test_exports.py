"""Learn2Reg export: the file the challenge's evaluation reads, checked against a direct numpy
implementation of its warping."""
import nibabel as nib
import numpy as np
import torch
from scipy import ndimage

import register
from engine.exports import l2r_case_id, write_l2r
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
    path = write_l2r(tmp_path, "x/AbdomenCTCT_0007_0000.nii.gz", "x/AbdomenCTCT_0012_0000.nii.gz",
                     torch.from_numpy(u)[None].float(), fixed)
    assert path.name == "disp_0007_0012.nii.gz"
    disp = nib.load(str(path)).get_fdata()
    assert disp.shape == (*SHAPE, 3) and np.allclose(nib.load(str(path)).affine, AFFINE)
    # the challenge: identity + disp.transpose(3, 0, 1, 2), nearest neighbour
    identity = np.meshgrid(*[np.arange(n) for n in SHAPE], indexing="ij")
    theirs = ndimage.map_coordinates(moving, identity + disp.transpose(3, 0, 1, 2), order=0)
    ours = warp_labels(torch.from_numpy(moving)[None, None], torch.from_numpy(u)[None].float())[0, 0].numpy()
    assert set(np.unique(theirs)) == set(np.unique(ours))
    assert (theirs == ours).mean() > 0.999


def test_l2r_case_ids():
    assert l2r_case_id("AbdomenCTCT_0001_0000.nii.gz") == "0001"
    assert l2r_case_id("/d/OASIS_0395_0000.nii.gz") == "0395"
    assert l2r_case_id("subject_a.nii.gz") == "subject_a"


def test_register_exports_l2r(tmp_path):
    lab = blob_labels(SHAPE, n_labels=3, seed=1)
    img = ndimage.gaussian_filter(lab.astype(np.float32) * 40, 0.8)
    for name, arr in (("AbdomenCTCT_0001_0000", img), ("AbdomenCTCT_0002_0000", np.roll(img, 1, axis=0))):
        nib.save(nib.Nifti1Image(arr, AFFINE), str(tmp_path / f"{name}.nii.gz"))
    out = tmp_path / "out"
    assert register.main(["--moving", str(tmp_path / "AbdomenCTCT_0002_0000.nii.gz"), "--fixed",
                          str(tmp_path / "AbdomenCTCT_0001_0000.nii.gz"), "--checkpoint", "none", "--io-steps", "2",
                          "--affine", "none", "--out-dir", str(out), "--export", "l2r", "--no-progress"]) == 0
    disp = nib.load(str(out / "disp_0001_0002.nii.gz"))
    ours = np.asarray(nib.load(str(out / "AbdomenCTCT_0002_0000_to_AbdomenCTCT_0001_0000_displacement.nii.gz")).dataobj)
    assert disp.shape == (*SHAPE, 3) and np.allclose(disp.get_fdata(), ours[..., 0, :], atol=1e-5)
    assert register.main(["--moving", str(tmp_path / "AbdomenCTCT_0002_0000.nii.gz"), "--fixed",
                          str(tmp_path / "AbdomenCTCT_0001_0000.nii.gz"), "--checkpoint", "none", "--io-steps", "2",
                          "--out-dir", str(tmp_path / "o2"), "--export", "itk,bogus"]) == 2
