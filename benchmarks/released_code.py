"""Import the authors' released PLCReg network from a checkout of their repository.

Used by ``scripts/check_released_equivalence.py`` and ``benchmarks/bench_released.py`` to run
the released code beside ours; nothing of it is copied here. Its ``Model/`` folder needs
``einops`` and ``ml_collections``; ``timm`` (three helpers) and the never-used ``Model.PolaSA``
are replaced by stand-ins when missing.
"""
from __future__ import annotations

import sys
import types
from pathlib import Path

import torch.nn as nn


def _stand_ins() -> None:
    try:
        import timm.layers  # noqa: F401
    except ImportError:
        layers = types.ModuleType("timm.layers")
        layers.DropPath = lambda p=0.0: nn.Identity()          # its drop path is 0 at depth 1
        layers.to_3tuple = lambda v: tuple(v) if isinstance(v, (tuple, list)) else (v, v, v)
        layers.trunc_normal_ = lambda t, std=1.0: nn.init.trunc_normal_(t, std=std)
        sys.modules["timm"] = types.ModuleType("timm")
        sys.modules["timm.layers"] = layers
    sys.modules.setdefault("Model.PolaSA", types.SimpleNamespace(PolaSA=None))


def released_network(code: Path, size) -> nn.Module:
    """The released PolaReg with its OASIS config, built for inputs of ``size`` (its attention
    blocks are built for one fixed size)."""
    sys.path.insert(0, str(Path(code).resolve()))
    _stand_ins()
    import Model.PolaReg as released
    from Model.PolaCA import PolaCA
    net = released.PolaReg(None)
    config = released.configs.get_PolaReg_OASIS_config()
    for lvl in (2, 3, 4, 5):
        level_size = tuple(n // 2 ** (lvl - 1) for n in size)
        setattr(net, f"corr_{lvl}", PolaCA(config, pretrain_img_size=level_size, dim_diy=16 * 2 ** (lvl - 1),
                                           attn_mix=config.attn_mix[lvl - 2]))
    return net


def released_spatial_transformer(size) -> nn.Module:
    """The released ``Model/STN.py`` SpatialTransformer (import ``released_network`` first)."""
    from Model.STN import SpatialTransformer
    return SpatialTransformer(size)
