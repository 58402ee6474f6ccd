"""Inference: register every test pair, score it, write per-case and summary results.

Seconds per pair time the network's forward pass only (synchronised on CUDA), as in the
paper; warping and metrics are not included. ``end_to_end_seconds`` is the wall time between
two finished pairs (reading, network, metrics and writing, overlapped). With instance
optimisation (``eval.io_steps``) its time is reported separately (``io_seconds``), with Dice
and %|J|<=0 before it.
The checkpoint ``none`` runs without a network: instance optimisation from a zero field.
"""
from __future__ import annotations

import json
import time
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from models import PLCReg, display_name, load_model
from models.backend import backend_name
from utils.config import RunConfig
from utils.datasets import DatasetIndex, VolumeCache, discover
from utils.io import DataError, atomic_write, ensure_dir, label_dtype, save_like
from utils.outputs import ResultFolder
from utils.spatial import warp

from utils.metrics import jacobian_stats

from . import distributed as ddp
from .assembly import output_dir
from .exports import l2r_id, l2r_names, parse_l2r_id, write_l2r
from .evaluate import evaluate_pair, format_summary_table, label_dice, summarise, write_results
from .instance_opt import io_similarity, refine_for_run
from .pipeline import BackgroundWriter, prefetched
from .report import inference_figures
from .resume_key import changes, describe, pair_files, resume_key
from .runtime import (amp_dtype, autocast, bar_disabled, compile_model, precision_name,
                      provenance, resolve_device, synchronize)


def save_pair_outputs(out_dir: Path, name: str, fixed_volume, warped: torch.Tensor, u: torch.Tensor,
                      warped_label: torch.Tensor | None) -> None:
    """``<name>_warped.nii.gz`` (float32), ``<name>_displacement.nii.gz`` (float32, a vector
    image) and ``<name>_warped_label.nii.gz`` (int16, or wider where a label needs it) with the
    fixed image's geometry.
    warped: (1, 1, D, H, W); u: (1, 3, D, H, W); warped_label: (1, 1, D, H, W) or None."""
    save_like(warped[0, 0].float().cpu().numpy(), fixed_volume, out_dir / f"{name}_warped.nii.gz", dtype=np.float32)
    save_like(u[0].float().cpu().numpy(), fixed_volume, out_dir / f"{name}_displacement.nii.gz", dtype=np.float32)
    if warped_label is not None:
        labels = warped_label[0, 0].cpu().numpy()
        save_like(labels, fixed_volume, out_dir / f"{name}_warped_label.nii.gz", dtype=label_dtype(labels))


def no_network(checkpoint) -> bool:
    """True for the checkpoint name 'none' (register by instance optimisation alone)."""
    return checkpoint is not None and str(checkpoint).lower() == "none"


def register_tensors(model, run: RunConfig, moving: torch.Tensor, fixed: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """Displacement (B, 3, D, H, W) of one pair: the network (or zero without one), then
    instance optimisation when ``run.eval.io_steps`` > 0.

    Returns (u, info): info has ``seconds`` (network) and, with IO, ``io_seconds`` and
    ``u_before_io``.
    """
    device = fixed.device
    synchronize(device)
    t0 = time.perf_counter()
    if model is None:
        u = fixed.new_zeros((fixed.shape[0], 3, *fixed.shape[2:]), dtype=torch.float32)
    else:
        with torch.inference_mode(), autocast(device, amp_dtype(device, run.eval.amp)):
            u = model(moving, fixed).float()
    synchronize(device)
    info = {"seconds": time.perf_counter() - t0}
    if run.eval.io_steps:
        refined = refine_for_run(run, moving, fixed, u)
        synchronize(device)
        info.update(io_seconds=refined.seconds, u_before_io=u)
        u = refined.u
    return u, info


def atlas_l2r_id(data) -> str:
    """The atlas's Learn2Reg id for ``--l2r-out`` names: ``data.l2r_fixed_id``, else the id in
    ``data.atlas_label``'s file name, else ''."""
    if data.l2r_fixed_id:
        return parse_l2r_id(data.l2r_fixed_id, "data.l2r_fixed_id (--l2r-fixed-id)")
    return (l2r_id(data.atlas_label) or "") if data.atlas_label else ""


def infer(run: RunConfig, checkpoint, *, save_nifti: bool = False, progress: bool | None = None,
          index: DatasetIndex | None = None, model=None, figures: bool = False, train_log=None,
          overwrite: bool = False, l2r_out=None, resume: bool = False) -> dict:
    """Evaluate a checkpoint (or a given model) on the data set's test pairs.

    Returns {"rows", "summary", "paths", "table"} (on rank 0; other ranks of a torchrun get
    {"rows": [], "table": None}); writes per_case.csv, summary.csv and summary.json into the
    run's output folder (and NIfTI outputs with ``save_nifti``, and ``figures/`` with
    ``figures``: panels, grid and Jacobian of the first pair, Dice per structure, and training
    curves from ``train_log`` or the checkpoint's folder). An output folder that holds an
    earlier run's results is refused unless ``overwrite``; with it, the earlier files that this
    run does not rewrite are removed at the end. With ``l2r_out``, each pair's field is also
    written there in Learn2Reg's format (``engine/exports.py``).

    Cohorts: the next pair is read in a background thread while the network runs, and each
    pair's metrics and files are computed and written in another while the next pair runs
    (``engine/pipeline.py``; ``eval.background``). Each finished pair's row is kept in
    ``<output>/partial/`` until the end, so a stopped run continues with ``resume`` without
    redoing them. Started by ``torchrun --nproc_per_node=N``, the pairs are shared out among
    the ranks and rank 0 writes the merged results.
    """
    atlas_id = atlas_l2r_id(run.data) if l2r_out else ""      # a bad id refused before anything is claimed
    ctx, device = ddp.setup(resolve_device(run.device))
    out_dir = output_dir(run)
    finished = FinishedPairs(out_dir / "partial")
    if not resume and not overwrite and finished.count():
        raise DataError(f"{finished.folder}: holds {finished.count()} finished pair(s) of a stopped run; continue "
                        f"it with --resume, or start again with --overwrite")
    with ExitStack() as stack:            # the folders are released however the run ends
        claimed = [stack.enter_context(ResultFolder.claim(folder, overwrite, resume=resume, lock=ctx.is_main,
                                                          log=print)) for folder in (out_dir, l2r_out) if folder]
        done = finished.rows() if resume else {}
        if resume and not done and (out_dir / "summary.json").is_file():
            raise DataError(f"{out_dir}: holds a finished run (summary.json) and no stopped one to continue; "
                            f"give --overwrite to run it again, or choose another output folder")
        ddp.barrier(ctx)                                   # every rank has looked before anything is written
        if no_network(checkpoint):
            if not run.eval.io_steps:
                raise ValueError("checkpoint 'none' registers by instance optimisation alone: set io_steps > 0")
            model = None
        elif model is None:
            model, _ = load_model(checkpoint)
        if model is not None:
            model = model.to(device).eval()
            if run.eval.compile:
                compile_model(model)
        index = index or discover(run.data, None, run.train.seed)
        pairs = index.test_pairs()
        inputs = pair_files(pairs)
        key = resume_key("inference", run, inputs, model)
        for each in claimed:
            each.protect(inputs)
        if resume and done:
            finished.check_same_run(key)
        if run.eval.max_pairs:
            pairs = pairs[:run.eval.max_pairs]
        if not pairs:
            raise DataError(f"{run.data.root}: no test pairs")
        l2r_name = dict(zip((p.name for p in pairs), l2r_names([(p.fixed.image, p.moving.image) for p in pairs],
                                                              atlas_id))) if l2r_out else {}
        todo = [p for p in pairs if p.name not in done]
        mine = todo[ctx.rank::ctx.world_size]
        cache = VolumeCache(run.data)
        rows: list[dict] = []
        first: dict = {}
        clock = {"last": time.perf_counter()}

        def finish_pair(pair, t, u, info):
            """Metrics, files and the row of one registered pair (runs in the writer thread)."""
            row = score_pair(run, t, u, info)
            now = time.perf_counter()
            row["end_to_end_seconds"] = now - clock["last"]
            clock["last"] = now
            row = {"case": pair.name, "moving": pair.moving.image, "fixed": pair.fixed.image, **row}
            if l2r_out:
                write_l2r(l2r_out, l2r_name[pair.name], u, t["fixed_volume"])
            if save_nifti:
                save_pair_outputs(out_dir / "nifti", pair.name, t["fixed_volume"], warp(t["moving"], u), u,
                                  row.pop("_warped_label"))
            row.pop("_warped_label", None)
            finished.add(row)
            rows.append(row)

        if ctx.is_main and not done:
            finished.start(key)
        background = run.eval.background
        with BackgroundWriter(background) as writer:
            loaded = prefetched(mine, lambda p: cache.pair_tensors(p, device), background)
            quiet = bar_disabled(progress) or not ctx.is_main
            for pair, t in tqdm(loaded, total=len(mine), desc="inference", disable=quiet):
                u, info = register_tensors(model, run, t["moving"], t["fixed"])
                if figures and not first:
                    first.update(name=pair.name, moving=t["moving"], fixed=t["fixed"], u=u)
                writer.submit(finish_pair, pair, t, u, info)
        gathered = ddp.gather_objects(rows, ctx)
        if not ctx.is_main:
            return {"rows": [], "summary": None, "paths": {}, "table": None}
        by_case = {**done, **{r["case"]: r for part in gathered for r in part}}
        rows = [by_case[p.name] for p in pairs]
        summary = summarise(rows)
        amp = amp_dtype(device, run.eval.amp) if model is not None else None
        meta = {"dataset": run.data.name, "checkpoint": str(checkpoint) if checkpoint else None, **provenance(device),
                "precision": precision_name(amp), "kernels": backend_name(device, amp) if isinstance(model, PLCReg) else None,
                "ranks": ctx.world_size, "resumed_pairs": len(done),
                "label_interpolation": run.eval.label_interpolation,
                "hd95_units": "mm" if run.eval.hd95_spacing else "voxels", "config": run.to_dict(),
                "model_config": model.config.to_dict() if model is not None else None,
                "instance_optimisation": ({k: v for k, v in run.eval.__dict__.items() if k.startswith("io_")}
                                          | {"similarity": io_similarity(run.train.similarity)})
                if run.eval.io_steps else None}
        paths = write_results(out_dir, rows, summary, meta)
        if figures:
            log = train_log or (Path(checkpoint).parent / "train_log.csv" if checkpoint and not no_network(checkpoint)
                                else None)
            paths["figures"] = inference_figures(out_dir / "figures", first or None, rows, run.data.labels, log)
        finished.clear()
        for each in claimed:
            each.finish(log=print)
        method = display_name(model.config.arch) if model is not None else "no network"
        if amp is not None:
            method += f" in {precision_name(amp)}"
        if run.eval.io_steps:
            method += f" + {run.eval.io_steps} IO steps"
        ranks = f", {ctx.world_size} ranks" if ctx.distributed else ""
        table = format_summary_table(summary, f"{run.data.name}: {len(rows)} test pairs, {method}{ranks} "
                                              f"(labels warped by {run.eval.label_interpolation})")
        return {"rows": rows, "summary": summary, "paths": paths, "table": table}


def score_pair(run: RunConfig, t: dict, u: torch.Tensor, info: dict) -> dict:
    """The metrics row of one registered pair (and its warped label under ``_warped_label``)."""
    labels = run.data.labels
    spacing = t["fixed_volume"].spacing if run.eval.hd95_spacing else None
    row, warped_label = evaluate_pair(u, t.get("moving_label"), t.get("fixed_label"), labels,
                                      run.eval.label_interpolation, spacing)
    row["seconds"] = info["seconds"]
    if "u_before_io" in info:
        before = info["u_before_io"]
        row["dice_before_io"] = label_dice(before, t.get("moving_label"), t.get("fixed_label"), labels,
                                           run.eval.label_interpolation)
        row["pct_nonpos_jac_before_io"] = jacobian_stats(before)["pct_nonpos_jac"]
        row["io_seconds"] = info["io_seconds"]
    row["_warped_label"] = warped_label
    return row


class FinishedPairs:
    """Rows of finished pairs, one ``<case>.row.json`` each in ``folder``, and the run's checkpoint
    and settings (``run.json``), kept until the run's results are written: what a stopped run
    leaves for ``--resume``."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.key: dict | None = None

    def files(self) -> list[Path]:
        return sorted(self.folder.glob("*.row.json")) if self.folder.is_dir() else []

    def count(self) -> int:
        return len(self.files())

    def rows(self) -> dict[str, dict]:
        out = {}
        for path in self.files():
            try:
                row = json.loads(path.read_text())
            except (OSError, ValueError):
                continue                            # a damaged row: that pair is registered again
            if isinstance(row, dict) and "case" in row:
                out[row["case"]] = row
        return out

    def start(self, key: dict) -> None:
        """The run's resume key (weights, settings, data list: ``engine/resume_key.py``), written
        as ``run.json`` with the first finished row (a run that fails before leaves nothing)."""
        self.key = key

    def _write_key(self) -> None:
        text = json.dumps(self.key, indent=1)
        atomic_write(self.folder / "run.json", lambda tmp: Path(tmp).write_text(text))
        self.key = None

    def check_same_run(self, key: dict) -> None:
        """DataError when ``--resume`` would mix rows of other weights, settings or data."""
        path = self.folder / "run.json"
        try:
            saved = json.loads(path.read_text())
        except (OSError, ValueError):
            raise DataError(f"{path}: the stopped run's record is missing or damaged, so its rows cannot be "
                            f"trusted to match this run; start again with --overwrite") from None
        changed = changes(saved, key)
        if changed:
            raise DataError(f"{self.folder}: the stopped run differs from this one in {describe(changed)}; "
                            f"continue it with the same checkpoint, settings and data, or start again with "
                            f"--overwrite")

    def add(self, row: dict) -> None:
        ensure_dir(self.folder)
        if self.key is not None:
            self._write_key()
        text = json.dumps(row, default=float)
        atomic_write(self.folder / f"{row['case']}.row.json", lambda tmp: Path(tmp).write_text(text))

    def clear(self) -> None:
        for path in [*self.files(), self.folder / "run.json"]:
            path.unlink(missing_ok=True)
        if self.folder.is_dir() and not any(self.folder.iterdir()):
            self.folder.rmdir()
