"""This checkout's network against another version of the project, side by side in one run.

Each measurement runs in a fresh child process (its peak memory its own), the two versions
alternating so that a machine's drift hits both alike: a full-size pair by default, float32
and, with ``--amp``, bf16 where the CPU has it. Both versions get the same process settings
(glibc's heap returned at once, no huge pages), the same random weights and the same pair.

    git worktree add /tmp/previous HEAD~1        # or: git archive HEAD~1 | tar -x -C /tmp/previous
    python benchmarks/bench_versions.py --other /tmp/previous --amp --rounds 3
    ONEDNN_MAX_CPU_ISA=AVX2 python benchmarks/bench_versions.py --other /tmp/previous   # as an AVX2-only CPU

Prints per version and precision the median and minimum seconds per pair and the peak RSS,
and the ratio of this checkout's medians and peaks to the other's.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import publish  # noqa: E402
from benchmarks.bench_inference import parse_size  # noqa: E402

_CHILD = r"""
import json, sys, statistics
sys.path.insert(0, {tree!r})
try:
    from engine.process import limit_heap_retention
except ImportError:
    from engine.runtime import limit_heap_retention
import torch
limit_heap_retention()
torch.set_num_threads({threads})
from benchmarks.common import time_and_peak
from models import build_model
from utils.config import ModelConfig
torch.manual_seed(0)
model = build_model(ModelConfig()).eval()
g = torch.Generator().manual_seed(0)
moving, fixed = (torch.rand(1, 1, *{size!r}, generator=g) for _ in range(2))
amp = {amp}
def run():
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
        return model(moving, fixed)
m = time_and_peak(run, {warmup}, {runs}, torch.device("cpu"))
print(json.dumps({{"times": m["times"], "peak_mib": m["peak_mib"]}}))
"""


def measure(tree: Path, size, amp: bool, args) -> dict:
    code = _CHILD.format(tree=str(tree), threads=args.threads, size=tuple(size), amp=amp, warmup=args.warmup,
                         runs=args.runs)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=str(tree))
    if out.returncode != 0:
        raise SystemExit(f"{tree}: the measurement failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--other", required=True, type=Path, help="a checkout of the version to compare with")
    p.add_argument("--size", type=parse_size, default=(160, 224, 192))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3, help="alternating child processes per version")
    p.add_argument("--runs", type=int, default=2, help="timed passes per child process")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--amp", action="store_true", help="also bf16 (CPU autocast), where the CPU has native bf16")
    p.add_argument("--write", action="store_true", help="append the table to benchmarks/RESULTS.md")
    p.add_argument("--label", default="This version against another, side by side")
    args = p.parse_args(argv)
    if not (args.other / "models").is_dir():
        p.error(f"--other {args.other}: not a checkout of this project (no models/ folder)")
    from models.backend import cpu_has_native_bf16
    precisions = [False] + ([True] if args.amp and cpu_has_native_bf16() else [])
    trees = {"this": ROOT, "other": args.other.resolve()}
    results = {(name, amp): {"times": [], "peaks": []} for name in trees for amp in precisions}
    for _ in range(args.rounds):
        for amp in precisions:
            for name, tree in trees.items():
                m = measure(tree, args.size, amp, args)
                results[name, amp]["times"] += m["times"]
                results[name, amp]["peaks"].append(m["peak_mib"])
    rows = ["| version | precision | median s/pair | min s | peak MiB (max) | time ratio this/other | peak ratio |",
            "|---|---|---|---|---|---|---|"]
    for amp in precisions:
        medians = {name: statistics.median(results[name, amp]["times"]) for name in trees}
        peaks = {name: max(results[name, amp]["peaks"]) for name in trees}
        for name in trees:
            r = results[name, amp]
            ratio = (f"{medians['this'] / medians['other']:.3f}", f"{peaks['this'] / peaks['other']:.3f}") \
                if name == "this" else ("", "")
            rows.append(f"| {name} | {'bf16' if amp else 'fp32'} | {medians[name]:.2f} | {min(r['times']):.2f} | "
                        f"{peaks[name]:.0f} | {ratio[0]} | {ratio[1]} |")
    size = "x".join(map(str, args.size))
    table = f"Size {size}, {args.threads} threads, {args.rounds} alternating processes x {args.runs} passes each.\n\n" \
        + "\n".join(rows)
    publish("bench_versions.py", args.label, table, args.threads, args.write, argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
