"""Spatial transforms: warping, resizing, composing and integrating displacement fields.

Convention (used by every module of the project)
------------------------------------------------
* A displacement ``u`` has shape (B, 3, D, H, W) and is in voxel units.
  Component ``i`` moves along spatial axis ``i`` in (D, H, W) order.
* ``warp(moving, u)(x) = moving(x + u(x))``: the warped image at voxel ``x``
  samples the moving image at ``x + u(x)``.  A constant ``u = +k`` along an axis
  therefore moves image content by ``-k`` voxels along that axis.
* Sampling has ``align_corners=True`` semantics: voxel ``i`` of an axis of size
  ``n`` sits at normalised coordinate ``-1 + 2 i / (n - 1)``, so voxel centres are
  on the grid and an integer displacement samples voxels exactly.
* Outside the volume images read as 0 (``padding_mode='zeros'``); fields read
  their border value when composed or integrated.

The functional core (``warp``, ``warp_labels``, ``resize_displacement``,
``compose``, ``integrate_velocity``) has thin ``nn.Module`` wrappers at the end
of the file, which keep their grid in a non-persistent buffer so that
checkpoints hold only weights.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .checks import check_field, check_same_batch, check_same_spatial, check_volume

LABEL_INTERPOLATIONS = ("nearest", "onehot")
_GRID_CACHE: "OrderedDict[tuple, torch.Tensor]" = OrderedDict()
_GRID_CACHE_SIZE = 16


# ---------------------------------------------------------------------------
# grids
# ---------------------------------------------------------------------------
def _axis_scale(n: int) -> float:
    """Normalised units per voxel along an axis of size n (align_corners=True)."""
    return 2.0 / (n - 1) if n > 1 else 0.0


def make_sampling_grid(shape: Sequence[int], device=None, dtype=torch.float32) -> torch.Tensor:
    """Identity grid in ``grid_sample`` units: (1, D, H, W, 3), last axis ordered (x=W, y=H, z=D)."""
    axes = [torch.linspace(-1.0, 1.0, n, device=device, dtype=dtype) if n > 1
            else torch.zeros(1, device=device, dtype=dtype) for n in shape]
    d, h, w = torch.meshgrid(*axes, indexing="ij")
    return torch.stack((w, h, d), dim=-1).unsqueeze(0)


def cached_sampling_grid(shape: Sequence[int], device, dtype) -> torch.Tensor:
    """``make_sampling_grid`` cached per (shape, device, dtype) (a small LRU)."""
    key = (tuple(int(s) for s in shape), torch.device(device), dtype)
    grid = _GRID_CACHE.get(key)
    if grid is None:
        grid = make_sampling_grid(key[0], device=device, dtype=dtype)
        _GRID_CACHE[key] = grid
        if len(_GRID_CACHE) > _GRID_CACHE_SIZE:
            _GRID_CACHE.popitem(last=False)
    else:
        _GRID_CACHE.move_to_end(key)
    return grid


def identity_grid(shape: Sequence[int], device=None, dtype=torch.float32) -> torch.Tensor:
    """Voxel coordinates of every voxel: (1, 3, D, H, W), channel i = index along axis i."""
    axes = [torch.arange(n, device=device, dtype=dtype) for n in shape]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=0).unsqueeze(0)


def displacement_to_grid(u: torch.Tensor, base_grid: torch.Tensor | None = None) -> torch.Tensor:
    """Sampling locations ``x + u(x)`` in ``grid_sample`` units: (B, D, H, W, 3).

    Args:
        u: displacement (B, 3, D, H, W), voxel units.
        base_grid: optional precomputed ``make_sampling_grid`` output for u's shape.
    """
    shape = u.shape[2:]
    if base_grid is None:
        base_grid = cached_sampling_grid(shape, u.device, u.dtype)
    scale = torch.tensor([_axis_scale(n) for n in shape[::-1]], device=u.device, dtype=u.dtype)
    # channels (D, H, W) -> grid_sample's (x, y, z) = (W, H, D)
    return base_grid + u.flip(1).movedim(1, -1) * scale


# ---------------------------------------------------------------------------
# warping
# ---------------------------------------------------------------------------
def _match_batch(x: torch.Tensor, grid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if x.shape[0] == grid.shape[0]:
        return x, grid
    if x.shape[0] == 1:
        return x.expand(grid.shape[0], *x.shape[1:]), grid
    return x, grid.expand(x.shape[0], *grid.shape[1:])


def warp(image: torch.Tensor, u: torch.Tensor, mode: str = "bilinear", padding_mode: str = "zeros",
         base_grid: torch.Tensor | None = None) -> torch.Tensor:
    """Warp an image by a displacement: ``out(x) = image(x + u(x))``.

    Args:
        image: (B, C, D, H, W). Half-precision inputs are computed and returned in float32.
        u: (B, 3, D, H, W) displacement in voxels, same spatial size as ``image``.
            A batch of 1 on either side broadcasts against the other.
        mode: 'bilinear' (trilinear in 3D) or 'nearest'.
        padding_mode: value outside the volume: 'zeros', 'border' or 'reflection'.
        base_grid: optional cached identity grid (see ``make_sampling_grid``).
    Returns:
        (B, C, D, H, W) warped image. An all-zero displacement that needs no gradient
        returns the image exactly (float32 grid normalisation would otherwise blur it
        by ~1e-7).
    """
    check_volume(image, "image")
    check_field(u, "displacement")
    check_same_spatial(image, u, "image", "displacement")
    check_same_batch(image, u, "image", "displacement")
    if mode not in ("bilinear", "nearest"):
        raise ValueError(f"warp: mode must be 'bilinear' or 'nearest', got {mode!r}")
    if image.dtype in (torch.float16, torch.bfloat16) or u.dtype in (torch.float16, torch.bfloat16):
        image, u = image.float(), u.float()
    if image.dtype != u.dtype:
        image = image.to(u.dtype)
    needs_grad = torch.is_grad_enabled() and u.requires_grad
    if not needs_grad and u.device.type != "meta" and not torch.compiler.is_compiling() and not bool(u.any()):
        batch = max(image.shape[0], u.shape[0])
        return image.expand(batch, *image.shape[1:]).clone()
    grid = displacement_to_grid(u, base_grid)
    image, grid = _match_batch(image, grid)
    return F.grid_sample(image, grid, mode=mode, padding_mode=padding_mode, align_corners=True)


def _label_float_dtype(labels: torch.Tensor) -> torch.dtype:
    if labels.is_floating_point():
        return torch.float64 if labels.dtype == torch.float64 else torch.float32
    max_abs = int(labels.abs().max()) if labels.numel() else 0
    return torch.float32 if max_abs < 2 ** 24 else torch.float64


def warp_labels(labels: torch.Tensor, u: torch.Tensor, interpolation: str = "nearest",
                label_values: Sequence[int] | None = None, chunk: int = 8) -> torch.Tensor:
    """Warp an integer label map; the result holds only label values of the input (or 0).

    Args:
        labels: (B, 1, D, H, W) integer (or integer-valued float) label map.
        u: (B, 3, D, H, W) displacement in voxels.
        interpolation: 'nearest' (label of the nearest voxel) or 'onehot' (each label's
            indicator warped trilinearly, then the label of highest weight wins).
        label_values: labels to consider in 'onehot' mode (default: those present, and 0).
        chunk: labels warped at once in 'onehot' mode (bounds memory).
    Returns:
        (B, 1, D, H, W) with the dtype of ``labels``.
    """
    check_volume(labels, "labels")
    u = u.float() if u.dtype in (torch.float16, torch.bfloat16) else u
    return sample_labels(labels, lambda x, mode: warp(x, u.to(x.dtype) if mode == "nearest" else u, mode=mode),
                         interpolation, label_values, chunk)


def sample_labels(labels: torch.Tensor, sampler, interpolation: str = "nearest",
                  label_values: Sequence[int] | None = None, chunk: int = 8) -> torch.Tensor:
    """A label map read through ``sampler(x, mode)`` (which samples a float volume (B, C, ...)
    with mode 'nearest' or 'bilinear'); only label values of the input (or 0) come out.

    ``labels`` (B, 1, ...) integer-valued; see ``warp_labels`` for the interpolations.
    """
    if labels.shape[1] != 1:
        raise ValueError(f"labels: expected one channel (B, 1, D, H, W), got shape {tuple(labels.shape)}")
    if interpolation not in LABEL_INTERPOLATIONS:
        raise ValueError(f"label interpolation must be one of {LABEL_INTERPOLATIONS}, got {interpolation!r}")
    fdtype = _label_float_dtype(labels)
    if interpolation == "nearest":
        return sampler(labels.to(fdtype), "nearest").round().to(labels.dtype)

    if label_values is None:
        values = torch.unique(labels).tolist()
    else:
        values = sorted(set(int(v) for v in label_values))
    if 0 not in values:
        values = [0] + list(values)
    best_w = best_label = None
    for start in range(0, len(values), chunk):
        vals = values[start:start + chunk]
        vt = torch.tensor(vals, device=labels.device, dtype=labels.dtype).view(1, -1, *([1] * (labels.dim() - 2)))
        w = sampler((labels == vt).to(fdtype), "bilinear")
        w_max, idx = w.max(dim=1, keepdim=True)
        lab = vt.view(-1)[idx]
        if best_w is None:
            best_w, best_label = w_max, lab
        else:
            better = w_max > best_w
            best_w = torch.where(better, w_max, best_w)
            best_label = torch.where(better, lab, best_label)
    return best_label.to(labels.dtype)


# ---------------------------------------------------------------------------
# field operations
# ---------------------------------------------------------------------------
def resize_displacement(u: torch.Tensor, size: Sequence[int], align_corners: bool = True) -> torch.Tensor:
    """Resample a displacement to a new grid size and rescale its values with the grid.

    With ``align_corners=True`` the first and last voxel centres of both grids coincide
    (a displacement scales by (new - 1) / (old - 1) per axis); with ``False`` the grids
    share their outer edges, as in a pyramid built by 2x average pooling (scale new / old).

    Args:
        u: (B, 3, D, H, W) displacement in voxels of the input grid.
        size: target (D', H', W').
    Returns:
        (B, 3, D', H', W') displacement in voxels of the target grid.
    """
    check_field(u)
    size = tuple(int(s) for s in size)
    if len(size) != 3 or min(size) < 1:
        raise ValueError(f"resize_displacement: size must be 3 positive integers (D, H, W), got {size}")
    old = u.shape[2:]
    if align_corners:
        scale = [(n - 1) / (o - 1) if o > 1 else float(n) / o for n, o in zip(size, old)]
    else:
        scale = [n / o for n, o in zip(size, old)]
    # scaled on the input grid (interpolation is linear): one pass over the smaller field
    u = u * torch.tensor(scale, device=u.device, dtype=u.dtype).view(1, 3, 1, 1, 1)
    if tuple(old) != size:
        u = F.interpolate(u, size=size, mode="trilinear", align_corners=align_corners)
    return u


def compose(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Displacement of the composition: warping by ``compose(a, b)`` equals warping by
    ``b`` and then warping the result by ``a``.

    ``warp(warp(m, b), a)(x) = m(x + a(x) + b(x + a(x)))``, so the result is
    ``a + warp(b, a)`` (b sampled at the points that a moves to, border-padded).

    Args:
        a, b: (B, 3, D, H, W) displacements on the same grid.
    """
    check_field(a, "a")
    check_field(b, "b")
    check_same_spatial(a, b, "a", "b")
    return a + warp(b, a, padding_mode="border")


def invert_displacement(u: torch.Tensor, iterations: int = 50, tolerance: float = 1e-3) -> torch.Tensor:
    """Inverse of a displacement by fixed-point iteration: ``v(y) = -u(y + v(y))``.

    Then ``x + u(x) = y`` gives back ``y + v(y) = x``: warping by ``u`` and then by ``v``
    returns the image where the map is invertible (folds have no inverse).

    Args:
        u: (B, 3, D, H, W) displacement in voxels.
        iterations: at most this many updates; stops earlier when no voxel moves by more
            than ``tolerance`` voxels.
    Returns:
        (B, 3, D, H, W) inverse displacement on the same grid.
    """
    check_field(u)
    v = -u
    for _ in range(iterations):
        nxt = -warp(u, v, padding_mode="border")
        change = float((nxt - v).abs().max())
        v = nxt
        if change < tolerance:
            break
    return v


def inverse_consistency(u: torch.Tensor, v: torch.Tensor) -> dict:
    """Mean and max of ``|u(x) + v(x + u(x))|`` in voxels, over voxels whose ``x + u(x)`` lies in the grid."""
    check_field(u, "u")
    check_field(v, "v")
    residual = torch.linalg.vector_norm(u + warp(v, u, padding_mode="border"), dim=1)
    size = torch.tensor(u.shape[2:], dtype=u.dtype, device=u.device).view(1, 3, 1, 1, 1)
    target = identity_grid(u.shape[2:], u.device, u.dtype) + u
    inside = ((target >= 0) & (target <= size - 1)).all(1)
    values = residual[inside] if bool(inside.any()) else residual.flatten()
    return {"mean": float(values.mean()), "max": float(values.max())}


def integrate_velocity(v: torch.Tensor, steps: int = 7) -> torch.Tensor:
    """Integrate a stationary velocity field by scaling and squaring.

    ``u = v / 2**steps`` then ``steps`` times ``u <- compose(u, u)``; the result is a
    displacement whose warp approximates the time-1 flow of ``v`` (diffeomorphic for
    smooth v and enough steps).

    Args:
        v: (B, 3, D, H, W) velocity in voxels.
        steps: number of squarings (>= 0).
    """
    check_field(v, "velocity")
    if steps < 0:
        raise ValueError(f"integrate_velocity: steps must be >= 0, got {steps}")
    u = v / (2 ** steps)
    for _ in range(steps):
        u = u + warp(u, u, padding_mode="border")
    return u


def upsample_displacement_released(u: torch.Tensor) -> torch.Tensor:
    """The released code's coarse-to-fine step: ``2 * interpolate(u, x2, trilinear, align_corners=True)``.

    (B, 3, d, h, w) -> (B, 3, 2d, 2h, 2w). With ``align_corners=True`` the exact value scale
    would be (2n - 1) / (n - 1), not 2; ``resize_displacement(..., align_corners=False)``
    is the project's consistent choice. Used only by the released-compatible mode.
    """
    check_field(u)
    return 2.0 * F.interpolate(u, scale_factor=2, mode="trilinear", align_corners=True)


def released_sampling_field(u: torch.Tensor) -> torch.Tensor:
    """The displacement whose ``warp`` equals the released spatial transformer applied with ``u``.

    The released transformer normalises ``x + u`` for ``align_corners=True`` but samples with
    ``grid_sample``'s default ``align_corners=False``, so along an axis of ``n`` voxels it
    reads the moving image at voxel ``(x + u) * n / (n - 1) - 0.5``. In this project's
    convention that is the displacement ``u' = u * n / (n - 1) + x / (n - 1) - 0.5`` (voxels),
    which this returns (B, 3, D, H, W) -> (B, 3, D, H, W).
    """
    check_field(u)
    out = torch.empty_like(u)
    for axis, n in enumerate(u.shape[2:]):
        if n < 2:
            out[:, axis] = u[:, axis] - 0.5
            continue
        x = torch.arange(n, device=u.device, dtype=u.dtype).view([n if i == axis else 1 for i in range(3)])
        out[:, axis] = u[:, axis] * (n / (n - 1)) + x / (n - 1) - 0.5
    return out


# ---------------------------------------------------------------------------
# nn.Module wrappers
# ---------------------------------------------------------------------------
class _GridHolder(nn.Module):
    """Keeps the identity grid of the last input size in a non-persistent buffer."""

    def __init__(self):
        super().__init__()
        self.register_buffer("grid", torch.empty(0), persistent=False)

    def _grid_for(self, u: torch.Tensor) -> torch.Tensor:
        shape = tuple(u.shape[2:])
        g = self.grid
        if g.numel() == 0 or tuple(g.shape[1:4]) != shape or g.device != u.device or g.dtype != u.dtype:
            self.grid = make_sampling_grid(shape, device=u.device, dtype=u.dtype)
        return self.grid


class SpatialTransformer(_GridHolder):
    """Module form of :func:`warp`: ``forward(image (B,C,D,H,W), u (B,3,D,H,W))``."""

    def __init__(self, mode: str = "bilinear", padding_mode: str = "zeros"):
        super().__init__()
        self.mode, self.padding_mode = mode, padding_mode

    def forward(self, image: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        check_field(u)
        grid = self._grid_for(u.float() if u.dtype in (torch.float16, torch.bfloat16) else u)
        return warp(image, u, mode=self.mode, padding_mode=self.padding_mode, base_grid=grid)


class LabelWarper(nn.Module):
    """Module form of :func:`warp_labels` with its interpolation fixed at construction."""

    def __init__(self, interpolation: str = "nearest", label_values: Sequence[int] | None = None):
        super().__init__()
        if interpolation not in LABEL_INTERPOLATIONS:
            raise ValueError(f"label interpolation must be one of {LABEL_INTERPOLATIONS}, got {interpolation!r}")
        self.interpolation = interpolation
        self.label_values = None if label_values is None else list(label_values)

    def forward(self, labels: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        return warp_labels(labels, u, self.interpolation, self.label_values)


class ResizeDisplacement(nn.Module):
    """Module form of :func:`resize_displacement` by a fixed factor (or to the size of a reference)."""

    def __init__(self, factor: float = 2.0, align_corners: bool = True):
        super().__init__()
        self.factor, self.align_corners = factor, align_corners

    def forward(self, u: torch.Tensor, size: Sequence[int] | None = None) -> torch.Tensor:
        if size is None:
            size = [max(1, int(round(s * self.factor))) for s in u.shape[2:]]
        return resize_displacement(u, size, self.align_corners)


class VecInt(nn.Module):
    """Module form of :func:`integrate_velocity` (scaling and squaring)."""

    def __init__(self, steps: int = 7):
        super().__init__()
        if steps < 0:
            raise ValueError(f"VecInt: steps must be >= 0, got {steps}")
        self.steps = steps

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        return integrate_velocity(v, self.steps)
