"""Inference: register every test pair, score it, write per-case and summary results.

Seconds per pair time the network's forward pass only (synchronised on CUDA), as in the
paper; warping and metrics are not included.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch
from tqdm import tqdm

from models import load_model
from utils.config import RunConfig
from utils.datasets import DatasetIndex, VolumeCache, discover
from utils.io import DataError, save_like
from utils.spatial import warp

from .evaluate import evaluate_pair, format_summary_table, summarise, write_results
from .runtime import command_line, package_versions, resolve_device, synchronize


def output_dir(run: RunConfig) -> Path:
    return Path(run.output_dir or f"Results/{run.data.name}")


def save_pair_outputs(out_dir: Path, name: str, fixed_volume, warped: torch.Tensor, u: torch.Tensor,
                      warped_label: torch.Tensor | None) -> None:
    """Warped image, warped label and displacement as NIfTI with the fixed image's geometry."""
    save_like(warped[0, 0].float().cpu().numpy(), fixed_volume, out_dir / f"{name}_warped.nii.gz")
    save_like(u[0].float().cpu().numpy(), fixed_volume, out_dir / f"{name}_displacement.nii.gz")
    if warped_label is not None:
        save_like(warped_label[0, 0].cpu().numpy().astype("int16"), fixed_volume,
                  out_dir / f"{name}_warped_label.nii.gz")


def infer(run: RunConfig, checkpoint, *, data_root=None, save_nifti: bool = False, progress: bool | None = None,
          index: DatasetIndex | None = None, model=None) -> dict:
    """Evaluate a checkpoint (or a given model) on the data set's test pairs.

    Returns {"rows", "summary", "paths", "table"}; writes per_case.csv, summary.csv and
    summary.json into the run's output folder (and NIfTI outputs with ``save_nifti``).
    """
    device = resolve_device(run.device)
    if model is None:
        model, _ = load_model(checkpoint)
    model = model.to(device).eval()
    index = index or discover(run.data, data_root, run.train.seed)
    pairs = index.test_pairs()
    if run.eval.max_pairs:
        pairs = pairs[:run.eval.max_pairs]
    if not pairs:
        raise DataError(f"{run.data.root}: no test pairs")
    out_dir = output_dir(run)
    cache = VolumeCache(run.data)
    labels = run.data.labels
    rows = []
    for pair in tqdm(pairs, desc="inference", disable=None if progress is None else not progress):
        t = cache.pair_tensors(pair, device)
        synchronize(device)
        t0 = time.perf_counter()
        with torch.inference_mode():
            u = model(t["moving"], t["fixed"])
        synchronize(device)
        seconds = time.perf_counter() - t0
        spacing = t["fixed_volume"].spacing if run.eval.hd95_spacing else None
        row, warped_label = evaluate_pair(u, t.get("moving_label"), t.get("fixed_label"), labels,
                                          run.eval.label_interpolation, spacing)
        rows.append({"case": pair.name, "moving": pair.moving.image, "fixed": pair.fixed.image, **row,
                     "seconds": seconds})
        if save_nifti:
            save_pair_outputs(out_dir / "nifti", pair.name, t["fixed_volume"], warp(t["moving"], u), u,
                              warped_label)
    summary = summarise(rows)
    meta = {"dataset": run.data.name, "checkpoint": str(checkpoint) if checkpoint else None,
            "command": command_line(), "versions": package_versions(), "device": str(device),
            "label_interpolation": run.eval.label_interpolation,
            "hd95_units": "mm" if run.eval.hd95_spacing else "voxels", "config": run.to_dict(),
            "model_config": model.config.to_dict()}
    paths = write_results(out_dir, rows, summary, meta)
    table = format_summary_table(summary, f"{run.data.name}: {len(rows)} test pairs "
                                          f"(labels warped by {run.eval.label_interpolation})")
    return {"rows": rows, "summary": summary, "paths": paths, "table": table}
