"""Writes tiny data sets in each data set's exact on-disk layout and naming (README, "Data sets")."""
from __future__ import annotations

import pickle
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from tests.helpers import blob_labels

SHAPE = (32, 40, 36)
AFFINE = np.array([[-1.2, 0.0, 0.0, 90.0], [0.0, 1.1, 0.0, -120.0], [0.0, 0.0, 1.3, -60.0], [0, 0, 0, 1]])


def _subject(seed: int, label_values, shape=SHAPE, intensity=(0.2, 1.0), shift=True):
    """An (image, label) pair: blobs carrying ``label_values``, shifted a little per subject."""
    lab = blob_labels(shape, n_labels=min(4, len(label_values)), seed=seed)
    lut = np.concatenate([[0], np.asarray(label_values)[:lab.max()]])
    lab = lut[lab]
    if shift:
        rng = np.random.default_rng(seed + 100)
        lab = ndimage.shift(lab, rng.uniform(-1.5, 1.5, 3), order=0, mode="constant")
    rng = np.random.default_rng(seed + 200)
    levels = {v: rng.uniform(*intensity) for v in np.unique(lab) if v}
    img = np.zeros(shape, np.float32)
    for v, level in levels.items():
        img[lab == v] = level
    img = ndimage.gaussian_filter(img, 0.8) + rng.normal(0, 0.01 * (intensity[1] - intensity[0]), shape)
    return img.astype(np.float32), lab.astype(np.int16)


def _nii(arr, path: Path, affine=AFFINE):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(arr, affine), str(path))


def write_oasis(root: Path, n_train=3, n_test=2, labels=(1, 2, 3, 4)) -> Path:
    img, lab = _subject(0, labels, shift=False)
    _nii(img, root / "fixed.nii.gz")
    _nii(lab, root / "label" / "OASIS_0395_0000.nii.gz")
    for i in range(1, n_train + n_test + 1):
        name = f"OASIS_{i:04d}_0000.nii.gz"
        img, lab = _subject(i, labels)
        _nii(img, root / ("Train" if i <= n_train else "Test") / name)
        _nii(lab, root / "label" / name)
    return root


def write_lpba40(root: Path, n_train=3, n_test=2, labels=(21, 22, 41, 42)) -> Path:
    img_dir = root / "delineation_l_norm"
    img, lab = _subject(0, labels, shift=False)
    _nii(img, img_dir / "fixed.nii.gz")
    _nii(lab, root / "label" / "S01.delineation.structure.label.nii.gz")
    ids = [f"S{i:02d}" for i in range(2, 2 + n_test)] + [f"S{i}" for i in range(11, 11 + n_train)]
    for k, sid in enumerate(ids):
        img, lab = _subject(k + 1, labels)
        _nii(img, img_dir / ("test" if k < n_test else "train") / f"{sid}.delineation.skullstripped.nii.gz")
        _nii(lab, root / "label" / f"{sid}.delineation.structure.label.nii.gz")
    return root


def write_ixi(root: Path, n_train=3, n_val=1, n_test=2, labels=(2, 3, 4, 7)) -> Path:
    def dump(seed, path, shift=True):
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as fh:
            pickle.dump(_subject(seed, labels, shift=shift), fh)
    dump(0, root / "atlas.pkl", shift=False)
    k = 1
    for folder, n in (("Train", n_train), ("Val", n_val), ("Test", n_test)):
        for i in range(n):
            dump(k, root / folder / f"subject_{k}.pkl")
            k += 1
    return root


def write_abdomenctct(root: Path, n=6, labels=(1, 2, 3, 4)) -> Path:
    for i in range(1, n + 1):
        img, lab = _subject(i, labels, intensity=(-100.0, 300.0))
        img[lab == 0] = -1000.0
        name = f"AbdomenCTCT_{i:04d}_0000.nii.gz"
        _nii(img, root / "imagesTr" / name)
        _nii(lab, root / "labelsTr" / name)
    # an unlabelled test image, as in the Learn2Reg release
    _nii(_subject(99, labels)[0], root / "imagesTs" / "AbdomenCTCT_0031_0000.nii.gz")
    return root


def write_srreg(root: Path, n=5, labels=(2, 3, 4, 7)) -> Path:
    for i in range(1, n + 1):
        sid = f"1BA{i:03d}"
        ct, lab = _subject(i, labels, intensity=(0.0, 80.0))
        ct[lab == 0] = -1000.0
        mr, _ = _subject(i, labels, intensity=(100.0, 900.0))
        _nii(ct, root / "vol" / f"{sid}_ct.nii.gz")
        _nii(mr, root / "vol" / f"{sid}_mr.nii.gz")
        _nii(lab, root / "seg" / f"{sid}.nii.gz")
    return root


WRITERS = {"OASIS": write_oasis, "LPBA40": write_lpba40, "IXI": write_ixi, "AbdomenCTCT": write_abdomenctct,
           "SRReg": write_srreg}

# settings that make the presets fit these tiny sets and a small, quick network
QUICK_OVERRIDES = {
    "common": ["model.widths=8,16,16,32,32", "model.num_heads=4", "model.window_size=2,3,2",
               "train.ncc_window=5"],
    "OASIS": ["data.labels=1,2,3,4", "data.val_subjects=1"],
    "LPBA40": ["data.labels=21,22,41,42", "data.val_subjects=1"],
    "IXI": ["data.labels=2,3,4,7"],
    "AbdomenCTCT": ["data.labels=1,2,3,4", "data.n_train=4", "data.n_test=2", "data.val_subjects=2"],
    "SRReg": ["data.labels=2,3,4,7", "data.n_train=3", "data.val_subjects=1"],
}


def quick_overrides(dataset: str) -> list[str]:
    return QUICK_OVERRIDES["common"] + QUICK_OVERRIDES[dataset]
