"""Displacement fields in other tools' conventions.

Learn2Reg (the challenge's evaluation): ``disp_<fixed id>_<moving id>.nii.gz`` holding a
(D, H, W, 3) array on the fixed image's grid, in voxels of the array axes, such that the
warped moving segmentation is ``map_coordinates(moving, identity + disp.transpose(3, 0, 1, 2),
order=0)``: the moving image is read at ``x + disp(x)``, which is this project's convention
(``warped(x) = moving(x + u(x))``) with the components last when both images share one grid
and nothing was pre-aligned; otherwise the file holds the whole transform (moving voxel read
minus fixed voxel index, ``composed_voxel_displacement``). The ids are the four-digit case
numbers of Learn2Reg file names (``AbdomenCTCT_0001_0000.nii.gz`` -> ``0001``), else the
file names without extension.
"""
from __future__ import annotations

import re
from pathlib import Path

import nibabel as nib
import numpy as np

from utils.checks import as_spatial_field
from utils.io import Volume, atomic_write
from utils.spatial import identity_grid
from utils.transforms import source_voxels

_L2R_NAME = re.compile(r"_(\d{4})_\d{4}\.nii(\.gz)?$")


def l2r_case_id(path) -> str:
    """The Learn2Reg case id of an image file (``..._0001_0000.nii.gz`` -> ``0001``), else its stem."""
    name = Path(path).name
    found = _L2R_NAME.search(name)
    if found:
        return found.group(1)
    return re.sub(r"\.nii(\.gz)?$", "", name)


def l2r_displacement(u) -> np.ndarray:
    """(1, 3, D, H, W) or (3, D, H, W) displacement -> Learn2Reg's (D, H, W, 3) float32 array."""
    return np.ascontiguousarray(np.moveaxis(as_spatial_field(u), 0, -1)).astype(np.float32)


def composed_voxel_displacement(chain, fixed: Volume, moving: Volume) -> np.ndarray:
    """The whole transform of ``chain`` (world maps, see utils/transforms.py) as a Learn2Reg field:
    moving-image voxel read for each fixed voxel minus that voxel's index, (3, D, H, W)."""
    voxels = source_voxels(chain, fixed.array.shape, fixed.affine, moving.affine)
    return (voxels - identity_grid(fixed.array.shape, voxels.device, voxels.dtype)[0]).cpu().numpy()


def write_l2r(out_dir, fixed_path, moving_path, u, fixed: Volume) -> Path:
    """Write ``disp_<fixed id>_<moving id>.nii.gz`` (Learn2Reg) with the fixed image's affine.

    ``u``: (1, 3, D, H, W) or (3, D, H, W), voxels, moving read at ``x + u(x)``."""
    disp = l2r_displacement(u)
    if disp.shape[:3] != fixed.array.shape:
        raise ValueError(f"write_l2r: field of shape {disp.shape[:3]} is not on the fixed grid {fixed.array.shape}")
    img = nib.Nifti1Image(disp, fixed.affine)
    img.set_data_dtype(np.float32)
    path = Path(out_dir) / f"disp_{l2r_case_id(fixed_path)}_{l2r_case_id(moving_path)}.nii.gz"
    return atomic_write(path, lambda tmp: nib.save(img, tmp))


__all__ = ["l2r_case_id", "l2r_displacement", "composed_voxel_displacement", "write_l2r"]
