"""Result folders: earlier results are refused without --overwrite and cleared with it."""
import os

import pytest

from engine.evaluate import csv_text
from utils.io import DataError, atomic_write
from utils.outputs import ResultFolder
import numpy as np


def test_previous_results_refused_then_replaced_and_stale_ones_removed(tmp_path):
    (tmp_path / "nifti").mkdir()
    (tmp_path / "per_case.csv").write_text("old")
    (tmp_path / "nifti" / "old_case_warped.nii.gz").write_text("old")
    (tmp_path / "nifti" / "kept_warped.nii.gz").write_text("old")
    (tmp_path / "notes.txt").write_text("the user's own file")
    with pytest.raises(DataError, match="previous run .*--overwrite"):
        ResultFolder.claim(tmp_path)
    folder = ResultFolder.claim(tmp_path, overwrite=True)
    assert (tmp_path / "nifti" / "old_case_warped.nii.gz").exists()       # nothing deleted up front
    atomic_write(tmp_path / "per_case.csv", lambda tmp: open(tmp, "w").write("new"))
    atomic_write(tmp_path / "nifti" / "kept_warped.nii.gz", lambda tmp: open(tmp, "w").write("new"))
    removed = folder.finish()
    assert [p.name for p in removed] == ["old_case_warped.nii.gz"]
    assert (tmp_path / "per_case.csv").read_text() == "new" and (tmp_path / "notes.txt").exists()
    assert (tmp_path / "nifti" / "kept_warped.nii.gz").read_text() == "new"


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_atomic_write_honours_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        path = atomic_write(tmp_path / "f.csv", lambda tmp: open(tmp, "w").write("x"))
        plain = tmp_path / "plain"
        plain.write_text("x")
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == plain.stat().st_mode & 0o777 == 0o666 & ~umask


def test_csv_cells_are_plain_numbers():
    text = csv_text([{"a": np.float64(0.125), "b": np.float32(0.5), "c": np.int64(3), "d": float("nan")}],
                    ["a", "b", "c", "d"])
    assert text.splitlines()[1] == "0.125,0.5,3,nan"
