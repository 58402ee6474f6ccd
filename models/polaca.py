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

import contextlib
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .cpu_kernels import autocast_dtype


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
def polarity_split(x: torch.Tensor, p: torch.Tensor, out: torch.Tensor | None = None,
                   work: torch.Tensor | None = None) -> torch.Tensor:
    """``[ReLU(x)**p, ReLU(-x)**p]`` along the last axis: (..., d) -> (..., 2d).

    One power per element (``|x|**p``, then split by sign), not one per half. ``p`` (d,)
    broadcasts over the leading axes. Without autograd the powers are taken in ``work``
    (x's shape, at least float32; made if not given) and written into ``out`` (made in x's
    dtype if not given), whose dtype may differ from x's: a bf16 ``out`` holds float32 powers
    rounded once.
    """
    if torch.is_grad_enabled() or torch.compiler.is_compiling():
        a = x.abs().pow(p)
        pos = a.copysign(x).clamp_min(0)
        return torch.cat([pos, a - pos], dim=-1)
    if out is None:
        out = x.new_empty((*x.shape[:-1], 2 * x.shape[-1]))
    if work is None:
        work = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, torch.float32))
    pos, neg = out.chunk(2, dim=-1)
    signed = work.copy_(x).abs_().pow_(p).copysign_(x)        # sign(x) |x|**p
    pos.copy_(signed).clamp_min_(0)            # rounding keeps the sign: clamped after it
    neg.copy_(signed).clamp_max_(0).neg_()
    return out


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
    The cheaper association (``K^T v`` first) costs O(N); gathering every head into one
    block-diagonal matrix (:func:`stream_matrix`) makes it two matrix products per window
    instead of many tiny ones per head, the second giving each channel's numerator and
    denominator side by side.
    """
    n, d = k2.shape[-2], v.shape[-1]
    # a column of ones after the values gives mean K in the same product
    gs = torch.matmul(k2.transpose(-2, -1), torch.cat([v, v.new_ones((*v.shape[:-1], 1))], dim=-1)) / n
    out = torch.matmul(q2, stream_matrix(gs[..., :d], gs[..., d], num_heads))      # (B', N, 2d)
    return out[..., :d] / (out[..., d:] + eps)


def polarity_product_dtype(core: torch.dtype, device_type: str) -> torch.dtype:
    """dtype of the polarity core's matrix products: bf16 under bf16 autocast on ``device_type``
    (its range is float32's, so the powers fit), else ``core`` (float16 autocast included)."""
    return torch.bfloat16 if autocast_dtype(device_type) == torch.bfloat16 else core


def autocast_off(device_type: str):
    """A context without autocast on ``device_type`` (nothing to switch off on a device that
    has none, such as "meta")."""
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def window_band(window: Sequence[int], kernel: int) -> torch.Tensor:
    """Where a depthwise ``kernel``^3 convolution inside a window (zero padding at its faces)
    takes each tap: (N, N) indices into the flattened kernel, ``kernel**3`` where token ``s``
    is outside the reach of token ``t``. Tokens in row-major (wd, wh, ww) order."""
    r = kernel // 2
    coords = torch.stack(torch.meshgrid(*[torch.arange(w) for w in window], indexing="ij"), dim=-1).view(-1, 3)
    offset = coords.unsqueeze(0) - coords.unsqueeze(1) + r                      # (t, s, 3): s - t + r
    inside = ((offset >= 0) & (offset < kernel)).all(dim=-1)
    flat = (offset[..., 0] * kernel + offset[..., 1]) * kernel + offset[..., 2]
    return torch.where(inside, flat, kernel ** 3)


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
        self.register_buffer("band", window_band(self.window, dwc_kernel), persistent=False)

    def exponent(self) -> torch.Tensor:
        """ALS exponent p = 1 + alpha * sigmoid(theta): (h, hd), always in (1, 1 + alpha)."""
        return 1.0 + self.alpha * torch.sigmoid(self.power)

    def _value_conv(self, v: torch.Tensor) -> torch.Tensor:
        """Depthwise convolution of each head's values, laid out spatially inside the window
        (zero outside it), one kernel shared by the heads: (B', N, d) -> (B', N, d).

        With autograd it is computed as a product with each channel's (N, N) band matrix
        (the kernel's taps placed by ``band``): the same sums, and in bf16 on the CPU its
        backward pass is several times faster than that of the depthwise convolution."""
        if torch.is_grad_enabled():
            return self._value_conv_as_product(v)
        bw, n, d = v.shape
        vol = v.reshape(bw, *self.window, d).permute(0, 4, 1, 2, 3)      # channels-last view
        weight = self.dwc.weight.repeat(self.num_heads, 1, 1, 1, 1)
        bias = None if self.dwc.bias is None else self.dwc.bias.repeat(self.num_heads)
        y = F.conv3d(vol, weight, bias, padding=self.dwc.padding, groups=d)
        return y.permute(0, 2, 3, 4, 1).reshape(bw, n, d)

    def _value_conv_as_product(self, v: torch.Tensor) -> torch.Tensor:
        bw, n, d = v.shape
        h, hd = self.num_heads, self.head_dim
        taps = self.dwc.weight.view(hd, -1)
        band = torch.cat([taps, taps.new_zeros(hd, 1)], dim=1)[:, self.band]            # (hd, N, N)
        by_channel = v.view(bw, n, h, hd).permute(3, 1, 0, 2).reshape(hd, n, bw * h)
        y = torch.matmul(band, by_channel).view(hd, n, bw, h).permute(2, 1, 3, 0).reshape(bw, n, d)
        return y if self.dwc.bias is None else y + self.dwc.bias.repeat(h).to(y.dtype)

    def forward(self, fixed: torch.Tensor, moving: torch.Tensor, scratch: dict | None = None) -> torch.Tensor:
        """``scratch``: without autograd, a dict in which the polarity core keeps its buffers
        from one call to the next (calls on chunks of at most as many windows as the first)."""
        d = self.dim
        weight = self.qkvg.weight
        # queries and keys divided by softplus(scale), folded into their weights
        scale = F.softplus(self.scale)
        q = F.linear(fixed, weight[:d] / scale.unsqueeze(1))
        k = F.linear(moving, weight[d:2 * d] / scale.unsqueeze(1))
        v, g = F.linear(moving, weight[2 * d:]).chunk(2, dim=-1)

        # powers in at least float32; products in bf16 under bf16 autocast (float32's range),
        # never in float16: x**p with p up to 16 overflows it
        core = torch.promote_types(q.dtype, torch.float32)
        products = polarity_product_dtype(core, q.device.type)
        p = self.exponent().reshape(d).to(core)
        positional = (self.positional / scale).to(core)
        if scratch is None or torch.is_grad_enabled() or torch.compiler.is_compiling():
            q2 = polarity_split(q.to(core), p).to(products)
            k2 = polarity_split(k.to(core) + positional, p).to(products)
        else:
            # buffers kept between chunks: a new tensor of a megabyte or more is fresh memory
            bw, n = q.shape[:2]
            if not scratch:
                scratch["q2"], scratch["k2"] = (q.new_empty((bw, n, 2 * d), dtype=products) for _ in range(2))
                scratch["k"], scratch["work"] = (q.new_empty((bw, n, d), dtype=core) for _ in range(2))
            work = scratch["work"][:bw]
            k_core = torch.add(k, positional, out=scratch["k"][:bw])
            q2 = polarity_split(q, p, out=scratch["q2"][:bw], work=work)
            k2 = polarity_split(k_core, p, out=scratch["k2"][:bw], work=work)
        with autocast_off(q.device.type):
            x = polarity_streams(q2, k2, v.to(products), self.num_heads, self.eps).to(v.dtype)   # (B', N, d)
        del q2, k2

        v_sp = self._value_conv(v)
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

    inference_chunk_tokens = 2 ** 13      # tokens per chunk of the attention and MLP without autograd

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

    def _attention_in_chunks(self, f_win: torch.Tensor, m_win: torch.Tensor) -> torch.Tensor:
        """``self.attn(f_win, m_win)`` over chunks of about ``inference_chunk_tokens`` tokens."""
        step = max(1, self.inference_chunk_tokens // f_win.shape[1])
        parts, scratch = [], {}
        for i in range(0, len(f_win), step):
            parts.append(self.attn(f_win[i:i + step], m_win[i:i + step], scratch))
        return torch.cat(parts)

    def forward(self, moving: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
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
        if torch.is_grad_enabled():
            attn = self.attn(f_win, m_win)
        else:
            # windows and tokens are independent: in chunks, the attention's and the MLP's
            # intermediates never exist for the whole volume at once (same values)
            attn = self._attention_in_chunks(f_win, m_win)
        del f_win, m_win
        attn = self.reverse(attn, self.window, padded)[:, :size[0], :size[1], :size[2]]
        x = m + attn
        del attn
        if torch.is_grad_enabled():
            x = x + self.mlp(self.norm_mlp(x))
        else:
            flat = x.view(-1, x.shape[-1])
            for i in range(0, flat.shape[0], self.inference_chunk_tokens):
                part = flat[i:i + self.inference_chunk_tokens]
                part += self.mlp(self.norm_mlp(part))
        return self.norm_out(x).permute(0, 4, 1, 2, 3)
