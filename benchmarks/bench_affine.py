"""Affine pre-alignment: its time beside the network's, and what it gives on misaligned pairs.

1. Time, in one process on the demo template's grid (80x96x80): the default network's forward
   pass (inference mode) and the pre-alignment (affine and rigid with NCC, affine with mutual
   information) alternately, median over ``--runs``; the ratio to the network is the figure.
2. Dice on the demo test pairs (template atlas as the fixed image, synthetic subjects as
   moving): each pair as made ("aligned"), and the same subject rotated by 10 degrees and
   shifted by 8 voxels ("misaligned", made from the template by one interpolation too), registered by ``register.py``'s engine with and without
   ``--affine affine``.

    python benchmarks/bench_affine.py                               # instance optimisation, no network
    python benchmarks/bench_affine.py --checkpoint Results/Demo/checkpoint/best.pth --write
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import publish  # noqa: E402


MISALIGNMENT = (10.0, 8.0)         # degrees about array axis 2, voxels along axis 0


def time_rows(args) -> list[tuple[str, float]]:
    import torch

    from models import build_model
    from utils.affine import AlignmentSettings, align_volumes
    from utils.demo_data import load_template, make_subject
    t1, labels, affine = load_template()
    moving = make_subject(t1, labels, 1, misalignment=MISALIGNMENT)[0]
    model = build_model().eval()
    x = torch.from_numpy(t1)[None, None]
    y = torch.from_numpy(moving)[None, None]
    steps = {"network (default PLCReg, forward)": lambda: model(y, x),
             "affine, NCC": lambda: align_volumes(moving, affine, t1, affine, "affine"),
             "rigid, NCC": lambda: align_volumes(moving, affine, t1, affine, "rigid"),
             "affine, mutual information": lambda: align_volumes(moving, affine, t1, affine, "affine",
                                                                 AlignmentSettings(metric="mi"))}
    times = {k: [] for k in steps}
    with torch.inference_mode():
        for fn in steps.values():
            fn()                                          # warm-up
    for _ in range(args.runs):
        for name, fn in steps.items():
            with torch.inference_mode(name.startswith("network")):
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
    return [(name, statistics.median(v)) for name, v in times.items()]


def dice_rows(args) -> list[tuple[str, float, float]]:
    import nibabel as nib
    import numpy as np

    from engine.register import PairFiles, register_files
    from utils.demo_data import load_template, make_subject
    t1, labels, affine = load_template()
    out = {"aligned, --affine none": [], "misaligned, --affine none": [], "misaligned, --affine affine": []}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        nib.save(nib.Nifti1Image(t1, affine), str(tmp / "atlas.nii.gz"))
        nib.save(nib.Nifti1Image(labels, affine), str(tmp / "atlas_seg.nii.gz"))
        pairs = {k: [] for k in out}
        for i in range(args.pairs):
            for kind, misalignment in (("aligned", None), ("misaligned", MISALIGNMENT)):
                im, la, _ = make_subject(t1, labels, 1000 + i, misalignment=misalignment)
                nib.save(nib.Nifti1Image(im.astype(np.float32), affine), str(tmp / f"{kind}_{i}.nii.gz"))
                nib.save(nib.Nifti1Image(la.astype(np.int16), affine), str(tmp / f"{kind}_{i}_seg.nii.gz"))
                for key in pairs:
                    if key.startswith(kind + ","):
                        pairs[key].append(PairFiles(str(tmp / f"{kind}_{i}.nii.gz"), str(tmp / "atlas.nii.gz"),
                                                    str(tmp / f"{kind}_{i}_seg.nii.gz"),
                                                    str(tmp / "atlas_seg.nii.gz")))
        io = {"io_steps": args.io_steps} if args.io_steps else {}
        for n, (key, files) in enumerate(pairs.items()):
            result = register_files(files, args.checkpoint, tmp / f"out{n}", io_settings=io, progress=False,
                                    log=lambda *_: None, alignment=key.split("--affine ")[1])
            out[key] = [r["dice"] for r in result["rows"]]
            out[key + " (initial)"] = [r.get("dice_affine", r["dice_initial"]) for r in result["rows"]]
    return [(key, float(np.mean(v)), float(np.std(v))) for key, v in out.items() if not key.endswith("(initial)")] + \
        [(key, float(np.mean(v)), float(np.std(v))) for key, v in out.items() if key.endswith("(initial)")]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--pairs", type=int, default=6, help="demo test pairs for the Dice table (0 = skip)")
    p.add_argument("--checkpoint", default="none", help="network for the Dice table ('none': instance "
                                                        "optimisation alone)")
    p.add_argument("--io-steps", type=int, default=None, help="instance optimisation steps (default 100 without "
                                                              "a network, 0 with one)")
    p.add_argument("--write", action="store_true", help="append the tables to benchmarks/RESULTS.md")
    args = p.parse_args(argv)
    import torch
    torch.set_num_threads(args.threads)
    if args.io_steps is None:
        args.io_steps = 100 if args.checkpoint == "none" else 0
    rows = time_rows(args)
    network = rows[0][1]
    table = "| step at 80x96x80 | seconds (median) | / network |\n|---|---|---|\n" + "\n".join(
        f"| {name} | {s:.3f} | {s / network:.2f} |" for name, s in rows)
    if args.pairs:
        what = "instance optimisation alone" if args.checkpoint == "none" else f"checkpoint {args.checkpoint}"
        table += (f"\n\nDice over {args.pairs} demo pairs ({what}"
                  f"{f', {args.io_steps} IO steps' if args.io_steps else ''}); misaligned = rotated 10 degrees, "
                  "shifted 8 voxels:\n\n| pairs, pre-alignment | Dice mean | std |\n|---|---|---|\n")
        table += "\n".join(f"| {name} | {m:.4f} | {s:.4f} |" for name, m, s in dice_rows(args))
    publish("bench_affine.py", "Affine pre-alignment: time and Dice", table, args.threads, args.write, argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
