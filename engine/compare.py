"""Compare registration methods on the very same pairs with the same metrics (``compare.py``).

Methods are given as ``LABEL=KIND[:ARGUMENT][:io=N]``:

- ``Initial=initial``: the identity (no registration), the floor;
- ``PLCReg=checkpoint:Checkpoint/OASIS/best.pth``: any checkpoint of this project
  (PLCReg, or VoxelMorph trained with ``Train_<Set>.py --model voxelmorph``); add ``:io=50``
  for instance optimisation on top;
- ``IO=io:100``: instance optimisation alone, from a zero field;
- ``SyN=syn``: ANTs SyN through the optional ``antspyx`` package.

A method whose optional package or file is missing is skipped with a message. Writes the
comparison table (Markdown and CSV), one per-case CSV per method, two-sided Wilcoxon
signed-rank p-values of the reference method against every other one (per-case Dice and
HD95; Markdown, CSV and a heat map) and per-structure Dice box plots with one box per method.
"""
from __future__ import annotations

import copy
import json
import math
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from models import load_model
from utils import figures
from utils.checkpoint import CheckpointError
from utils.config import RunConfig
from utils.io import DataError
from utils.outputs import ResultFolder

from .evaluate import csv_text, evaluate_pair, summarise, write_text
from .infer import register_tensors
from .runtime import PeakMemory, bar_disabled, provenance
from .stats import paired_wilcoxon

KINDS = ("initial", "checkpoint", "io", "syn")
TESTED_METRICS = (("dice", "Dice"), ("hd95", "HD95"))


@dataclass
class MethodSpec:
    label: str
    kind: str
    argument: str = ""
    io_steps: int = 0


def parse_method(text: str) -> MethodSpec:
    """``LABEL=KIND[:ARGUMENT][:io=N]`` (see the module docstring); ValueError when malformed."""
    label, sep, rest = text.partition("=")
    if not sep or not label.strip() or not rest:
        raise ValueError(f"method {text!r}: expected LABEL=KIND[:ARGUMENT][:io=N], e.g. PLCReg=checkpoint:best.pth")
    parts = rest.split(":")
    kind, args, io_steps = parts[0].strip(), [], 0
    for part in parts[1:]:
        m = re.fullmatch(r"io=(\d+)", part.strip())
        if m:
            io_steps = int(m.group(1))
        else:
            args.append(part)
    if kind not in KINDS:
        raise ValueError(f"method {text!r}: unknown kind {kind!r}; expected one of {KINDS}")
    argument = ":".join(args)
    if kind == "checkpoint" and not argument:
        raise ValueError(f"method {text!r}: give the checkpoint file, e.g. {label}=checkpoint:best.pth")
    if kind == "io":
        if not argument.isdigit() or int(argument) < 1:
            raise ValueError(f"method {text!r}: give the number of steps, e.g. {label}=io:100")
        io_steps, argument = int(argument), ""
    return MethodSpec(label.strip(), kind, argument, io_steps)


def slug(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.+-]+", "_", label).strip("_") or "method"


# ---------------------------------------------------------------------------
# methods: each turns a pair (tensors on a device) into a displacement in our convention
# ---------------------------------------------------------------------------
class Method:
    """register(moving, fixed) -> (u (1, 3, D, H, W) float32, seconds)."""
    parameters: int | None = None

    def __init__(self, spec: MethodSpec, run: RunConfig, device: torch.device):
        self.spec, self.device = spec, device
        self.run = copy.deepcopy(run)
        self.run.eval.io_steps = spec.io_steps

    def register(self, moving, fixed):
        raise NotImplementedError


class Identity(Method):
    parameters = 0

    def register(self, moving, fixed):
        return torch.zeros((fixed.shape[0], 3, *fixed.shape[2:]), device=fixed.device), 0.0


class Network(Method):
    """A checkpoint of this project (PLCReg or VoxelMorph), or none (instance optimisation alone)."""

    def __init__(self, spec, run, device):
        super().__init__(spec, run, device)
        self.model = None
        self.parameters = 0
        if spec.kind == "checkpoint":
            self.model, _ = load_model(spec.argument)
            self.model = self.model.to(device).eval()
            self.parameters = sum(p.numel() for p in self.model.parameters())

    def register(self, moving, fixed):
        u, info = register_tensors(self.model, self.run, moving, fixed)
        return u, info["seconds"] + info.get("io_seconds", 0.0)


class SyN(Method):
    """ANTs SyN (antspyx), images in voxel space; the field is read back by warping the
    moving grid's index coordinates, so it is exactly our convention."""
    PAD = 16

    def __init__(self, spec, run, device):
        super().__init__(spec, run, device)
        os.environ.setdefault("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", str(torch.get_num_threads()))
        try:
            import ants
        except ImportError as exc:
            raise ModuleNotFoundError(f"ANTs SyN needs the optional package antspyx "
                                      f"(pip install -r requirements-baselines.txt): {exc}") from exc
        self.ants = ants

    def register(self, moving, fixed):
        ants = self.ants
        mov, fix = (x[0, 0].detach().cpu().double().numpy() for x in (moving, fixed))
        t0 = time.perf_counter()
        f, m = ants.from_numpy(fix), ants.from_numpy(mov)
        transforms = ants.registration(fixed=f, moving=m, type_of_transform=self.spec.argument or "SyN")["fwdtransforms"]
        seconds = time.perf_counter() - t0
        # index coordinates on a grid padded by PAD voxels (origin -PAD), so that points mapped
        # just outside the volume still read their own coordinate instead of a fill value
        pad = self.PAD
        grid = np.indices(tuple(n + 2 * pad for n in fix.shape), dtype=np.float64) - pad
        inner = tuple(slice(pad, pad + n) for n in fix.shape)
        u = np.stack([ants.apply_transforms(fixed=f, moving=ants.from_numpy(grid[i], origin=(-float(pad),) * 3),
                                            transformlist=transforms, interpolator="linear").numpy()
                      - grid[i][inner] for i in range(3)])
        return torch.from_numpy(u.astype(np.float32))[None].to(fixed.device), seconds


def build_method(spec: MethodSpec, run: RunConfig, device: torch.device) -> Method:
    if spec.kind == "initial":
        return Identity(spec, run, device)
    if spec.kind == "syn":
        return SyN(spec, run, device)
    return Network(spec, run, device)


# ---------------------------------------------------------------------------
# the comparison
# ---------------------------------------------------------------------------
COLUMNS = [("dice", "Dice", "{:.4f}"), ("hd95", "HD95", "{:.3f}"), ("pct_nonpos_jac", "%|J|<=0", "{:.4f}"),
           ("sdlogj", "SDlogJ", "{:.4f}"), ("seconds", "s/pair", "{:.3f}")]


def comparison_rows(results: dict) -> list[dict]:
    rows = []
    for label, res in results.items():
        s = res["summary"]
        row = {"method": label, "cases": s["n_cases"]}
        for key, _, _ in COLUMNS:
            row[f"{key}_mean"] = s.get(key, {}).get("mean", math.nan)
            row[f"{key}_std"] = s.get(key, {}).get("std", math.nan)
        row["peak_mib"] = res["peak_mib"]
        row["parameters"] = res["parameters"]
        rows.append(row)
    return rows


def comparison_markdown(rows: list[dict], title: str) -> str:
    head = "| method | cases | " + " | ".join(h for _, h, _ in COLUMNS) + " | peak MiB | parameters |"
    lines = [f"**{title}**", "", head, "|---" * (len(COLUMNS) + 4) + "|"]
    for r in rows:
        cells = [f"{f.format(r[k + '_mean'])} ± {f.format(r[k + '_std'])}" for k, _, f in COLUMNS]
        params = "-" if r["parameters"] is None else f"{r['parameters'] / 1e6:.2f} M" if r["parameters"] else "0"
        lines.append(f"| {r['method']} | {r['cases']} | " + " | ".join(cells) + f" | {r['peak_mib']:.0f} | {params} |")
    return "\n".join(lines)


def pvalue_rows(results: dict, reference: str) -> list[dict]:
    """Wilcoxon tests of the reference against every other method, per tested metric."""
    ref = results[reference]["rows"]
    out = []
    for label, res in results.items():
        if label == reference:
            continue
        for key, name in TESTED_METRICS:
            a = np.array([r.get(key, math.nan) for r in ref], dtype=np.float64)
            b = np.array([r.get(key, math.nan) for r in res["rows"]], dtype=np.float64)
            out.append({"reference": reference, "method": label, "metric": name, **paired_wilcoxon(a, b)})
    return out


def pvalue_markdown(rows: list[dict]) -> str:
    lines = ["| reference | method | metric | n | median difference | W | p | note |", "|---" * 8 + "|"]
    for r in rows:
        lines.append(f"| {r['reference']} | {r['method']} | {r['metric']} | {r['n']} | {r['median_difference']:.4f} | "
                     f"{r['statistic']:.1f} | {r['p']:.3g} | {r['note']} |")
    return "\n".join(lines)


def compare(items, specs: list[MethodSpec], run: RunConfig, out_dir, *, reference: str | None = None,
            device: torch.device | None = None, labels=None, title: str = "comparison",
            progress: bool | None = None, log=print, overwrite: bool = False) -> dict:
    """Register every item (dicts of tensors: moving, fixed[, moving_label, fixed_label], name)
    with every method; write and return the tables.

    ``items`` is a list (it is traversed once per method). Methods that cannot be built
    (missing optional package or checkpoint) are skipped with a message in ``skipped``.
    """
    device = device or torch.device("cpu")
    with ResultFolder.claim(out_dir, overwrite, log=log) as folder:
        out_dir = Path(out_dir)
        labels = list(labels if labels is not None else run.data.labels)
        results, skipped = {}, {}
        for spec in specs:
            try:
                method = build_method(spec, run, device)
            except (ModuleNotFoundError, CheckpointError, DataError) as exc:
                skipped[spec.label] = str(exc)
                log(f"skipping {spec.label}: {exc}")
                continue
            rows = []
            with PeakMemory(device) as peak:
                for item in tqdm(items, desc=spec.label, disable=bar_disabled(progress)):
                    u, seconds = method.register(item["moving"], item["fixed"])
                    row, _ = evaluate_pair(u, item.get("moving_label"), item.get("fixed_label"), labels,
                                           run.eval.label_interpolation)
                    rows.append({"case": item["name"], **row, "seconds": seconds})
            results[spec.label] = {"rows": rows, "summary": summarise(rows), "peak_mib": peak.mib,
                                   "parameters": method.parameters}
            columns = list(dict.fromkeys(k for r in rows for k in r))
            write_text(out_dir / f"per_case_{slug(spec.label)}.csv", csv_text(rows, columns))
        if not results:
            raise ValueError("no method could be run: " + "; ".join(f"{k}: {v}" for k, v in skipped.items()))
        reference = reference or next((label for label, s in zip(results, specs) if s.kind != "initial"), None) \
            or next(iter(results))
        if reference not in results:
            raise ValueError(f"reference method {reference!r} is not among the methods run: {sorted(results)}")
        table_rows = comparison_rows(results)
        table = comparison_markdown(table_rows, f"{title}: {len(items)} pairs")
        tests = pvalue_rows(results, reference)
        paths = {
            "table_md": write_text(out_dir / "comparison.md", table + "\n"),
            "table_csv": write_text(out_dir / "comparison.csv", csv_text(table_rows, list(table_rows[0]))),
            "pvalues_md": write_text(out_dir / "pvalues.md", pvalue_markdown(tests) + "\n"),
            "pvalues_csv": write_text(out_dir / "pvalues.csv", csv_text(tests, list(tests[0]) if tests else ["method"])),
        }
        if tests:
            others = [m for m in results if m != reference]
            grid = np.array([[next(t["p"] for t in tests if t["method"] == m and t["metric"] == name)
                              for _, name in TESTED_METRICS] for m in others])
            paths["pvalues_png"] = figures.pvalue_heatmap(grid, others, [n for _, n in TESTED_METRICS],
                                                          out_dir / "figures" / "pvalues.png",
                                                          f"Wilcoxon signed-rank vs {reference} (two-sided)")
        per_structure = {label: np.array([[r.get(f"dice_{v}", math.nan) for v in labels] for r in res["rows"]])
                         for label, res in results.items()}
        if labels and any(np.isfinite(a).any() for a in per_structure.values()):
            paths["boxplot"] = figures.methods_boxplot(per_structure, labels, out_dir / "figures" / "dice_per_structure.png",
                                                       f"Dice per structure over {len(items)} pairs")
        write_text(out_dir / "comparison.json", json.dumps(
            {"methods": [vars(s) for s in specs], "skipped": skipped, "reference": reference, **provenance(device),
             "config": run.to_dict(), "table": table_rows, "pvalues": tests}, indent=2, default=str))
        folder.finish(log=log)
    return {"results": results, "skipped": skipped, "table": table, "pvalues": tests,
            "pvalue_table": pvalue_markdown(tests), "paths": paths, "reference": reference}


__all__ = ["MethodSpec", "parse_method", "compare", "build_method", "KINDS"]
