"""VoxelMorph (``voxelmorph`` 0.3.x, PyTorch) as a baseline trained and run by this engine.

An optional dependency (``pip install -r requirements-baselines.txt``): importing this module
works without it; building the network without it raises a ModuleNotFoundError that says
what to install. The adapter takes (moving, fixed) like PLCReg and returns a displacement
in the project's convention: (B, 3, D, H, W) voxels, warped(x) = moving(x + u(x)).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from utils.config import ModelConfig

from .plcreg import pad_far_end
from .registry import register_model

INSTALL_HINT = "VoxelMorph baseline needs the optional package: pip install -r requirements-baselines.txt"


def import_voxelmorph():
    """The voxelmorph package, or ModuleNotFoundError with the install command."""
    try:
        import voxelmorph
    except ImportError as exc:
        raise ModuleNotFoundError(f"{INSTALL_HINT} ({exc})") from exc
    return voxelmorph


class VoxelMorphNet(nn.Module):
    """VxmPairwise (U-Net on the concatenated pair, flow head, optional integration).

    Inputs are zero-padded at the far end to multiples of 2**len(widths) (the U-Net pools once
    per width) and the field cropped back.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        vxm = import_voxelmorph()
        self.config = config
        self.net = vxm.nn.models.VxmPairwise(
            ndim=3, source_channels=config.in_channels, target_channels=config.in_channels,
            nb_features=list(config.level_widths), integration_steps=config.int_steps if config.diffeomorphic else 0)

    def freeze_encoder(self, frozen: bool = True) -> None:
        """No separate encoder: freezing is a PLCReg option."""
        if frozen:
            raise ValueError("freeze_encoder applies to PLCReg only")

    def input_size(self, size) -> tuple[int, ...]:
        """The grid the U-Net computes on for inputs of ``size`` (padded, field cropped back)."""
        m = 2 ** len(self.config.widths)
        return tuple(int(n) + (-int(n) % m) for n in size)

    def forward(self, moving: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
        if moving.ndim != 5 or moving.shape != fixed.shape:
            raise ValueError(f"VoxelMorphNet: moving and fixed must be (B, C, D, H, W) of one shape, got "
                             f"{tuple(moving.shape)} and {tuple(fixed.shape)}")
        size = moving.shape[2:]
        target = self.input_size(size)
        moving, fixed = pad_far_end(moving, target), pad_far_end(fixed, target)
        u = self.net(moving, fixed, return_field_type="displacement")
        return u[:, :, :size[0], :size[1], :size[2]]


@register_model("voxelmorph", display="VoxelMorph", defaults={"widths": (16, 32, 32, 32, 32)},
                requires="voxelmorph (requirements-baselines.txt)")
def build_voxelmorph(config: ModelConfig) -> VoxelMorphNet:
    return VoxelMorphNet(config)


__all__ = ["VoxelMorphNet", "import_voxelmorph", "INSTALL_HINT"]
