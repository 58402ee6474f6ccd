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
from utils.transforms import AffineMap, FieldMap, image_at, inside_fraction, labels_at, source_voxels

AFFINE_SUFFIXES = (".txt", ".tfm", ".mat")
FIELD_SUFFIXES = (".nii", ".nii.gz")
_INVERTED = re.compile(r"^\[(.+),\s*1\s*\]$")


FIELD_UNITS = ("auto", "voxels", "mm")
NIFTI_INTENT_VECTOR = 1007


def field_units(data: np.ndarray, header, path, units: str = "auto") -> str:
    """'voxels' or 'mm' for a field array read from ``path``: ``units`` when given, else what
    the file says (this project's intent name: voxels; ITK/ANTs's (X, Y, Z, 1, 3) vector image:
    LPS millimetres); DataError when the file does not say."""
    if units not in FIELD_UNITS:
        raise ValueError(f"field units {units!r}: expected one of {', '.join(FIELD_UNITS)}")
    if units != "auto":
        return units
    code, _, name = header.get_intent("code")
    if data.ndim == 5 and name == PLCREG_FIELD_INTENT:
        return "voxels"
    if data.ndim == 5 and code == NIFTI_INTENT_VECTOR:
        return "mm"
    raise DataError(f"{path}: a field of shape {data.shape} (intent code {code}) does not say its units: this "
                    f"project's fields are (X, Y, Z, 1, 3) named {PLCREG_FIELD_INTENT!r} (voxels), ITK/ANTs's "
                    f"(X, Y, Z, 1, 3) vector images (LPS millimetres); give --field-units voxels or mm")


def read_field(path, units: str = "auto") -> FieldMap:
    """A displacement field NIfTI as a world map: voxels of its grid (component i along array
    axis i) or LPS millimetres (ITK/ANTs), from the file or ``units`` ('voxels', 'mm')."""
    data, affine, header = read_nifti_arrays(require_file(path, "displacement field"))
    data = np.asarray(data, dtype=np.float64)
    if data.ndim not in (4, 5) or data.shape[-1] != 3 or (data.ndim == 5 and data.shape[3] != 1) \
            or min(data.shape[:3]) < 2:
        raise DataError(f"{path}: not a 3D displacement field: expected shape (X, Y, Z, 1, 3) or (X, Y, Z, 3) "
                        f"with at least 2 voxels along each axis, got {data.shape}")
    if not np.isfinite(data).all():
        raise DataError(f"{path}: displacement field has NaN/Inf values")
    affine = check_affine(affine, path)
    data = data.reshape(*data.shape[:3], 3) if field_units(data, header, path, units) == "voxels" else data
    u = np.moveaxis(data, -1, 0) if data.ndim == 4 else voxel_displacement(data, affine)
    return FieldMap(torch.from_numpy(np.ascontiguousarray(u)).float(), affine)


def read_transform(spec: str, units: str = "auto"):
    """One ``--transform`` argument: a field (``units`` as in ``read_field``), an affine, or
    ``[affine,1]`` for its inverse."""
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
        return read_field(path, units)
    raise DataError(f"{path}: unknown transform file; expected a displacement field ({', '.join(FIELD_SUFFIXES)}) "
                    f"or an affine ({', '.join(AFFINE_SUFFIXES)})")


def apply_transforms(input_path, reference_path, transforms, out_path, *, label: bool = False,
                     label_interpolation: str = "nearest", overwrite: bool = False, device="cpu",
                     units: str = "auto", log=print) -> Path:
    """Resample ``input_path`` onto the grid of ``reference_path`` through ``transforms`` (see the
    module text) and write it as NIfTI with the reference's geometry: trilinear for images
    (float32), nearest or one-hot for label maps (``label``; their values kept). ``units``:
    of the displacement fields ('auto': as their files say). A warning goes to ``log`` when no
    output voxel reads inside the input image (an all-zero output)."""
    out_path = Path(out_path)
    if not out_path.name.lower().endswith(FIELD_SUFFIXES):
        raise DataError(f"{out_path}: the output is written as NIfTI; give a name ending in .nii.gz or .nii")
    if out_path.exists() and not overwrite:
        raise DataError(f"{out_path}: exists; give --overwrite to replace it")
    chain = [read_transform(t, units) for t in transforms]
    source = load_volume(input_path, "label" if label else "image")
    if out_path.exists() and out_path.samefile(source.path):
        raise DataError(f"{out_path}: is the input image; write the output to another file")
    reference = load_volume(reference_path, "image")
    voxels = source_voxels(chain, reference.array.shape, reference.affine, source.affine, device)
    if inside_fraction(voxels, source.array.shape) == 0:
        log(f"warning: {out_path}: no voxel of the reference grid maps inside {input_path} through the given "
            f"transforms: the output is all zeros (check their order and which of them need [file,1])")
    if label:
        out = labels_at(source.array, voxels, label_interpolation)
        dtype = label_dtype(out)
    else:
        out, dtype = image_at(source.array, voxels), np.float32
    ensure_dir(out_path.parent)
    return save_like(out, reference, out_path, dtype=dtype)


__all__ = ["FIELD_UNITS", "field_units", "read_field", "read_transform", "apply_transforms"]
