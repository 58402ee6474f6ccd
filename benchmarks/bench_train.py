"""Training-step time and peak memory: forward + NCC/Grad loss + backward + Adam step, one pair.

Each (size, network, variant) runs in a fresh child process so that its peak memory is its
own (peak RSS on the CPU, max allocated on CUDA). Variants: fp32, gradient checkpointing
(``ckpt``) and, on CUDA, mixed precision (``amp``, bf16 where supported) with and without it.

    python benchmarks/bench_train.py                                   # OASIS size, default network, CPU
    python benchmarks/bench_train.py --sizes 80x96x80 --networks default light --write
    python benchmarks/bench_train.py --device cuda --write              # fp32 / ckpt / amp / amp+ckpt
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import append_results, measure_in_child, time_and_peak  # noqa: E402

NETWORKS = {"default": {}, "light": {"widths": (8, 16, 32, 64, 128)}}


def measure(args) -> dict:
    import torch

    from engine.objective import Objective
    from engine.process import keeps_training_heap, reuse_heap_memory
    from engine.runtime import amp_dtype, autocast
    from models import build_model
    from utils.config import ModelConfig, TrainConfig

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    ckpt, amp = "ckpt" in args.variant, "amp" in args.variant
    keep_heap = device.type == "cpu" and {"trainer": keeps_training_heap(device, ckpt), "reuse": True,
                                          "plain": False}[args.heap]
    if keep_heap:
        reuse_heap_memory()
    model = build_model(ModelConfig(window_size=tuple(args.window), grad_checkpointing=ckpt,
                                    **NETWORKS[args.network])).to(device).train()
    objective = Objective(TrainConfig(), range(1, 36))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    dtype = amp_dtype(device, amp)
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)
    size = tuple(int(v) for v in args.size.split("x"))
    g = torch.Generator().manual_seed(0)
    moving, fixed = (torch.rand(1, 1, *size, generator=g).to(device) for _ in range(2))

    def step():
        with autocast(device, dtype):
            u = model(moving, fixed)
        loss, _ = objective(moving, fixed, u.float())
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        if device.type == "cuda":
            torch.cuda.synchronize()

    m = time_and_peak(step, args.warmup, args.runs, device)
    variant = args.variant + (", plain heap" if device.type == "cpu" and not keep_heap else "")
    return {"size": args.size, "network": args.network, "variant": variant, "device": device.type,
            "threads": args.threads, "params_M": sum(p.numel() for p in model.parameters()) / 1e6,
            "median_s": statistics.median(m["times"]), "min_s": min(m["times"]), "peak_mib": m["peak_mib"]}


def format_table(rows: list[dict]) -> str:
    head = ("| size | network | variant | device | threads | params (M) | median s/step | min s | peak MiB |\n"
            "|---|---|---|---|---|---|---|---|---|")
    return "\n".join([head] + [f"| {r['size']} | {r['network']} | {r['variant']} | {r['device']} | {r['threads']} | "
                               f"{r['params_M']:.2f} | {r['median_s']:.3f} | {r['min_s']:.3f} | {r['peak_mib']:.0f} |"
                               for r in rows])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", nargs="+", default=["160x224x192"])
    p.add_argument("--networks", nargs="+", choices=sorted(NETWORKS), default=["default"])
    p.add_argument("--variants", nargs="+", help="fp32, ckpt, amp, amp+ckpt (default: all that apply)")
    p.add_argument("--window", nargs=3, type=int, default=[5, 7, 6])
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--heap", choices=["trainer", "reuse", "plain", "both"], default="trainer",
                   help="CPU: as the trainer decides (kept unless checkpointing), keep freed memory in the heap "
                        "for the next step (reuse), leave glibc's settings alone (plain), or measure both side by side")
    p.add_argument("--write", action="store_true", help="append the table to benchmarks/RESULTS.md")
    p.add_argument("--label", default="")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--size", help=argparse.SUPPRESS)
    p.add_argument("--network", help=argparse.SUPPRESS)
    p.add_argument("--variant", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(measure(args)))
        return
    variants = args.variants or (["fp32", "ckpt", "amp", "amp+ckpt"] if args.device.startswith("cuda")
                                 else ["fp32", "ckpt"])
    # the heap setting is the CPU process's; on CUDA "both" would measure one setting twice
    heaps = ["reuse", "plain"] if args.heap == "both" and args.device == "cpu" else [args.heap]
    rows = []
    for size in args.sizes:
        for network in args.networks:
            for variant in variants:
                for heap in heaps:
                    child = ["--size", size, "--network", network, "--variant", variant, "--device", args.device,
                             "--threads", str(args.threads), "--runs", str(args.runs), "--warmup", str(args.warmup),
                             "--window", *map(str, args.window), "--heap", heap]
                    rows.append(measure_in_child(__file__, child, f"{size} {network} {variant} {heap}"))
                    print(format_table(rows[-1:]).splitlines()[-1], flush=True)
    table = format_table(rows)
    print()
    print(table)
    if args.write:
        append_results("bench_train.py", args.label or "Training step, one pair", table, args.device, argv)


if __name__ == "__main__":
    main()
