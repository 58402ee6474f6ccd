"""Registration losses: lower is better for all of them.

Every loss takes batched volumes (B, C, D, H, W) on any device and in any
floating dtype; reduced-precision inputs are evaluated in float32.
"""
from __future__ import annotations

import itertools

import torch
import torch.nn as nn
import torch.nn.functional as F

from .checks import check_field, check_same_shape, check_volume


def _fp32(*xs: torch.Tensor):
    return tuple(x.float() if x.dtype in (torch.float16, torch.bfloat16) else x for x in xs)


SHIFT_ADD_MAX_WINDOW = 9      # up to this window, shifted adds beat running sums (and round less)


def _box_sum(x: torch.Tensor, win: int) -> torch.Tensor:
    r = win // 2
    for dim in (2, 3, 4):
        n = x.shape[dim]
        if win <= SHIFT_ADD_MAX_WINDOW:
            out = x.clone()
            for s in range(1, min(r, n - 1) + 1):
                out.narrow(dim, s, n - s).add_(x.narrow(dim, 0, n - s))
                out.narrow(dim, 0, n - s).add_(x.narrow(dim, s, n - s))
            x = out
        else:
            pad = [0] * 6
            pad[2 * (4 - dim)], pad[2 * (4 - dim) + 1] = r + 1, r      # F.pad lists the last axis first
            running = F.pad(x, pad).cumsum(dim)
            x = running.narrow(dim, win, n) - running.narrow(dim, 0, n)
    return x


class _BoxSum(torch.autograd.Function):
    """The window is symmetric and zero-padded, so the filter is its own adjoint: the gradient
    is the box sum of the incoming gradient (no graph of pads, cumsums and slices is kept)."""

    @staticmethod
    def forward(ctx, x, win):
        ctx.win = win
        return _box_sum(x, win)

    @staticmethod
    def backward(ctx, grad):
        return _box_sum(grad.contiguous(), ctx.win), None


def box_sum(x: torch.Tensor, win: int) -> torch.Tensor:
    """Sum over a cubic window of side ``win`` (odd) around each voxel (zero-padded), same size.

    Separable: each 1-D pass adds shifted copies (windows up to 9, about 3x faster than a
    running sum at 5) or takes a difference of a running sum (cumsum; cost independent of the
    window). Its backward pass is the same box sum of the gradient.
    """
    if win < 1 or win % 2 == 0:
        raise ValueError(f"box_sum: win must be a positive odd integer, got {win}")
    if x.requires_grad and torch.is_grad_enabled():
        return _BoxSum.apply(x, win)
    return _box_sum(x, win)


# ---------------------------------------------------------------------------
# similarity
# ---------------------------------------------------------------------------
def ncc_loss(pred: torch.Tensor, target: torch.Tensor, win: int = 9, eps: float = 1e-5) -> torch.Tensor:
    """Local normalised cross-correlation, returned as ``-mean(cc)`` (so -1 is a perfect match).

    For every voxel, over the ``win``**3 window around it (zero-padded box sums as in
    VoxelMorph): ``cc = cross**2 / (var_pred * var_target + eps)``, where cross and the
    variances are window sums of centred products.  Squaring makes the loss invariant to
    any affine intensity change of either input.  The window statistics are centred with
    the mean over the voxels that lie inside the volume, so that invariance also holds at
    the border.

    Args:
        pred, target: (B, C, D, H, W) with the same shape.
        win: odd window side.
        eps: stabiliser added to the variance product (window-sum units).
    Returns:
        scalar tensor.
    """
    check_volume(pred, "pred")
    check_volume(target, "target")
    check_same_shape(pred, target, "pred", "target")
    if win < 1 or win % 2 == 0:
        raise ValueError(f"ncc_loss: win must be a positive odd integer, got {win}")
    pred, target = _fp32(pred, target)
    c = pred.shape[1]
    stacked = torch.cat([pred, target, pred * pred, target * target, pred * target], dim=1)
    sums = box_sum(stacked, win)
    count = box_sum(torch.ones_like(pred[:1, :1]), win)
    p_sum, t_sum, pp_sum, tt_sum, pt_sum = torch.split(sums, c, dim=1)
    cross = pt_sum - p_sum * t_sum / count
    p_var = (pp_sum - p_sum * p_sum / count).clamp_min(0)
    t_var = (tt_sum - t_sum * t_sum / count).clamp_min(0)
    cc = cross * cross / (p_var * t_var + eps)
    return -cc.mean()


def mse_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared intensity difference of two (B, C, D, H, W) volumes."""
    check_volume(pred, "pred")
    check_volume(target, "target")
    check_same_shape(pred, target, "pred", "target")
    pred, target = _fp32(pred, target)
    return F.mse_loss(pred, target)


# the six-neighbourhood and its 12 pairs of neighbours at distance sqrt(2)
_SIX = [(1, 0, 0), (-1, 0, 0), (0, 1, 0), (0, -1, 0), (0, 0, 1), (0, 0, -1)]
_MIND_PAIRS = [(a, b) for a, b in itertools.combinations(_SIX, 2)
               if sum((x - y) ** 2 for x, y in zip(a, b)) == 2]


def _shift(x: torch.Tensor, offset, pad: int) -> torch.Tensor:
    """x(p + offset) with replicated borders; ``x`` is pre-padded by ``pad`` on each side."""
    d, h, w = x.shape[2] - 2 * pad, x.shape[3] - 2 * pad, x.shape[4] - 2 * pad
    o = [pad + s for s in offset]
    return x[:, :, o[0]:o[0] + d, o[1]:o[1] + h, o[2]:o[2] + w]


def mind_ssc(image: torch.Tensor, radius: int = 1, dilation: int = 2, eps: float = 1e-6) -> torch.Tensor:
    """MIND self-similarity context descriptor (Heinrich et al., MICCAI 2013).

    For each of the 12 pairs (a, b) of six-neighbours that are sqrt(2) apart (scaled by
    ``dilation``), the patch distance ``D = mean_patch((I(x + a) - I(x + b))**2)`` over a
    (2 radius + 1)**3 patch; the descriptor is ``exp(-D / V)`` with the local variance
    ``V = mean over pairs of D`` (clamped to [1e-3, 1e3] times its volume mean), each
    voxel's vector divided by its maximum.

    Args:
        image: (B, 1, D, H, W).
    Returns:
        (B, 12, D, H, W) descriptor in (0, 1].
    """
    check_volume(image, "image")
    if image.shape[1] != 1:
        raise ValueError(f"mind_ssc: expected a single-channel image (B, 1, D, H, W), got shape {tuple(image.shape)}")
    (image,) = _fp32(image)
    pad = dilation
    padded = F.pad(image, (pad,) * 6, mode="replicate")
    diffs = []
    for a, b in _MIND_PAIRS:
        sa = _shift(padded, [dilation * s for s in a], pad)
        sb = _shift(padded, [dilation * s for s in b], pad)
        diffs.append((sa - sb) ** 2)
    ssd = torch.cat(diffs, dim=1)
    k = 2 * radius + 1
    ssd = F.avg_pool3d(F.pad(ssd, (radius,) * 6, mode="replicate"), k, stride=1)
    var = ssd.mean(dim=1, keepdim=True)
    mean_var = var.mean(dim=(2, 3, 4), keepdim=True)
    var = torch.maximum(torch.minimum(var, mean_var * 1000.0), mean_var * 0.001) + eps
    mind = torch.exp(-ssd / var)
    return mind / mind.amax(dim=1, keepdim=True)


def mind_loss(pred: torch.Tensor, target: torch.Tensor, radius: int = 1, dilation: int = 2) -> torch.Tensor:
    """Mean squared difference of MIND-SSC descriptors: a multi-modal (CT-MR) dissimilarity."""
    check_volume(pred, "pred")
    check_volume(target, "target")
    check_same_shape(pred, target, "pred", "target")
    return F.mse_loss(mind_ssc(pred, radius, dilation), mind_ssc(target, radius, dilation))


# ---------------------------------------------------------------------------
# regularisation
# ---------------------------------------------------------------------------
def grad_loss(u: torch.Tensor, penalty: str = "l2") -> torch.Tensor:
    """Smoothness of a displacement by forward differences.

    ``mean over axes j of mean(|u(x + e_j) - u(x)|**p)`` with p = 2 ('l2') or 1 ('l1'),
    each mean taken over batch, components and voxels.

    Args:
        u: (B, 3, D, H, W).
    """
    check_field(u, "displacement")
    if penalty not in ("l1", "l2"):
        raise ValueError(f"grad_loss: penalty must be 'l1' or 'l2', got {penalty!r}")
    (u,) = _fp32(u)
    terms = []
    for axis in (2, 3, 4):
        if u.shape[axis] < 2:
            continue
        d = torch.diff(u, dim=axis)
        terms.append((d * d).mean() if penalty == "l2" else d.abs().mean())
    if not terms:
        return u.sum() * 0.0
    return torch.stack(terms).sum() / 3.0


# ---------------------------------------------------------------------------
# labels
# ---------------------------------------------------------------------------
# ---------------------------------------------------------------------------
# the image similarities by name: one table read by the config check, the training loss and
# instance optimisation (a new similarity is a function above plus one entry here)
# ---------------------------------------------------------------------------
SIMILARITY_LOSSES = {
    "ncc": lambda pred, target, window: ncc_loss(pred, target, win=window),
    "mse": lambda pred, target, window: mse_loss(pred, target),
    "mind": lambda pred, target, window: mind_loss(pred, target),
}
SIMILARITIES = tuple(SIMILARITY_LOSSES)


def similarity_loss(name: str, window: int = 9):
    """The similarity ``name`` as ``loss(pred, target)`` (lower is better); ``window`` is the
    NCC window. ValueError naming the choices for an unknown name."""
    if name not in SIMILARITY_LOSSES:
        raise ValueError(f"unknown similarity {name!r}; expected one of {SIMILARITIES}")
    fn = SIMILARITY_LOSSES[name]
    return lambda pred, target: fn(pred, target, window)


def one_hot(labels: torch.Tensor, label_values) -> torch.Tensor:
    """(B, 1, D, H, W) integer labels -> (B, K, D, H, W) float indicators of ``label_values``."""
    check_volume(labels, "labels")
    if labels.shape[1] != 1:
        raise ValueError(f"one_hot: expected labels of shape (B, 1, D, H, W), got {tuple(labels.shape)}")
    values = torch.as_tensor(list(label_values), device=labels.device).view(1, -1, 1, 1, 1)
    return (labels == values.to(labels.dtype)).float()


def dice_loss(pred: torch.Tensor, target: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Soft Dice loss on one-hot (or probability) volumes: ``1 - mean_k dice_k``.

    ``dice_k = 2 sum(p_k t_k) / (sum p_k + sum t_k + eps)``, per sample and channel.
    Pass only foreground channels: every channel given is averaged.

    Args:
        pred, target: (B, K, D, H, W).
    """
    check_volume(pred, "pred")
    check_volume(target, "target")
    check_same_shape(pred, target, "pred", "target")
    pred, target = _fp32(pred, target)
    dims = (2, 3, 4)
    inter = (pred * target).sum(dims)
    denom = pred.sum(dims) + target.sum(dims)
    return 1.0 - (2.0 * inter / (denom + eps)).mean()


# ---------------------------------------------------------------------------
# nn.Module wrappers
# ---------------------------------------------------------------------------
class NCC(nn.Module):
    def __init__(self, win: int = 9, eps: float = 1e-5):
        super().__init__()
        self.win, self.eps = win, eps

    def forward(self, pred, target):
        return ncc_loss(pred, target, self.win, self.eps)


class MSE(nn.Module):
    def forward(self, pred, target):
        return mse_loss(pred, target)


class MINDSSC(nn.Module):
    def __init__(self, radius: int = 1, dilation: int = 2):
        super().__init__()
        self.radius, self.dilation = radius, dilation

    def forward(self, pred, target):
        return mind_loss(pred, target, self.radius, self.dilation)


class Grad(nn.Module):
    def __init__(self, penalty: str = "l2"):
        super().__init__()
        self.penalty = penalty

    def forward(self, u):
        return grad_loss(u, self.penalty)


class DiceLoss(nn.Module):
    def forward(self, pred, target):
        return dice_loss(pred, target)
