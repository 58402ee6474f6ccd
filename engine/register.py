"""Register a user's own image pairs with a checkpoint (``register.py``).

For each pair: optional rigid/affine pre-alignment (``utils/affine.py``) in world space; the
moving image resampled onto the fixed image's grid through its affine and the pre-alignment;
intensities normalised as the checkpoint was trained (its run config; min-max without one);
the network computes on a grid padded to multiples of 16 and crops its field back; optional
instance optimisation refines it. Written with the fixed image's geometry: ``<name>_warped.nii.gz``
(the moving image in its own intensities, read through the whole transform),
``<name>_displacement.nii.gz``, ``<name>_affine.txt`` (with pre-alignment), with a moving label
``<name>_warped_label.nii.gz``; exports and the inverse on request; plus per_case.csv,
summary.csv and summary.json (metrics, notes on what was aligned, resampled or padded, the
command and settings).
"""
from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from models import load_model
from utils.config import RunConfig
from utils.datasets import normalise, volume_tensor
from utils.affine import AFFINE_KINDS, AlignmentSettings, align_volumes
from utils.io import DataError, Volume, check_same_grid, load_volume, image_stem, require_file, save_like
from utils.itk import write_itk_affine, write_itk_displacement
from utils.outputs import ResultFolder
from utils.resample import grid_overlap, resample_to_grid, same_grid
from utils.spatial import inverse_consistency, invert_displacement
from utils.transforms import AffineMap, FieldMap, resample_image, resample_labels

from .evaluate import evaluate_pair, format_summary_table, mean_dice, summarise, write_results
from .exports import composed_voxel_displacement, l2r_id, l2r_names, write_l2r
from .infer import no_network, register_tensors, save_pair_outputs
from .pipeline import prefetched
from .runtime import bar_disabled, provenance, resolve_device

PAIR_COLUMNS = ("moving", "fixed", "moving_label", "fixed_label", "name")
EXPORTS = ("itk", "l2r")


@dataclass
class PairFiles:
    moving: str
    fixed: str
    moving_label: str = ""
    fixed_label: str = ""
    name: str = ""

    @property
    def case(self) -> str:
        return self.name or f"{image_stem(self.moving)}_to_{image_stem(self.fixed)}"


def check_case_name(name: str, where: str) -> str:
    """An output name that stays inside the output folder: one plain file-name part.

    DataError for an empty name, a path (``/``, ``\\``), ``.``/``..``, or a name starting with a dot.
    """
    if not name or name in (".", "..") or "/" in name or "\\" in name or name.startswith(".") or "\0" in name:
        raise DataError(f"{where}: output name {name!r} is not a plain file name (no folders, no '..', no leading "
                        f"dot); outputs are written inside --out-dir only")
    return name


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
    lines = {}
    for line, pair in enumerate(pairs, start=2):
        if pair.case in lines:
            raise DataError(f"{path}: lines {lines[pair.case]} and {line} would both write {pair.case!r}; give "
                            f"them different names in a 'name' column")
        lines[pair.case] = line
    return pairs


def _onto_fixed(volume: Volume, fixed: Volume, order: int, notes: list[str] | None, what: str) -> np.ndarray:
    if same_grid(volume.array.shape, volume.affine, fixed.array.shape, fixed.affine):
        return volume.array
    covered = grid_overlap(volume.array.shape, volume.affine, fixed.array.shape, fixed.affine)
    if covered == 0:
        raise DataError(f"{volume.path}: does not overlap the fixed image {fixed.path} in world space (through the "
                        f"two affines); check the headers or align the images first")
    if notes is not None:
        notes.append(f"{what} resampled onto the fixed grid {fixed.array.shape} "
                     f"({'nearest' if order == 0 else 'trilinear'}, through the affines; it covers "
                     f"{100 * covered:.1f}% of the fixed grid)")
    return resample_to_grid(volume.array, volume.affine, fixed.array.shape, fixed.affine, order=order)


def aligned(volume: Volume, matrix: np.ndarray) -> Volume:
    """``volume`` seen through a pre-alignment ``matrix`` (fixed world -> moving world): same array,
    the affine that places it in the fixed image's world."""
    return Volume(volume.array, np.linalg.inv(matrix) @ volume.affine, volume.header, volume.path)


def load_pair(files: PairFiles, data_cfg, alignment: str = "none", settings: AlignmentSettings | None = None,
              device="cpu") -> dict:
    """A pair read and brought onto the fixed grid: the volumes, the pre-alignment (4x4, fixed world ->
    moving world; identity without one), the normalised network inputs, label maps and notes."""
    fixed = load_volume(files.fixed, "image")
    moving = load_volume(files.moving, "image")
    notes: list[str] = []
    result = align_volumes(moving.array, moving.affine, fixed.array, fixed.affine, alignment, settings, device)
    if alignment != "none":
        notes.append(f"{alignment} pre-alignment ({result.metric}): similarity {result.similarity_before:.4f} -> "
                     f"{result.similarity_after:.4f} in {result.seconds:.2f} s")
    raw_moving = _onto_fixed(aligned(moving, result.matrix), fixed, 1, notes, "moving image")
    out = {"fixed_volume": fixed, "moving_volume": moving, "alignment": result, "notes": notes,
           "moving": normalise(raw_moving, data_cfg.normalisation, data_cfg.ct_window),
           "fixed": normalise(fixed.array, data_cfg.fixed_normalisation or data_cfg.normalisation,
                              data_cfg.ct_window)}
    if files.fixed_label:
        fl = load_volume(files.fixed_label, "label")
        if not same_grid(fl.array.shape, fl.affine, fixed.array.shape, fixed.affine):
            raise DataError(f"{files.fixed_label}: label map is not on the grid of its image {files.fixed}")
        out["fixed_label"] = fl.array
    if files.moving_label:
        ml = load_volume(files.moving_label, "label")
        check_same_grid(moving, ml)
        out["moving_label_volume"] = ml
        out["moving_label"] = _onto_fixed(ml, fixed, 0, None, "moving label")           # headers only
        out["moving_label_aligned"] = _onto_fixed(aligned(ml, result.matrix), fixed, 0, None, "moving label")
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
                   log=print, overwrite: bool = False, exports=(), alignment: str = "none",
                   alignment_settings: AlignmentSettings | None = None, inverse: bool = False) -> dict:
    """Register every pair and write its outputs; returns {"rows", "summary", "paths", "table"}.

    ``out_dir`` holding an earlier run's results is refused unless ``overwrite``. ``alignment``
    ('none', 'rigid', 'affine') pre-aligns each pair before the network. ``exports`` may hold
    ``'itk'`` (ITK/ANTs displacement field in LPS millimetres, and the affine) and ``'l2r'``
    (Learn2Reg's field, named as its evaluation looks it up: ``engine/exports.py``). ``inverse``
    also computes and writes the inverse transform and reports its inverse consistency.
    """
    unknown = set(exports) - set(EXPORTS)
    if unknown:
        raise ValueError(f"--export {','.join(sorted(unknown))}: expected one or more of {', '.join(EXPORTS)}")
    if alignment not in AFFINE_KINDS:
        raise ValueError(f"--affine {alignment}: expected one of {', '.join(AFFINE_KINDS)}")
    l2r_name = {}
    if "l2r" in exports:            # names settled (and clashes refused) before any work
        l2r_name = dict(zip((f.case for f in pairs), l2r_names([(f.fixed, f.moving) for f in pairs],
                                                              require_ids=False)))
        for f in pairs:
            if not (l2r_id(f.fixed) and l2r_id(f.moving)):
                log(f"{f.case}: no Learn2Reg ids in the image names (<task>_<case>_<modality>.nii.gz): the field is "
                    f"written as {l2r_name[f.case]}, which the challenge's evaluation will not look up")
    with ResultFolder.claim(out_dir, overwrite, log=log) as folder:
        folder.protect(f for files in pairs for f in (files.moving, files.fixed, files.moving_label, files.fixed_label)
                       if f)
        device = resolve_device(device)
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
        # the next pair is read (and pre-aligned) in the background while the network runs
        loaded = prefetched(pairs, lambda f: load_pair(f, run.data, alignment, alignment_settings, device),
                            run.eval.background)
        for files, p in tqdm(loaded, total=len(pairs), desc="registration", disable=bar_disabled(progress)):
            shape = p["fixed"].shape
            if model is not None and model.input_size(shape) != tuple(shape):
                p["notes"].append(f"network input zero-padded from {shape} to {model.input_size(shape)}, field cropped back")
            for note in p["notes"]:
                log(f"{files.case}: {note}")
            as_tensor = lambda a: volume_tensor(a, device)  # noqa: E731
            u, info = register_tensors(model, run, as_tensor(p["moving"]), as_tensor(p["fixed"]))
            p["l2r_name"] = l2r_name.get(files.case)
            row = write_pair(out_dir, files, p, u, run, exports, inverse, as_tensor)
            row.update(seconds=info["seconds"], **({"io_seconds": info["io_seconds"]} if "io_seconds" in info else {}))
            rows.append({"case": files.case, "moving": files.moving, "fixed": files.fixed, **row,
                         "notes": "; ".join(p["notes"])})
        summary = summarise(rows)
        meta = {"checkpoint": str(checkpoint), **provenance(device), "normalisation": run.data.normalisation,
                "fixed_normalisation": run.data.fixed_normalisation or run.data.normalisation,
                "label_interpolation": run.eval.label_interpolation,
                "instance_optimisation": {k: v for k, v in vars(run.eval).items() if k.startswith("io_")},
                "pre_alignment": {"kind": alignment, **({"settings": vars(alignment_settings or AlignmentSettings())}
                                                        if alignment != "none" else {})},
                "displacement": "voxels of the fixed grid, component i along array axis i; warped(x) = moving(x + u(x)) "
                                "for the moving image on the fixed grid after pre-alignment",
                "transform": "fixed point p -> p' = A_f (x + u(x)) with x = A_f^-1 p (the displacement), then "
                             "<case>_affine.txt (with pre-alignment) takes p' to the moving image's world point"}
        paths = write_results(out_dir, rows, summary, meta)
        folder.finish(log=log)
    table = format_summary_table(summary, f"{len(rows)} pair(s) registered")
    return {"rows": rows, "summary": summary, "paths": paths, "table": table}


def write_pair(out_dir: Path, files: PairFiles, p: dict, u: torch.Tensor, run: RunConfig, exports, inverse: bool,
               as_tensor) -> dict:
    """Metrics and output files of one registered pair; the row of metrics.

    The warped image and label are read from the moving files through the whole transform
    (displacement, then pre-alignment and header geometry): one interpolation.
    """
    fixed, moving = p["fixed_volume"], p["moving_volume"]
    matrix = p["alignment"].matrix
    chain = [FieldMap(u[0].float(), fixed.affine), AffineMap(matrix)]
    grid = (fixed.array.shape, fixed.affine)
    warped = resample_image(moving.array, moving.affine, *grid, chain, u.device)
    wl = None
    if "moving_label_volume" in p:
        ml = p["moving_label_volume"]
        wl = resample_labels(ml.array, ml.affine, *grid, chain, run.eval.label_interpolation, device=u.device)
    fl = as_tensor(p["fixed_label"]) if "fixed_label" in p else None
    labels = sorted(set(np.unique(p["fixed_label"]).tolist()) - {0}) if fl is not None else []
    ml_t = as_tensor(p["moving_label"]) if "moving_label" in p else None
    row, _ = evaluate_pair(u, ml_t, fl, labels, run.eval.label_interpolation,
                           warped_label=as_tensor(wl) if wl is not None else None)
    if fl is not None and ml_t is not None and p["alignment"].kind != "none":
        row["dice_affine"] = mean_dice(as_tensor(p["moving_label_aligned"]), fl, labels)
    wl_t = torch.from_numpy(wl)[None, None] if wl is not None else None
    save_pair_outputs(out_dir, files.case, fixed, torch.from_numpy(warped)[None, None], u, wl_t)
    if p["alignment"].kind != "none" or "itk" in exports:       # (the identity without pre-alignment)
        write_itk_affine(out_dir / f"{files.case}_affine.txt", matrix)
    if "itk" in exports:
        write_itk_displacement(out_dir / f"{files.case}_itk_displacement.nii.gz", u, fixed)
    if "l2r" in exports:
        write_l2r(out_dir, p["l2r_name"], composed_voxel_displacement(chain, fixed, moving), fixed)
    if inverse:
        v = invert_displacement(u.float())
        consistency = inverse_consistency(u.float(), v)
        row.update(inverse_consistency_mean=consistency["mean"], inverse_consistency_max=consistency["max"])
        save_like(v[0].cpu().numpy(), fixed, out_dir / f"{files.case}_inverse_displacement.nii.gz", np.float32)
        back = [AffineMap(np.linalg.inv(matrix)), FieldMap(v[0], fixed.affine)]
        fixed_on_moving = resample_image(fixed.array, fixed.affine, moving.array.shape, moving.affine, back, u.device)
        save_like(fixed_on_moving, moving, out_dir / f"{files.case}_inverse_warped.nii.gz", np.float32)
        if "itk" in exports:
            write_itk_displacement(out_dir / f"{files.case}_itk_inverse_displacement.nii.gz", v, fixed)
    return row


__all__ = ["PairFiles", "read_pairs_csv", "load_pair", "register_files", "run_config_of"]
