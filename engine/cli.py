"""Command lines of the per-data-set scripts: ``Train_<Set>.py`` and ``Infer_<Set>.py``.

Every value of the run's config can be set with ``--set section.field=value`` (repeatable),
e.g. ``--set train.lr=1e-4 --set model.window_size=5,6,5``; the common ones have flags.
Bad input ends with ``error: <file>: <problem>`` and exit status 2, not a traceback.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from models.registry import DEFAULT_MODEL, MODELS
from utils.checkpoint import CheckpointError
from utils.config import RunConfig
from utils.io import DataError, WriteError

from .assembly import assemble_run, checkpoint_dir, default_checkpoint, output_dir
from . import process
from .runtime import progress_setting, resolve_device

EXIT_BAD_INPUT = 2
# --freeze choice -> ModelConfig fields switched on
FREEZE_CHOICES = {"none": (), "encoder": ("freeze_encoder",), "released": ("freeze_encoder", "freeze_upsampling")}
EXIT_DIVERGED = 3


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-root", help="data set folder (default from utils/config.py)")
    p.add_argument("--device", help="auto, cpu, cuda or cuda:N (default auto)")
    p.add_argument("--seed", type=int)
    p.add_argument("--max-pairs", type=int, help="limit training items / test pairs (quick runs)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="override any config value, e.g. train.lr=1e-4 (repeatable)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the results (or checkpoints) of a previous run in the output folder")


def train_parser(dataset: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"Train_{dataset}.py", description=f"Train PLCReg on {dataset}.")
    _common(p)
    p.add_argument("--epochs", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--checkpoint-dir", help=f"default Checkpoint/{dataset}")
    p.add_argument("--resume", action="store_true", help="continue from <checkpoint-dir>/last.pth")
    p.add_argument("--init-from", help="start from another run's checkpoint (multi-task fine-tuning)")
    p.add_argument("--freeze", choices=sorted(FREEZE_CHOICES), default=None,
                   help="weights kept fixed: encoder (multi-task fine-tuning: train only the estimator), or "
                        "released (encoder and the estimator's transposed convolutions, as the released code "
                        "fine-tunes)")
    p.add_argument("--freeze-encoder", action="store_true", help="same as --freeze encoder")
    p.add_argument("--model", choices=sorted(MODELS), default=DEFAULT_MODEL,
                   help="network to train (models/registry.py): " + "; ".join(
                       f"{e.name} = {e.display}" + (f", needs {e.requires}" if e.requires else "")
                       for e in MODELS.values()) + f"; other than {DEFAULT_MODEL} the default checkpoint folder "
                   f"is Checkpoint/{dataset}_<model>")
    p.add_argument("--amp", action="store_true", help="mixed precision: bf16 on CPUs with native bf16 (AMX or "
                                                      "AVX-512-bf16) and on GPUs that have it, else fp16 with a grad "
                                                      "scaler on GPUs; float32 on other CPUs (said on the console)")
    p.add_argument("--grad-checkpointing", action="store_true", help="recompute each level in backward (less memory)")
    return p


def infer_parser(dataset: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"Infer_{dataset}.py", description=f"Evaluate PLCReg on the {dataset} test pairs.")
    _common(p)
    p.add_argument("--checkpoint", help="default <checkpoint-dir>/best.pth; 'none' = no network "
                                        "(instance optimisation from a zero field)")
    p.add_argument("--checkpoint-dir", help=f"folder of the default checkpoint (default Checkpoint/{dataset})")
    p.add_argument("--output-dir", help=f"default Results/{dataset}")
    p.add_argument("--save-nifti", action="store_true", help="write warped image, warped label and displacement")
    p.add_argument("--label-interpolation", choices=["nearest", "onehot"])
    p.add_argument("--hd95-mm", action="store_true", help="HD95 in mm (image spacing) instead of voxels")
    p.add_argument("--amp", action="store_true", help="mixed precision for the network: bf16 on CPUs with native "
                                                      "bf16 (AMX or AVX-512-bf16) and on GPUs; float32 elsewhere. "
                                                      "Fields, warping and metrics stay float32")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the network (the first pair compiles: up to 1.5 minutes on 2 CPU cores)")
    p.add_argument("--figures", action="store_true", help="write figures into <output-dir>/figures")
    p.add_argument("--l2r-out", help="also write each field in Learn2Reg's format into this folder, named as the "
                                     "challenge's evaluation looks it up (disp_<fixed>_<fixmod>_<moving>_<movmod>."
                                     "nii.gz; (D, H, W, 3) voxels on the fixed grid)")
    p.add_argument("--l2r-fixed-id", help="Learn2Reg id of an atlas whose file name carries none, for --l2r-out "
                                          "(e.g. 0395 or 0395_0000; default from data.atlas_label)")
    p.add_argument("--resume", action="store_true",
                   help="continue a stopped run in --output-dir: pairs it finished are not registered again")
    add_io_arguments(p)
    return p


def add_io_arguments(p: argparse.ArgumentParser) -> None:
    """--io-steps, --io-lr, --io-weight: instance optimisation of each pair (engine/instance_opt.py)."""
    p.add_argument("--io-steps", type=int, help="instance optimisation steps per pair (default 0 = none)")
    p.add_argument("--io-lr", type=float, help="instance optimisation learning rate (default 2.0)")
    p.add_argument("--io-weight", type=float, help="smoothness weight of instance optimisation (default 5.0)")


def io_settings(args) -> dict:
    """The --io-* flags given on the command line, as EvalConfig fields."""
    return {name: getattr(args, name) for name in ("io_steps", "io_lr", "io_weight")
            if getattr(args, name, None) is not None}


def _flag(args, name):
    return getattr(args, name, None) or None          # store_true flags count only when given


def build_run(dataset: str, args, training: bool) -> RunConfig:
    """The data set's preset with the command line applied (raises ValueError on a bad value)."""
    settings = {"data.root": args.data_root, "device": args.device, "train.seed": args.seed}
    if training:
        freeze = FREEZE_CHOICES.get("encoder" if args.freeze_encoder else args.freeze, ())
        settings.update({"train.max_pairs": args.max_pairs, "train.epochs": args.epochs, "train.lr": args.lr,
                         "checkpoint_dir": args.checkpoint_dir, "train.amp": _flag(args, "amp"),
                         "model.grad_checkpointing": _flag(args, "grad_checkpointing"),
                         **{f"model.{name}": True for name in freeze}})
    else:
        settings.update({"eval.max_pairs": args.max_pairs, "output_dir": args.output_dir,
                         "checkpoint_dir": args.checkpoint_dir,
                         "eval.label_interpolation": args.label_interpolation,
                         "eval.hd95_spacing": _flag(args, "hd95_mm"), "eval.amp": _flag(args, "amp"),
                         "eval.compile": _flag(args, "compile"), "data.l2r_fixed_id": args.l2r_fixed_id,
                         **{f"eval.{k}": v for k, v in io_settings(args).items()}})
    return assemble_run(dataset, model=getattr(args, "model", DEFAULT_MODEL), overrides=args.overrides,
                        settings=settings)


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return EXIT_BAD_INPUT


def _parse(dataset: str, argv, training: bool):
    """(args, run), or (None, exit status) after printing the error of a bad setting."""
    args = (train_parser if training else infer_parser)(dataset).parse_args(argv)
    try:
        return args, build_run(dataset, args, training=training)
    except ValueError as exc:
        return None, _fail(str(exc))


def train_main(dataset: str, argv=None) -> int:
    args, run = _parse(dataset, argv, training=True)
    if args is None:
        return run
    from . import distributed as ddp
    from .train import Trainer, TrainingDiverged, TrainingInterrupted
    process.for_training(resolve_device(run.device), run.model.grad_checkpointing)
    trainer = None
    try:
        trainer = Trainer(run, resume=args.resume, overwrite=args.overwrite, init_from=args.init_from,
                          progress=progress_setting(args))
        trainer.fit()
        if trainer.ctx.distributed:
            sums = ddp.gather_objects(trainer.weights_checksum(), trainer.ctx)
            if trainer.ctx.is_main:
                same = len(set(sums)) == 1
                print(f"weights {'identical' if same else 'DIFFER'} on {trainer.ctx.world_size} ranks "
                      f"(checksums {sums})")
    except WriteError as exc:
        last = checkpoint_dir(run) / "last.pth"
        kept = (f"; the last complete checkpoint {last} is kept: continue with --resume once the file can be "
                f"written" if last.is_file() else "")
        return _fail(f"{exc}{kept}")
    except (DataError, CheckpointError, ModuleNotFoundError) as exc:
        return _fail(str(exc))
    except TrainingInterrupted as exc:
        if trainer is None or trainer.ctx.is_main:
            print(f"stopped by {exc}", file=sys.stderr)
        return 128 + int(exc.signum)
    except TrainingDiverged as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_DIVERGED
    finally:
        ddp.teardown()
    if trainer.ctx.is_main:
        print(f"checkpoints in {checkpoint_dir(run)} (best validation Dice {trainer.best:.4f})")
    return 0


def infer_main(dataset: str, argv=None) -> int:
    process.for_inference()       # before the first tensor: PyTorch reads the page setting once
    args, run = _parse(dataset, argv, training=False)
    if args is None:
        return run
    from . import distributed as ddp
    from .infer import FinishedPairs, infer
    checkpoint = Path(args.checkpoint) if args.checkpoint else default_checkpoint(run)
    try:
        result = infer(run, checkpoint, save_nifti=args.save_nifti, progress=progress_setting(args),
                       figures=args.figures, overwrite=args.overwrite, l2r_out=args.l2r_out, resume=args.resume)
    except WriteError as exc:
        partial = FinishedPairs(output_dir(run) / "partial")
        return _fail(f"{exc}; {partial.count()} finished pair(s) are kept in {partial.folder}: continue with "
                     f"--resume once the file can be written")
    except (DataError, CheckpointError, ValueError) as exc:
        return _fail(str(exc))
    finally:
        ddp.teardown()
    if result["table"] is None:                 # a rank other than 0 of a torchrun
        return 0
    print(result["table"])
    print(f"results in {result['paths']['summary_json'].parent}")
    return 0
