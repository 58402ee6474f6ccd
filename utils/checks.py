"""Input validation shared by the transforms, losses and metrics.

Every public function of the project checks its tensors with these helpers so
that a malformed input fails early with a ``ValueError`` that says what was
expected, instead of a shape error deep inside ``grid_sample`` or ``conv3d``.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch


def shape_of(x) -> tuple:
    return tuple(x.shape)


def check_ndim(x, ndim: int | Sequence[int], name: str, layout: str) -> None:
    """Raise if ``x`` does not have ``ndim`` dimensions (``layout`` describes them)."""
    allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
    if x.ndim not in allowed:
        raise ValueError(f"{name}: expected a {layout} array, got shape {shape_of(x)}")


def check_field(u: torch.Tensor, name: str = "displacement") -> None:
    """A batched 3D vector field: (B, 3, D, H, W)."""
    if not isinstance(u, torch.Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor of shape (B, 3, D, H, W), got {type(u).__name__}")
    check_ndim(u, 5, name, "(B, 3, D, H, W)")
    if u.shape[1] != 3:
        raise ValueError(f"{name}: expected 3 channels (one per spatial axis) in (B, 3, D, H, W), got shape {shape_of(u)}")
    if not u.is_floating_point():
        raise ValueError(f"{name}: expected a floating-point field, got dtype {u.dtype}")


def check_volume(x: torch.Tensor, name: str = "image") -> None:
    """A batched 3D volume with channels: (B, C, D, H, W)."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor of shape (B, C, D, H, W), got {type(x).__name__}")
    check_ndim(x, 5, name, "(B, C, D, H, W)")


def check_same_spatial(a: torch.Tensor, b: torch.Tensor, name_a: str, name_b: str) -> None:
    if tuple(a.shape[2:]) != tuple(b.shape[2:]):
        raise ValueError(
            f"{name_a} and {name_b} must share the spatial size (D, H, W): "
            f"got {shape_of(a)} and {shape_of(b)}")


def check_same_batch(a: torch.Tensor, b: torch.Tensor, name_a: str, name_b: str) -> None:
    if a.shape[0] != b.shape[0] and 1 not in (a.shape[0], b.shape[0]):
        raise ValueError(
            f"{name_a} and {name_b} must have the same batch size (or one of them 1): "
            f"got {shape_of(a)} and {shape_of(b)}")


def check_same_shape(a, b, name_a: str, name_b: str) -> None:
    if shape_of(a) != shape_of(b):
        raise ValueError(f"{name_a} and {name_b} must have the same shape: got {shape_of(a)} and {shape_of(b)}")


def as_numpy(x, dtype=None) -> np.ndarray:
    """A numpy view/copy of a numpy array or a torch tensor (detached, on the CPU)."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    x = np.asarray(x)
    return x.astype(dtype, copy=False) if dtype is not None else x


def as_spatial_label(x, name: str) -> np.ndarray:
    """A label map as a (D, H, W) numpy array; accepts (D, H, W), (1, D, H, W) and (1, 1, D, H, W)."""
    a = as_numpy(x)
    while a.ndim > 3 and a.shape[0] == 1:
        a = a[0]
    if a.ndim != 3:
        raise ValueError(f"{name}: expected a 3D label map (D, H, W) (leading singleton axes allowed), got shape {np.shape(x)}")
    return a


def as_spatial_field(u, name: str = "displacement") -> np.ndarray:
    """A displacement as a float64 (3, D, H, W) numpy array; accepts (3, D, H, W) and (1, 3, D, H, W)."""
    a = as_numpy(u, np.float64)
    if a.ndim == 5:
        if a.shape[0] != 1:
            raise ValueError(f"{name}: expected one field (1, 3, D, H, W) or (3, D, H, W), got shape {a.shape}")
        a = a[0]
    if a.ndim != 4 or a.shape[0] != 3:
        raise ValueError(f"{name}: expected a 3D displacement of shape (3, D, H, W) or (1, 3, D, H, W), got shape {a.shape}")
    return a
