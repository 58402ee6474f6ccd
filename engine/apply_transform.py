"""Apply saved transforms to any image or label map, onto a reference image's grid (``warp.py``).

Transforms are given in the order ``antsApplyTransforms`` takes them: each maps a point of
the reference space one step towards the input image's space, the first one first. For a
``register.py`` result the forward chain is ``<name>_displacement.nii.gz <name>_affine.txt``
(moving image onto the fixed grid) and the inverse chain ``[<name>_affine.txt,1]
<name>_inverse_displacement.nii.gz`` (fixed image onto the moving grid).

Accepted files:

* displacement fields (NIfTI): this project's own (intent name ``plcreg_voxels``: voxels of
  its grid) or ITK/ANTs fields (millimetres, LPS), e.g. ``antsRegistration``'s ``1Warp.nii.gz``;
* affines: ITK text (``.txt``, ``.tfm``) or ANTs ``.mat`` files; ``[file,1]`` uses the inverse.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch

from utils.io import (PLCREG_FIELD_INTENT, DataError, check_affine, ensure_dir, load_volume, read_nifti_arrays,
                      label_dtype, require_file, save_like)
from utils.itk import read_itk_affine, voxel_displacement
from utils.transforms import AffineMap, FieldMap, resample_image, resample_labels

AFFINE_SUFFIXES = (".txt", ".tfm", ".mat")
FIELD_SUFFIXES = (".nii", ".nii.gz")
_INVERTED = re.compile(r"^\[(.+),\s*1\s*\]$")


def read_field(path) -> FieldMap:
    """A displacement field NIfTI (ours in voxels, or ITK/ANTs in LPS millimetres) as a world map."""
    data, affine, header = read_nifti_arrays(require_file(path, "displacement field"))
    data = np.asarray(data, dtype=np.float64)
    if data.ndim not in (4, 5) or data.shape[-1] != 3 or (data.ndim == 5 and data.shape[3] != 1):
        raise DataError(f"{path}: not a 3D displacement field: expected shape (X, Y, Z, 1, 3) or (X, Y, Z, 3), "
                        f"got {data.shape}")
    if not np.isfinite(data).all():
        raise DataError(f"{path}: displacement field has NaN/Inf values")
    affine = check_affine(affine, path)
    name = header.get_intent()[2] if data.ndim == 5 else ""
    if name == PLCREG_FIELD_INTENT:
        u = np.moveaxis(data.reshape(*data.shape[:3], 3), -1, 0)
    else:
        u = voxel_displacement(data, affine)
    return FieldMap(torch.from_numpy(np.ascontiguousarray(u)).float(), affine)


def read_transform(spec: str):
    """One ``--transform`` argument: a field, an affine, or ``[affine,1]`` for its inverse."""
    inverted = _INVERTED.match(spec.strip())
    path = Path(inverted.group(1).strip() if inverted else spec)
    name = path.name.lower()
    if name.endswith(AFFINE_SUFFIXES):
        matrix = read_itk_affine(path)
        return AffineMap(np.linalg.inv(matrix) if inverted else matrix)
    if name.endswith(FIELD_SUFFIXES):
        if inverted:
            raise DataError(f"{path}: a displacement field cannot be inverted here; give its inverse field "
                            f"(register.py --inverse writes <name>_inverse_displacement.nii.gz)")
        return read_field(path)
    raise DataError(f"{path}: unknown transform file; expected a displacement field ({', '.join(FIELD_SUFFIXES)}) "
                    f"or an affine ({', '.join(AFFINE_SUFFIXES)})")


def apply_transforms(input_path, reference_path, transforms, out_path, *, label: bool = False,
                     label_interpolation: str = "nearest", overwrite: bool = False, device="cpu") -> Path:
    """Resample ``input_path`` onto the grid of ``reference_path`` through ``transforms`` (see the
    module text) and write it as NIfTI with the reference's geometry: trilinear for images
    (float32), nearest or one-hot for label maps (``label``; their values kept)."""
    out_path = Path(out_path)
    if not out_path.name.lower().endswith(FIELD_SUFFIXES):
        raise DataError(f"{out_path}: the output is written as NIfTI; give a name ending in .nii.gz or .nii")
    if out_path.exists() and not overwrite:
        raise DataError(f"{out_path}: exists; give --overwrite to replace it")
    chain = [read_transform(t) for t in transforms]
    source = load_volume(input_path, "label" if label else "image")
    reference = load_volume(reference_path, "image")
    grid = (reference.array.shape, reference.affine)
    if label:
        out = resample_labels(source.array, source.affine, *grid, chain, label_interpolation, device=device)
        dtype = label_dtype(out)
    else:
        out, dtype = resample_image(source.array, source.affine, *grid, chain, device), np.float32
    ensure_dir(out_path.parent)
    return save_like(out, reference, out_path, dtype=dtype)


__all__ = ["read_field", "read_transform", "apply_transforms"]
