"""World-space transforms and resampling a volume through a chain of them.

Every transform here maps a point of the output (reference) space to the point of the
input space where the image is read, in world coordinates (millimetres, the frame of the
NIfTI affines): this is the direction ITK and ANTs use too. A chain ``[t1, t2, ...]``
applies ``t1`` to the point first, as ``antsApplyTransforms -t t1 -t t2`` does; for a
registration with pre-alignment the chain is ``[field, affine]``: the displacement lives on
the fixed grid, the affine takes the result into the moving image's space.

* ``AffineMap(matrix)``: ``p -> matrix @ p`` (4x4).
* ``FieldMap(u, affine)``: a displacement ``u`` (3, D, H, W) in voxels of its grid (voxel
  to world ``affine``), component i along array axis i, as this project writes it:
  ``p -> affine @ (x + u(x))`` with ``x`` the voxel position of ``p``; trilinear between
  voxels, no displacement outside the grid (ITK's convention).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .spatial import sample_labels


@dataclass
class AffineMap:
    matrix: np.ndarray            # (4, 4) world -> world

    def inverse(self) -> "AffineMap":
        return AffineMap(np.linalg.inv(self.matrix))

    def __call__(self, points: torch.Tensor) -> torch.Tensor:
        return apply_matrix(points, self.matrix)


@dataclass
class FieldMap:
    field: torch.Tensor           # (3, D, H, W) displacement in voxels of its grid
    affine: np.ndarray            # (4, 4) voxel -> world of that grid

    def __call__(self, points: torch.Tensor) -> torch.Tensor:
        voxels = apply_matrix(points, np.linalg.inv(self.affine))
        u = sample_at(self.field[None].to(points), voxels, "bilinear")[0]
        return points + apply_matrix(u, self.affine, translate=False)


def apply_matrix(points: torch.Tensor, matrix: np.ndarray, translate: bool = True) -> torch.Tensor:
    """``matrix`` (4x4) applied to points stored along dim 0: (3, ...) -> (3, ...)."""
    m = torch.as_tensor(np.asarray(matrix, dtype=np.float64), dtype=points.dtype, device=points.device)
    out = torch.einsum("ij,j...->i...", m[:3, :3], points)
    if translate:
        out = out + m[:3, 3].view(3, *([1] * (points.dim() - 1)))
    return out


def voxel_points(shape: Sequence[int], affine: np.ndarray, device="cpu", dtype=torch.float64) -> torch.Tensor:
    """World positions of every voxel of a grid: (3, D, H, W)."""
    axes = [torch.arange(n, device=device, dtype=torch.float64) for n in shape]
    idx = torch.stack(torch.meshgrid(*axes, indexing="ij"), 0)
    return apply_matrix(idx, affine).to(dtype)


def sample_at(volume: torch.Tensor, voxels: torch.Tensor, mode: str = "bilinear") -> torch.Tensor:
    """Values of ``volume`` (B, C, d, h, w) at voxel positions ``voxels`` (3, D, H, W) of its grid:
    (B, C, D, H, W); 0 outside (``mode`` 'bilinear' or 'nearest')."""
    size = torch.tensor(volume.shape[2:], dtype=voxels.dtype, device=voxels.device).view(3, 1, 1, 1)
    grid = (2.0 * voxels / (size - 1).clamp_min(1) - 1.0).flip(0).movedim(0, -1)[None]
    grid = grid.expand(volume.shape[0], *grid.shape[1:]).to(volume.dtype)
    return F.grid_sample(volume, grid, mode=mode, padding_mode="zeros", align_corners=True)


def source_voxels(chain, reference_shape, reference_affine, source_affine, device="cpu") -> torch.Tensor:
    """Voxel positions in the source image read for each reference voxel: (3, D, H, W), float64
    (world coordinates of hundreds of millimetres would lose 1e-5 voxel in float32)."""
    points = voxel_points(reference_shape, reference_affine, device)
    for transform in chain:
        points = transform(points)
    return apply_matrix(points, np.linalg.inv(source_affine))


def inside_fraction(voxels: torch.Tensor, source_shape) -> float:
    """Fraction of the positions ``voxels`` (3, D, H, W) that lie inside a grid of ``source_shape``."""
    top = torch.tensor(source_shape, dtype=voxels.dtype, device=voxels.device).view(3, 1, 1, 1) - 1
    return float(((voxels >= 0) & (voxels <= top)).all(0).double().mean())


def image_at(array: np.ndarray, voxels: torch.Tensor) -> np.ndarray:
    """An image (trilinear) read at ``voxels`` (3, D, H, W) of its grid; 0 outside it. float32."""
    vol = torch.as_tensor(np.asarray(array, dtype=np.float32), device=voxels.device)[None, None]
    return sample_at(vol, voxels, "bilinear")[0, 0].cpu().numpy()


def labels_at(array: np.ndarray, voxels: torch.Tensor, interpolation: str = "nearest",
              label_values=None) -> np.ndarray:
    """A label map (nearest or one-hot) read at ``voxels`` (3, D, H, W) of its grid; its dtype kept."""
    labels = torch.as_tensor(np.asarray(array), device=voxels.device)[None, None]
    out = sample_labels(labels, lambda x, mode: sample_at(x, voxels.to(x.dtype), mode), interpolation, label_values)
    return out[0, 0].cpu().numpy()


def resample_image(array: np.ndarray, affine: np.ndarray, reference_shape, reference_affine, chain=(),
                   device="cpu") -> np.ndarray:
    """An image (trilinear) on the reference grid through ``chain``; 0 outside it. float32."""
    return image_at(array, source_voxels(chain, reference_shape, reference_affine, affine, device))


def resample_labels(array: np.ndarray, affine: np.ndarray, reference_shape, reference_affine, chain=(),
                    interpolation: str = "nearest", label_values=None, device="cpu") -> np.ndarray:
    """A label map on the reference grid through ``chain`` (nearest or one-hot); its dtype kept."""
    return labels_at(array, source_voxels(chain, reference_shape, reference_affine, affine, device), interpolation,
                     label_values)


__all__ = ["AffineMap", "FieldMap", "apply_matrix", "voxel_points", "sample_at", "source_voxels", "inside_fraction",
           "image_at", "labels_at",
           "resample_image", "resample_labels"]
