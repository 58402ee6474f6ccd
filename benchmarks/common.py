"""Shared by the benchmark scripts: the timing loop, the machine line, appending a table to
RESULTS.md, and running one measurement in a child process."""
from __future__ import annotations

import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "RESULTS.md"


def cpu_model() -> str:
    """The CPU's model name and its bf16 matrix features (AMX, AVX-512-bf16)."""
    from engine.runtime import cpu_features, cpu_name
    flags = cpu_features()
    features = [f for f in ("amx_bf16", "avx512_bf16", "avx512f", "avx2") if f in flags]
    return f"{cpu_name()} ({', '.join(features) or 'no AVX-512/AMX'})"


def machine_line(device: str = "cpu") -> str:
    import torch
    line = f"{platform.system()} {cpu_model()}, {os.cpu_count()} logical CPUs, torch {torch.__version__}"
    if device == "cuda" and torch.cuda.is_available():
        line += f", {torch.cuda.get_device_name()}"
    return line


def append_results(script: str, label: str, table: str, device: str = "cpu", argv=None, extra: str = "") -> None:
    """Append a section (heading, machine, exact command, table) to benchmarks/RESULTS.md."""
    args = argv if argv is not None else sys.argv[1:]
    cmd = f"python benchmarks/{script} " + " ".join(f'"{a}"' if " " in a else a for a in args)
    with open(RESULTS, "a") as fh:
        fh.write(f"\n### {label} ({time.strftime('%Y-%m-%d')})\n\nMachine: {machine_line(device)}\n\n"
                 f"Command: `{cmd.strip()}`\n\n{table}\n" + (f"\n{extra}\n" if extra else ""))


def publish(script: str, label: str, table: str, threads: int, write: bool, argv=None, extra: str = "") -> None:
    """Print the machine line and ``table``; with ``write`` also append them to RESULTS.md."""
    print(f"{machine_line()}, {threads} threads\n\n{table}" + (f"\n\n{extra}" if extra else ""))
    if write:
        append_results(script, label, table, argv=argv, extra=extra)


def measure_in_child(script: str, child_args: list[str], what: str) -> dict:
    """Run ``script --child <child_args>`` in a fresh process (so its peak memory is its own)
    and return the JSON row it prints last; exits with its stderr when it fails."""
    import json
    import subprocess
    out = subprocess.run([sys.executable, script, "--child", *child_args], capture_output=True, text=True,
                         check=False)
    if out.returncode != 0:
        sys.exit(f"measurement of {what} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def time_and_peak(fn, warmup: int, runs: int, device) -> dict:
    """Call ``fn`` ``warmup`` times, then ``runs`` timed times (``fn`` synchronises CUDA itself).

    Returns {"times": [s, ...], "first_s": seconds of the first warm-up call (NaN without
    one; with torch.compile it includes compiling), "peak_mib": CUDA max allocated over the
    timed runs, or the process's peak RSS on the CPU}.
    """
    import resource
    import torch
    first = float("nan")
    for i in range(warmup):
        t0 = time.perf_counter()
        fn()
        if i == 0:
            first = time.perf_counter() - t0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() / 2 ** 20 if device.type == "cuda" \
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"times": times, "first_s": first, "peak_mib": peak}
