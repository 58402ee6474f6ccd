"""Compare registration methods on the same test pairs: table, per-case CSVs, p-values, box plots.

    python compare.py --dataset Demo --method Initial=initial \\
        --method PLCReg=checkpoint:Results/Demo/checkpoint/last.pth \\
        --method "PLCReg+IO=checkpoint:Results/Demo/checkpoint/last.pth:io=50" \\
        --method VoxelMorph=checkpoint:Checkpoint/Demo_voxelmorph/last.pth --method SyN=syn --reference PLCReg+IO
    python compare.py --pairs pairs.csv --method Initial=initial --method "IO=io:100"    # own data

Methods: LABEL=initial | LABEL=checkpoint:FILE[:io=N] | LABEL=io:N | LABEL=syn (antspyx).
The reference (default: the first method that is not 'initial') is tested against every
other method with two-sided Wilcoxon signed-rank tests of per-case Dice and HD95.
"""
import argparse
import sys
from pathlib import Path

from engine.assembly import assemble_run
from engine.cli import EXIT_BAD_INPUT
from engine.compare import compare, parse_method
from engine.pair_items import csv_items, dataset_items
from engine.runtime import progress_setting, resolve_device
from utils.checkpoint import CheckpointError
from utils.config import PRESETS
from utils.io import DataError


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", choices=sorted(PRESETS), default="Demo", help="data set config (default Demo)")
    p.add_argument("--data-root", help="data set folder (default from utils/config.py)")
    p.add_argument("--pairs", help="CSV of own pairs (moving,fixed[,moving_label,fixed_label,name]) instead")
    p.add_argument("--method", dest="methods", action="append", required=True, metavar="LABEL=KIND[:ARG][:io=N]")
    p.add_argument("--reference", help="method tested against the others (default: first non-initial)")
    p.add_argument("--output-dir", help="default Results/Compare_<dataset>")
    p.add_argument("--max-pairs", type=int, default=0)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE")
    p.add_argument("--device", default="auto")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--overwrite", action="store_true", help="replace the results of a previous comparison")
    args = p.parse_args(argv)
    try:
        specs = [parse_method(m) for m in args.methods]
        if len({s.label for s in specs}) != len(specs):
            raise ValueError("two methods share a label")
        run = assemble_run(args.dataset, overrides=args.overrides,
                           settings={"data.root": args.data_root, "eval.max_pairs": args.max_pairs})
        device = resolve_device(args.device)
        if args.pairs:
            items, labels = csv_items(args.pairs, run, device, args.max_pairs)
            title = f"{Path(args.pairs).name}"
        else:
            items, labels = dataset_items(run, device)
            title = run.data.name
        out = Path(args.output_dir or f"Results/Compare_{'pairs' if args.pairs else args.dataset}")
        result = compare(items, specs, run, out, reference=args.reference, device=device, labels=labels,
                         title=title, progress=progress_setting(args), overwrite=args.overwrite)
    except (DataError, CheckpointError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(result["table"])
    print()
    print(f"Two-sided Wilcoxon signed-rank tests against {result['reference']}:")
    print(result["pvalue_table"])
    for label, why in result["skipped"].items():
        print(f"skipped {label}: {why}")
    print(f"\nresults in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
