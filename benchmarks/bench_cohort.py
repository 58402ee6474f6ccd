"""Cohort inference: end-to-end seconds per pair (read, network, metrics, NIfTI outputs) beside
the network's own seconds, with the background pipeline and with the plain loop, in one run.

Pairs are the embedded demo template resampled to ``--size`` (default 160x192x160, LPBA40's
grid) with small per-subject shifts, in the OASIS layout; the network is the default PLCReg
(random weights: the time does not depend on them). Both runs write every NIfTI output
(``--save-nifti``), as a cohort run would.

    python benchmarks/bench_cohort.py                     # 3 pairs, 2 threads
    python benchmarks/bench_cohort.py --pairs 4 --write
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.bench_inference import parse_size  # noqa: E402
from benchmarks.common import publish  # noqa: E402


def write_pairs(root: Path, size, n: int) -> None:
    """The OASIS layout: fixed.nii.gz + label/OASIS_0395_0000.nii.gz (atlas), Test/ subjects and labels."""
    import nibabel as nib
    import numpy as np
    from scipy import ndimage

    from utils.demo_data import load_template
    t1, labels, affine = load_template()
    zoom = [s / n0 for s, n0 in zip(size, t1.shape)]
    t1 = ndimage.zoom(t1, zoom, order=1).astype(np.float32)
    labels = ndimage.zoom(labels, zoom, order=0).astype(np.int16)
    affine = affine @ np.diag([1 / zoom[0], 1 / zoom[1], 1 / zoom[2], 1])
    for sub in ("Train", "Test", "label"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(t1, affine), str(root / "fixed.nii.gz"))
    nib.save(nib.Nifti1Image(labels, affine), str(root / "label" / "OASIS_0395_0000.nii.gz"))
    rng = np.random.default_rng(0)
    for i in range(1, n + 2):                      # one training subject (the layout needs one), n test
        shift = rng.integers(-3, 4, 3)
        name = f"OASIS_{i:04d}_0000.nii.gz"
        img = np.roll(t1, shift, (0, 1, 2)) + rng.normal(0, 0.01, t1.shape).astype(np.float32)
        nib.save(nib.Nifti1Image(img, affine), str(root / ("Train" if i == 1 else "Test") / name))
        nib.save(nib.Nifti1Image(np.roll(labels, shift, (0, 1, 2)), affine), str(root / "label" / name))


def run_once(data: Path, out: Path, ckpt: Path, size, background: bool) -> dict:
    from engine.assembly import assemble_run
    from engine.infer import infer
    run = assemble_run("Demo", settings={"data.root": str(data), "data.image_size": tuple(size),
                                         "data.val_subjects": 0, "output_dir": str(out), "device": "cpu",
                                         "eval.background": background})
    t0 = time.perf_counter()
    result = infer(run, ckpt, save_nifti=True, progress=False)
    wall = time.perf_counter() - t0
    rows = result["rows"]
    return {"network": sum(r["seconds"] for r in rows) / len(rows), "wall": wall / len(rows),
            "e2e": sum(r["end_to_end_seconds"] for r in rows[1:]) / max(len(rows) - 1, 1)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=parse_size, default=(160, 192, 160))
    p.add_argument("--pairs", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--write", action="store_true", help="append the table to benchmarks/RESULTS.md")
    args = p.parse_args(argv)
    import torch

    from models import build_model, save_model
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_pairs(tmp / "data", args.size, args.pairs)
        ckpt = save_model(tmp / "model.pth", build_model())
        results = {mode: run_once(tmp / "data", tmp / f"out_{mode}", ckpt, args.size, mode == "background")
                   for mode in ("plain", "background")}
    size = "x".join(map(str, args.size))
    table = (f"| loop ({args.pairs} pairs at {size}) | network s/pair | end-to-end s/pair (steady) | "
             f"wall s/pair (all) | network / end-to-end |\n|---|---|---|---|---|\n" + "\n".join(
                 f"| {mode} | {r['network']:.2f} | {r['e2e']:.2f} | {r['wall']:.2f} | {r['network'] / r['e2e']:.2f} |"
                 for mode, r in results.items()))
    publish("bench_cohort.py", "Cohort inference: end-to-end vs network seconds", table, args.threads, args.write, argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
