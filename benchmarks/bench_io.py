"""Instance optimisation on the demo: Dice against seconds per pair for several schedules, in one run.

The demo's test pairs (``data/demo_dataset``, built by ``demo.py``) start from a checkpoint's
field; each schedule refines it (``engine/instance_opt.py``). Rows: the coarse grid only
(2x coarser, as before coarse-to-fine existed), full resolution only, and coarse to fine
(coarse steps, then ``fine`` steps at full resolution with their own step size, weight and
smoothing: the defaults of ``EvalConfig``). Dice, %|J|<=0 and seconds are means over pairs.

    python benchmarks/bench_io.py --checkpoint Results/Demo/checkpoint/best.pth
    python benchmarks/bench_io.py --checkpoint ... --write --figure Figures/io_dice_vs_seconds.png
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import publish  # noqa: E402

# (name, coarse steps, coarse scale, fine steps)
SCHEDULES = [("coarse only, 50 steps", 50, 2, 0), ("coarse only, 100 steps", 100, 2, 0),
             ("full resolution only, 20 steps", 20, 1, 0), ("full resolution only, 100 steps", 100, 1, 0),
             ("coarse to fine, 20 + 12", 20, 2, 12), ("coarse to fine, 40 + 12", 40, 2, 12),
             ("coarse to fine, 60 + 12", 60, 2, 12), ("coarse to fine, 40 + 20", 40, 2, 20)]


def draw(rows, path, threads: int) -> None:
    """Dice against seconds per pair (log scale), one marker per schedule family."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter
    styles = {"coarse only": ("o", "tab:blue"), "full resolution only": ("s", "tab:red"),
              "coarse to fine": ("^", "tab:green")}
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for i, (name, d, _, s) in enumerate(rows[1:]):
        kind, steps = name.split(", ")
        marker, color = styles[kind]
        ax.scatter(s, d, marker=marker, color=color)
        ax.annotate(steps, (s, d), textcoords="offset points", xytext=[(5, 6), (5, -11), (-8, -20)][i % 3], fontsize=7)
    for kind, (marker, color) in styles.items():
        ax.scatter([], [], marker=marker, color=color, label=kind)
    ax.axhline(rows[0][1], color="grey", lw=0.8, ls="--", label=f"network only ({rows[0][1]:.3f})")
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}" if v in (2, 3, 5, 20) else ""))
    ax.set_ylim(min(d for _, d, _, _ in rows[1:]) - 0.03, max(d for _, d, _, _ in rows[1:]) + 0.015)
    ax.set_xlabel(f"seconds per pair ({threads} CPU threads)")
    ax.set_ylabel("mean Dice")
    ax.set_title("Instance optimisation on the 2 mm demo")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--data-root", default=str(ROOT / "data" / "demo_dataset"))
    p.add_argument("--pairs", type=int, default=6)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--write", action="store_true", help="append the table to benchmarks/RESULTS.md")
    p.add_argument("--figure", help="also draw Dice against seconds into this PNG")
    args = p.parse_args(argv)
    import numpy as np
    import torch

    from engine.assembly import assemble_run
    from engine.evaluate import label_dice
    from engine.instance_opt import instance_optimise
    from models import load_model
    from utils.config import EvalConfig
    from utils.datasets import VolumeCache, discover
    from utils.metrics import jacobian_stats
    torch.set_num_threads(args.threads)
    run = assemble_run("Demo", settings={"data.root": args.data_root, "device": "cpu"})
    cache = VolumeCache(run.data)
    model, _ = load_model(args.checkpoint)
    model.eval()
    pairs = []
    for pair in discover(run.data, None, run.train.seed).test_pairs()[:args.pairs]:
        t = cache.pair_tensors(pair, "cpu")
        with torch.inference_mode():
            pairs.append((t, model(t["moving"], t["fixed"]).float().clone()))
    e, labels = EvalConfig(), run.data.labels

    def score(u, t):
        return label_dice(u, t["moving_label"], t["fixed_label"], labels), jacobian_stats(u)["pct_nonpos_jac"]

    rows = [("network only", *np.mean([score(u, t) for t, u in pairs], axis=0), 0.0)]
    for name, steps, scale, fine in SCHEDULES:
        results = []
        for t, u in pairs:
            t0 = time.perf_counter()
            out = instance_optimise(t["moving"], t["fixed"], u, steps=steps, lr=e.io_lr, reg_weight=e.io_weight,
                                    ncc_window=e.io_ncc_window, scale=scale, smoothing=e.io_smoothing,
                                    fine_steps=fine, fine_lr=e.io_fine_lr, fine_reg_weight=e.io_fine_weight,
                                    fine_smoothing=e.io_fine_smoothing)
            results.append((*score(out.u, t), time.perf_counter() - t0))
        rows.append((name, *np.mean(results, axis=0)))
    table = "| schedule | Dice | %\\|J\\|<=0 | s/pair |\n|---|---|---|---|\n" + "\n".join(
        f"| {name} | {d:.4f} | {j:.4f} | {s:.2f} |" for name, d, j, s in rows)
    table = f"{len(pairs)} demo pairs, checkpoint {args.checkpoint}:\n\n{table}"
    publish("bench_io.py", "Instance optimisation: Dice against seconds", table, args.threads, args.write, argv)
    if args.figure:
        draw(rows, args.figure, args.threads)
    return 0


if __name__ == "__main__":
    sys.exit(main())
