"""Convert the authors' released PLCReg checkpoint into this project's checkpoint format.

    python scripts/convert_released.py final.pth.tar Checkpoint/OASIS/released.pth
    python scripts/convert_released.py lpba.pth.tar Checkpoint/LPBA40/released.pth --window 5,6,5

The file is read without executing anything in it (tensors and plain values only). Every
tensor is mapped onto our network (models/released.py has the table); the 24 LayerNorm
tensors the released forward never uses are dropped (and listed); a missing, unexpected or
misshapen tensor stops the conversion with its name. The result has ``released_compat`` on,
so ``Infer_OASIS.py --checkpoint DST`` and ``register.py --checkpoint DST`` compute the released
network's fields, and ``Train_<Set>.py --init-from DST --freeze released`` fine-tunes it as the
released code does.
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.factory import convert_released  # noqa: E402
from utils.checkpoint import CheckpointError  # noqa: E402
from utils.io import DataError  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", help="released checkpoint (a dict with 'state_dict', or a bare state dict)")
    p.add_argument("dst", help="our checkpoint to write")
    p.add_argument("--window", default="5,7,6", help="attention window of the data set (OASIS 5,7,6; LPBA40 "
                                                     "5,6,5; IXI 5,6,7): not stored in the released file")
    p.add_argument("--alpha", type=float, default=15.0, help="ALS range of the released config (default 15)")
    p.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    args = p.parse_args(argv)
    try:
        window = tuple(int(v) for v in args.window.replace("x", ",").split(","))
        if len(window) != 3 or min(window) < 1:
            raise ValueError
    except ValueError:
        print(f"error: --window {args.window!r}: expected three positive integers, e.g. 5,7,6", file=sys.stderr)
        return 2
    if Path(args.dst).exists() and Path(args.src).exists() and Path(args.dst).samefile(args.src):
        print(f"error: {args.dst}: is the file being converted; write the converted checkpoint to another file",
              file=sys.stderr)
        return 2
    if Path(args.dst).exists() and not args.overwrite:
        print(f"error: {args.dst}: exists; add --overwrite to replace it", file=sys.stderr)
        return 2
    try:
        path, dropped = convert_released(args.src, args.dst, window, args.alpha)
    except (CheckpointError, DataError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"dropped {len(dropped)} tensor(s) the released forward never uses: {', '.join(dropped)}")
    print(f"wrote {path} (released_compat on)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
