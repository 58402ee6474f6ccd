"""Apply a saved transform to any image or label map, onto a reference image's grid.

    # the moving image (or any image in its space) onto the fixed grid, as register.py did
    python warp.py --input M.nii.gz --reference F.nii.gz --out M_on_F.nii.gz \
        -t out/M_to_F_displacement.nii.gz -t out/M_to_F_affine.txt
    # a label map the same way (nearest neighbour; --label-interpolation onehot for smoother edges)
    python warp.py --input M_seg.nii.gz --label --reference F.nii.gz --out seg_on_F.nii.gz -t ... -t ...
    # the fixed image onto the moving grid, with the inverse (register.py --inverse)
    python warp.py --input F.nii.gz --reference M.nii.gz --out F_on_M.nii.gz \
        -t "[out/M_to_F_affine.txt,1]" -t out/M_to_F_inverse_displacement.nii.gz

Transforms are listed as antsApplyTransforms lists them; ITK/ANTs displacement fields
(millimetres, LPS) and affines (.txt, .mat) are read too. Inputs: NIfTI, and .mha/.nrrd/DICOM
folders with SimpleITK installed. The output is NIfTI with the reference's geometry.
"""
import argparse
import sys

from engine.apply_transform import FIELD_UNITS, apply_transforms
from engine.cli import EXIT_BAD_INPUT
from engine.runtime import resolve_device
from utils.io import DataError
from utils.spatial import LABEL_INTERPOLATIONS


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, help="image or label map to resample")
    p.add_argument("--reference", required=True, help="image whose grid (and geometry) the output takes")
    p.add_argument("--out", required=True, help="output NIfTI (.nii.gz or .nii)")
    p.add_argument("-t", "--transform", action="append", default=[], metavar="FILE",
                   help="displacement field or affine, in antsApplyTransforms order (repeatable); [FILE,1] "
                        "inverts an affine; none given: resampling through the headers only")
    p.add_argument("--field-units", choices=FIELD_UNITS, default="auto",
                   help="units of the displacement fields: auto (as the file says: this project's fields are in "
                        "voxels, ITK/ANTs (X, Y, Z, 1, 3) vector images in LPS millimetres), voxels (component i "
                        "along array axis i) or mm (LPS, as ITK)")
    p.add_argument("--label", action="store_true", help="the input is a label map (values kept)")
    p.add_argument("--label-interpolation", choices=LABEL_INTERPOLATIONS, default="nearest")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--device", default="auto")
    args = p.parse_args(argv)
    try:
        path = apply_transforms(args.input, args.reference, args.transform, args.out, label=args.label,
                                label_interpolation=args.label_interpolation, overwrite=args.overwrite,
                                device=resolve_device(args.device), units=args.field_units,
                                log=lambda m: print(m, file=sys.stderr))
    except (DataError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
