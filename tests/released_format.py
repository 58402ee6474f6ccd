"""The released PLCReg checkpoint layout, written down from its model code (not from ours).

``PolaReg(channel_num=c)`` holds: an encoder of five ``DualConvBlock``s (``conv1``/``conv2``,
3x3x3 convolutions with bias; instance norms without parameters); estimator blocks ``conv_l``
and ``conv_fine_l``; ``DeconvBlock``s ``upsample_l`` (2x2x2 transposed convolutions);
``RegHead``s ``reghead_l`` / ``fine_reghead_l`` (3x3x3 to 3 channels); and for levels 2..5 a
``PolaCA`` whose ``PolaSwinTransformer`` has one layer with one block (``norm1``, ``attn`` =
``PolaLinearAttention`` with a bias-free ``qkvg``, depthwise ``dwc``, ``power`` (1, h, 1, hd),
``scale`` (1, 1, d), ``positional_encoding`` (1, N, d), ``proj``; ``norm2``; ``mlp.fc1/fc2``)
and four output norms ``norm0..norm3`` (only ``norm0`` is used).
"""
from __future__ import annotations

import numpy as np
import torch


def released_shapes(c: int = 16, heads: int = 8, window=(5, 7, 6), in_channels: int = 1) -> dict[str, tuple]:
    n_tokens = int(np.prod(window))
    shapes: dict[str, tuple] = {}

    def conv(name, cin, cout, k=3):
        shapes[f"{name}.weight"], shapes[f"{name}.bias"] = (cout, cin, k, k, k), (cout,)

    def dual(name, cin, cout):
        conv(f"{name}.conv1", cin, cout)
        conv(f"{name}.conv2", cout, cout)

    def norm(name, d):
        shapes[f"{name}.weight"], shapes[f"{name}.bias"] = (d,), (d,)

    width = [c * 2 ** i for i in range(5)]                 # levels 1..5
    for lvl in range(1, 6):
        dual(f"encoder.conv_{lvl}", in_channels if lvl == 1 else width[lvl - 2], width[lvl - 1])
    dual("conv_1", c * 2, c)
    for lvl in (2, 3, 4):
        dual(f"conv_{lvl}", width[lvl - 1] * 3, width[lvl - 1])
    dual("conv_5", c * 16 * 2 + 256, c * 16)
    for lvl in (1, 2, 3, 4):
        dual(f"conv_fine_{lvl}", 2 * width[lvl - 1] + 3, width[lvl - 1])
        shapes[f"upsample_{lvl}.deconv.weight"] = (width[lvl], width[lvl - 1], 2, 2, 2)
        shapes[f"upsample_{lvl}.deconv.bias"] = (width[lvl - 1],)
        conv(f"fine_reghead_{lvl}.reg_head", width[lvl - 1], 3)
    for lvl in range(1, 6):
        conv(f"reghead_{lvl}.reg_head", width[lvl - 1], 3)
    for lvl in (2, 3, 4, 5):
        d, block = width[lvl - 1], f"corr_{lvl}.transformer.layers.0.blocks.0"
        hd = d // heads
        norm(f"{block}.norm1", d)
        shapes[f"{block}.attn.qkvg.weight"] = (4 * d, d)
        shapes[f"{block}.attn.dwc.weight"], shapes[f"{block}.attn.dwc.bias"] = (hd, 1, 3, 3, 3), (hd,)
        shapes[f"{block}.attn.power"] = (1, heads, 1, hd)
        shapes[f"{block}.attn.scale"] = (1, 1, d)
        shapes[f"{block}.attn.positional_encoding"] = (1, n_tokens, d)
        shapes[f"{block}.attn.proj.weight"], shapes[f"{block}.attn.proj.bias"] = (d, d), (d,)
        norm(f"{block}.norm2", d)
        shapes[f"{block}.mlp.fc1.weight"], shapes[f"{block}.mlp.fc1.bias"] = (4 * d, d), (4 * d,)
        shapes[f"{block}.mlp.fc2.weight"], shapes[f"{block}.mlp.fc2.bias"] = (d, 4 * d), (d,)
        for i in range(4):
            norm(f"corr_{lvl}.transformer.norm{i}", d)
    return shapes


def released_state(seed: int = 0, **kw) -> dict[str, torch.Tensor]:
    """Random tensors in the released layout (small values, so that fields stay moderate)."""
    g = torch.Generator().manual_seed(seed)
    return {k: 0.05 * torch.randn(shape, generator=g) for k, shape in released_shapes(**kw).items()}
