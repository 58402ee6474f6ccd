"""PoLaCA: polarity correlation attention between fixed and moving features.

Reads top-down: window helpers, the attention inside one window
(:class:`PolarityAttention`), then the full block on feature volumes (:class:`PoLaCA`).

Queries come from the fixed features; keys, values and a gate from the (already
warped) moving features. Correlation is split by sign: ``x+ = ReLU(x)**p`` and
``x- = ReLU(-x)**p`` with a learnable per-head, per-channel exponent
``p = 1 + alpha * sigmoid(theta)`` (ALS). The same-sign stream correlates
``[q+, q-]`` with ``[k+, k-]`` (agreement); the opposite-sign stream correlates
``[q-, q+]`` with ``[k+, k-]`` (disagreement, the inhibitory cue). Each stream is
linear attention over one half of the value channels.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .backend import autocast_dtype
from .blocks import autocast_off


# ---------------------------------------------------------------------------
# windows
# ---------------------------------------------------------------------------
def pad_to_multiple(x: torch.Tensor, window: Sequence[int]) -> torch.Tensor:
    """Zero-pad a channels-last volume (B, D, H, W, C) at the far end of each axis to a multiple of ``window``."""
    pads = [(-n) % w for n, w in zip(x.shape[1:4], window)]
    if not any(pads):
        return x
    return F.pad(x, (0, 0, 0, pads[2], 0, pads[1], 0, pads[0]))


def window_partition(x: torch.Tensor, window: Sequence[int]) -> torch.Tensor:
    """(B, D, H, W, C) with sizes divisible by ``window`` -> (B * nWindows, wd * wh * ww, C).

    Windows are ordered (batch, d, h, w); tokens inside a window in row-major (wd, wh, ww) order.
    """
    b, d, h, w, c = x.shape
    wd, wh, ww = window
    x = x.view(b, d // wd, wd, h // wh, wh, w // ww, ww, c)
    return x.permute(0, 1, 3, 5, 2, 4, 6, 7).reshape(-1, wd * wh * ww, c)


def window_reverse(windows: torch.Tensor, window: Sequence[int], size: Sequence[int]) -> torch.Tensor:
    """Inverse of :func:`window_partition`: (B * nWindows, N, C) -> (B, D, H, W, C) for ``size`` = (D, H, W)."""
    d, h, w = size
    wd, wh, ww = window
    c = windows.shape[-1]
    x = windows.view(-1, d // wd, h // wh, w // ww, wd, wh, ww, c)
    return x.permute(0, 1, 4, 2, 5, 3, 6, 7).reshape(-1, d, h, w, c)


def window_reverse_released(windows: torch.Tensor, window: Sequence[int], size: Sequence[int]) -> torch.Tensor:
    """The released code's window reverse: (B * nWindows, N, C) -> (B, D, H, W, C).

    It views the windows as (B, nD, nH, nW, wd, wh, ww, C) and applies the partition's own
    axis permutation a second time instead of its inverse, so each window's outputs land on
    other voxels (across windows). Kept only for ``released_compat``.
    """
    d, h, w = size
    wd, wh, ww = window
    c = windows.shape[-1]
    x = windows.view(-1, d // wd, h // wh, w // ww, wd, wh, ww, c)
    return x.permute(0, 1, 3, 5, 2, 4, 6, 7).reshape(-1, d, h, w, c)


# ---------------------------------------------------------------------------
# attention inside windows
# ---------------------------------------------------------------------------
def polarity_split(x: torch.Tensor, p: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``[ReLU(x)**p, ReLU(-x)**p]`` along the last axis: (..., d) -> (..., 2d), in ``dtype``
    (default x's); ``p`` (d,) broadcasts over the leading axes. One power per element
    (``|x|**p``, then split by sign)."""
    a = x.abs().pow(p)
    pos = a.copysign(x).clamp_min(0)
    return torch.cat([pos, a - pos], dim=-1).to(dtype or x.dtype)


def stream_matrix(g: torch.Tensor, s: torch.Tensor, num_heads: int) -> torch.Tensor:
    """The two polarity streams of every head as one matrix on ``[q+ | q-]`` (see
    :func:`polarity_streams`).

    g: ``[k+ | k-]^T v / N`` (B', 2d, d); s: ``mean [k+ | k-]`` (B', 2d) -> (B', 2d, 2d):
    value columns, then each value channel's normaliser column. Entries between different
    heads are zero. The first half of each head's value channels reads ``[q+, q-]`` against
    ``[k+, k-]`` (agreement), the second half ``[q-, q+]`` (disagreement), which is the same
    product with the key signs swapped; so do their normalisers.
    """
    b, two_d, d = g.shape
    hd = d // num_heads
    head = torch.arange(d, device=g.device) // hd
    same_head = (head.unsqueeze(1) == head.unsqueeze(0)).to(g.dtype)                  # (d, d)
    opposite_col = (torch.arange(d, device=g.device) % hd) >= hd // 2                 # (d,)
    g, s = g.unflatten(1, (2, d)), s.unflatten(1, (2, d)).unsqueeze(-1)
    values = torch.where(opposite_col, g.flip(1), g) * same_head
    norms = torch.where(opposite_col, s.flip(1), s) * same_head
    return torch.cat([values, norms], dim=-1).view(b, two_d, 2 * d)


def polarity_streams(q2: torch.Tensor, k2: torch.Tensor, v: torch.Tensor, num_heads: int,
                     eps: float) -> torch.Tensor:
    """Both polarity streams of linear attention for all heads, in two dense products.

    q2, k2: ``[x+ | x-]`` of queries and keys (B', N, 2d); v: (B', N, d) -> (B', N, d).
    Head ``j`` of width hd computes, with ``Q = [q+, q-]``, ``Q' = [q-, q+]``, ``K = [k+, k-]``
    restricted to its channels and ``v1``, ``v2`` the halves of its values,
    ``[Q (K^T v1 / N) / (Q . mean K + eps), Q' (K^T v2 / N) / (Q' . mean K + eps)]``.
    ``K^T v`` first costs O(N); every head in one block-diagonal matrix
    (:func:`stream_matrix`) makes it two matrix products per window, the second giving each
    channel's numerator and denominator side by side.
    """
    n, d = k2.shape[-2], v.shape[-1]
    # a column of ones after the values gives mean K in the same product
    gs = torch.matmul(k2.transpose(-2, -1), torch.cat([v, v.new_ones((*v.shape[:-1], 1))], dim=-1)) / n
    out = torch.matmul(q2, stream_matrix(gs[..., :d], gs[..., d], num_heads))      # (B', N, 2d)
    return out[..., :d] / (out[..., d:] + eps)


def polarity_pair(q: torch.Tensor, k: torch.Tensor, positional: torch.Tensor, p: torch.Tensor,
                  products: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``[q+ | q-]`` and ``[k+ | k-]`` (B', N, 2d) in ``products`` of queries q and keys
    ``k + positional`` (B', N, d), the powers ``p`` (d,) taken in p's dtype."""
    core = p.dtype
    return polarity_split(q.to(core), p, products), polarity_split(k.to(core) + positional, p, products)


def polarity_dtypes(x: torch.Tensor) -> tuple[torch.dtype, torch.dtype]:
    """(powers, products) dtypes of the polarity core for projections ``x``: powers in at least
    float32; products in bf16 under bf16 autocast (float32's range), never in float16, where
    x**p with p up to 16 overflows."""
    core = torch.promote_types(x.dtype, torch.float32)
    return core, (torch.bfloat16 if autocast_dtype(x.device.type) == torch.bfloat16 else core)


class PolarityAttention(nn.Module):
    """Polarity-aware linear cross-attention in one window, with ALS sharpening.

    Args:
        dim: token width d (split into ``num_heads`` heads of even width).
        window: window size (wd, wh, ww); fixes the learnable positional term (N, d).
        num_heads: heads h.
        alpha: ALS range; exponent p = 1 + alpha * sigmoid(theta) starts at 1 + alpha / 2.
        dwc_kernel: kernel of the depthwise convolution of the values (shared by heads).
        eps: stabiliser of the attention normaliser.
        released_layout: read the depthwise convolution's (B', h, N, hd) output straight as
            (B', N, d), as the released code does (mixes tokens and heads); default the
            correct (B', N, h, hd) layout.
    Forward:
        fixed, moving: (B', N, d) normalised window tokens -> (B', N, d).
    """

    def __init__(self, dim: int, window: Sequence[int], num_heads: int = 8, alpha: float = 15.0,
                 dwc_kernel: int = 3, eps: float = 1e-6, released_layout: bool = False):
        super().__init__()
        self.released_layout = released_layout
        if dim % num_heads or (dim // num_heads) % 2:
            raise ValueError(f"PolarityAttention: dim {dim} must split into {num_heads} heads of even width")
        self.dim, self.num_heads, self.head_dim = dim, num_heads, dim // num_heads
        self.window = tuple(int(w) for w in window)
        self.alpha, self.eps = float(alpha), eps
        n_tokens = self.window[0] * self.window[1] * self.window[2]
        self.qkvg = nn.Linear(dim, 4 * dim, bias=False)          # rows: q | k | v | g
        self.positional = nn.Parameter(torch.zeros(n_tokens, dim))
        self.scale = nn.Parameter(torch.zeros(dim))               # softplus(0) = log 2
        self.power = nn.Parameter(torch.zeros(num_heads, self.head_dim))  # ALS theta
        self.dwc = nn.Conv3d(self.head_dim, self.head_dim, dwc_kernel, padding=dwc_kernel // 2,
                             groups=self.head_dim)
        self.proj = nn.Linear(dim, dim)

    def exponent(self) -> torch.Tensor:
        """ALS exponent p = 1 + alpha * sigmoid(theta): (h, hd), always in (1, 1 + alpha)."""
        return 1.0 + self.alpha * torch.sigmoid(self.power)

    def value_conv(self, v: torch.Tensor) -> torch.Tensor:
        """Depthwise convolution of each head's values, laid out spatially inside the window
        (zero outside it), one kernel shared by the heads: (B', N, d) -> (B', N, d)."""
        bw, n, d = v.shape
        vol = v.reshape(bw, *self.window, d).permute(0, 4, 1, 2, 3)
        weight = self.dwc.weight.repeat(self.num_heads, 1, 1, 1, 1)
        bias = None if self.dwc.bias is None else self.dwc.bias.repeat(self.num_heads)
        y = F.conv3d(vol, weight, bias, padding=self.dwc.padding, groups=d)
        return y.permute(0, 2, 3, 4, 1).reshape(bw, n, d)

    def forward(self, fixed: torch.Tensor, moving: torch.Tensor) -> torch.Tensor:
        return self.attend(fixed, moving, polarity_pair, self.value_conv)

    def attend(self, fixed: torch.Tensor, moving: torch.Tensor, split, value_conv) -> torch.Tensor:
        """The attention with its two costliest steps given: ``split`` as :func:`polarity_pair`,
        ``value_conv`` as :meth:`value_conv`."""
        d = self.dim
        weight = self.qkvg.weight
        # queries and keys divided by softplus(scale), folded into their weights
        scale = F.softplus(self.scale)
        q = F.linear(fixed, weight[:d] / scale.unsqueeze(1))
        k = F.linear(moving, weight[d:2 * d] / scale.unsqueeze(1))
        v, g = F.linear(moving, weight[2 * d:]).chunk(2, dim=-1)
        core, products = polarity_dtypes(q)
        p = self.exponent().reshape(d).to(core)
        q2, k2 = split(q, k, (self.positional / scale).to(core), p, products)
        with autocast_off(q.device.type):
            x = polarity_streams(q2, k2, v.to(products), self.num_heads, self.eps).to(v.dtype)   # (B', N, d)
        del q2, k2
        v_sp = value_conv(v)
        if self.released_layout:
            # the released code reads the convolution's (B', h, N, hd) output as (B', N, d)
            bw, n, _ = v_sp.shape
            v_sp = v_sp.view(bw, n, self.num_heads, self.head_dim).transpose(1, 2).reshape(bw, n, d)
        return self.proj((x + v_sp) * g)


# ---------------------------------------------------------------------------
# the block on feature volumes
# ---------------------------------------------------------------------------
class PoLaCA(nn.Module):
    """Polarity correlation attention block on (B, C, D, H, W) feature volumes.

    ``LN(moving), LN(fixed)`` (one shared norm) -> windows (padded to a multiple of the
    window, cropped back afterwards) -> :class:`PolarityAttention` -> residual to the
    moving features -> ``x + MLP(LN(x))`` -> final LayerNorm. Works at any input size.
    ``released_compat`` switches on the released code's value layout and window reverse.

    Forward:
        moving, fixed: (B, C, D, H, W) -> (B, C, D, H, W).
    """

    def __init__(self, dim: int, window: Sequence[int], num_heads: int = 8, alpha: float = 15.0,
                 dwc_kernel: int = 3, mlp_ratio: float = 4.0, released_compat: bool = False):
        super().__init__()
        self.window = tuple(int(w) for w in window)
        self.reverse = window_reverse_released if released_compat else window_reverse
        self.norm_in = nn.LayerNorm(dim)
        self.attn = PolarityAttention(dim, self.window, num_heads, alpha, dwc_kernel, released_layout=released_compat)
        self.norm_mlp = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self.norm_out = nn.LayerNorm(dim)

    def mlp_residual(self, x: torch.Tensor) -> torch.Tensor:
        """``x + MLP(LN(x))`` on tokens (..., C)."""
        return x + self.mlp(self.norm_mlp(x))

    def forward(self, moving: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
        return self.run(moving, fixed, self.attn, self.mlp_residual)

    def run(self, moving: torch.Tensor, fixed: torch.Tensor, attention, mlp_residual) -> torch.Tensor:
        """The block with its two token-wise steps given: ``attention(f_win, m_win)`` as
        :class:`PolarityAttention`, ``mlp_residual(x)`` as :meth:`mlp_residual` (may work in place)."""
        if moving.shape != fixed.shape or moving.ndim != 5:
            raise ValueError(f"PoLaCA: expected moving and fixed features of one shape (B, C, D, H, W), "
                             f"got {tuple(moving.shape)} and {tuple(fixed.shape)}")
        size = moving.shape[2:]
        m = moving.permute(0, 2, 3, 4, 1)                         # (B, D, H, W, C)
        f = fixed.permute(0, 2, 3, 4, 1)
        m_pad = pad_to_multiple(self.norm_in(m), self.window)
        f_pad = pad_to_multiple(self.norm_in(f), self.window)
        padded = m_pad.shape[1:4]
        f_win, m_win = window_partition(f_pad, self.window), window_partition(m_pad, self.window)
        del f_pad, m_pad
        attn = attention(f_win, m_win)
        del f_win, m_win
        attn = self.reverse(attn, self.window, padded)[:, :size[0], :size[1], :size[2]]
        x = mlp_residual(m + attn)
        return self.norm_out(x).permute(0, 4, 1, 2, 3)
