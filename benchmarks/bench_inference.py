"""Inference speed and memory of PLCReg for one pair: prints a table, optionally appends it to RESULTS.md.

Each (size, variant) is measured in a fresh child process so that its peak memory is its own:
peak RSS on the CPU, max allocated on CUDA. Seconds are the median over ``--runs`` after
``--warmup`` passes, with ``torch.inference_mode()`` (synchronised on CUDA). GMACs are
torch's flop counter (convolutions and matrix products) divided by two, counted once on
the meta device (shapes only).

    python benchmarks/bench_inference.py                       # OASIS size, 2 CPU threads
    python benchmarks/bench_inference.py --sizes 160x192x160 --threads 2 --runs 3
    python benchmarks/bench_inference.py --device cuda --amp --write
    python benchmarks/bench_inference.py --compile        # eager and torch.compile side by side

With ``--compile`` each size is measured twice, eager and compiled (``torch.compile``,
fixed shapes); the first compiled call (compilation included) is reported apart.
With ``--reference`` each size is also measured on the reference network
(``PLCREG_KERNELS=reference``: plain PyTorch layers, both images encoded as one batch,
concatenated inputs, attention over the whole volume at once). Same weights, same field: the
ratio to the default row is the gain of the CPU kernels, in one run.
With ``--profile N`` each row also runs one pass under the PyTorch profiler and prints the N
operators that take the most time (grouped by input shapes), for finding the next bottleneck,
and the pass's time by the grid each operator works on (full size, half size, smaller, or no
volume input such as gathers and linear layers).
With ``--released-compat`` each size is also measured with ``model.released_compat`` on (the
released code's function, for its converted weights), beside the default network.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import append_results, measure_in_child, time_and_peak  # noqa: E402

DATASET_SIZES = {"OASIS": (160, 224, 192), "LPBA40": (160, 192, 160), "IXI": (160, 192, 224)}


def parse_size(text: str) -> tuple[int, int, int]:
    parts = tuple(int(v) for v in text.lower().split("x"))
    if len(parts) != 3:
        raise argparse.ArgumentTypeError(f"size must look like 160x224x192, got {text!r}")
    return parts


def measure(args) -> dict:
    """Runs in the child process: one size, one variant."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from models import build_model
    from models.plcreg import padded_size
    from utils.config import ModelConfig

    from engine.process import limit_heap_retention, prefer_huge_pages
    if args.huge_pages:
        prefer_huge_pages()               # as the scripts do with PLCREG_HUGE_PAGES=1, before the first tensor
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if not args.plain_heap:
        limit_heap_retention()            # as Infer_*.py and register.py do
    config = ModelConfig(window_size=tuple(args.window), widths=tuple(args.widths), released_compat=args.compat)
    model = build_model(config).to(device).eval()
    params = sum(p.numel() for p in model.parameters())
    size = parse_size(args.size)
    g = torch.Generator().manual_seed(0)
    moving = torch.rand(1, 1, *size, generator=g).to(device)
    fixed = torch.rand(1, 1, *size, generator=g).to(device)
    from engine.runtime import amp_dtype as mixed_precision, autocast, precision_name
    dtype = mixed_precision(device, args.amp)       # bf16 on CPUs with native bf16, as --amp in the scripts
    if args.compiled:
        from engine.runtime import compile_model
        compile_model(model)

    from models.backend import use_kernels
    kernels = "reference" if args.plain else "auto"

    def run():
        with torch.inference_mode(), use_kernels(kernels), autocast(device, dtype):
            u = model(moving, fixed)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return u

    m = time_and_peak(run, args.warmup, args.runs, device)
    top_ops, by_size = profile_ops(run, args.profile, math.prod(padded_size(size))) if args.profile else ([], [])
    gmacs = float("nan")
    if args.flops:
        # counted on the meta device: shapes only, no memory, and every conv goes through
        # the op the counter sees (the CPU path calls oneDNN directly)
        meta_model = build_model(config).to("meta").eval()
        meta_input = torch.empty(1, 1, *size, device="meta")
        counter = FlopCounterMode(display=False)
        with torch.inference_mode(), counter:
            meta_model(meta_input, meta_input)
        gmacs = counter.get_total_flops() / 2e9
    return {"size": "x".join(map(str, size)), "device": device.type, "threads": args.threads,
            "amp": precision_name(dtype) + (", compiled" if args.compiled else "")
            + (", reference" if args.plain else "") + (", released-compatible" if args.compat else ""),
            "first_call_s": m["first_s"] if args.compiled else float("nan"), "params_M": params / 1e6,
            "gmacs": gmacs, "median_s": statistics.median(m["times"]), "min_s": min(m["times"]),
            "peak_mib": m["peak_mib"],
            "runs": args.runs, "profile": top_ops, "by_size": by_size}


def _shapes_text(shapes) -> str:
    """The first two tensor shapes of an operator's inputs, e.g. '1x16x160x224x192, 16x16x3x3x3'."""
    tensors = [s for s in shapes if isinstance(s, (list, tuple)) and s and all(isinstance(v, int) for v in s)]
    return ", ".join("x".join(map(str, s)) for s in tensors[:2])


_SIZE_CLASSES = ("full size", "half size", "smaller", "no volume input")


def _size_class(shapes, voxels: int) -> str:
    """Which grid an operator works on: that of its largest (B, C, D, H, W) input, as full size,
    half size (8x fewer voxels), smaller, or none (rows and tokens: gathers, linear layers)."""
    volumes = [math.prod(s[2:]) for s in shapes
               if isinstance(s, (list, tuple)) and len(s) == 5 and all(isinstance(v, int) for v in s)]
    if not volumes:
        return _SIZE_CLASSES[3]
    halvings = math.log2(voxels / max(volumes)) / 3
    return _SIZE_CLASSES[0] if halvings < 0.5 else _SIZE_CLASSES[1] if halvings < 1.5 else _SIZE_CLASSES[2]


def profile_ops(run, top: int, voxels: int) -> tuple[list[dict], list[dict]]:
    """One more pass under the PyTorch profiler: the ``top`` operators (by input shapes) with the
    most CPU time of their own, each with its share of the pass's total; and that time by the
    grid each operator works on (:func:`_size_class`; ``voxels`` = the network's full grid),
    with the three heaviest operators of each."""
    from torch.profiler import profile
    with profile(record_shapes=True) as prof:
        run()
    events = prof.key_averages(group_by_input_shape=True)
    total = sum(e.self_cpu_time_total for e in events) or 1.0
    classes = {name: {} for name in _SIZE_CLASSES}
    for e in events:
        ops = classes[_size_class(e.input_shapes, voxels)]
        ops[e.key] = ops.get(e.key, 0.0) + e.self_cpu_time_total
    by_size = [{"inputs": name, "self_s": sum(ops.values()) / 1e6, "share": sum(ops.values()) / total,
                "heaviest": [(op, t / 1e6) for op, t in sorted(ops.items(), key=lambda kv: -kv[1])[:3]]}
               for name, ops in classes.items() if ops]
    events = sorted(events, key=lambda e: -e.self_cpu_time_total)[:top]
    return [{"op": e.key, "shapes": _shapes_text(e.input_shapes), "calls": e.count,
             "self_s": e.self_cpu_time_total / 1e6, "share": e.self_cpu_time_total / total} for e in events], by_size


def format_profile(row: dict) -> str:
    head = (f"Where the time goes: {row['size']}, {row['amp']} (one pass under the profiler, CPU time of each "
            "operator itself)\n\n| operator | inputs | calls | s | share |\n|---|---|---|---|---|")
    table = "\n".join([head] + [f"| {o['op']} | {o['shapes']} | {o['calls']} | {o['self_s']:.3f} | "
                                f"{100 * o['share']:.1f} % |" for o in row["profile"]])
    sizes = ("By grid (each operator at its largest (B, C, D, H, W) input; the same pass)\n\n"
             "| grid | s | share | heaviest operators (s) |\n|---|---|---|---|\n"
             + "\n".join(f"| {c['inputs']} | {c['self_s']:.3f} | {100 * c['share']:.1f} % | "
                         + ", ".join(f"{op} {t:.3f}" for op, t in c["heaviest"]) + " |" for c in row["by_size"]))
    return f"{table}\n\n{sizes}"


def format_table(rows: list[dict]) -> str:
    head = "| size | device | threads | precision | params (M) | GMACs | median s/pair | min s | peak MiB |"
    sep = "|---|---|---|---|---|---|---|---|---|"
    body = [f"| {r['size']} | {r['device']} | {r['threads']} | {r['amp']} | {r['params_M']:.2f} | "
            f"{r['gmacs']:.1f} | {r['median_s']:.3f} | {r['min_s']:.3f} | {r['peak_mib']:.0f} |" for r in rows]
    return "\n".join([head, sep, *body])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", nargs="+", default=["x".join(map(str, DATASET_SIZES["OASIS"]))],
                   help="volume sizes DxHxW (default: OASIS 160x224x192)")
    p.add_argument("--window", nargs=3, type=int, default=[5, 7, 6], help="PoLaCA window (default OASIS)")
    p.add_argument("--widths", nargs=5, type=int, default=[16, 32, 64, 128, 256],
                   help="encoder widths (default: the paper's; the light CPU network is 8 16 32 64 128)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--amp", action="store_true", help="also measure mixed precision (bf16 on CPUs with native bf16 "
                                                      "and on GPUs that have it, else fp16 on GPUs)")
    p.add_argument("--compile", action="store_true", help="also measure the network under torch.compile")
    p.add_argument("--reference", action="store_true", help="also measure the reference network (no CPU kernels)")
    p.add_argument("--released-compat", action="store_true",
                   help="also measure the released-compatible network (model.released_compat)")
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="also profile one pass and print the N operators with the most time")
    p.add_argument("--no-flops", dest="flops", action="store_false")
    p.add_argument("--plain-heap", action="store_true", help="leave glibc's malloc settings alone")
    p.add_argument("--huge-pages", action="store_true",
                   help="ask for transparent huge pages (engine.process.prefer_huge_pages), as PLCREG_HUGE_PAGES=1 does")
    p.add_argument("--write", action="store_true", help="append the table to benchmarks/RESULTS.md")
    p.add_argument("--label", default="", help="heading for RESULTS.md")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--size", help=argparse.SUPPRESS)
    p.add_argument("--compiled", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--plain", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--compat", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.child:
        print(json.dumps(measure(args)))
        return
    rows = []
    variants = [(amp, compiled, False, False) for compiled in ([False, True] if args.compile else [False])
                for amp in ([False, True] if args.amp else [False])]
    variants += [(False, False, True, False)] if args.reference else []
    variants += [(False, False, False, True)] if args.released_compat else []
    for size in args.sizes:
        for amp, compiled, plain, compat in variants:
            child = ["--size", size, "--device", args.device, "--threads", str(args.threads), "--runs", str(args.runs),
                     "--warmup", str(args.warmup), "--window", *map(str, args.window), "--widths", *map(str, args.widths)]
            child += (["--amp"] if amp else []) + ([] if args.flops else ["--no-flops"]) \
                + (["--plain-heap"] if args.plain_heap else []) + (["--huge-pages"] if args.huge_pages else []) \
                + (["--compiled"] if compiled else []) + (["--plain"] if plain else []) \
                + (["--compat"] if compat else []) + (["--profile", str(args.profile)] if args.profile else [])
            rows.append(measure_in_child(__file__, child, size))
            print(format_table(rows[-1:]).splitlines()[-1], flush=True)
    table = format_table(rows)
    firsts = [f"{r['size']} {r['amp']}: {r['first_call_s']:.1f} s" for r in rows if r.get("first_call_s") == r.get("first_call_s")]
    extra = ("First compiled call (compilation included): " + "; ".join(firsts) + ".") if firsts else ""
    profiles = "\n\n".join(format_profile(r) for r in rows if r.get("profile"))
    extra = "\n\n".join(part for part in (extra, profiles) if part)
    print()
    print(table)
    if extra:
        print(extra)
    if args.write:
        append_results("bench_inference.py", args.label or "Inference, one pair", table, args.device, argv, extra)


if __name__ == "__main__":
    main()
