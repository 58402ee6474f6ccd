"""Displacement fields in other tools' conventions.

Learn2Reg (the challenge's evaluation): ``disp_<fixed id>_<moving id>.nii.gz`` holding a
(D, H, W, 3) array on the fixed image's grid, in voxels of the array axes, such that the
warped moving segmentation is ``map_coordinates(moving, identity + disp.transpose(3, 0, 1, 2),
order=0)``: the moving image is read at ``x + disp(x)``, which is this project's convention
(``warped(x) = moving(x + u(x))``) with the components last when both images share one grid
and nothing was pre-aligned; otherwise the file holds the whole transform (moving voxel read
minus fixed voxel index, ``composed_voxel_displacement``). The ids come from Learn2Reg file
names ``<task>_<case>_<modality>.nii.gz``; the evaluation looks a pair up as
``disp_<fixed case>_<fixed modality>_<moving case>_<moving modality>.nii.gz``, and also accepts
the short ``disp_<fixed case>_<moving case>.nii.gz`` when the fixed modality is 0000 and the
moving 0001 (which is written then, as older versions of the evaluation read only that one).
"""
from __future__ import annotations

import re
from pathlib import Path

import nibabel as nib
import numpy as np

from utils.checks import as_spatial_field
from utils.io import Volume, atomic_write, image_stem
from utils.spatial import identity_grid
from utils.transforms import source_voxels

_L2R_ID = re.compile(r"_(\d{4})_(\d{4})\.nii(\.gz)?$")
_GIVEN_ID = re.compile(r"^(\d{4})(?:_(\d{4}))?$")


def l2r_id(path) -> str | None:
    """The Learn2Reg id ``<case>_<modality>`` of an image file (``OASIS_0395_0000.nii.gz`` ->
    ``0395_0000``), or None when its name carries none."""
    found = _L2R_ID.search(Path(path).name)
    return f"{found.group(1)}_{found.group(2)}" if found else None


def parse_l2r_id(text: str, what: str = "--l2r-fixed-id") -> str:
    """A given id, ``0395`` (modality 0000) or ``0395_0000``, as ``<case>_<modality>``."""
    found = _GIVEN_ID.match(str(text).strip())
    if not found:
        raise ValueError(f"{what} {text!r}: expected a Learn2Reg case id such as 0395 or 0395_0000")
    return f"{found.group(1)}_{found.group(2) or '0000'}"


def l2r_file_name(fixed_id: str, moving_id: str) -> str:
    """The name the Learn2Reg evaluation looks up for a pair of ids ``<case>_<modality>``."""
    (fixed_case, fixed_mod), (moving_case, moving_mod) = fixed_id.split("_"), moving_id.split("_")
    if (fixed_mod, moving_mod) == ("0000", "0001"):
        return f"disp_{fixed_case}_{moving_case}.nii.gz"
    return f"disp_{fixed_id}_{moving_id}.nii.gz"


def l2r_names(pairs, fixed_id: str = "", require_ids: bool = True) -> list[str]:
    """The Learn2Reg file name of each (fixed path, moving path) pair, checked before any work.

    ``fixed_id`` stands in for a fixed image whose name carries no id (an atlas). Without an id
    a pair is refused naming the file (``require_ids``), or named ``disp_<fixed stem>_<moving
    stem>.nii.gz``, which the evaluation will not find. Two pairs of one name are refused."""
    names, seen = [], {}
    for fixed, moving in pairs:
        ids = [l2r_id(fixed) or fixed_id or None, l2r_id(moving)]
        missing = [str(path) for path, found in zip((fixed, moving), ids) if found is None]
        if missing and require_ids:
            raise ValueError(f"{missing[0]}: no Learn2Reg id in the file name (<task>_<case>_<modality>.nii.gz, "
                             f"e.g. OASIS_0395_0000.nii.gz), so the evaluation could not find its field; for an "
                             f"atlas give one with --l2r-fixed-id (e.g. 0395 or 0395_0000)")
        name = l2r_file_name(*ids) if not missing else f"disp_{image_stem(fixed)}_{image_stem(moving)}.nii.gz"
        if name in seen:
            raise ValueError(f"Learn2Reg export: pairs {seen[name]} and ({fixed}, {moving}) would both be written "
                             f"as {name}")
        seen[name] = (str(fixed), str(moving))
        names.append(name)
    return names


def l2r_displacement(u) -> np.ndarray:
    """(1, 3, D, H, W) or (3, D, H, W) displacement -> Learn2Reg's (D, H, W, 3) float32 array."""
    return np.ascontiguousarray(np.moveaxis(as_spatial_field(u), 0, -1)).astype(np.float32)


def composed_voxel_displacement(chain, fixed: Volume, moving: Volume) -> np.ndarray:
    """The whole transform of ``chain`` (world maps, see utils/transforms.py) as a Learn2Reg field:
    moving-image voxel read for each fixed voxel minus that voxel's index, (3, D, H, W)."""
    voxels = source_voxels(chain, fixed.array.shape, fixed.affine, moving.affine)
    return (voxels - identity_grid(fixed.array.shape, voxels.device, voxels.dtype)[0]).cpu().numpy()


def write_l2r(out_dir, name: str, u, fixed: Volume) -> Path:
    """Write the Learn2Reg field ``name`` (:func:`l2r_names`) with the fixed image's affine.

    ``u``: (1, 3, D, H, W) or (3, D, H, W), voxels, moving read at ``x + u(x)``."""
    disp = l2r_displacement(u)
    if disp.shape[:3] != fixed.array.shape:
        raise ValueError(f"write_l2r: field of shape {disp.shape[:3]} is not on the fixed grid {fixed.array.shape}")
    img = nib.Nifti1Image(disp, fixed.affine)
    img.set_data_dtype(np.float32)
    path = Path(out_dir) / name
    return atomic_write(path, lambda tmp: nib.save(img, tmp))


__all__ = ["l2r_id", "parse_l2r_id", "l2r_file_name", "l2r_names", "l2r_displacement", "composed_voxel_displacement",
           "write_l2r"]
