"""Shared by the benchmark scripts: the machine line and appending a table to RESULTS.md."""
from __future__ import annotations

import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "RESULTS.md"


def machine_line(device: str = "cpu") -> str:
    import torch
    cpu = platform.processor() or platform.machine()
    line = f"{platform.system()} {cpu}, {os.cpu_count()} logical CPUs, torch {torch.__version__}"
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
