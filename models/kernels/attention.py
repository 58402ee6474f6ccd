"""PoLaCA's costliest steps as CPU kernels, for :meth:`PolarityAttention.attend` and
:meth:`PoLaCA.run`: the polarity split into kept buffers, attention and MLP in chunks of
windows and tokens (inference), and the depthwise value convolution as a band-matrix product
(training). Each computes the reference step's values.
"""
from __future__ import annotations

import functools
from typing import Sequence

import torch


def polarity_split_into(x: torch.Tensor, p: torch.Tensor, out: torch.Tensor | None = None,
                        work: torch.Tensor | None = None) -> torch.Tensor:
    """``polarity_split(x, p, out.dtype)`` without autograd, written into ``out`` (made in x's
    dtype if not given); the powers are taken in ``work`` (x's shape, at least float32; made if
    not given), so a bf16 ``out`` holds float32 powers rounded once."""
    if out is None:
        out = x.new_empty((*x.shape[:-1], 2 * x.shape[-1]))
    if work is None:
        work = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, torch.float32))
    pos, neg = out.chunk(2, dim=-1)
    signed = work.copy_(x).abs_().pow_(p).copysign_(x)        # sign(x) |x|**p
    pos.copy_(signed).clamp_min_(0)            # rounding keeps the sign: clamped after it
    neg.copy_(signed).clamp_max_(0).neg_()
    return out


class BufferedSplit:
    """The ``split`` of :meth:`PolarityAttention.attend` with its buffers kept from one chunk of
    windows to the next (chunks of at most as many windows as the first): a new tensor of a
    megabyte or more is fresh memory, whose page faults cost more than the arithmetic."""

    def __init__(self):
        self.buffers: dict[str, torch.Tensor] = {}

    def __call__(self, q: torch.Tensor, k: torch.Tensor, positional: torch.Tensor, p: torch.Tensor,
                 products: torch.dtype):
        bw, n, d = q.shape
        if not self.buffers:
            self.buffers["q2"], self.buffers["k2"] = (q.new_empty((bw, n, 2 * d), dtype=products) for _ in range(2))
            self.buffers["k"], self.buffers["work"] = (q.new_empty((bw, n, d), dtype=p.dtype) for _ in range(2))
        work = self.buffers["work"][:bw]
        k_core = torch.add(k, positional, out=self.buffers["k"][:bw])
        return (polarity_split_into(q, p, out=self.buffers["q2"][:bw], work=work),
                polarity_split_into(k_core, p, out=self.buffers["k2"][:bw], work=work))


def attention_in_chunks(block, f_win: torch.Tensor, m_win: torch.Tensor, chunk_tokens: int) -> torch.Tensor:
    """``block.attn(f_win, m_win)`` over chunks of about ``chunk_tokens`` tokens: the attention's
    intermediates never exist for the whole volume at once."""
    attn = block.attn
    step = max(1, chunk_tokens // f_win.shape[1])
    split, parts = BufferedSplit(), []
    for i in range(0, len(f_win), step):
        parts.append(attn.attend(f_win[i:i + step], m_win[i:i + step], split, attn.value_conv))
    return torch.cat(parts)


def mlp_residual_in_chunks_(block, x: torch.Tensor, chunk_tokens: int) -> torch.Tensor:
    """``block.mlp_residual(x)`` in place, ``chunk_tokens`` tokens at a time."""
    flat = x.view(-1, x.shape[-1])
    for i in range(0, flat.shape[0], chunk_tokens):
        part = flat[i:i + chunk_tokens]
        part += block.mlp(block.norm_mlp(part))
    return x


@functools.lru_cache(maxsize=16)
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


def value_conv_as_product(attn, v: torch.Tensor) -> torch.Tensor:
    """``attn.value_conv(v)`` as a product with each channel's (N, N) band matrix (the kernel's
    taps placed by :func:`window_band`): the same sums, with a much faster backward pass in bf16
    on the CPU than the depthwise convolution's. v: (B', N, d) -> (B', N, d)."""
    bw, n, d = v.shape
    h, hd = attn.num_heads, attn.head_dim
    kernel = attn.dwc.kernel_size[0]
    taps = attn.dwc.weight.view(hd, -1)
    band = torch.cat([taps, taps.new_zeros(hd, 1)], dim=1)[:, window_band(attn.window, kernel)]   # (hd, N, N)
    by_channel = v.view(bw, n, h, hd).permute(3, 1, 0, 2).reshape(hd, n, bw * h)
    y = torch.matmul(band, by_channel).view(hd, n, bw, h).permute(2, 1, 3, 0).reshape(bw, n, d)
    return y if attn.dwc.bias is None else y + attn.dwc.bias.repeat(h).to(y.dtype)


def band_applies(attn) -> bool:
    """Whether :func:`value_conv_as_product` computes ``attn.value_conv``: a cubic, odd kernel
    with 'same' zero padding and stride 1."""
    conv = attn.dwc
    k = conv.kernel_size
    return (len(set(k)) == 1 and k[0] % 2 == 1 and conv.padding == (k[0] // 2,) * 3 and conv.stride == (1, 1, 1)
            and conv.dilation == (1, 1, 1) and conv.padding_mode == "zeros")
