"""engine.instance_opt: instance optimisation of one pair, and its use by inference."""
import csv
import json

import numpy as np
import pytest
import torch

from engine.cli import infer_main
from engine.instance_opt import coarse_shape, instance_optimise
from tests.helpers import smooth_field, synthetic_pair
from tests.layouts import quick_overrides, write_oasis
from utils.losses import grad_loss, ncc_loss
from utils.metrics import dice_per_label, jacobian_determinant
from utils.spatial import resize_displacement, warp, warp_labels

LABELS = (1, 2, 3, 4)


def _loss(moving, fixed, u, scale, reg_weight, win):
    """The loss IO optimises, evaluated independently on its coarse grid."""
    size = coarse_shape(fixed.shape[2:], scale)
    m, f = (torch.nn.functional.adaptive_avg_pool3d(x, size) for x in (moving, fixed))
    uc = resize_displacement(u, size)
    return float(ncc_loss(warp(m, uc), f, win=win) + reg_weight * grad_loss(uc))


@pytest.fixture(scope="module")
def pair():
    return synthetic_pair((32, 32, 32), amplitude=3.0, seed=3)


def test_zero_steps_returns_the_start_field_unchanged(pair):
    moving, fixed, _, _ = pair
    u0 = smooth_field((32, 32, 32), 2.0, seed=5)
    result = instance_optimise(moving, fixed, u0, steps=0)
    assert torch.equal(result.u, u0) and result.losses == []


@pytest.mark.parametrize("scale", [1, 2])
def test_io_lowers_its_loss_and_recovers_a_known_deformation(pair, scale):
    moving, fixed, moving_lab, fixed_lab = pair
    result = instance_optimise(moving, fixed, None, steps=40, scale=scale, ncc_window=5, reg_weight=1.0)
    # the best loss is never above the starting loss, and clearly below it
    assert result.best_loss <= result.losses[0]
    assert result.best_loss < result.losses[0] - 0.05
    assert result.u.shape == (1, 3, 32, 32, 32) and not result.u.requires_grad
    if scale == 1:
        # the returned field has the reported loss (independent evaluation at full resolution)
        assert _loss(moving, fixed, result.u, 1, 1.0, 5) == pytest.approx(result.best_loss, abs=1e-4)
    before = np.nanmean(dice_per_label(moving_lab, fixed_lab, LABELS))
    after = np.nanmean(dice_per_label(warp_labels(moving_lab, result.u), fixed_lab, LABELS))
    assert after > before + 0.1
    assert (jacobian_determinant(result.u) <= 0).mean() < 0.01


def test_io_never_returns_a_field_worse_than_its_start(pair):
    """Even a learning rate far too large cannot make the result worse than u0."""
    moving, fixed, _, _ = pair
    u0 = smooth_field((32, 32, 32), 1.0, seed=8)
    start = _loss(moving, fixed, u0, 1, 1.0, 5)
    result = instance_optimise(moving, fixed, u0, steps=5, scale=1, lr=50.0, reg_weight=1.0, smoothing=0)
    assert result.losses[0] == pytest.approx(start, abs=1e-5)
    assert _loss(moving, fixed, result.u, 1, 1.0, 5) <= start + 1e-6


def test_io_works_inside_inference_mode(pair):
    moving, fixed, _, _ = pair
    with torch.inference_mode():
        u0 = torch.zeros(1, 3, 32, 32, 32)
        result = instance_optimise(moving, fixed, u0, steps=3)
    assert torch.isfinite(result.u).all()


@pytest.mark.parametrize("kwargs", [dict(steps=-1), dict(scale=0), dict(lr=0.0), dict(similarity="dice"),
                                    dict(smoothing=-1)])
def test_bad_settings_raise_value_error(pair, kwargs):
    moving, fixed, _, _ = pair
    with pytest.raises(ValueError):
        instance_optimise(moving, fixed, None, **{"steps": 2, **kwargs})


def test_infer_with_io_and_without_a_network(tmp_path):
    data = write_oasis(tmp_path / "OASIS")
    out = tmp_path / "out"
    sets = [a for o in quick_overrides("OASIS") for a in ("--set", o)]
    rc = infer_main("OASIS", ["--data-root", str(data), "--checkpoint", "none", "--io-steps", "20",
                              "--output-dir", str(out), "--max-pairs", "2", "--no-progress", *sets])
    assert rc == 0
    with open(out / "per_case.csv") as fh:
        rows = list(csv.DictReader(fh))
    for r in rows:
        # from a zero field: 'before IO' is the identity
        assert float(r["dice_before_io"]) == pytest.approx(float(r["dice_initial"]), abs=1e-9)
        assert float(r["pct_nonpos_jac_before_io"]) == 0.0
        assert float(r["io_seconds"]) > 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["instance_optimisation"]["io_steps"] == 20 and summary["model_config"] is None
    # 'none' without IO steps is refused with a message
    assert infer_main("OASIS", ["--data-root", str(data), "--checkpoint", "none", "--output-dir", str(out),
                                "--no-progress", *sets]) == 2


def test_coarse_to_fine_lowers_the_full_resolution_loss_of_the_coarse_result(pair):
    moving, fixed, _, _ = pair
    settings = dict(steps=30, scale=2, ncc_window=5, reg_weight=1.0)
    coarse = instance_optimise(moving, fixed, None, **settings)
    both = instance_optimise(moving, fixed, None, **settings, fine_steps=10, fine_reg_weight=1.0)
    assert len(both.losses) == len(coarse.losses) + 11            # the same coarse run, then 10 fine steps
    # evaluated independently, at full resolution
    assert _loss(moving, fixed, both.u, 1, 1.0, 5) < _loss(moving, fixed, coarse.u, 1, 1.0, 5) - 1e-3
