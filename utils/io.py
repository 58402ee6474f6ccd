"""Reading and writing volumes, with errors that name the file and the problem.

Arrays are kept in the file's voxel index order (i, j, k), as nibabel returns them.
Everything written as NIfTI carries a reference image's affine and header (the
fixed image of the pair), so outputs overlay the fixed image in ITK-SNAP or 3D Slicer.
"""
from __future__ import annotations

import os
import pickle
import tempfile
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np


class DataError(ValueError):
    """An input file or folder that cannot be used; the message names it and says why."""


@dataclass
class Volume:
    """A 3D array with the geometry of the file it came from (identity affine for pickles)."""
    array: np.ndarray
    affine: np.ndarray
    header: nib.Nifti1Header | None
    path: str

    @property
    def spacing(self) -> tuple[float, float, float]:
        return tuple(float(v) for v in np.sqrt((self.affine[:3, :3] ** 2).sum(0)))


def _as_3d(arr: np.ndarray, path, what: str) -> np.ndarray:
    arr = np.asarray(arr)
    while arr.ndim > 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim != 3:
        raise DataError(f"{path}: expected a 3D {what}, got an array of shape {arr.shape}")
    if min(arr.shape) < 2:
        raise DataError(f"{path}: {what} of shape {arr.shape} has an axis shorter than 2 voxels")
    return arr


def check_image_values(arr: np.ndarray, path) -> None:
    if not np.isfinite(arr).all():
        bad = int((~np.isfinite(arr)).sum())
        raise DataError(f"{path}: image has {bad} NaN/Inf voxel(s)")


def check_label_values(arr: np.ndarray, path) -> np.ndarray:
    if not np.isfinite(arr).all():
        raise DataError(f"{path}: label map has NaN/Inf voxels")
    rounded = np.rint(arr)
    if np.abs(arr - rounded).max() > 1e-3:
        raise DataError(f"{path}: label map holds non-integer values (is this an image?)")
    if not rounded.any():
        raise DataError(f"{path}: label map is empty (all background)")
    return rounded.astype(np.int32)


def load_nifti(path, kind: str = "image") -> Volume:
    """Read a 3D NIfTI image (float32) or label map (int32), checking it on the way.

    Raises DataError for a missing, unreadable or non-3D file, NaN/Inf intensities, or an
    empty / non-integer label map.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        img = nib.load(str(path))
        data = np.asanyarray(img.dataobj)
    except Exception as exc:
        raise DataError(f"{path}: cannot read NIfTI ({type(exc).__name__}: {exc})") from exc
    arr = _as_3d(data, path, kind)
    if kind == "label":
        arr = check_label_values(arr.astype(np.float64), path)
    else:
        arr = arr.astype(np.float32)
        check_image_values(arr, path)
    return Volume(arr, np.asarray(img.affine, dtype=np.float64), img.header.copy(), str(path))


def load_pickle_pair(path) -> tuple[Volume, Volume]:
    """Read an IXI-style pickle holding ``(image, label)``; identity geometry."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        with open(path, "rb") as fh:
            obj = pickle.load(fh)
    except Exception as exc:
        raise DataError(f"{path}: cannot read pickle ({type(exc).__name__}: {exc})") from exc
    if not isinstance(obj, (tuple, list)) or len(obj) != 2:
        raise DataError(f"{path}: expected a pickled (image, label) pair, got {type(obj).__name__}")
    image = _as_3d(obj[0], path, "image").astype(np.float32)
    check_image_values(image, path)
    label = check_label_values(_as_3d(obj[1], path, "label map").astype(np.float64), path)
    if image.shape != label.shape:
        raise DataError(f"{path}: image {image.shape} and label {label.shape} differ in shape")
    eye = np.eye(4)
    return Volume(image, eye, None, str(path)), Volume(label, eye, None, str(path))


def check_same_grid(a: Volume, b: Volume) -> None:
    if a.array.shape != b.array.shape:
        raise DataError(f"shape mismatch: {a.path} is {a.array.shape} but {b.path} is {b.array.shape}")


# ---------------------------------------------------------------------------
# writing
# ---------------------------------------------------------------------------
def atomic_write(path, write) -> Path:
    """Call ``write(tmp_path)`` then rename the temporary file over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(path.suffixes) or ".tmp"
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def save_like(array: np.ndarray, reference: Volume, path, dtype=None) -> Path:
    """Write ``array`` as NIfTI with the reference volume's affine and header.

    ``array`` is (D, H, W) for images and label maps, or (3, D, H, W) for a displacement,
    written as a (D, H, W, 1, 3) vector image (NIfTI intent 'vector'; voxel units,
    component i along array axis i).
    """
    array = np.asarray(array)
    if array.ndim == 4 and array.shape[0] == 3:
        array = np.moveaxis(array, 0, -1)[:, :, :, None, :]
    ref_shape = reference.array.shape
    if array.shape[:3] != ref_shape:
        raise DataError(f"{path}: array of shape {array.shape[:3]} does not match the reference grid {ref_shape} "
                        f"of {reference.path}")
    if dtype is not None:
        array = array.astype(dtype)
    header = reference.header.copy() if reference.header is not None else nib.Nifti1Header()
    img = nib.Nifti1Image(array, reference.affine, header)
    img.set_data_dtype(array.dtype)
    if array.ndim == 5:
        img.header.set_intent("vector")
    else:
        img.header.set_intent("none")
    img.set_qform(reference.affine, code=int(header["qform_code"]) or 1)
    img.set_sform(reference.affine, code=int(header["sform_code"]) or 1)
    return atomic_write(path, lambda tmp: nib.save(img, tmp))
