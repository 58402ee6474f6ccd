"""Typed configuration: every hyperparameter of the network lives here.

Configs are dataclasses so that they can be saved beside (and inside) checkpoints
and rebuilt from them; ``to_dict``/``from_dict`` round-trip through plain JSON types.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


def _tuple(v):
    return tuple(v) if isinstance(v, (list, tuple)) else v


@dataclass
class ModelConfig:
    """Architecture of PLCReg (DESIGN §1.1-1.3). Defaults reproduce the OASIS network.

    Attributes:
        in_channels: image channels of each input volume.
        widths: encoder widths of levels 1..5 (full, 1/2, 1/4, 1/8, 1/16 resolution).
        width_multiplier: scales every width (rounded, at least 1).
        window_size: PoLaCA window (D, H, W) in voxels of each attention level.
        num_heads: attention heads of PoLaCA (every attention level).
        alpha: ALS exponent range; p = 1 + alpha * sigmoid(theta) in (1, 1 + alpha).
        dwc_kernel: kernel of the depthwise convolution on the values.
        mlp_ratio: hidden width of the PoLaCA MLP relative to its width.
        attention_levels: levels (2..5) that use PoLaCA; level 1 never does.
        compose_levels: compose (instead of add) the upsampled coarse field and each residual.
        diffeomorphic: treat the output as a stationary velocity and integrate it.
        int_steps: scaling-and-squaring steps of the diffeomorphic option.
        grad_checkpointing: recompute each level in the backward pass to save memory.
        freeze_encoder: encoder weights get no gradient (multi-task fine-tuning).
    """
    in_channels: int = 1
    widths: tuple = (16, 32, 64, 128, 256)
    width_multiplier: float = 1.0
    window_size: tuple = (5, 7, 6)
    num_heads: int = 8
    alpha: float = 15.0
    dwc_kernel: int = 3
    mlp_ratio: float = 4.0
    attention_levels: tuple = (2, 3, 4, 5)
    compose_levels: bool = False
    diffeomorphic: bool = False
    int_steps: int = 7
    grad_checkpointing: bool = False
    freeze_encoder: bool = False

    def __post_init__(self):
        self.widths = _tuple(self.widths)
        self.window_size = _tuple(self.window_size)
        self.attention_levels = _tuple(self.attention_levels)
        if len(self.widths) != 5:
            raise ValueError(f"ModelConfig.widths: expected 5 widths (levels 1..5), got {self.widths}")
        if len(self.window_size) != 3 or min(self.window_size) < 1:
            raise ValueError(f"ModelConfig.window_size: expected 3 positive integers (D, H, W), got {self.window_size}")
        if not set(self.attention_levels) <= {2, 3, 4, 5}:
            raise ValueError(f"ModelConfig.attention_levels: expected a subset of (2, 3, 4, 5), got {self.attention_levels}")
        if self.width_multiplier <= 0:
            raise ValueError(f"ModelConfig.width_multiplier must be > 0, got {self.width_multiplier}")
        for level in self.attention_levels:
            w = self.level_widths[level - 1]
            if w % self.num_heads or (w // self.num_heads) % 2:
                raise ValueError(
                    f"ModelConfig: width {w} of attention level {level} must split into {self.num_heads} heads "
                    f"of even size (the values are halved between the two polarity streams)")

    @property
    def level_widths(self) -> tuple:
        """Widths of levels 1..5 after the multiplier."""
        return tuple(max(1, int(round(w * self.width_multiplier))) for w in self.widths)

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"ModelConfig: unknown field(s) {sorted(unknown)}")
        return cls(**d)


def architecture_fields() -> tuple[str, ...]:
    """Fields of ModelConfig that change the weights' shapes or meaning (not run-time options)."""
    runtime = {"grad_checkpointing", "freeze_encoder"}
    return tuple(f.name for f in dataclasses.fields(ModelConfig) if f.name not in runtime)


__all__ = ["ModelConfig", "architecture_fields", "field"]
