"""Metrics of one registered pair, their summary over a test set, and the result files."""
from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

import numpy as np
import torch

from utils.io import atomic_write
from utils.metrics import dice_per_label, hd95_per_label, jacobian_stats
from utils.spatial import warp_labels

# summary columns, in table order: (key, heading, format)
SUMMARY_COLUMNS = [
    ("dice_initial", "Dice (initial)", "{:.4f}"),
    ("dice", "Dice", "{:.4f}"),
    ("hd95", "HD95", "{:.3f}"),
    ("pct_nonpos_jac", "%|J|<=0", "{:.4f}"),
    ("sdlogj", "SDlogJ", "{:.4f}"),
    ("seconds", "s/pair", "{:.3f}"),
    ("end_to_end_seconds", "end-to-end s/pair", "{:.3f}"),
    ("dice_before_io", "Dice before IO", "{:.4f}"),
    ("pct_nonpos_jac_before_io", "%|J|<=0 before IO", "{:.4f}"),
    ("io_seconds", "IO s/pair", "{:.3f}"),
]


def evaluate_pair(u: torch.Tensor, moving_label: torch.Tensor | None, fixed_label: torch.Tensor | None,
                  labels, label_interpolation: str = "nearest", spacing=None,
                  warped_label: torch.Tensor | None = None) -> tuple[dict, torch.Tensor | None]:
    """Metrics of one displacement: (row dict, warped moving label or None).

    The row holds mean Dice (registered and initial), per-label Dice ``dice_<label>``, mean HD95
    and the Jacobian statistics. Without labels only the Jacobian statistics are given.
    ``warped_label`` (B, 1, D, H, W), when given, is scored instead of warping ``moving_label`` by ``u``
    (a transform that holds more than ``u``, e.g. a pre-alignment).
    """
    row = dict(jacobian_stats(u))
    warped = None
    if moving_label is not None and fixed_label is not None:
        warped = warped_label if warped_label is not None else \
            warp_labels(moving_label, u.float(), label_interpolation, label_values=labels)
        per_label = dice_per_label(warped, fixed_label, labels)
        initial = dice_per_label(moving_label, fixed_label, labels)
        hd = hd95_per_label(warped, fixed_label, labels, spacing)
        row["dice"] = _nanmean(per_label)
        row["dice_initial"] = _nanmean(initial)
        row["hd95"] = _nanmean(hd)
        for lab, d, d0 in zip([v for v in labels if v != 0], per_label, initial):
            row[f"dice_{lab}"] = d
            row[f"dice_initial_{lab}"] = d0
    return row, warped


def label_dice(u: torch.Tensor, moving_label, fixed_label, labels, label_interpolation: str = "nearest") -> float:
    """Mean Dice over ``labels`` after warping the moving label map by ``u`` (NaN without labels)."""
    if moving_label is None or fixed_label is None:
        return float("nan")
    warped = warp_labels(moving_label, u.float(), label_interpolation, label_values=labels)
    return _nanmean(dice_per_label(warped, fixed_label, labels))


def mean_dice(label: torch.Tensor, fixed_label: torch.Tensor, labels) -> float:
    """Mean Dice over ``labels`` of two label maps on one grid."""
    return _nanmean(dice_per_label(label, fixed_label, labels))


def _nanmean(a) -> float:
    a = np.asarray(a, dtype=np.float64)
    return float(np.nanmean(a)) if np.isfinite(a).any() else float("nan")


def summarise(rows: list[dict]) -> dict:
    """Mean and std (over cases, NaN cases left out) of every numeric column, plus n."""
    keys = [k for k in rows[0] if isinstance(rows[0][k], (int, float, np.floating))] if rows else []
    out = {"n_cases": len(rows)}
    for k in keys:
        vals = np.array([r.get(k, np.nan) for r in rows], dtype=np.float64)
        finite = vals[np.isfinite(vals)]
        out[k] = {"mean": float(finite.mean()) if finite.size else float("nan"),
                  "std": float(finite.std()) if finite.size else float("nan"), "n": int(finite.size)}
    return out


def format_summary_table(summary: dict, title: str = "") -> str:
    """The summary as a Markdown table of mean ± std."""
    cols = [(k, h, f) for k, h, f in SUMMARY_COLUMNS if k in summary]
    head = "| cases | " + " | ".join(h for _, h, _ in cols) + " |"
    sep = "|---" * (len(cols) + 1) + "|"
    cells = [f"{f.format(summary[k]['mean'])} ± {f.format(summary[k]['std'])}" for k, _, f in cols]
    lines = ([f"**{title}**", ""] if title else []) + [head, sep, f"| {summary['n_cases']} | " + " | ".join(cells) + " |"]
    return "\n".join(lines)


def csv_text(rows: list[dict], columns: list[str]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: _fmt(r.get(k, "")) for k in columns})
    return buf.getvalue()


def _fmt(v):
    """A CSV cell: plain numbers (numpy scalars as Python numbers, never their repr)."""
    if isinstance(v, (np.floating, float)):
        v = float(v)
        return "nan" if math.isnan(v) else repr(v)
    if isinstance(v, np.integer):
        return int(v)
    return v


def write_text(path, text: str) -> Path:
    def write(tmp):
        with open(tmp, "w") as fh:
            fh.write(text)
    return atomic_write(path, write)


def write_results(out_dir, rows: list[dict], summary: dict, meta: dict) -> dict[str, Path]:
    """per_case.csv (one row per pair), summary.csv and summary.json (with ``meta``)."""
    out_dir = Path(out_dir)
    columns = list(dict.fromkeys(k for r in rows for k in r))
    paths = {"per_case": write_text(out_dir / "per_case.csv", csv_text(rows, columns))}
    metric_rows = [{"metric": k, "mean": v["mean"], "std": v["std"], "n": v["n"]}
                   for k, v in summary.items() if isinstance(v, dict)]
    paths["summary_csv"] = write_text(out_dir / "summary.csv", csv_text(metric_rows, ["metric", "mean", "std", "n"]))
    paths["summary_json"] = write_text(out_dir / "summary.json",
                                       json.dumps({**meta, "summary": summary}, indent=2, default=_json_default))
    return paths


def _json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
