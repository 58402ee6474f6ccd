"""register.py on own NIfTI files: odd sizes, non-identity affines, other grids, CSV of pairs, errors."""
import csv
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

import register
from models import build_model, save_model
from tests.forked_scripts import run_script
from tests.helpers import blob_labels
from utils.config import ModelConfig

ROOT = Path(__file__).resolve().parents[1]
SHAPE = (33, 37, 35)
AFFINE = np.array([[0.0, -1.2, 0, 30.0], [1.1, 0, 0, -20.0], [0, 0, 1.3, 5.0], [0, 0, 0, 1]])
SHIFT = 2


def _save(array, path, affine=AFFINE):
    nib.save(nib.Nifti1Image(array, affine), str(path))
    return str(path)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Fixed image/label and a moving pair whose content sits SHIFT voxels later along axis 0."""
    d = tmp_path_factory.mktemp("own")
    lab = blob_labels(SHAPE, n_labels=4, sigma=3.0, seed=11)
    img = ndimage.gaussian_filter(np.array([0, 40, 80, 120, 160.0])[lab], 0.8).astype(np.float32)
    moved_lab = ndimage.shift(lab, (SHIFT, 0, 0), order=0)
    moved_img = ndimage.shift(img, (SHIFT, 0, 0), order=1)
    return {"fixed": _save(img, d / "fixed.nii.gz"), "fixed_label": _save(lab.astype(np.int16), d / "fixed_seg.nii.gz"),
            "moving": _save(moved_img, d / "moving.nii.gz"),
            "moving_label": _save(moved_lab.astype(np.int16), d / "moving_seg.nii.gz"), "dir": d, "label": lab}


def _rows(out):
    with open(out / "per_case.csv") as fh:
        return list(csv.DictReader(fh))


def test_known_shift_is_recovered_and_outputs_have_the_fixed_geometry(files, tmp_path):
    out = tmp_path / "out"
    rc = register.main(["--moving", files["moving"], "--fixed", files["fixed"], "--moving-label",
                        files["moving_label"], "--fixed-label", files["fixed_label"], "--checkpoint", "none",
                        "--io-steps", "60", "--affine", "none", "--out-dir", str(out), "--no-progress"])
    assert rc == 0
    case = "moving_to_fixed"
    shapes = {"warped": SHAPE, "warped_label": SHAPE, "displacement": (*SHAPE, 1, 3)}
    for kind, shape in shapes.items():
        img = nib.load(str(out / f"{case}_{kind}.nii.gz"))
        assert img.shape == shape and np.allclose(img.affine, AFFINE)
    row = _rows(out)[0]
    assert float(row["dice"]) > float(row["dice_initial"]) + 0.15
    # moving(x) = fixed(x - SHIFT e0), so warped(x) = moving(x + u) = fixed(x) needs u = +SHIFT e0 inside
    u = np.asarray(nib.load(str(out / f"{case}_displacement.nii.gz")).dataobj)[..., 0, :]
    inside = ndimage.binary_erosion(files["label"] > 0, iterations=3)
    assert np.median(u[inside, 0]) == pytest.approx(SHIFT, abs=0.5)
    assert np.abs(np.median(u[inside, 1:], axis=0)).max() < 0.5


def test_checkpoint_on_another_grid_is_resampled_padded_and_said(files, tmp_path, capsys):
    model = build_model(ModelConfig(widths=(4, 8, 16, 16, 16), num_heads=2, window_size=(2, 2, 2)))
    ck = save_model(tmp_path / "tiny.pth", model)
    # the same moving content, stored on a grid translated by one voxel of axis 0 in world space
    shifted = AFFINE.copy()
    shifted[:3, 3] += AFFINE[:3, 0]
    img = np.asarray(nib.load(files["moving"]).dataobj)
    moving = _save(img, tmp_path / "moving_other_grid.nii.gz", shifted)
    out = tmp_path / "out"
    rc = register.main(["--moving", moving, "--fixed", files["fixed"], "--checkpoint", str(ck), "--affine", "none",
                        "--out-dir", str(out), "--no-progress"])
    assert rc == 0
    said = capsys.readouterr().out
    assert "resampled onto the fixed grid" in said and "zero-padded from (33, 37, 35) to (48, 48, 48)" in said
    warped = nib.load(str(out / "moving_other_grid_to_fixed_warped.nii.gz"))
    assert warped.shape == SHAPE and np.allclose(warped.affine, AFFINE)
    assert "resampled" in _rows(out)[0]["notes"]


def test_csv_of_pairs_with_relative_paths(files, tmp_path):
    d = files["dir"]
    table = tmp_path / "pairs.csv"
    rel = lambda k: str(Path(files[k]).relative_to(d))  # noqa: E731
    lines = ["moving,fixed,moving_label,fixed_label,name",
             f"{files['moving']},{files['fixed']},{files['moving_label']},{files['fixed_label']},forward",
             f"{files['fixed']},{files['moving']},,,backward"]
    table.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    assert register.main(["--pairs", str(table), "--checkpoint", "none", "--io-steps", "2", "--out-dir",
                          str(out), "--no-progress"]) == 0
    assert [r["case"] for r in _rows(out)] == ["forward", "backward"]
    assert (out / "forward_warped_label.nii.gz").is_file() and not (out / "backward_warped_label.nii.gz").exists()
    # relative paths are read relative to the CSV's folder
    local = d / "local.csv"
    local.write_text(f"moving,fixed\n{rel('moving')},{rel('fixed')}\n")
    assert register.main(["--pairs", str(local), "--checkpoint", "none", "--io-steps", "1", "--out-dir",
                          str(tmp_path / "out2"), "--no-progress"]) == 0


@pytest.mark.parametrize("problem", ["missing_file", "bad_csv", "no_io_steps"])
def test_bad_input_names_the_problem(files, tmp_path, problem):
    if problem == "missing_file":
        args, expected = ["--moving", str(tmp_path / "nope.nii.gz"), "--fixed", files["fixed"], "--io-steps", "1"], \
            "nope.nii.gz: file not found"
    elif problem == "bad_csv":
        table = tmp_path / "bad.csv"
        table.write_text("source,target\na,b\n")
        args, expected = ["--pairs", str(table), "--io-steps", "1"], "bad.csv: missing column"
    else:
        args, expected = ["--moving", files["moving"], "--fixed", files["fixed"]], "io-steps"
    res = run_script("register.py", [*args, "--checkpoint", "none", "--out-dir", str(tmp_path / "o"), "--no-progress"],
                     cwd=ROOT)
    assert res.returncode == 2 and expected in res.stderr and "Traceback" not in res.stderr
