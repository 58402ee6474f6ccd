"""Accuracy per second on the embedded demo data: networks x instance-optimisation steps (+ SyN).

For each network checkpoint given (e.g. trained for 5 and for 20 CPU minutes with
``python demo.py --minutes N``), for no network at all, and for each number of
instance-optimisation steps, registers the demo test pairs and prints Dice, HD95, %|J|<=0
and seconds per pair (network + IO); ANTs SyN too with ``--syn`` when antspyx is installed.
Writes a Dice-versus-seconds figure and, with ``--write``, the table to RESULTS.md.

    python demo.py --out-dir Results/Demo                         # a 5-minute network
    python demo.py --minutes 20 --out-dir Results/Demo20         # a 20-minute network
    python benchmarks/bench_accuracy.py --checkpoint "5 min=Results/Demo/checkpoint/last.pth" \\
        --checkpoint "20 min=Results/Demo20/checkpoint/last.pth" --syn --write
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from benchmarks.common import append_results  # noqa: E402
from engine.assembly import assemble_run  # noqa: E402
from engine.compare import MethodSpec, compare  # noqa: E402
from engine.pair_items import dataset_items  # noqa: E402


def specs_for(checkpoints: list[tuple[str, str]], steps: list[int], syn: bool) -> list[tuple[str, int, MethodSpec]]:
    """(group, io steps, spec) for every network x IO steps, IO alone, the identity and SyN."""
    out = [("initial", 0, MethodSpec("Initial", "initial"))]
    for label, path in checkpoints:
        out += [(label, n, MethodSpec(f"{label}, IO {n}", "checkpoint", path, n)) for n in steps]
    out += [("no network", n, MethodSpec(f"no network, IO {n}", "io", "", n)) for n in steps if n > 0]
    if syn:
        out.append(("SyN", 0, MethodSpec("ANTs SyN", "syn")))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", action="append", default=[], metavar="LABEL=FILE")
    p.add_argument("--io-steps", nargs="+", type=int, default=[0, 25, 50, 100, 200])
    p.add_argument("--syn", action="store_true", help="also ANTs SyN (antspyx)")
    p.add_argument("--data-root", default=str(ROOT / "data" / "demo_dataset"))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--output-dir", default=str(ROOT / "Results" / "BenchAccuracy"))
    p.add_argument("--write", action="store_true", help="append the table to benchmarks/RESULTS.md")
    p.add_argument("--overwrite", action="store_true", help="replace the results of a previous run in --output-dir")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    checkpoints = [tuple(c.split("=", 1)) for c in args.checkpoint]
    run = assemble_run("Demo", settings={"data.root": args.data_root})
    items, labels = dataset_items(run, torch.device("cpu"))
    plan = specs_for(checkpoints, args.io_steps, args.syn)
    result = compare(items, [s for _, _, s in plan], run, args.output_dir, reference="Initial", labels=labels,
                     title="demo", progress=False, overwrite=args.overwrite)
    rows = []
    for group, steps, spec in plan:
        res = result["results"].get(spec.label)
        if res is None:
            continue
        s = res["summary"]
        rows.append({"group": group, "io": steps, "label": spec.label, "dice": s["dice"]["mean"],
                     "dice_std": s["dice"]["std"], "hd95": s["hd95"]["mean"], "fold": s["pct_nonpos_jac"]["mean"],
                     "seconds": s["seconds"]["mean"]})
    head = "| method | IO steps | Dice | HD95 | %\\|J\\|<=0 | s/pair (network + IO) |\n|---|---|---|---|---|---|"
    table = "\n".join([head] + [f"| {r['group']} | {r['io']} | {r['dice']:.4f} ± {r['dice_std']:.4f} | "
                                f"{r['hd95']:.3f} | {r['fold']:.4f} | {r['seconds']:.3f} |" for r in rows])
    print(table)
    for label, why in result["skipped"].items():
        print(f"skipped {label}: {why}")
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for group in dict.fromkeys(r["group"] for r in rows):
        pts = [r for r in rows if r["group"] == group]
        ax.plot([r["seconds"] for r in pts], [r["dice"] for r in pts], marker="o", label=group)
        for r in pts:
            if group not in ("initial", "SyN"):
                ax.annotate(str(r["io"]), (r["seconds"], r["dice"]), fontsize=7, xytext=(3, -9),
                            textcoords="offset points")
    ax.set_xscale("symlog", linthresh=0.1)
    ax.set_xlabel(f"seconds per pair ({args.threads} CPU threads)")
    ax.set_ylabel("mean Dice over the demo test pairs")
    ax.set_title("Dice vs seconds (numbers: instance-optimisation steps)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig_path = Path(args.output_dir) / "dice_vs_seconds.png"
    fig.savefig(fig_path, dpi=120)
    print(f"figure: {fig_path}")
    if args.write:
        append_results("bench_accuracy.py", f"Accuracy per second on the demo data, {args.threads} CPU threads",
                       table, "cpu", argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
