"""The figures of an inference run (``Infer_<Set>.py --figures`` and the demo)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from utils import figures
from utils.metrics import jacobian_determinant
from utils.spatial import warp


def inference_figures(fig_dir, first: dict, rows: list[dict], labels, train_log=None) -> list[Path]:
    """Registration panels, deformation grid and Jacobian map of the first pair; per-structure
    Dice box plot (initial vs registered) over all pairs; training curves when a log is given.

    ``first``: {"name", "moving", "fixed", "u"} tensors (1, C, D, H, W) / (1, 3, D, H, W).
    """
    fig_dir = Path(fig_dir)
    u = first["u"].float()
    with torch.no_grad():
        warped = warp(first["moving"], u)
    spacing = 3 if min(u.shape[2:]) < 60 else 4
    paths = [
        figures.registration_panels(first["moving"], first["fixed"], warped, fig_dir / "registration.png",
                                    f"{first['name']}: moving, fixed, warped"),
        figures.deformation_grid(u, fig_dir / "deformation_grid.png", spacing=spacing,
                                 title="deformation grid (where each fixed voxel samples the moving image)"),
        figures.jacobian_map(jacobian_determinant(u), fig_dir / "jacobian.png"),
    ]
    labels = [v for v in labels if v != 0]
    registered = np.array([[r.get(f"dice_{v}", np.nan) for v in labels] for r in rows], dtype=float)
    initial = np.array([[r.get(f"dice_initial_{v}", np.nan) for v in labels] for r in rows], dtype=float)
    if labels and np.isfinite(registered).any():
        paths.append(figures.dice_boxplot(initial, registered, labels, fig_dir / "dice_per_structure.png",
                                          f"Dice per structure over {len(rows)} pairs"))
    if train_log is not None and Path(train_log).is_file():
        paths.append(figures.training_curves(train_log, fig_dir / "training_curves.png"))
    return paths


__all__ = ["inference_figures"]
