"""Instance optimisation: refine one pair's displacement by gradient descent on its own loss.

Starting from a displacement ``u0`` (the network's output, or zero with no network), a
correction ``delta`` is optimised with Adam on the unsupervised loss of this one pair,

    loss(u) = similarity(warp(moving, u), fixed) + reg_weight * Grad-l2(u),   u = u0 + up(S(delta)),

never on labels; S is ``smoothing`` 3x3x3 mean filters. ``scale`` > 1 optimises at a coarser
resolution for speed: the images are average-pooled by ``scale``, ``u0`` is resized to that
grid, and the refined coarse field is resized back to full size at the end (``delta`` is a
field on that coarse control grid); ``fine_steps`` then refine it at full resolution.
The field with the lowest loss seen is returned, so the loss of the result never exceeds
that of ``u0`` on the grid the loss is evaluated on.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from utils.checks import check_field, check_same_spatial, check_volume
from utils.losses import SIMILARITIES, box_sum, grad_loss, similarity_loss
from utils.spatial import resize_displacement, warp


@dataclass
class IOResult:
    """What instance optimisation did to one pair."""
    u: torch.Tensor                                   # (B, 3, D, H, W) refined displacement, full size
    losses: list = field(default_factory=list)        # loss before each Adam step, then after the last
    best_loss: float = math.nan
    seconds: float = 0.0


def coarse_shape(shape, scale: int) -> tuple[int, ...]:
    """Spatial size of the optimisation grid: ceil(n / scale) per axis, at least 8."""
    return tuple(max(min(n, 8), math.ceil(n / scale)) for n in shape)


def _downsample(image: torch.Tensor, size) -> torch.Tensor:
    """Average-pool (B, C, D, H, W) down to ``size`` (never up)."""
    return image if tuple(image.shape[2:]) == tuple(size) else F.adaptive_avg_pool3d(image, size)


def instance_optimise(moving: torch.Tensor, fixed: torch.Tensor, u0: torch.Tensor | None = None, *,
                      steps: int = 50, lr: float = 2.0, reg_weight: float = 5.0, similarity: str = "ncc",
                      ncc_window: int = 5, scale: int = 2, smoothing: int = 3, fine_steps: int = 0,
                      fine_lr: float = 0.5, fine_reg_weight: float = 3.0, fine_smoothing: int = 1) -> IOResult:
    """Refine ``u0`` for this pair (see the module docstring).

    Args:
        moving, fixed: (B, C, D, H, W) images of one size.
        u0: (B, 3, D, H, W) starting displacement in voxels, or None for zero.
        steps: Adam steps (0 returns ``u0`` unchanged).
        lr: Adam learning rate, in voxels of the optimisation grid per step.
        reg_weight: weight of the Grad-l2 smoothness term.
        similarity: 'ncc', 'mse' or 'mind'.
        ncc_window: NCC window on the optimisation grid.
        scale: optimise on a grid ``scale`` times coarser (1 = full resolution).
        smoothing: 3x3x3 mean filters applied to the correction inside the loss (a cheap
            preconditioner: each step moves a neighbourhood, not single voxels).
        fine_steps: with ``scale`` > 1, this many more steps at full resolution, from the
            coarse result (coarse to fine: the coarse steps do the long way cheaply), with
            their own ``fine_lr`` (voxels; Adam's first steps move every voxel by about this
            much, so it is small), ``fine_reg_weight`` and ``fine_smoothing``.
    Returns:
        IOResult with the refined full-size displacement (float32, no gradient).
    """
    check_volume(moving, "moving")
    check_volume(fixed, "fixed")
    check_same_spatial(moving, fixed, "moving", "fixed")
    if steps < 0 or fine_steps < 0 or scale < 1 or lr <= 0 or reg_weight < 0 or smoothing < 0:
        raise ValueError(f"instance optimisation: expected steps >= 0, fine_steps >= 0, scale >= 1, lr > 0, "
                         f"reg_weight >= 0 and smoothing >= 0, got steps={steps}, fine_steps={fine_steps}, "
                         f"scale={scale}, lr={lr}, reg_weight={reg_weight}, smoothing={smoothing}")
    if fine_steps and scale > 1 and steps > 0:
        coarse = instance_optimise(moving, fixed, u0, steps=steps, lr=lr, reg_weight=reg_weight,
                                   similarity=similarity, ncc_window=ncc_window, scale=scale, smoothing=smoothing)
        fine = instance_optimise(moving, fixed, coarse.u, steps=fine_steps, lr=fine_lr, reg_weight=fine_reg_weight,
                                 similarity=similarity, ncc_window=ncc_window, scale=1, smoothing=fine_smoothing)
        return IOResult(u=fine.u, losses=coarse.losses + fine.losses, best_loss=fine.best_loss,
                        seconds=coarse.seconds + fine.seconds)
    sim = similarity_loss(similarity, ncc_window)
    full = tuple(fixed.shape[2:])
    if u0 is None:
        u0 = fixed.new_zeros((fixed.shape[0], 3, *full), dtype=torch.float32)
    check_field(u0, "u0")
    check_same_spatial(u0, fixed, "u0", "fixed")
    if steps == 0:
        return IOResult(u=u0)
    t0 = time.perf_counter()
    with torch.inference_mode(False), torch.enable_grad():
        # clones leave inference mode: tensors made under inference_mode cannot enter autograd
        mov, fix, start = (x.detach().float().clone() for x in (moving, fixed, u0))
        size = coarse_shape(full, scale)
        mov, fix = _downsample(mov, size), _downsample(fix, size)
        base = resize_displacement(start, size) if size != full else start
        delta = torch.zeros_like(base, requires_grad=True)
        opt = torch.optim.Adam([delta], lr=lr)

        count = box_sum(base.new_ones((1, 1, *size)), 3)

        def field_of(d):
            for _ in range(smoothing):          # 3x3x3 mean over the voxels inside the volume
                d = box_sum(d, 3) / count
            return d

        def loss_of(d):
            u = base + field_of(d)
            return sim(warp(mov, u), fix) + reg_weight * grad_loss(u)

        losses, best, best_delta = [], math.inf, None
        for _ in range(steps):
            loss = loss_of(delta)
            value = float(loss.detach())
            losses.append(value)
            if value < best:
                best, best_delta = value, delta.detach().clone()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        with torch.no_grad():
            value = float(loss_of(delta))
        losses.append(value)
        if value < best:
            best, best_delta = value, delta.detach().clone()
        with torch.no_grad():
            best_delta = field_of(best_delta)
            u = start + resize_displacement(best_delta, full) if size != full else base + best_delta
    return IOResult(u=u.detach(), losses=losses, best_loss=best, seconds=time.perf_counter() - t0)


def io_similarity(train_similarity: str) -> str:
    """The loss IO optimises for a run: its own similarity, or MIND (modality independent)
    when training used labels only."""
    return train_similarity if train_similarity in SIMILARITIES else "mind"


def refine_for_run(run, moving: torch.Tensor, fixed: torch.Tensor, u0: torch.Tensor | None) -> IOResult:
    """Instance optimisation with a RunConfig's ``eval.io_*`` settings and its similarity."""
    e = run.eval
    return instance_optimise(moving, fixed, u0, steps=e.io_steps, lr=e.io_lr, reg_weight=e.io_weight,
                             similarity=io_similarity(run.train.similarity), ncc_window=e.io_ncc_window,
                             scale=e.io_scale, smoothing=e.io_smoothing, fine_steps=e.io_fine_steps,
                             fine_lr=e.io_fine_lr, fine_reg_weight=e.io_fine_weight, fine_smoothing=e.io_fine_smoothing)


__all__ = ["IOResult", "instance_optimise", "coarse_shape", "SIMILARITIES", "io_similarity", "refine_for_run"]
