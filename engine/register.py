"""Register a user's own NIfTI pairs with a checkpoint (``register.py``).

For each pair: the moving image (and label) is resampled onto the fixed image's grid when
the two grids differ (through their affines, so world positions are kept); intensities are
normalised as the checkpoint was trained (its run config; min-max without one); the
network computes on a grid padded to multiples of 16 and crops its field back; optional
instance optimisation refines it. Written with the fixed image's geometry:
``<name>_warped.nii.gz`` (the moving image in its own intensities), ``<name>_displacement.nii.gz``
and, with a moving label, ``<name>_warped_label.nii.gz``; plus per_case.csv, summary.csv and
summary.json (metrics, notes on what was resampled or padded, the command and settings).
"""
from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from models import load_model
from models.plcreg import padded_size
from utils.config import RunConfig
from utils.datasets import normalise, volume_tensor
from utils.io import DataError, Volume, check_same_grid, load_nifti, require_file
from utils.outputs import ResultFolder
from utils.resample import grid_overlap, resample_to_grid, same_grid
from utils.spatial import warp, warp_labels

from .evaluate import evaluate_pair, format_summary_table, summarise, write_results
from .exports import write_l2r
from .infer import no_network, register_tensors, save_pair_outputs
from .runtime import bar_disabled, limit_heap_retention, provenance, resolve_device

PAIR_COLUMNS = ("moving", "fixed", "moving_label", "fixed_label", "name")
EXPORTS = ("l2r",)


@dataclass
class PairFiles:
    moving: str
    fixed: str
    moving_label: str = ""
    fixed_label: str = ""
    name: str = ""

    @property
    def case(self) -> str:
        return self.name or f"{_stem(self.moving)}_to_{_stem(self.fixed)}"


def check_case_name(name: str, where: str) -> str:
    """An output name that stays inside the output folder: one plain file-name part.

    DataError for an empty name, a path (``/``, ``\\``), ``.``/``..``, or a name starting with a dot.
    """
    if not name or name in (".", "..") or "/" in name or "\\" in name or name.startswith(".") or "\0" in name:
        raise DataError(f"{where}: output name {name!r} is not a plain file name (no folders, no '..', no leading "
                        f"dot); outputs are written inside --out-dir only")
    return name


def _stem(path: str) -> str:
    name = Path(path).name
    for ext in (".nii.gz", ".nii"):
        if name.endswith(ext):
            return name[: -len(ext)]
    return Path(name).stem


def read_pairs_csv(path) -> list[PairFiles]:
    """Pairs from a CSV with columns moving, fixed and optionally moving_label, fixed_label, name.

    Relative paths are taken relative to the CSV's folder.
    """
    path = require_file(path, "file")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not a text CSV file (byte {exc.start} is not UTF-8)") from None
    if "\0" in text:
        raise DataError(f"{path}: not a text CSV file (it holds NUL bytes)")
    reader = csv.DictReader(io.StringIO(text, newline=""))
    columns = [c.strip() for c in reader.fieldnames or []]
    missing = {"moving", "fixed"} - set(columns)
    if missing:
        raise DataError(f"{path}: missing column(s) {sorted(missing)}; expected {', '.join(PAIR_COLUMNS)}")
    unknown = set(columns) - set(PAIR_COLUMNS)
    if unknown:
        raise DataError(f"{path}: unknown column(s) {sorted(unknown)}; expected {', '.join(PAIR_COLUMNS)}")
    pairs = []
    for line, row in enumerate(reader, start=2):
        row = {k.strip(): (v or "").strip() for k, v in row.items() if k}
        if not row.get("moving") or not row.get("fixed"):
            raise DataError(f"{path}: line {line}: moving and fixed are required")
        resolved = {k: str(path.parent / v) if v and k != "name" and not Path(v).is_absolute() else v
                    for k, v in row.items()}
        pairs.append(PairFiles(**resolved))
        check_case_name(pairs[-1].case, f"{path}: line {line}")
    if not pairs:
        raise DataError(f"{path}: no pairs")
    names = [p.case for p in pairs]
    if len(set(names)) != len(names):
        raise DataError(f"{path}: two pairs would write the same output name; add a 'name' column")
    return pairs


def _onto_fixed(volume: Volume, fixed: Volume, order: int, notes: list[str], what: str) -> np.ndarray:
    if same_grid(volume.array.shape, volume.affine, fixed.array.shape, fixed.affine):
        return volume.array
    covered = grid_overlap(volume.array.shape, volume.affine, fixed.array.shape, fixed.affine)
    if covered == 0:
        raise DataError(f"{volume.path}: does not overlap the fixed image {fixed.path} in world space (through the "
                        f"two affines); check the headers or align the images first")
    notes.append(f"{what} resampled onto the fixed grid {fixed.array.shape} "
                 f"({'nearest' if order == 0 else 'trilinear'}, through the affines; it covers "
                 f"{100 * covered:.1f}% of the fixed grid)")
    return resample_to_grid(volume.array, volume.affine, fixed.array.shape, fixed.affine, order=order)


def load_pair(files: PairFiles, data_cfg) -> dict:
    """Arrays of a pair on the fixed grid: raw and normalised moving, normalised fixed, labels, notes."""
    fixed = load_nifti(files.fixed, "image")
    moving = load_nifti(files.moving, "image")
    notes: list[str] = []
    raw_moving = _onto_fixed(moving, fixed, 1, notes, "moving image")
    out = {"fixed_volume": fixed, "raw_moving": raw_moving, "notes": notes,
           "moving": normalise(raw_moving, data_cfg.normalisation, data_cfg.ct_window),
           "fixed": normalise(fixed.array, data_cfg.fixed_normalisation or data_cfg.normalisation,
                              data_cfg.ct_window)}
    if files.fixed_label:
        fl = load_nifti(files.fixed_label, "label")
        if not same_grid(fl.array.shape, fl.affine, fixed.array.shape, fixed.affine):
            raise DataError(f"{files.fixed_label}: label map is not on the grid of its image {files.fixed}")
        out["fixed_label"] = fl.array
    if files.moving_label:
        ml = load_nifti(files.moving_label, "label")
        check_same_grid(moving, ml)
        out["moving_label"] = _onto_fixed(ml, fixed, 0, notes, "moving label")
    return out


def run_config_of(ckpt: dict | None) -> RunConfig:
    """The run config saved with a checkpoint (normalisation, similarity), else the defaults."""
    if ckpt and "run_config" in ckpt:
        try:
            return RunConfig.from_dict(ckpt["run_config"])
        except (KeyError, TypeError, ValueError):
            pass
    return RunConfig()


def register_files(pairs: list[PairFiles], checkpoint, out_dir, *, run: RunConfig | None = None,
                   io_settings: dict | None = None, device: str = "auto", progress: bool | None = None,
                   log=print, overwrite: bool = False, exports=()) -> dict:
    """Register every pair and write its outputs; returns {"rows", "summary", "paths", "table"}.

    ``out_dir`` holding an earlier run's results is refused unless ``overwrite``. ``exports``
    may hold ``'l2r'``: the field also as Learn2Reg's ``disp_<fixed>_<moving>.nii.gz``.
    """
    unknown = set(exports) - set(EXPORTS)
    if unknown:
        raise ValueError(f"--export {','.join(sorted(unknown))}: expected one of {', '.join(EXPORTS)}")
    folder = ResultFolder.claim(out_dir, overwrite)
    device = resolve_device(device)
    limit_heap_retention()
    model, ckpt = (None, None) if no_network(checkpoint) else load_model(checkpoint)
    run = run or run_config_of(ckpt)
    for key, value in (io_settings or {}).items():
        setattr(run.eval, key, value)
    run.eval.__post_init__()
    if model is None and not run.eval.io_steps:
        raise ValueError("checkpoint 'none' registers by instance optimisation alone: give --io-steps > 0")
    if model is not None:
        model = model.to(device).eval()
    out_dir = Path(out_dir)
    rows = []
    for files in tqdm(pairs, desc="registration", disable=bar_disabled(progress)):
        p = load_pair(files, run.data)
        shape = p["fixed"].shape
        if model is not None and padded_size(shape) != tuple(shape):
            p["notes"].append(f"network input zero-padded from {shape} to {padded_size(shape)}, field cropped back")
        for note in p["notes"]:
            log(f"{files.case}: {note}")
        as_tensor = lambda a: volume_tensor(a, device)  # noqa: E731
        u, info = register_tensors(model, run, as_tensor(p["moving"]), as_tensor(p["fixed"]))
        ml, fl = (as_tensor(p[k]) if k in p else None for k in ("moving_label", "fixed_label"))
        labels = sorted(set(np.unique(p["fixed_label"]).tolist()) - {0}) if fl is not None else []
        row, warped_label = evaluate_pair(u, ml, fl, labels, run.eval.label_interpolation)
        row.update(seconds=info["seconds"], **({"io_seconds": info["io_seconds"]} if "io_seconds" in info else {}))
        warped = warp(as_tensor(p["raw_moving"].astype(np.float32)), u)
        wl = None
        if ml is not None:
            wl = warped_label if warped_label is not None else warp_labels(ml, u, run.eval.label_interpolation)
        save_pair_outputs(out_dir, files.case, p["fixed_volume"], warped, u, wl)
        if "l2r" in exports:
            write_l2r(out_dir, files.fixed, files.moving, u, p["fixed_volume"])
        rows.append({"case": files.case, "moving": files.moving, "fixed": files.fixed, **row,
                     "notes": "; ".join(p["notes"])})
    summary = summarise(rows)
    meta = {"checkpoint": str(checkpoint), **provenance(device), "normalisation": run.data.normalisation,
            "fixed_normalisation": run.data.fixed_normalisation or run.data.normalisation,
            "label_interpolation": run.eval.label_interpolation,
            "instance_optimisation": {k: v for k, v in vars(run.eval).items() if k.startswith("io_")},
            "displacement": "voxels of the fixed grid, component i along array axis i; "
                            "warped(x) = moving(x + u(x))"}
    paths = write_results(out_dir, rows, summary, meta)
    folder.finish(log=log)
    table = format_summary_table(summary, f"{len(rows)} pair(s) registered")
    return {"rows": rows, "summary": summary, "paths": paths, "table": table}


__all__ = ["PairFiles", "read_pairs_csv", "load_pair", "register_files", "run_config_of"]
