"""Register your own images with a trained PLCReg checkpoint.

    python register.py --moving M.nii.gz --fixed F.nii.gz --checkpoint Checkpoint/OASIS/best.pth --out-dir out
    python register.py --pairs pairs.csv --checkpoint C.pth --out-dir out      # columns: moving,fixed[,moving_label,fixed_label,name]
    python register.py --moving M.nii.gz --fixed F.nii.gz --checkpoint none --io-steps 50 --out-dir out
    python register.py --moving M.mha --fixed F.nii.gz --checkpoint C.pth --export itk,l2r --inverse --out-dir out

Each pair is first aligned affinely (--affine; none for images aligned already), then
registered deformably on the fixed grid. Images: NIfTI, and .mha/.nrrd/DICOM folders with
SimpleITK installed. Outputs (fixed image's geometry): <name>_warped.nii.gz,
<name>_displacement.nii.gz, <name>_affine.txt (the pre-alignment, ITK format),
<name>_warped_label.nii.gz (with --moving-label), per_case.csv, summary.csv, summary.json.
Dice and HD95 are reported when both label maps are given.
"""
import argparse
import sys

from engine.cli import EXIT_BAD_INPUT, add_io_arguments, io_settings
from engine.register import PairFiles, read_pairs_csv, register_files
from engine import process
from engine.runtime import progress_setting
from utils.affine import AFFINE_KINDS, ALIGNMENT_METRICS, AlignmentSettings
from utils.checkpoint import CheckpointError
from utils.io import DataError


def main(argv=None) -> int:
    process.for_inference()       # before the first tensor: PyTorch reads the page setting once
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--moving", help="moving image (NIfTI)")
    p.add_argument("--fixed", help="fixed image (NIfTI); outputs take its grid")
    p.add_argument("--moving-label", default="", help="moving label map (warped and scored)")
    p.add_argument("--fixed-label", default="", help="fixed label map (for Dice and HD95)")
    p.add_argument("--pairs", help="CSV of pairs instead of --moving/--fixed")
    p.add_argument("--checkpoint", required=True, help="PLCReg checkpoint, or 'none' for instance optimisation alone")
    p.add_argument("--out-dir", required=True)
    p.add_argument("--device", default="auto")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--overwrite", action="store_true", help="replace the results of a previous run in --out-dir")
    p.add_argument("--affine", choices=AFFINE_KINDS, default="affine",
                   help="pre-alignment before the network (default affine): rigid (6 degrees of freedom), affine "
                        "(12) or none (the images are aligned by their headers already)")
    p.add_argument("--affine-metric", choices=sorted(ALIGNMENT_METRICS), default="ncc",
                   help="similarity of the pre-alignment: ncc (same modality, default) or mi (mutual "
                        "information, e.g. T1 to T2 or CT to MR)")
    p.add_argument("--inverse", action="store_true",
                   help="also the inverse transform: <name>_inverse_displacement.nii.gz and the fixed image on the "
                        "moving grid, <name>_inverse_warped.nii.gz; inverse consistency in per_case.csv")
    p.add_argument("--export", default="", help="also write the transform for other tools, comma-separated: itk "
                                                "(ITK/ANTs displacement field in LPS mm, with <name>_affine.txt), l2r "
                                                "(Learn2Reg's disp_<fixed>_<moving>.nii.gz)")
    add_io_arguments(p)
    args = p.parse_args(argv)
    if bool(args.pairs) == bool(args.moving or args.fixed):
        p.error("give either --pairs, or --moving and --fixed")
    if not args.pairs and not (args.moving and args.fixed):
        p.error("--moving and --fixed are both required")
    io = io_settings(args)
    try:
        pairs = read_pairs_csv(args.pairs) if args.pairs else \
            [PairFiles(args.moving, args.fixed, args.moving_label, args.fixed_label)]
        result = register_files(pairs, args.checkpoint, args.out_dir, io_settings=io, device=args.device,
                                progress=progress_setting(args), overwrite=args.overwrite,
                                exports=[e for e in args.export.split(",") if e], alignment=args.affine,
                                alignment_settings=AlignmentSettings(metric=args.affine_metric),
                                inverse=args.inverse)
    except (DataError, CheckpointError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(result["table"])
    print(f"outputs in {args.out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
