"""Figures of one run's diagnostics: training curves and the slot / cluster split of each class.

Inputs are what privbench.engine.diagnostics returns (`curves_frame`, `slot_stats`), so a figure can
be redrawn from a run folder's files alone. The `*_figure` functions return the matplotlib
Figure (tests read its artists); `plot_curves` and `plot_slots` write `<path_stem>.png`
atomically through the same helper as privbench.report.plots.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from privbench.errors import UserError
from privbench.report import figure
from privbench.report.plots import _save

PANELS_PER_ROW = 3
# z's spread, as logged: the loop's clean-z statistics and the CEM defenses' own measures.
VARIANCE_COLUMNS = {
    "z_intra_class_var": "intra-class (clean z)",
    "z_total_var": "total (clean z)",
    "within_var": "within cluster (gmm-cem refit)",
    "intra_mse": "intra-class (slot-cem, train batches)",
}
ACCURACY_COLUMNS = {"train_acc": "train accuracy", "test_acc": "test accuracy", "test_accuracy": "test accuracy"}


def _png(path_stem: str | Path) -> Path:
    path = Path(path_stem)
    return path if path.suffix == ".png" else path.with_name(path.name + ".png")


def _loss_columns(frame: pd.DataFrame) -> list[str]:
    return [c for c in frame.columns if c.endswith("_loss") and frame[c].notna().any()]


def curves_figure(frame: pd.DataFrame, *, noise_std: float | None = None, title: str | None = None) -> Any:
    """One panel per loss term (train_loss, defense_loss, rob_loss, module_loss, <part>_loss),
    one for the variance of z (intra-class and total, log scale; the channel noise variance as
    a line when noise_std is given), one for accuracy (%), one for the learning rate; x: epoch.
    A missing value (a CEM term before its warm-up ends) leaves a gap."""
    plt = figure.pyplot()

    if frame.empty or "epoch" not in frame:
        raise UserError("nothing to plot: the run's history has no epochs")
    panels: list[tuple[str, list[str]]] = [(c, [c]) for c in _loss_columns(frame)]
    var = [c for c in VARIANCE_COLUMNS if c in frame and (frame[c] > 0).any()]
    if var:
        panels.append(("variance of z (mean per dimension)", var))
    acc = [c for c in ACCURACY_COLUMNS if c in frame and frame[c].notna().any()]
    if acc:
        panels.append(("accuracy (%)", acc))
    if "lr" in frame and frame["lr"].notna().any():
        panels.append(("learning rate", ["lr"]))
    ncols = min(len(panels), PANELS_PER_ROW)
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.2 * nrows), dpi=120, squeeze=False)
    for ax in axes.flat[len(panels) :]:
        ax.set_visible(False)
    x = frame["epoch"]
    marker = "o" if len(frame) <= 40 else None
    for ax, (name, cols) in zip(axes.flat, panels):
        for col in cols:
            y = frame[col] * (100 if col in ACCURACY_COLUMNS else 1)
            label = VARIANCE_COLUMNS.get(col) or ACCURACY_COLUMNS.get(col) or col
            ax.plot(x, y, marker=marker, ms=3, lw=1.2, label=label)
        if cols is var:
            ax.set_yscale("log")
            if noise_std:
                ax.axhline(noise_std**2, color="0.4", ls="--", lw=1, label=f"noise variance ({noise_std:g}²)")
        if len(cols) > 1 or (cols is var and noise_std):
            ax.legend(fontsize=7)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("epoch", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def plot_curves(
    frame: pd.DataFrame, path_stem: str | Path, *, noise_std: float | None = None, title: str | None = None
) -> Path:
    """Write `curves_figure(frame)` to `<path_stem>.png` (RUN/curves -> RUN/curves.png)."""
    return _save(curves_figure(frame, noise_std=noise_std, title=title), _png(path_stem), bbox_inches="tight")


def slots_figure(stats: dict[str, Any], *, title: str | None = None) -> Any:
    """Heatmaps, class (rows) x slot (columns): the mean responsibility of each slot for the
    class's samples, the share of them for which it is the largest, and (log10) the slot's
    variance of z relative to the channel noise variance when `noise_var` is known, else the
    variance itself. Slot k of one class is unrelated to slot k of another."""
    plt = figure.pyplot()

    resp = np.asarray(stats["responsibility"], dtype=float)
    if resp.ndim != 2 or resp.size == 0:
        raise UserError("nothing to plot: no slot responsibilities")
    C, K = resp.shape
    noise_var = stats.get("noise_var")
    var = np.asarray(stats["slot_var"], dtype=float)
    with np.errstate(divide="ignore"):
        if noise_var:
            var_panel = (np.log10(var / noise_var), "log10(slot variance / noise variance)", "RdBu_r")
        else:
            var_panel = (np.log10(var), "log10(slot variance of z)", "viridis")
    panels = [
        (resp, "mean responsibility", "Blues", (0.0, 1.0)),
        (np.asarray(stats["argmax_share"], dtype=float), "share of samples (largest responsibility)", "Blues", (0, 1)),
        (*var_panel, None),
    ]
    width = max(3.2, 0.45 * K + 1.6)
    height = max(2.6, 0.32 * C + 1.2)
    fig, axes = plt.subplots(1, 3, figsize=(3 * width, height), dpi=120, squeeze=False)
    counts = stats.get("class_counts") or [None] * C
    names = stats.get("class_names") or [str(c) for c in range(C)]
    for ax, (values, label, cmap, limits) in zip(axes.flat, panels):
        shown = np.ma.masked_invalid(values)
        if limits is None and shown.count() and cmap == "RdBu_r":  # centre the diverging map on 0
            m = float(np.abs(shown).max()) or 1.0
            limits = (-m, m)
        im = ax.imshow(
            shown, cmap=cmap, aspect="auto", vmin=limits[0] if limits else None, vmax=limits[1] if limits else None
        )
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04).ax.tick_params(labelsize=6)
        if C * K <= 160:
            for (i, j), v in np.ndenumerate(values):
                if math.isfinite(v):
                    ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=5)
        ax.set_title(label, fontsize=8)
        ax.set_xlabel("slot (within the class)", fontsize=7)
        ax.set_xticks(range(K))
        ax.set_yticks(range(C))
        ax.set_yticklabels([f"{n} (n={c})" if c is not None else n for n, c in zip(names, counts)], fontsize=6)
        ax.tick_params(axis="x", labelsize=6)
    axes[0, 0].set_ylabel("class", fontsize=7)
    head = f"{stats.get('defense', '')}: {K} slots per class, {sum(c or 0 for c in counts)} samples"
    fig.suptitle(head + (f"\n{title}" if title else ""), fontsize=9)
    fig.tight_layout()
    return fig


def plot_slots(stats: dict[str, Any], path_stem: str | Path, *, title: str | None = None) -> Path:
    """Write `slots_figure(stats)` (stats: privbench.engine.diagnostics.slot_stats) to `<path_stem>.png`."""
    return _save(slots_figure(stats, title=title), _png(path_stem), bbox_inches="tight")
