"""Memory-lean CPU inference: the whole pass without autograd.

One image at a time through the encoder (the full-resolution level's peak halves); each
level's features freed as soon as the level has read them; convolutions over concatenations
computed part by part, summed in place into one output; norms in place; features kept
channels-last (oneDNN's fast layout, PoLaCA's token layout a view of it) and warped by row
gathers; attention and MLP in chunks. In bf16 the convolutions, norms and warps run in bf16
(float32 sums), the fields stay float32.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .attention import attention_in_chunks, mlp_residual_in_chunks_
from .ops import (_HAS_FUSED_ADD, channels_last, instance_norm_relu_, onednn_conv3d_add_, onednn_conv3d_bf16,
                  warp_by_gather)
from .runner import CpuKernels, direct_conv, fused_norm_act


class CpuInference(CpuKernels):
    """The inference table (see :class:`CpuKernels`)."""

    chunk_tokens = 2 ** 13      # tokens per chunk of the attention and MLP

    def encode(self, encoder, moving: torch.Tensor, fixed: torch.Tensor):
        return self.encode_image(encoder, moving), self.encode_image(encoder, fixed)

    def estimate(self, model, level, pair: list, phi_up, context):
        return self.estimator_level(level, pair, phi_up, context)

    def conv(self, layer: nn.Conv3d, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
        """``layer``'s convolution of x with the given weight and bias, channels-last in and out."""
        geometry = (layer.padding, layer.stride, layer.dilation, layer.groups)
        if self.bf16:
            return onednn_conv3d_bf16(x, weight, bias, *geometry)
        return channels_last(torch.mkldnn_convolution(channels_last(x), weight, bias, *geometry))

    def layer(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return self.conv(layer, x, layer.weight, layer.bias) if direct_conv(layer) else layer(x)

    def norm_act(self, norm: nn.Module, act: nn.Module, y: torch.Tensor) -> torch.Tensor:
        return instance_norm_relu_(y, norm.eps) if fused_norm_act(norm, act) else act(norm(y))

    def double_conv(self, block: nn.Sequential, parts: list) -> torch.Tensor:
        """``block(torch.cat(parts, dim=1))`` without building the concatenation (see
        :meth:`conv_of_parts`); consumes ``parts``."""
        first, second = block
        conv, norm, act = first
        if not direct_conv(conv):
            return second(first(torch.cat([part() if callable(part) else part for part in parts], dim=1)))
        return self.layer_norm_act(second, self.norm_act(norm, act, self.conv_of_parts(conv, parts)))

    def conv_of_parts(self, conv: nn.Conv3d, parts: list) -> torch.Tensor:
        """``conv(torch.cat(parts, dim=1))`` as one convolution per part with its slice of the
        weights, each added in place to the first one's result (fused into the convolution where
        oneDNN can). Consumes the list: each entry is let go once used, and an entry may be a
        function making the part, called only when its turn comes."""
        out, start = None, 0
        for i in range(len(parts)):
            part = parts[i]() if callable(parts[i]) else parts[i]
            parts[i] = None
            stop = start + part.shape[1]
            weight = conv.weight[:, start:stop]
            if out is None:
                out = self.conv(conv, part, weight, conv.bias)
            elif _HAS_FUSED_ADD and out.dtype == self.precision and out.is_contiguous(
                    memory_format=torch.channels_last_3d):
                out = onednn_conv3d_add_(out, part, weight, conv.padding, conv.stride, conv.dilation, conv.groups)
            else:
                out = out.add_(self.conv(conv, part, weight, None))
            del part
            start = stop
        if start != conv.in_channels:
            raise ValueError(f"conv_of_parts: parts have {start} channels, the convolution takes {conv.in_channels}")
        return out

    def head(self, head: nn.Conv3d, x: torch.Tensor) -> torch.Tensor:
        """The flow head, float32 out. In bf16 its products run in bf16 through oneDNN (float32
        sums, the 3-channel result rounded to bf16, then the bias added in float32): in float32
        it would cost as much as four bf16 convolutions of the level."""
        if not direct_conv(head):
            return head(x)
        if self.bf16:
            y = onednn_conv3d_bf16(x, head.weight, None, head.padding, head.stride, head.dilation, head.groups)
            return y.float().add_(head.bias.view(1, -1, 1, 1, 1))
        return self.conv(head, x, head.weight, head.bias)

    def combine(self, level, residual: torch.Tensor, base: torch.Tensor | None) -> torch.Tensor:
        if base is not None and not level.compose_levels:
            return residual.add_(base)          # the head's output is new: reused
        return level.combine(residual, base)

    def warp(self, model, features: torch.Tensor, phi: torch.Tensor) -> torch.Tensor:
        if phi.dtype != torch.float32 or features.dtype not in (torch.float32, torch.bfloat16):
            return model.transformer(features, phi)
        return warp_by_gather(features, phi)

    def attention(self, block, moving: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
        return block.run(moving, fixed, lambda f_win, m_win: attention_in_chunks(block, f_win, m_win, self.chunk_tokens),
                         lambda x: mlp_residual_in_chunks_(block, x, self.chunk_tokens))
