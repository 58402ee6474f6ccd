"""The released PLCReg code and ours side by side: seconds and peak memory per pair, one run.

    python benchmarks/bench_released.py --released-code ../PLCReg                 # OASIS size, 2 threads
    python benchmarks/bench_released.py --released-code ../PLCReg --write --figure Figures/speed_side_by_side.png
    python benchmarks/bench_released.py --released-code ../PLCReg --amp      # ours in bf16 too, a third row

Each row runs in a fresh child process (its peak RSS is its own): the released network as its
inference script runs it (``torch.no_grad``, float32; its ``Model/`` imported from the given
checkout, see benchmarks/released_code.py), then ours (``Infer_<Set>.py``'s path, float32).
Both get the same random pair; ratios are taken within this one run.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import append_results, cpu_model, measure_in_child, time_and_peak  # noqa: E402


def measure(args) -> dict:
    """In the child: one network, one size."""
    import torch

    from engine import process
    from engine.runtime import amp_dtype, autocast
    if args.which == "ours":
        process.for_inference()       # as Infer_*.py and register.py do, before the first tensor
    torch.set_num_threads(args.threads)
    size = tuple(args.size)
    g = torch.Generator().manual_seed(0)
    moving, fixed = torch.rand(1, 1, *size, generator=g), torch.rand(1, 1, *size, generator=g)
    if args.which == "released":
        from benchmarks.released_code import released_network
        net, mode = released_network(args.released_code, size).eval(), torch.no_grad
    else:
        from models import build_model
        from utils.config import ModelConfig
        net, mode = build_model(ModelConfig(window_size=(5, 7, 6))).eval(), torch.inference_mode

    dtype = None
    if args.amp:
        dtype = amp_dtype(torch.device("cpu"), True)      # bf16 where the CPU has it natively, else None

    def run():
        with mode(), autocast(torch.device("cpu"), dtype):
            return net(moving, fixed)

    m = time_and_peak(run, args.warmup, args.runs, torch.device("cpu"))
    return {"which": args.which + (", bf16" if dtype is not None else ""),
            "median_s": statistics.median(m["times"]), "min_s": min(m["times"]),
            "peak_mib": m["peak_mib"], "params_M": sum(p.numel() for p in net.parameters()) / 1e6}


ROW_NAMES = {"released": "released code", "ours": "this project", "ours, bf16": "this project, bf16"}


def figure(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = [ROW_NAMES[r["which"]].replace(", ", "\n") for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(7.5, 3.2))
    for ax, key, label in ((axes[0], "median_s", "seconds per pair"), (axes[1], "peak_mib", "peak memory (MiB)")):
        bars = ax.bar(names, [r[key] for r in rows], color=["#999999", "#2a7ab9", "#6bb0e0"][:len(rows)])
        ax.bar_label(bars, fmt="%.1f" if key == "median_s" else "%.0f")
        ax.set_ylabel(label)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--released-code", type=Path, required=True, help="checkout of the released repository")
    p.add_argument("--size", type=int, nargs=3, default=[160, 224, 192])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--runs", type=int, default=2)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--amp", action="store_true",
                   help="also run ours in bf16 (CPU autocast, on CPUs with native bf16), a third row")
    p.add_argument("--write", action="store_true", help="append the table to benchmarks/RESULTS.md")
    p.add_argument("--figure", type=Path, help="write a bar chart of both rows")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--which", choices=["released", "ours"], help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(measure(args)))
        return 0
    rows = []
    for which, amp in (("released", False), ("ours", False)) + ((("ours", True),) if args.amp else ()):
        child = ["--which", which, "--released-code", str(args.released_code), "--size", *map(str, args.size),
                 "--threads", str(args.threads), "--runs", str(args.runs), "--warmup", str(args.warmup)]
        rows.append(measure_in_child(__file__, child + (["--amp"] if amp else []), which))
        print(rows[-1], flush=True)
    size = "x".join(map(str, args.size))
    table = "\n".join(["| network | size | threads | params (M) | median s/pair | min s | peak MiB |",
                       "|---|---|---|---|---|---|---|"] +
                      [f"| {ROW_NAMES[r['which']]} | {size} | "
                       f"{args.threads} | {r['params_M']:.2f} | {r['median_s']:.2f} | {r['min_s']:.2f} | "
                       f"{r['peak_mib']:.0f} |" for r in rows])
    extra = " ".join(f"{ROW_NAMES[r['which']].capitalize()} / released in this run: "
                     f"{r['median_s'] / rows[0]['median_s']:.3f}x the time, "
                     f"{r['peak_mib'] / rows[0]['peak_mib']:.3f}x the peak memory." for r in rows[1:])
    print(table)
    print(extra)
    if args.figure:
        figure(rows, args.figure, f"one {size} pair, {args.threads} CPU threads, float32; {cpu_model()}")
    if args.write:
        # a local path means nothing on another machine: the checkout is named generically
        recorded = ["<checkout of the released repository>" if a == str(args.released_code) else a
                    for a in (argv if argv is not None else sys.argv[1:])]
        append_results("bench_released.py", "The released code and ours side by side, one pair", table, "cpu",
                       recorded, extra)
    return 0


if __name__ == "__main__":
    sys.exit(main())
