"""Rigid and affine pre-alignment of two volumes, optimised in torch from coarse to fine.

The result is a 4x4 matrix ``T`` acting on world coordinates (the NIfTI frame of the two
affines, millimetres): the fixed image's point ``p`` corresponds to the moving image's point
``T @ p``. With ``T`` the identity the images are taken as aligned by their headers, which is
also where the optimisation starts, after moving the centres of mass onto each other.

Parameters live in a frame centred on the fixed image and scaled by its half extent, so
angles, translations and the affine part are all of order one for the optimiser:
``T(p) = L (p - c) + c + s t`` with ``L = R(angles)`` (rigid) or ``R(angles) (I + A)``
(affine, A a general 3x3 matrix).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

AFFINE_KINDS = ("none", "rigid", "affine")
# Adam steps per level: mutual information's gradient is noisier (sampled voxels, Parzen windows)
DEFAULT_STEPS = {"ncc": (60, 30, 10), "mi": (60, 30, 30)}


@dataclass
class AlignmentSettings:
    """Coarse-to-fine schedule: one entry per level (downsampling factor, Adam steps, step size)."""
    factors: tuple = (8, 4, 2)
    steps: tuple | None = None    # default: DEFAULT_STEPS of the metric
    learning_rates: tuple = (0.04, 0.01, 0.003)
    metric: str = "ncc"           # 'ncc' (same modality) or 'mi' (mutual information, any modalities)
    mi_bins: int = 32
    mi_samples: int = 10000       # voxels sampled per level for mutual information
    finest_size: int = 32         # small volumes: all factors halved until the finest level has this many voxels

    def __post_init__(self):
        if self.metric not in ALIGNMENT_METRICS:
            raise ValueError(f"alignment metric must be one of {sorted(ALIGNMENT_METRICS)}, got {self.metric!r}")
        if self.steps is None:
            self.steps = DEFAULT_STEPS[self.metric]
        if not (len(self.factors) == len(self.steps) == len(self.learning_rates)) or not self.factors:
            raise ValueError(f"alignment schedule: factors {self.factors}, steps {self.steps} and learning rates "
                             f"{self.learning_rates} must be non-empty and of one length")


    def factors_for(self, shape) -> tuple:
        """The downsampling factors used for a volume of ``shape`` (small volumes get finer levels)."""
        factors = list(self.factors)
        while factors[-1] > 1 and min(shape) / factors[-1] < self.finest_size:
            factors = [max(1, f // 2) for f in factors]
        return tuple(factors)


@dataclass
class AlignmentResult:
    matrix: np.ndarray                   # (4, 4) fixed world -> moving world
    kind: str
    metric: str
    similarity_before: float             # header alignment, fine level
    similarity_after: float
    seconds: float
    history: list = field(default_factory=list)


# ---------------------------------------------------------------------------
# similarity measures on sampled points (higher is better)
# ---------------------------------------------------------------------------
def masked_ncc(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Global normalised cross-correlation of ``a`` and ``b`` over ``mask`` (all (N,)), in [-1, 1]."""
    w = mask / mask.sum().clamp_min(1.0)
    am, bm = (w * a).sum(), (w * b).sum()
    da, db = a - am, b - bm
    cov = (w * da * db).sum()
    return cov / ((w * da * da).sum() * (w * db * db).sum()).clamp_min(1e-12).sqrt()


def parzen_weights(values: torch.Tensor, bins: int = 32) -> torch.Tensor:
    """Gaussian Parzen-window bin weights of intensities in [0, 1]: (N,) -> (N, bins), rows summing to 1."""
    centres = torch.linspace(0.0, 1.0, bins, dtype=values.dtype, device=values.device)
    w = torch.exp(-0.5 * ((values[:, None] - centres) * (bins - 1)) ** 2)
    return w / w.sum(1, keepdim=True).clamp_min(1e-12)


def mutual_information(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor, bins: int = 32,
                       b_weights: torch.Tensor | None = None) -> torch.Tensor:
    """Mutual information (nats) of intensities in [0, 1] over ``mask``, with Gaussian Parzen windows.
    ``b_weights``: ``parzen_weights(b, bins)`` when already computed (a fixed image's)."""
    wa = parzen_weights(a, bins) * mask[:, None]
    wb = parzen_weights(b, bins) if b_weights is None else b_weights
    joint = wa.t() @ wb
    joint = joint / joint.sum().clamp_min(1e-12)
    pa, pb = joint.sum(1, keepdim=True), joint.sum(0, keepdim=True)
    return (joint * (torch.log(joint + 1e-12) - torch.log(pa @ pb + 1e-12))).sum()


ALIGNMENT_METRICS = {"ncc": masked_ncc, "mi": mutual_information}


# ---------------------------------------------------------------------------
# geometry
# ---------------------------------------------------------------------------
def rotation_matrix(angles: torch.Tensor) -> torch.Tensor:
    """Rotation R = Rz Ry Rx from three angles in radians: (3,) -> (3, 3)."""
    cx, cy, cz = torch.cos(angles)
    sx, sy, sz = torch.sin(angles)
    one, zero = torch.ones_like(cx), torch.zeros_like(cx)
    rx = torch.stack([one, zero, zero, zero, cx, -sx, zero, sx, cx]).view(3, 3)
    ry = torch.stack([cy, zero, sy, zero, one, zero, -sy, zero, cy]).view(3, 3)
    rz = torch.stack([cz, -sz, zero, sz, cz, zero, zero, zero, one]).view(3, 3)
    return rz @ ry @ rx


def robust_unit(array: np.ndarray) -> np.ndarray:
    """Intensities mapped to [0, 1] between the 0.5 and 99.5 percentiles (clipped)."""
    lo, hi = np.percentile(array, [0.5, 99.5])
    if hi <= lo:
        lo, hi = float(array.min()), float(array.max())
    return np.clip((array - lo) / max(hi - lo, 1e-12), 0.0, 1.0).astype(np.float32)


def centre_of_mass(array: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """World position of the intensity centre of mass (intensities above the volume's minimum)."""
    w = robust_unit(array).astype(np.float64)
    total = w.sum()
    if total <= 0:
        return affine[:3, :3] @ ((np.asarray(array.shape) - 1) / 2.0) + affine[:3, 3]
    idx = [np.tensordot(w.sum(axis=tuple(a for a in range(3) if a != ax)), np.arange(n), 1) / total
           for ax, n in enumerate(array.shape)]
    return affine[:3, :3] @ np.asarray(idx) + affine[:3, 3]


def _pool(volume: torch.Tensor, affine: np.ndarray, factor: int) -> tuple[torch.Tensor, np.ndarray]:
    """Average-pooled volume (1, 1, d, h, w) and the affine of its voxel grid."""
    if factor == 1:
        return volume, affine
    pooled = F.avg_pool3d(volume, factor, ceil_mode=True, count_include_pad=False)
    scale = np.diag([factor, factor, factor, 1.0])
    scale[:3, 3] = (factor - 1) / 2.0
    return pooled, affine @ scale


def _voxel_to_normalised(shape) -> np.ndarray:
    """4x4 map from voxel indices (i, j, k) to ``grid_sample`` coordinates (x=k, y=j, z=i), align_corners."""
    m = np.zeros((4, 4))
    for out_axis, in_axis in enumerate((2, 1, 0)):
        n = shape[in_axis]
        m[out_axis, in_axis] = 2.0 / (n - 1) if n > 1 else 0.0
        m[out_axis, 3] = -1.0 if n > 1 else 0.0
    m[3, 3] = 1.0
    return m


class _Parameters(torch.nn.Module):
    def __init__(self, kind: str, centre: np.ndarray, scale: float, translation0: np.ndarray):
        super().__init__()
        self.kind = kind
        self.angles = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))
        self.shift = torch.nn.Parameter(torch.as_tensor(translation0 / scale, dtype=torch.float64))
        self.linear = torch.nn.Parameter(torch.zeros(3, 3, dtype=torch.float64), requires_grad=kind == "affine")
        self.centre = torch.as_tensor(centre, dtype=torch.float64)
        self.scale = scale

    def matrix(self) -> torch.Tensor:
        lin = rotation_matrix(self.angles)
        if self.kind == "affine":
            lin = lin @ (torch.eye(3, dtype=torch.float64) + self.linear)
        top = torch.cat([lin, (self.centre - lin @ self.centre + self.scale * self.shift)[:, None]], 1)
        return torch.cat([top, torch.tensor([[0.0, 0.0, 0.0, 1.0]], dtype=torch.float64)], 0)


def align_volumes(moving: np.ndarray, moving_affine: np.ndarray, fixed: np.ndarray, fixed_affine: np.ndarray,
                  kind: str = "affine", settings: AlignmentSettings | None = None,
                  device="cpu") -> AlignmentResult:
    """Rigid or affine transform (fixed world -> moving world) that best aligns ``moving`` to ``fixed``.

    Args:
        moving, fixed: 3D arrays (any intensities; each is mapped to [0, 1] robustly).
        moving_affine, fixed_affine: their voxel-to-world 4x4 matrices.
        kind: 'rigid' (6 degrees of freedom), 'affine' (12) or 'none' (identity, nothing run).
        settings: the coarse-to-fine schedule and the similarity ('ncc' or 'mi').
    """
    if kind not in AFFINE_KINDS:
        raise ValueError(f"affine alignment kind must be one of {AFFINE_KINDS}, got {kind!r}")
    settings = settings or AlignmentSettings()
    t0 = time.perf_counter()
    if settings.metric == "ncc":
        score = masked_ncc
    else:
        fixed_weights: dict = {}             # the fixed side's Parzen weights, once per level

        def score(a, b, m):
            if id(b) not in fixed_weights:
                fixed_weights.clear()
                fixed_weights[id(b)] = (b, parzen_weights(b, settings.mi_bins))
            return mutual_information(a, b, m, settings.mi_bins, fixed_weights[id(b)][1])
    fixed_affine = np.asarray(fixed_affine, dtype=np.float64)
    moving_affine = np.asarray(moving_affine, dtype=np.float64)
    if kind == "none":
        return AlignmentResult(np.eye(4), kind, settings.metric, float("nan"), float("nan"), 0.0)
    with torch.inference_mode(False), torch.enable_grad():      # whatever the caller's mode
        return _optimise(moving, moving_affine, fixed, fixed_affine, kind, settings, score, device, t0)


def _optimise(moving, moving_affine, fixed, fixed_affine, kind, settings, score, device, t0) -> AlignmentResult:

    fixed_t = torch.from_numpy(robust_unit(fixed))[None, None].to(device)
    moving_t = torch.from_numpy(robust_unit(moving))[None, None].to(device)
    extent = np.abs(fixed_affine[:3, :3] @ (np.asarray(fixed.shape) - 1.0))
    centre = fixed_affine[:3, :3] @ ((np.asarray(fixed.shape) - 1) / 2.0) + fixed_affine[:3, 3]
    translation0 = centre_of_mass(moving, moving_affine) - centre_of_mass(fixed, fixed_affine)
    params = _Parameters(kind, centre, float(extent.max()) / 2.0, translation0).to(device)
    generator = torch.Generator().manual_seed(0)

    def level_data(factor):
        f_vol, f_aff = _pool(fixed_t, fixed_affine, factor)
        m_vol, m_aff = _pool(moving_t, moving_affine, factor)
        shape = f_vol.shape[2:]
        # normalised fixed coords -> world, and world -> normalised moving coords (float64)
        pre = torch.as_tensor(f_aff @ np.linalg.inv(_voxel_to_normalised(shape)), device=device)
        post = torch.as_tensor(_voxel_to_normalised(m_vol.shape[2:]) @ np.linalg.inv(m_aff), device=device)
        pick = None
        if settings.metric == "mi" and f_vol.numel() > settings.mi_samples:
            pick = torch.randperm(f_vol.numel(), generator=generator)[:settings.mi_samples].to(device)
        values = f_vol.reshape(-1) if pick is None else f_vol.reshape(-1)[pick]
        return m_vol, shape, pre, post, pick, values

    def similarity(data, matrix=None):
        m_vol, shape, pre, post, pick, values = data
        theta = (post @ (params.matrix() if matrix is None else matrix) @ pre)[:3].to(m_vol.dtype)
        grid = F.affine_grid(theta[None], (1, 1, *shape), align_corners=True).view(1, 1, 1, -1, 3)
        if pick is not None:
            grid = grid[:, :, :, pick]
        inside = (grid.abs() <= 1.0).all(-1).view(-1).to(m_vol.dtype)
        sampled = F.grid_sample(m_vol, grid, mode="bilinear", padding_mode="border", align_corners=True)
        return score(sampled.view(-1), values, inside)

    history = []
    factors = settings.factors_for(fixed.shape)
    finest = level_data(factors[-1])
    with torch.no_grad():
        before = float(similarity(finest, torch.eye(4, dtype=torch.float64, device=device)))
    for factor, steps, lr in zip(factors, settings.steps, settings.learning_rates):
        data = level_data(factor)
        opt = torch.optim.Adam([p for p in params.parameters() if p.requires_grad], lr=lr)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(steps, 1), eta_min=lr * 0.05)
        for _ in range(steps):
            opt.zero_grad(set_to_none=True)
            loss = -similarity(data)
            loss.backward()
            opt.step()
            sched.step()
        history.append((factor, -float(loss.detach())) if steps else (factor, float("nan")))
    with torch.no_grad():
        after = float(similarity(finest))
        matrix = params.matrix().cpu().numpy()
    return AlignmentResult(matrix, kind, settings.metric, before, after, time.perf_counter() - t0, history)


def rotation_angle_deg(rotation: np.ndarray) -> float:
    """Angle (degrees) of a 3x3 rotation matrix."""
    cos = (np.trace(rotation) - 1.0) / 2.0
    return math.degrees(math.acos(float(np.clip(cos, -1.0, 1.0))))


__all__ = ["AFFINE_KINDS", "ALIGNMENT_METRICS", "AlignmentSettings", "AlignmentResult", "align_volumes",
           "masked_ncc", "mutual_information", "parzen_weights", "rotation_matrix", "centre_of_mass", "robust_unit",
           "rotation_angle_deg"]
