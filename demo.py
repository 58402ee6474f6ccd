"""The main job on the embedded demo data: build it, train PLCReg on the CPU, infer, report, draw.

    python demo.py            # about 6 minutes on 2 CPU cores (5 of them training)
    python demo.py --quick    # under a minute: 4 mm data, a few training steps (used by the tests)

1. Builds a demo data set in the OASIS layout from the embedded MNI ICBM152 template
   (utils/demo_data.py) unless it is already there.
2. Trains PLCReg (the lighter CPU configuration: widths 8/16/32/64/128) for a time budget.
3. Registers every test subject to the atlas, prints the summary table (initial vs registered
   Dice, HD95, %|J|<=0, SDlogJ, seconds per pair) and writes per-case and summary files.
4. Writes figures: registration panels, deformation grid, Jacobian map, per-structure Dice
   box plot, training curves.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from engine.assembly import assemble_run
from engine.infer import infer
from engine import process
from engine.runtime import progress_setting, resolve_device
from engine.train import Trainer
from models.registry import DEFAULT_MODEL, MODELS
from utils.config import RunConfig
from utils.demo_data import DemoSettings, write_demo_dataset
from utils.checkpoint import CheckpointError
from utils.io import DataError

ROOT = Path(__file__).resolve().parent


def demo_run(args) -> RunConfig:
    """The 'Demo' preset (utils/config.py) with this run's folders, budget and seed."""
    # a short CPU budget: the preset warms the learning rate up (the first Adam steps otherwise
    # throw the coarse fields far off), takes both directions of an atlas item as one batch and
    # spends the first part of the budget at half resolution (steps about 8x cheaper); the
    # VoxelMorph baseline gets the same data, loss, schedule and budget
    settings = {"data.root": str(args.data_dir), "train.epochs": 1000, "train.max_minutes": args.minutes,
                "train.seed": args.seed, "train.half_res_fraction": args.half_res, "device": args.device,
                "checkpoint_dir": str(args.out_dir / "checkpoint"), "output_dir": str(args.out_dir)}
    if args.quick:
        settings.update({"data.image_size": (40, 48, 40), "data.val_subjects": 1})
    if args.widths and args.model == DEFAULT_MODEL:
        settings["model.widths"] = tuple(args.widths)
    return assemble_run("Demo", model=args.model, settings=settings)


def run_demo(args, run: RunConfig) -> dict:
    """Train, then infer (and infer again with instance optimisation); prints the tables and
    returns the first inference's result."""
    print(f"training {run.model.arch} (widths {run.model.widths}) for {args.minutes:g} min on {run.device}")
    progress = progress_setting(args)
    process.for_training(resolve_device(run.device), run.model.grad_checkpointing)
    trainer = Trainer(run, progress=progress, overwrite=args.overwrite)
    trainer.fit()
    process.for_inference()
    result = infer(run, None, model=trainer.model, index=trainer.index, progress=progress, figures=True,
                   train_log=trainer.dir / "train_log.csv", overwrite=args.overwrite)
    print()
    print(result["table"])
    if args.io_steps:
        run.eval.io_steps = args.io_steps
        run.output_dir = str(args.out_dir / "with_io")
        with_io = infer(run, None, model=trainer.model, index=trainer.index, progress=progress,
                        overwrite=args.overwrite)
        print()
        print(with_io["table"])
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="4 mm data, few subjects, a short training (for tests)")
    p.add_argument("--minutes", type=float, help="training time budget (default 5; 0.4 with --quick)")
    p.add_argument("--data-dir", type=Path, help="demo data folder (default data/demo_dataset[_quick])")
    p.add_argument("--out-dir", type=Path, help="results folder (default Results/Demo[_quick])")
    p.add_argument("--half-res", type=float,
                   help="fraction of the training budget spent at half resolution (default 0.6; 0 with --quick, "
                        "whose 4 mm volumes are small already)")
    p.add_argument("--io-steps", type=int, default=50,
                   help="instance optimisation steps per pair for the second table (default 50; 0 = skip)")
    p.add_argument("--model", choices=sorted(MODELS), default=DEFAULT_MODEL,
                   help="network to train (models/registry.py; voxelmorph needs requirements-baselines.txt)")
    p.add_argument("--widths", nargs=5, type=int, help="PLCReg widths (default the light 8 16 32 64 128; "
                                                        "the paper's network is 16 32 64 128 256)")
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--overwrite", action="store_true", help="replace the results and checkpoints of a previous demo run")
    args = p.parse_args(argv)
    suffix = "_quick" if args.quick else ""
    args.data_dir = args.data_dir or ROOT / "data" / f"demo_dataset{suffix}"
    args.out_dir = args.out_dir or ROOT / "Results" / f"Demo{suffix}"
    args.minutes = args.minutes if args.minutes is not None else (0.4 if args.quick else 5.0)
    args.half_res = args.half_res if args.half_res is not None else (0.0 if args.quick else 0.6)
    t_start = time.time()

    try:
        run = demo_run(args)             # settings checked before the data set is built
        if not (args.data_dir / "DONE").is_file():
            settings = DemoSettings(downsample=2 if args.quick else 1)
            n_train, n_test = (4, 2) if args.quick else (24, 6)
            print(f"building the demo data set in {args.data_dir} ({n_train} training and {n_test} test subjects)")
            write_demo_dataset(args.data_dir, n_train, n_test, seed=args.seed, settings=settings)
        result = run_demo(args, run)
    except (DataError, CheckpointError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    paths = result["paths"]["figures"]
    print(f"\nresults: {result['paths']['summary_json'].parent}")
    print("figures: " + ", ".join(str(p.relative_to(args.out_dir)) for p in paths))
    print(f"wall time: {time.time() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
