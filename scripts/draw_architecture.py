"""Draw the network's block diagram (Figures/architecture.png), as README.md shows it.

    python scripts/draw_architecture.py [--out Figures/architecture.png]

Five encoder levels shared by the moving and the fixed image; PoLaCA (polarity-split
cross-image attention with ALS sharpening) on levels 2-5; the coarse-to-fine estimator from
level 5 to full resolution, each level warping the moving features by the coarser field.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from utils.io import atomic_write  # noqa: E402

LEVELS = 5
ENCODER, POLACA, ESTIMATOR, IMAGE = "#cfe2f3", "#f9cb9c", "#d9ead3", "#eeeeee"


def box(ax, x, y, w, h, text, colour, size=8):
    ax.add_patch(FancyBboxPatch((x - w / 2, y - h / 2), w, h, boxstyle="round,pad=0.02,rounding_size=0.08",
                                facecolor=colour, edgecolor="#444444", linewidth=0.8))
    ax.text(x, y, text, ha="center", va="center", fontsize=size)


def arrow(ax, start, end, style="-|>", colour="#444444", dashed=False):
    ax.add_patch(FancyArrowPatch(start, end, arrowstyle=style, mutation_scale=8, color=colour, linewidth=0.8,
                                 linestyle="--" if dashed else "-", shrinkA=2, shrinkB=2))


def draw(path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(11, 5.2))
    ax.set_xlim(0, 11)
    ax.set_ylim(-0.75, 5.6)
    ax.axis("off")
    ys = [5.0 - 1.05 * i for i in range(LEVELS)]                  # level 1 (full resolution) on top
    box(ax, 0.55, 5.0, 0.9, 0.5, "moving M", IMAGE)
    box(ax, 0.55, 3.95, 0.9, 0.5, "fixed F", IMAGE)
    for i, y in enumerate(ys):
        scale = "1" if i == 0 else f"1/{2 ** i}"
        box(ax, 2.2, y, 1.5, 0.62, f"encoder level {i + 1}\n2 × (conv 3³, IN, ReLU)\n{scale} resolution", ENCODER, 7)
        if i:
            arrow(ax, (2.2, ys[i - 1] - 0.31), (2.2, y + 0.31))
    ax.text(0.55, 2.9, "one encoder,\nshared weights:\nM and F pass\nthrough it\nin turn", ha="center", va="top",
            fontsize=7.5)
    arrow(ax, (1.0, 5.0), (1.45, 5.0))
    arrow(ax, (1.0, 3.95), (1.45, 4.85))
    for i, y in enumerate(ys[1:], start=1):
        box(ax, 4.7, y, 2.3, 0.72, f"PoLaCA, level {i + 1} (3D windows)\nQ from F; K, V, gate from warped M\n"
                                   f"ALS sharpening p = 1 + α·σ(θ)", POLACA, 6.5)
        arrow(ax, (2.95, y), (3.55, y))
    box(ax, 4.7, ys[0], 2.3, 0.62, "level 1: no attention\n(features of M warped, and of F)", IMAGE, 6.5)
    arrow(ax, (2.95, ys[0]), (3.55, ys[0]))
    for i, y in enumerate(ys):
        text = ("coarsest field:\nconv([M, PoLaCA, F]) → flow head" if i == LEVELS - 1 else
                f"level {i + 1}: field ↑2 warps M's features;\nresidual field + fine branch")
        box(ax, 7.55, y, 2.2, 0.62, text, ESTIMATOR, 6.5)
        arrow(ax, (5.85, y), (6.45, y))
        if i < LEVELS - 1:
            arrow(ax, (7.55, ys[i + 1] + 0.31), (7.55, y - 0.31), colour="#38761d")
    box(ax, 10.0, ys[0], 1.4, 0.62, "displacement u\n(B, 3, D, H, W)", IMAGE, 7)
    arrow(ax, (8.65, ys[0]), (9.3, ys[0]))
    box(ax, 10.0, ys[2], 1.4, 0.62, "warped M\nM(x + u(x))", IMAGE, 7)
    arrow(ax, (10.0, ys[0] - 0.31), (10.0, ys[2] + 0.31))
    # the polarity split, spelled out
    ax.text(5.95, -0.35, "ALS: x⁺ = ReLU(x)ᵖ, x⁻ = ReLU(−x)ᵖ.  Same-sign stream: [q⁺, q⁻]·[k⁺, k⁻];  opposite-sign "
                        "stream: [q⁻, q⁺]·[k⁺, k⁻]\n(the inhibitory cue); each is linear attention over half of the "
                        "value channels.", ha="center", fontsize=7.5)
    for x, text in ((2.2, "dual-stream encoder"), (4.7, "cross-image attention"), (7.55, "coarse-to-fine estimator")):
        ax.text(x, 5.5, text, ha="center", fontsize=9, fontweight="bold")
    try:
        return atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=130, bbox_inches="tight", format="png"))
    finally:
        plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "Figures" / "architecture.png"),
                   help="PNG file to write (default Figures/architecture.png)")
    args = p.parse_args(argv)
    print(f"wrote {draw(Path(args.out))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
