"""The privacy-utility frontier plot of a privbench.analysis.frontier.Comparison, as PNG and PDF.

Accuracy (x, %) against the worst-case privacy metric over attacks (y), one panel per data set,
model and preset: every configuration with 95% CI bars cut at the axes' ranges and labelled
with its strength, each family's Pareto frontier as a line, the reference's frontier in bold
(dashed where it ends at the undefended model), the undefended model as a star and the
mean-image baseline as a horizontal line. Points outside the reference's accuracy range (no
gain computed) are drawn hollow.
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any

import pandas as pd

from privbench.analysis.frontier import REFERENCE, UNDEFENDED, Comparison
from privbench.report import figure
from privbench.report.plots import ACCURACY_RANGE, PANELS_PER_ROW, clipped_err
from privbench.store.rows import ATTACKER_HIGHER, METRIC_LABEL, METRIC_RANGE, METRIC_UNIT
from privbench.util.storage import atomic_write_bytes

FORMATS = ("png", "pdf")
MARKERS = ("o", "s", "^", "D")
LEGEND_INSIDE = 6  # more families than this: the legend goes beside the panel


def _span(values: list[int], unit: str) -> str:
    """'256 test images', '1–5 seeds'."""
    values = sorted({int(v) for v in values if v is not None and not pd.isna(v)})
    if not values:
        return f"? {unit}s"
    if len(values) == 1:
        return f"{values[0]} {unit}" + ("" if values[0] == 1 else "s")
    return f"{values[0]}–{values[-1]} {unit}s"


def y_label(metric: str, rows: pd.DataFrame) -> str:
    """'worst-case SSIM over attacks [0,1], 256 test images, 3 seeds (lower = less leakage)'."""
    unit = f" {METRIC_UNIT[metric]}" if METRIC_UNIT.get(metric) else ""
    better = "lower" if ATTACKER_HIGHER[metric] else "higher"
    return (
        f"worst-case {METRIC_LABEL[metric]} over attacks{unit}, {_span(list(rows.n_images), 'test image')}, "
        f"{_span(list(rows.n_seeds), 'seed')}\n({better} = less leakage)"
    )


def frontier_figure(comparison: Comparison) -> Any:
    """The figure (one panel per group); `plot_frontier` writes it."""
    plt = figure.pyplot()

    pts, fams = comparison.points, comparison.families
    groups = list(dict.fromkeys(pts.group))
    ncols = min(len(groups), PANELS_PER_ROW)
    nrows = math.ceil(len(groups) / ncols)
    crowded = pts[pts.family != UNDEFENDED].groupby("group").family.nunique().max() > LEGEND_INSIDE
    width = 7.2 + (3.6 if crowded else 0.0)  # room for a legend beside the panel
    fig, axes = plt.subplots(nrows, ncols, figsize=(width * ncols, 5.4 * nrows), dpi=150, squeeze=False)
    for ax in axes.flat[len(groups) :]:
        ax.set_visible(False)
    for ax, group in zip(axes.flat, groups):
        _panel(ax, pts[pts.group == group], fams[fams.group == group] if len(fams) else fams, comparison)
    fig.tight_layout()
    return fig


def _panel(ax: Any, rows: pd.DataFrame, fams: pd.DataFrame, comparison: Comparison) -> None:
    metric = comparison.metric
    lo, hi = METRIC_RANGE.get(metric, (0.0, math.inf))
    verdict = dict(zip(fams.family, fams.verdict)) if len(fams) else {}
    ref = next((f for f, v in verdict.items() if v == REFERENCE), None)
    families = [f for f in dict.fromkeys(rows.family) if f != UNDEFENDED]
    families.sort(key=lambda f: f != ref)  # the reference first: colour C0 is never it
    colours = {f: "black" if f == ref else f"C{i % 10}" for i, f in enumerate(families)}
    markers = {f: MARKERS[(i // 10) % len(MARKERS)] for i, f in enumerate(families)}  # colours repeat after 10
    for fam in families:
        g = rows[rows.family == fam].sort_values("accuracy_mean")
        colour, is_ref = colours[fam], fam == ref
        front = g[g.on_frontier.astype(bool)]
        ax.plot(
            100 * front.accuracy_mean,
            front.privacy_mean,
            color=colour,
            lw=2.6 if is_ref else 1.2,
            zorder=3 if is_ref else 2,
        )
        ax.plot(
            [],
            [],
            color=colour,
            lw=2.6 if is_ref else 1.2,
            marker=markers[fam],
            ms=4,
            label=f"{fam} (reference)" if is_ref else f"{fam}: {verdict.get(fam, 'no reference')}",
        )
        for r in g.itertuples():
            added = bool(getattr(r, "added", False))  # a reference point added by bracketing
            _point(
                ax,
                r,
                colour,
                lo,
                hi,
                hollow=added or bool(getattr(r, "extrapolated", False)),
                marker="s" if added else markers[fam],
            )
            ax.annotate(
                r.strength,
                (100 * r.accuracy_mean, r.privacy_mean),
                xytext=(4, 4),
                textcoords="offset points",
                fontsize=6,
                color=colour,
            )
    und = rows[rows.family == UNDEFENDED].sort_values("accuracy_mean")
    ref_row = fams[fams.family == ref] if ref is not None else fams.iloc[:0]
    if len(ref_row) and len(und) and float(ref_row.ref_acc_max.iloc[0]) > float(ref_row.ref_own_max.iloc[0]):
        # compare() ends the reference at the undefended model: draw that stretch of its frontier
        top = rows[(rows.family == ref) & rows.on_frontier.astype(bool)].sort_values("accuracy_mean").iloc[-1]
        end = und.iloc[-1]
        ax.plot(
            [100 * top.accuracy_mean, 100 * end.accuracy_mean],
            [top.privacy_mean, end.privacy_mean],
            color="black",
            lw=1.6,
            ls="--",
            zorder=3,
            label="reference, ended at the undefended model",
        )
    for r in und.itertuples():
        _point(ax, r, "0.3", lo, hi, marker="*", size=11)
        ax.annotate(
            "undefended",
            (100 * r.accuracy_mean, r.privacy_mean),
            xytext=(4, -9),
            textcoords="offset points",
            fontsize=6,
            color="0.3",
        )
    if rows.baseline_mean.notna().any():
        figure.labelled_line(ax, float(rows.baseline_mean.mean()), "mean image", "--")
    if "added" in rows and rows.added.astype(bool).any():
        ax.plot([], [], "s", mfc="none", color="black", label="reference point added to bracket a defense")
    if rows.extrapolated.astype(bool).any():
        ax.plot([], [], "o", mfc="none", color="0.4", label="outside the reference's accuracy range")
    ax.set_xlabel("test accuracy (%)", fontsize=8)
    ax.set_ylabel(y_label(metric, rows), fontsize=8)
    ax.set_title(
        f"{rows.group.iloc[0]}: privacy at matched accuracy vs {ref or comparison.reference}"
        "\nbars: 95% CI (Student t over seeds; over test images with one seed)",
        fontsize=9,
    )
    ax.grid(alpha=0.3)
    outside = {"loc": "upper left", "bbox_to_anchor": (1.01, 1.0)} if len(families) > LEGEND_INSIDE else {}
    ax.legend(fontsize=7, title="family: verdict", title_fontsize=7, **({"loc": "best"} | outside))


def _point(
    ax: Any, r: Any, colour: str, lo: float, hi: float, *, hollow: bool = False, marker: str = "o", size: float = 5
) -> None:
    acc = 100 * r.accuracy_mean
    ax.errorbar(
        acc,
        r.privacy_mean,
        fmt=marker,
        ms=size,
        capsize=3,
        color=colour,
        mfc="none" if hollow else colour,
        xerr=clipped_err(acc, 100 * r.accuracy_ci95, *ACCURACY_RANGE),
        yerr=clipped_err(r.privacy_mean, r.privacy_ci95, lo, hi),
        zorder=4,
    )


def plot_frontier(comparison: Comparison, path_stem: str | Path) -> list[Path]:
    """Write the frontier plot as `<path_stem>.png` and `<path_stem>.pdf`; returns both paths."""
    plt = figure.pyplot()

    stem = str(path_stem)
    for fmt in FORMATS:
        stem = stem.removesuffix(f".{fmt}")
    fig = frontier_figure(comparison)
    out = []
    try:
        for fmt in FORMATS:
            buf = io.BytesIO()
            fig.savefig(buf, format=fmt, bbox_inches="tight")
            path = Path(f"{stem}.{fmt}")
            atomic_write_bytes(path, buf.getvalue())
            out.append(path)
    finally:
        plt.close(fig)
    return out
