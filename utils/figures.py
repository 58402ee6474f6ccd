"""Figures of a registration (matplotlib, Agg backend; every function writes one PNG).

Slices are taken through the middle of the volume in the three planes of the array axes
(axis 0, 1 and 2 fixed in turn); arrays are (D, H, W) numpy arrays or tensors.
"""
from __future__ import annotations

import csv
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import TwoSlopeNorm  # noqa: E402

from .checks import as_numpy, as_spatial_field  # noqa: E402
from .io import atomic_write  # noqa: E402

PLANES = ("axis 0", "axis 1", "axis 2")


def _vol(x) -> np.ndarray:
    a = as_numpy(x, np.float64)
    while a.ndim > 3:
        a = a[0]
    return a


def _slice(vol: np.ndarray, axis: int, index: int | None = None) -> np.ndarray:
    index = vol.shape[axis] // 2 if index is None else index
    return np.rot90(np.take(vol, index, axis=axis))


def _save(fig, path) -> Path:
    try:
        return atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, bbox_inches="tight", format="png"))
    finally:
        plt.close(fig)


def registration_panels(moving, fixed, warped, path, title: str = "") -> Path:
    """Moving / fixed / warped / |warped - fixed| (and |moving - fixed|) in three planes."""
    m, f, w = _vol(moving), _vol(fixed), _vol(warped)
    cols = [("moving", m, "gray"), ("fixed", f, "gray"), ("warped", w, "gray"),
            ("|moving - fixed|", np.abs(m - f), "magma"), ("|warped - fixed|", np.abs(w - f), "magma")]
    vmax_diff = max(np.abs(m - f).max(), 1e-8)
    fig, axes = plt.subplots(3, len(cols), figsize=(2.6 * len(cols), 8))
    for r in range(3):
        for c, (name, vol, cmap) in enumerate(cols):
            ax = axes[r, c]
            kw = {"vmin": 0, "vmax": vmax_diff} if "|" in name else {}
            ax.imshow(_slice(vol, r), cmap=cmap, **kw)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(name)
            if c == 0:
                ax.set_ylabel(PLANES[r])
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def deformation_grid(u, path, spacing: int = 4, background=None, title: str = "") -> Path:
    """A regular grid deformed by the in-plane components of u, on the middle slice of each plane.

    Each grid point p is drawn at p + u_plane(p): the grid shows where each fixed voxel samples
    the moving image.
    """
    u = as_spatial_field(u)
    fig, axes = plt.subplots(1, 3, figsize=(13, 4.5))
    for axis in range(3):
        ax = axes[axis]
        a, b = [k for k in range(3) if k != axis]
        mid = u.shape[1 + axis] // 2
        ua, ub = np.take(u[a], mid, axis=axis), np.take(u[b], mid, axis=axis)
        ii, jj = np.meshgrid(np.arange(ua.shape[0]), np.arange(ua.shape[1]), indexing="ij")
        ya, xb = ii + ua, jj + ub
        if background is not None:
            ax.imshow(np.take(_vol(background), mid, axis=axis), cmap="gray", origin="lower", alpha=0.6)
        for k in range(0, ua.shape[0], spacing):
            ax.plot(xb[k, :], ya[k, :], color="tab:red", lw=0.7)
        for k in range(0, ua.shape[1], spacing):
            ax.plot(xb[:, k], ya[:, k], color="tab:red", lw=0.7)
        ax.set_aspect("equal")
        ax.set_title(f"{PLANES[axis]} = {mid}")
        ax.set_xticks([])
        ax.set_yticks([])
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def jacobian_map(det, path, title: str = "") -> Path:
    """Jacobian determinant on the middle slices, colours centred at 1; voxels with |J| <= 0 circled."""
    det = _vol(det)
    lo, hi = min(det.min(), 0.99), max(det.max(), 1.01)
    norm = TwoSlopeNorm(vmin=lo, vcenter=1.0, vmax=hi)
    fig, axes = plt.subplots(1, 3, figsize=(13, 4.5))
    for axis in range(3):
        sl = _slice(det, axis)
        im = axes[axis].imshow(sl, cmap="RdBu_r", norm=norm)
        folds = np.argwhere(sl <= 0)
        if len(folds):
            axes[axis].scatter(folds[:, 1], folds[:, 0], s=12, facecolors="none", edgecolors="k", linewidths=0.8)
        axes[axis].set_title(f"{PLANES[axis]}: {int((sl <= 0).sum())} folded voxels")
        axes[axis].set_xticks([])
        axes[axis].set_yticks([])
    fig.colorbar(im, ax=axes, shrink=0.8, label="|J|")
    fig.suptitle(title or f"Jacobian determinant: {100 * (det <= 0).mean():.4f}% of voxels with |J| <= 0")
    return _save(fig, path)


def dice_boxplot(initial: np.ndarray, registered: np.ndarray, names, path, title: str = "") -> Path:
    """Per-structure Dice over cases, initial vs registered: (cases, structures) arrays."""
    return methods_boxplot({"initial": initial, "registered": registered}, names, path, title)


def methods_boxplot(per_method: dict, names, path, title: str = "") -> Path:
    """Per-structure Dice over cases with one box per method: {method: (cases, structures) array}."""
    data = {k: np.asarray(v, float) for k, v in per_method.items()}
    n, m = len(list(names)), len(data)
    width = 0.8 / m
    fig, ax = plt.subplots(figsize=(max(6, (0.3 + 0.22 * m) * n + 2), 4.5))
    pos = np.arange(n)
    colours = plt.get_cmap("tab10").colors
    for j, (label, values) in enumerate(data.items()):
        colour = "tab:gray" if label.lower() in ("initial", "identity") else colours[j % len(colours)]
        cols = [c[np.isfinite(c)] for c in values.T]
        bp = ax.boxplot(cols, positions=pos + (j - (m - 1) / 2) * width, widths=width * 0.85, patch_artist=True,
                        manage_ticks=False, flierprops={"markersize": 2})
        for box in bp["boxes"]:
            box.set_facecolor(colour)
            box.set_alpha(0.6)
        ax.plot([], [], color=colour, lw=8, alpha=0.6, label=label)
    ax.set_xticks(pos)
    ax.set_xticklabels([str(v) for v in names], rotation=60, ha="right", fontsize=8)
    ax.set_ylabel("Dice")
    ax.set_ylim(0, 1)
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title(title or "Dice per structure")
    return _save(fig, path)


def pvalue_heatmap(pvalues: np.ndarray, methods, metrics, path, title: str = "") -> Path:
    """Two-sided p-values (methods x metrics) as -log10(p), each cell annotated with p."""
    p = np.asarray(pvalues, float)
    fig, ax = plt.subplots(figsize=(2.2 + 1.6 * len(metrics), 1.2 + 0.5 * len(methods)))
    shown = -np.log10(np.clip(np.where(np.isfinite(p), p, 1.0), 1e-12, 1.0))
    im = ax.imshow(shown, cmap="viridis", vmin=0, vmax=max(3.0, float(shown.max())), aspect="auto")
    for (i, j), v in np.ndenumerate(p):
        ax.text(j, i, "n/a" if not np.isfinite(v) else f"{v:.2g}", ha="center", va="center",
                color="white" if shown[i, j] < 2 else "black", fontsize=9)
    ax.set_xticks(range(len(metrics)))
    ax.set_xticklabels(metrics)
    ax.set_yticks(range(len(methods)))
    ax.set_yticklabels(methods)
    fig.colorbar(im, ax=ax, label="-log10 p")
    ax.set_title(title or "Wilcoxon signed-rank p-values")
    return _save(fig, path)


def resolution_switch(rows: list[dict], xs: list[float]) -> tuple[float, float] | None:
    """Where a run's half-resolution phase ends on the x axis ``xs`` (each row's x is the end
    of its epoch): (x0, x1) between which it ended, x0 = x1 when an epoch ended with it, or
    None without a switch (or in logs without the ``resolution`` column)."""
    for prev, row, x0, x1 in zip(rows, rows[1:], xs, xs[1:]):
        if prev.get("resolution") == "half" and row.get("resolution") == "full":
            return x0, x0
        if prev.get("resolution") == "half" and row.get("resolution") == "half+full":
            return x0, x1
    return None


def training_curves(log_csv, path, title: str = "") -> Path:
    """Training loss and validation Dice against training wall time (per epoch in older logs),
    from a train_log.csv."""
    with open(log_csv, newline="") as fh:
        rows = list(csv.DictReader(fh))
    timed = bool(rows) and all(r.get("elapsed") for r in rows)
    epochs = [float(r["elapsed"]) / 60.0 if timed else int(r["epoch"]) for r in rows]
    xlabel = "training time (min)" if timed else "epoch"
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for key in ("loss", "sim", "reg", "dice_loss"):
        vals = [float(r[key]) for r in rows]
        if any(vals):
            a.plot(epochs, vals, marker="o", label=key)
    a.set_xlabel(xlabel)
    a.set_ylabel("training loss")
    a.legend()
    b.plot(epochs, [float(r["val_dice"]) for r in rows], marker="o", color="tab:green")
    b.set_xlabel(xlabel)
    b.set_ylabel("validation Dice")
    switch = resolution_switch(rows, epochs)
    if switch is not None:
        # the loss changes scale here: the same NCC window covers twice the anatomy at half resolution
        for ax in (a, b):
            if switch[0] == switch[1]:
                ax.axvline(switch[0], color="grey", linestyle="--", linewidth=1)
            else:
                ax.axvspan(*switch, color="grey", alpha=0.15, linewidth=0)
        a.annotate("full resolution from here", (switch[0], 1.0), xycoords=("data", "axes fraction"),
                   xytext=(3, -12), textcoords="offset points", fontsize=8, color="grey")
    if title:
        fig.suptitle(title)
    return _save(fig, path)
