"""Resampling a volume onto another volume's voxel grid through their affines (world space)."""
from __future__ import annotations

import numpy as np
from scipy import ndimage


def same_grid(shape_a, affine_a, shape_b, affine_b, atol: float = 1e-4) -> bool:
    """True when two volumes share shape and voxel-to-world affine (within ``atol`` mm)."""
    return tuple(shape_a) == tuple(shape_b) and np.allclose(affine_a, affine_b, atol=atol)


def reference_to_source(affine: np.ndarray, reference_affine: np.ndarray) -> np.ndarray:
    """4x4 map from the reference grid's voxel indices to the source volume's (through world space)."""
    return np.linalg.inv(np.asarray(affine, dtype=np.float64)) @ np.asarray(reference_affine, dtype=np.float64)


def grid_overlap(shape, affine, reference_shape, reference_affine, samples: int = 24) -> float:
    """Fraction (0..1) of the reference grid whose voxel centres fall inside the other volume,
    estimated on a ``samples``**3 lattice of reference voxels."""
    axes = [np.linspace(0, n - 1, min(samples, n)) for n in reference_shape]
    pts = np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 3)
    to_source = reference_to_source(affine, reference_affine)
    src = pts @ to_source[:3, :3].T + to_source[:3, 3]
    inside = np.all((src >= -0.5) & (src <= np.asarray(shape) - 0.5), axis=1)
    return float(inside.mean())


def resample_to_grid(array: np.ndarray, affine: np.ndarray, shape, reference_affine: np.ndarray,
                     order: int = 1) -> np.ndarray:
    """Values of ``array`` (voxel-to-world ``affine``) at the voxel centres of the grid
    (``shape``, ``reference_affine``); points outside the volume read 0.

    ``order`` 1 is trilinear (images), 0 nearest neighbour (label maps, dtype kept).
    """
    if array.ndim != 3 or len(tuple(shape)) != 3:
        raise ValueError(f"resample_to_grid: expected a 3D array and a 3D shape, got {array.shape} and {shape}")
    if order not in (0, 1):
        raise ValueError(f"resample_to_grid: order must be 0 (nearest) or 1 (linear), got {order}")
    to_source = reference_to_source(affine, reference_affine)
    source = array if order == 0 else array.astype(np.float64)
    out = ndimage.affine_transform(source, to_source[:3, :3], to_source[:3, 3], output_shape=tuple(shape),
                                   order=order, mode="constant", cval=0, prefilter=False)
    return out.astype(array.dtype if order == 0 else np.float32)


__all__ = ["same_grid", "grid_overlap", "resample_to_grid"]
