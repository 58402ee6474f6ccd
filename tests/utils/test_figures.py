"""Every figure is written as a non-empty PNG."""
import csv

import matplotlib.image as mpimg
import numpy as np
import torch

from tests.helpers import smooth_field, smooth_image
from utils import figures
from utils.metrics import jacobian_determinant


def _check_png(path):
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    img = mpimg.imread(str(path))
    assert img.shape[0] > 100 and img.shape[1] > 100 and img.std() > 0.01   # not blank


def test_all_figures(tmp_path):
    shape = (20, 24, 22)
    m, f = smooth_image(shape, seed=1), smooth_image(shape, seed=2)
    u = smooth_field(shape, 2.0)
    u[0, 0, 8:12, 10:14, 9:13] += torch.linspace(-3, 3, 4).view(4, 1, 1)    # a fold to mark
    _check_png(figures.registration_panels(m, f, m, tmp_path / "panels.png", "t"))
    _check_png(figures.deformation_grid(u, tmp_path / "grid.png", spacing=3, background=f))
    _check_png(figures.jacobian_map(jacobian_determinant(u), tmp_path / "jac.png"))
    rng = np.random.default_rng(0)
    _check_png(figures.dice_boxplot(rng.random((5, 4)), rng.random((5, 4)), [1, 2, 3, 4], tmp_path / "box.png"))
    with open(tmp_path / "log.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, ["epoch", "loss", "sim", "reg", "dice_loss", "val_dice", "elapsed", "resolution"])
        w.writeheader()
        for e in range(1, 4):
            w.writerow({"epoch": e, "loss": -e / 10, "sim": -e / 9, "reg": 0.01, "dice_loss": 0, "val_dice": 0.5 + e / 20,
                        "elapsed": 30 * e, "resolution": "half" if e == 1 else "full"})
    _check_png(figures.training_curves(tmp_path / "log.csv", tmp_path / "curves.png"))


def test_resolution_switch_sits_where_the_half_resolution_phase_ended():
    rows = [{"resolution": r} for r in ("half", "half", "full", "full")]
    assert figures.resolution_switch(rows, [1.0, 2.0, 4.0, 5.0]) == (2.0, 2.0)    # at the end of epoch 2
    rows[2]["resolution"] = "half+full"                                             # inside epoch 3
    assert figures.resolution_switch(rows, [1.0, 2.0, 4.0, 5.0]) == (2.0, 4.0)
    assert figures.resolution_switch([{"resolution": "full"}] * 3, [1.0, 2.0, 3.0]) is None
    assert figures.resolution_switch([{"epoch": 1}, {"epoch": 2}], [1.0, 2.0]) is None    # logs without the column
