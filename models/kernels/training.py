"""CPU training: the pass with autograd, kept in channels-last layout.

Both images go through the encoder as one batch; every feature map and every gradient stays
channels-last (oneDNN's fast layout), which PyTorch's norms, pooling and ``grid_sample`` would
each give up: hence the channels-last InstanceNorm+ReLU and pooling with their gradients, the
feature warp by row gathers with ``grid_sample``'s backward, float32 flow heads that keep
their bf16 input rather than a float32 copy, and the attention's value convolution as a
band-matrix product. The operations' values are the reference's (``tests/models``).
"""
from __future__ import annotations

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from .attention import band_applies, value_conv_as_product
from .ops import (channels_last, float32_conv3d_saving_input, instance_norm_relu_channels_last, is_channels_last,
                  warp_by_gather_with_grad)
from .runner import CpuKernels, direct_conv, fused_norm_act
from ..polaca import polarity_pair


class CpuTraining(CpuKernels):
    """The training table (see :class:`CpuKernels`)."""

    def encode(self, encoder, moving: torch.Tensor, fixed: torch.Tensor):
        feats = self.encode_image(encoder, channels_last(torch.cat([moving, fixed])))
        # split, not sliced: the two halves' gradients meet in one concatenation (slices would
        # each fill a full-size zero tensor and add them)
        halves = [f.split(moving.shape[0]) for f in feats]
        return [h[0] for h in halves], [h[1] for h in halves]

    def estimate(self, model, level, pair: list, phi_up, context):
        if not model.checkpointed():
            return self.estimator_level(level, pair, phi_up, context)
        return checkpoint(lambda m, f, phi, ctx: self.estimator_level(level, [m, f], phi, ctx), *pair, phi_up, context,
                          use_reentrant=False)

    def layer(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if direct_conv(layer) and not self.bf16:
            # oneDNN directly: PyTorch's own choice takes a kernel about 10x slower for small volumes
            return torch.mkldnn_convolution(x, layer.weight, layer.bias, layer.padding, layer.stride, layer.dilation,
                                            layer.groups)
        return layer(x)

    def norm_act(self, norm: nn.Module, act: nn.Module, y: torch.Tensor) -> torch.Tensor:
        if fused_norm_act(norm, act) and is_channels_last(y):
            return instance_norm_relu_channels_last(y, norm.eps)
        return act(norm(y))

    def double_conv(self, block: nn.Sequential, parts: list) -> torch.Tensor:
        # in the precision the convolution rounds its input to anyway (float32 parts such as
        # fields would promote the whole concatenation), channels-last (one part in the default
        # layout would make the concatenation so, and every layer after it slower)
        parts = [(part() if callable(part) else part).to(dtype=self.precision, memory_format=torch.channels_last_3d)
                 for part in parts]
        first, second = block
        return self.layer_norm_act(second, self.layer_norm_act(first, torch.cat(parts, dim=1)))

    def head(self, head: nn.Conv3d, x: torch.Tensor) -> torch.Tensor:
        if direct_conv(head) and x.dtype != head.weight.dtype:
            return float32_conv3d_saving_input(x, head.weight, head.bias, head.padding, head.stride, head.dilation,
                                               head.groups)
        if direct_conv(head) and not self.bf16:
            return self.layer(head, x)
        return head(x)

    def warp(self, model, features: torch.Tensor, phi: torch.Tensor) -> torch.Tensor:
        if is_channels_last(features) and phi.dtype == torch.float32 and features.dtype in (torch.float32,
                                                                                             self.precision):
            return warp_by_gather_with_grad(features, phi)
        return model.transformer(features, phi)

    def attention(self, block, moving: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
        attn = block.attn
        value_conv = (lambda v: value_conv_as_product(attn, v)) if band_applies(attn) else attn.value_conv
        return block.run(moving, fixed, lambda f_win, m_win: attn.attend(f_win, m_win, polarity_pair, value_conv),
                         block.mlp_residual)
