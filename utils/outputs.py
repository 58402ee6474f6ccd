"""Result folders that never silently replace an earlier run's results.

``ResultFolder.claim(path, overwrite)`` is called before a run reads any data. When the
folder already holds results (``RESULT_PATTERNS``: the tables, summaries, per-pair NIfTIs and
figures this project writes), the run stops with a message unless ``overwrite`` is given.
With ``overwrite``, nothing is deleted up front (a run that then fails on bad input loses
nothing); ``finish()`` removes the earlier run's files that the new run did not write again,
so no stale NIfTI or figure is left beside the new results.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from .io import DataError, ensure_dir

# (sub-folder, glob) of every file a results run writes
RESULT_PATTERNS = (
    ("", "per_case*.csv"), ("", "summary.csv"), ("", "summary.json"), ("", "comparison.*"), ("", "pvalues.*"),
    ("", "*_warped.nii.gz"), ("", "*_warped_label.nii.gz"), ("", "*_displacement.nii.gz"),
    ("", "disp_*.nii.gz"), ("", "*_affine.txt"), ("nifti", "*.nii.gz"), ("figures", "*.png"),
)


def result_files(folder: Path) -> list[Path]:
    """The files in ``folder`` that a results run of this project writes."""
    found = set()
    for sub, pattern in RESULT_PATTERNS:
        base = folder / sub if sub else folder
        if base.is_dir():
            found.update(p for p in base.glob(pattern) if p.is_file())
    return sorted(found)


def _identity(path: Path) -> tuple:
    st = path.stat()
    return st.st_ino, st.st_mtime_ns, st.st_size


class ResultFolder:
    """An output folder claimed by one run (see the module docstring)."""

    def __init__(self, path: Path, previous: dict[Path, tuple]):
        self.path, self.previous = path, previous

    @classmethod
    def claim(cls, path, overwrite: bool = False, resume: bool = False) -> "ResultFolder":
        """``resume``: the folder holds a stopped run that this one continues; its files are kept."""
        path = ensure_dir(path)
        previous = result_files(path)
        if resume:
            return cls(path, {})
        if previous and not overwrite:
            shown = ", ".join(str(p.relative_to(path)) for p in previous[:4])
            more = f" and {len(previous) - 4} more" if len(previous) > 4 else ""
            raise DataError(f"{path}: holds results of a previous run ({shown}{more}); replace them with "
                            f"--overwrite, or choose another output folder")
        return cls(path, {p: _identity(p) for p in previous})

    def finish(self, log: Callable | None = None) -> list[Path]:
        """Delete the earlier run's result files that this run did not rewrite; returns them."""
        stale = [p for p, ident in self.previous.items() if p.is_file() and _identity(p) == ident]
        for p in stale:
            p.unlink(missing_ok=True)
        if stale and log is not None:
            log(f"note: {self.path}: removed {len(stale)} result file(s) of the previous run")
        return stale
