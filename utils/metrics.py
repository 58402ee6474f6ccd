"""Evaluation metrics: label overlap, surface distance and deformation regularity.

All functions take numpy arrays or torch tensors (moved to the CPU) and compute
in numpy, float64 where it matters.

Definitions
-----------
* Dice per label over a given label list; background (0) is never scored. A label
  absent from both volumes gives NaN, which means over labels leave out.
* HD95 per label: surface voxels of a mask are the mask minus its erosion by the
  6-connected structuring element (voxels on the volume's edge count as surface).
  For each surface voxel of one mask, its Euclidean distance to the nearest surface
  voxel of the other; HD95 is the 95th percentile of the pooled distances of both
  directions. Voxel units, or mm when ``spacing`` is given. A label absent from
  either volume gives NaN (no surface to measure from).
* Jacobian determinant of the map ``x -> x + u(x)`` with derivatives by central
  differences (one-sided at the volume's edge; ``numpy.gradient``).
* SDlogJ = std(log(clip(det, 1e-9, 1e9))) over all voxels. ``sdlogj_l2r`` is the
  Learn2Reg variant: std(log(clip(det + 3, 1e-9, 1e9))) on the volume cropped by 2.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy import ndimage

from .checks import as_numpy, as_spatial_field, as_spatial_label, check_same_shape

_SIX_CONNECTED = ndimage.generate_binary_structure(3, 1)


def _labels_pair(pred, target):
    p = as_spatial_label(pred, "pred")
    t = as_spatial_label(target, "target")
    check_same_shape(p, t, "pred", "target")
    return p, t


def _label_list(labels: Sequence[int]) -> list[int]:
    labels = [int(v) for v in as_numpy(labels).ravel()]
    return [v for v in labels if v != 0]


# ---------------------------------------------------------------------------
# overlap
# ---------------------------------------------------------------------------
def dice_per_label(pred, target, labels: Sequence[int]) -> np.ndarray:
    """Dice of each label in ``labels`` (background 0 dropped): array of len(labels without 0).

    Args:
        pred, target: (D, H, W) integer label maps (leading singleton axes allowed).
        labels: label values to score.
    """
    p, t = _labels_pair(pred, target)
    out = np.full(len(_label_list(labels)), np.nan)
    for i, lab in enumerate(_label_list(labels)):
        a, b = p == lab, t == lab
        denom = a.sum(dtype=np.int64) + b.sum(dtype=np.int64)
        if denom > 0:
            out[i] = 2.0 * np.logical_and(a, b).sum(dtype=np.int64) / denom
    return out


def mean_dice(pred, target, labels: Sequence[int]) -> float:
    """Mean of :func:`dice_per_label` over the labels present in either volume (NaN if none)."""
    d = dice_per_label(pred, target, labels)
    return float(np.nanmean(d)) if np.isfinite(d).any() else float("nan")


# ---------------------------------------------------------------------------
# surface distance
# ---------------------------------------------------------------------------
def surface_voxels(mask: np.ndarray) -> np.ndarray:
    """Boolean surface of a 3D mask: the mask minus its 6-connected erosion."""
    mask = np.asarray(mask, dtype=bool)
    return mask & ~ndimage.binary_erosion(mask, structure=_SIX_CONNECTED, border_value=0)


def _spacing(spacing) -> tuple[float, float, float]:
    if spacing is None:
        return (1.0, 1.0, 1.0)
    s = tuple(float(v) for v in np.ravel(spacing))
    if len(s) != 3 or min(s) <= 0:
        raise ValueError(f"spacing must be 3 positive numbers (D, H, W), got {spacing}")
    return s


def hd95_masks(a, b, spacing=None) -> float:
    """HD95 between two boolean 3D masks (pooled 95th percentile of both directed surface distances)."""
    a = np.asarray(a, dtype=bool)
    b = np.asarray(b, dtype=bool)
    check_same_shape(a, b, "mask a", "mask b")
    if a.ndim != 3:
        raise ValueError(f"hd95_masks: expected 3D masks, got shape {a.shape}")
    if not a.any() or not b.any():
        return float("nan")
    # every surface voxel of either mask lies in the bounding box of their union: crop to it
    # (one voxel of margin keeps the erosion exact) so that the distance maps stay small
    idx = np.argwhere(a | b)
    lo = np.maximum(idx.min(0) - 1, 0)
    hi = np.minimum(idx.max(0) + 2, a.shape)
    box = tuple(slice(l, h) for l, h in zip(lo, hi))
    a, b = a[box], b[box]
    sa, sb = surface_voxels(a), surface_voxels(b)
    sp = _spacing(spacing)
    dist_to_b = ndimage.distance_transform_edt(~sb, sampling=sp)
    dist_to_a = ndimage.distance_transform_edt(~sa, sampling=sp)
    pooled = np.concatenate([dist_to_b[sa], dist_to_a[sb]])
    return float(np.percentile(pooled, 95))


def hd95_per_label(pred, target, labels: Sequence[int], spacing=None) -> np.ndarray:
    """HD95 of each label in ``labels`` (background dropped); NaN where a label is absent from either side.

    Args:
        pred, target: (D, H, W) label maps.
        labels: label values to score.
        spacing: voxel size (D, H, W) for distances in mm; voxels when None.
    """
    p, t = _labels_pair(pred, target)
    sp = _spacing(spacing)
    labs = _label_list(labels)
    out = np.full(len(labs), np.nan)
    for i, lab in enumerate(labs):
        out[i] = hd95_masks(p == lab, t == lab, sp)
    return out


# ---------------------------------------------------------------------------
# deformation regularity
# ---------------------------------------------------------------------------
def jacobian_determinant(u) -> np.ndarray:
    """Determinant of the Jacobian of ``x -> x + u(x)``: (D, H, W) float64.

    Args:
        u: displacement (3, D, H, W) or (1, 3, D, H, W) in voxels (numpy or torch).
            Every spatial axis needs at least 2 voxels.
    """
    u = as_spatial_field(u)
    if min(u.shape[1:]) < 2:
        raise ValueError(f"jacobian_determinant: every spatial axis needs >= 2 voxels, got shape {u.shape}")
    # J[i][j] = d(x_i + u_i) / d x_j
    grads = [np.gradient(u[i], axis=(0, 1, 2)) for i in range(3)]
    j = [[grads[i][k] + (1.0 if i == k else 0.0) for k in range(3)] for i in range(3)]
    return (j[0][0] * (j[1][1] * j[2][2] - j[1][2] * j[2][1])
            - j[0][1] * (j[1][0] * j[2][2] - j[1][2] * j[2][0])
            + j[0][2] * (j[1][0] * j[2][1] - j[1][1] * j[2][0]))


def sdlogj(det) -> float:
    """Standard deviation of log(clip(det, 1e-9, 1e9)) over all voxels."""
    det = as_numpy(det, np.float64)
    return float(np.log(np.clip(det, 1e-9, 1e9)).std())


def sdlogj_l2r(det) -> float:
    """Learn2Reg's SDlogJ: std(log(clip(det + 3, 1e-9, 1e9))) on the volume cropped by 2 voxels."""
    det = as_numpy(det, np.float64)
    if det.ndim != 3 or min(det.shape) <= 4:
        raise ValueError(f"sdlogj_l2r: expected a 3D determinant map larger than 4 voxels per axis, got {det.shape}")
    crop = det[2:-2, 2:-2, 2:-2]
    return float(np.log(np.clip(crop + 3.0, 1e-9, 1e9)).std())


def jacobian_stats(u) -> dict:
    """Folding and regularity of a displacement.

    Returns a dict with ``pct_nonpos_jac`` (%|J|<=0), ``pct_neg_jac`` (%|J|<0),
    ``n_nonpos_jac`` (count of voxels with |J|<=0), ``sdlogj`` and ``sdlogj_l2r``.
    """
    det = jacobian_determinant(u)
    n = det.size
    nonpos = int((det <= 0).sum())
    out = {
        "pct_nonpos_jac": 100.0 * nonpos / n,
        "pct_neg_jac": 100.0 * float((det < 0).sum()) / n,
        "n_nonpos_jac": nonpos,
        "sdlogj": sdlogj(det),
    }
    out["sdlogj_l2r"] = sdlogj_l2r(det) if min(det.shape) > 4 else float("nan")
    return out
