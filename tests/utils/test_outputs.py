"""Result folders: earlier results are refused without --overwrite and cleared with it."""
import os

import pytest

from engine.evaluate import csv_text
from utils.io import DataError, atomic_write
from utils.outputs import ResultFolder
import numpy as np


def _write(path, text):
    atomic_write(path, lambda tmp: open(tmp, "w").write(text))


def _previous_run(folder, names):
    claimed = ResultFolder.claim(folder)
    for name in names:
        _write(folder / name, "old")
    claimed.finish()


def test_previous_results_refused_then_replaced_and_stale_ones_removed(tmp_path):
    _previous_run(tmp_path, ["per_case.csv", "nifti/old_case_warped.nii.gz", "nifti/kept_warped.nii.gz"])
    (tmp_path / "notes.txt").write_text("the user's own file")
    with pytest.raises(DataError, match="previous run .*--overwrite"):
        ResultFolder.claim(tmp_path)
    folder = ResultFolder.claim(tmp_path, overwrite=True)
    assert (tmp_path / "nifti" / "old_case_warped.nii.gz").exists()       # nothing deleted up front
    _write(tmp_path / "per_case.csv", "new")
    _write(tmp_path / "nifti" / "kept_warped.nii.gz", "new")
    removed = folder.finish()
    assert [p.name for p in removed] == ["old_case_warped.nii.gz"]
    assert (tmp_path / "per_case.csv").read_text() == "new" and (tmp_path / "notes.txt").exists()
    assert (tmp_path / "nifti" / "kept_warped.nii.gz").read_text() == "new"
    assert not (tmp_path / ".lock").exists()


def test_overwrite_removes_only_files_of_its_own_making(tmp_path):
    out, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    elsewhere.mkdir()
    _previous_run(out, ["a_warped.nii.gz", "b_warped.nii.gz", "c_warped.nii.gz", "figures/d.png"])
    (out / "sub1_affine.txt").write_text("another tool's transform")        # named like a result, not ours
    (out / "b_warped.nii.gz").write_text("edited by the user since")          # ours, changed since
    (out / "figures" / "d.png").unlink()
    (elsewhere / "d.png").write_text("a file behind a link")
    (out / "figures").rmdir()
    (out / "figures").symlink_to(elsewhere)                                   # ours by name, behind a link
    folder = ResultFolder.claim(out, overwrite=True)
    folder.protect([out / "c_warped.nii.gz"])                                 # the new run's input
    removed = folder.finish()
    assert [p.name for p in removed] == ["a_warped.nii.gz"]
    assert (out / "sub1_affine.txt").read_text() == "another tool's transform"
    assert (out / "b_warped.nii.gz").read_text() == "edited by the user since"
    assert (out / "c_warped.nii.gz").read_text() == "old" and (elsewhere / "d.png").exists()


def test_files_of_a_killed_run_are_its_own(tmp_path):
    claimed = ResultFolder.claim(tmp_path)
    _write(tmp_path / "x_warped.nii.gz", "done")
    claimed.recorder._observe(tmp_path / "y_warped.nii.gz", "start")                  # killed between the two lines
    _write(tmp_path / "y_warped.nii.gz", "written")
    claimed.recorder.manifest.rewrite({k: v for k, v in claimed.recorder.manifest.read().items()} |
                             {"y_warped.nii.gz": {"file": "y_warped.nii.gz", "started": 0}})
    claimed.close()
    with pytest.raises(DataError, match="x_warped.nii.gz, y_warped.nii.gz"):
        ResultFolder.claim(tmp_path)
    assert sorted(p.name for p in ResultFolder.claim(tmp_path, overwrite=True).finish()) == [
        "x_warped.nii.gz", "y_warped.nii.gz"]


def test_a_second_live_run_is_refused(tmp_path):
    import subprocess
    import sys
    from pathlib import Path as P
    root = P(__file__).resolve().parents[2]
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from utils.outputs import ResultFolder; "
                               "ResultFolder.claim(sys.argv[1]); print('held', flush=True); time.sleep(60)",
                               str(tmp_path)], cwd=root, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(DataError, match=f"in use by process {holder.pid}"):
            ResultFolder.claim(tmp_path)
    finally:
        holder.kill()
        holder.wait()
    ResultFolder.claim(tmp_path).finish()                                     # a dead holder's lock is taken over


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


def test_a_result_changed_by_the_user_since_still_stops_a_fresh_run(tmp_path):
    _previous_run(tmp_path, ["per_case.csv"])
    (tmp_path / "per_case.csv").write_text("edited by the user")
    with pytest.raises(DataError, match=r"previous run \(per_case.csv\)"):
        ResultFolder.claim(tmp_path)
    assert ResultFolder.claim(tmp_path, overwrite=True).finish() == []
    assert (tmp_path / "per_case.csv").read_text() == "edited by the user"
