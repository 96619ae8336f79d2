"""Figures built from run folders: the accuracy-privacy plot and a cross-defense image grid.

Both read only what the tables module collected (numbers from metrics.json files) and what
each attack folder stores (`grid_images.pt`, `per_image.csv`), so they can be redrawn at any
time without touching a model. The `*_figure` functions return the matplotlib Figure (tests
read its artists); the others write the PNG.
"""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from privbench.attack.images import GRID_TENSORS
from privbench.attack.metrics import ssim
from privbench.errors import UserError
from privbench.report import figure
from privbench.store.rows import (
    ATTACKER_HIGHER,
    CLEAN_SEM_ACC,
    METRIC_LABEL,
    METRIC_RANGE,
    METRIC_UNIT,
    config_label,
    natural_key,
)
from privbench.util.storage import atomic_write_bytes, load_checkpoint

GRID_COLUMNS = 8  # test images per row of the reconstruction grid
PANELS_PER_ROW = 3
SSIM_RANGE = (0.0, 1.0)
ACCURACY_RANGE = (0.0, 100.0)


def clipped_err(mean: float, ci: float, lo: float, hi: float) -> list[list[float]] | None:
    """Asymmetric error bar [[below], [above]] for mean ± ci, cut at the metric's range [lo, hi]."""
    if pd.isna(mean) or pd.isna(ci):
        return None
    return [[max(0.0, min(ci, mean - lo))], [max(0.0, min(ci, hi - mean))]]


def _distinct(values: Any) -> list[str]:
    out = {v for s in values for v in str(s).split() if v and v != "nan"}
    return sorted(out, key=natural_key)


def _span(values: list[str], unit: str) -> str:
    """'64 images', '1–3 seeds', '1 seed'."""
    if not values:
        return f"? {unit}s"
    if len(values) == 1:
        return f"{values[0]} {unit}" + ("" if values[0] == "1" else "s")
    return f"{values[0]}–{values[-1]} {unit}s"


def _panel_title(rows: pd.DataFrame, dataset: str, preset: str) -> str:
    noises = sorted({float(n) for n in rows.noise}, key=float)
    noise = "noise std " + ", ".join(f"{n:g}" for n in noises)
    images = _span(_distinct(rows.get("eval_images", [])), "image")
    seeds = _span([str(n) for n in sorted(set(rows.n_seeds))], "seed")
    return f"{dataset}, {preset} preset\n{noise}; {images}; {seeds}"


def privacy_utility_figure(table: pd.DataFrame) -> Any:
    """Accuracy (y) against the worst-case attack's SSIM (x; the table's privacy metric, e.g.
    sem_acc): one panel per data set and preset, one colour and legend entry per defense, 95% CI
    bars cut at each axis' range; the mean image, chance accuracy and, for sem_acc, the
    evaluation classifier's clean accuracy as labelled reference lines."""
    plt = figure.pyplot()

    metric = table.attrs.get("privacy_metric", "ssim")
    col = f"worst_{metric}_mean"
    if table.empty or col not in table or table[col].isna().all():
        what = "attack results" if metric == "ssim" else f"{metric} results"
        raise UserError(f"nothing to plot: no {what} in these runs")
    attrs = dict(table.attrs)
    table = table[table[col].notna()].reset_index(drop=True)
    table.attrs.update(attrs)
    panels = list(dict.fromkeys(zip(table.dataset, table.preset)))
    colours = {d: f"C{i % 10}" for i, d in enumerate(dict.fromkeys(table.defense))}
    ncols = min(len(panels), PANELS_PER_ROW)
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(6.4 * ncols, 4.8 * nrows), dpi=150, squeeze=False)
    for ax in axes.flat[len(panels) :]:
        ax.set_visible(False)
    over = "seeds" if (table.n_seeds > 1).all() else "test images" if (table.n_seeds == 1).all() else "seeds or images"
    for ax, (dataset, preset) in zip(axes.flat, panels):
        rows = table[(table.dataset == dataset) & (table.preset == preset)]
        _draw_panel(ax, rows, colours, metric)
        ax.set_title(_panel_title(rows, dataset, preset), fontsize=9)
    fig.suptitle(f"privacy vs utility (bars: 95% CI over {over})", fontsize=10)
    fig.tight_layout()
    return fig


def _draw_panel(ax: Any, rows: pd.DataFrame, colours: dict[str, str], metric: str = "ssim") -> None:
    several_options = rows.groupby("defense").options.nunique()
    labels = []
    for defense, group in rows.groupby("defense", sort=False):
        for i, r in enumerate(group.itertuples()):
            acc = 100 * r.accuracy_mean
            x, x_ci = getattr(r, f"worst_{metric}_mean"), getattr(r, f"worst_{metric}_ci95")
            ax.errorbar(
                x,
                acc,
                fmt="o",
                capsize=3,
                color=colours[defense],
                xerr=clipped_err(x, x_ci, *METRIC_RANGE.get(metric, SSIM_RANGE)),
                yerr=clipped_err(acc, 100 * r.accuracy_ci95, *ACCURACY_RANGE),
                label=defense if i == 0 else None,
            )
            text = r.channel.replace(" + noise ", "+").replace("noise ", "n")
            if several_options.get(defense, 0) > 1 and r.options:
                text += f" ({r.options})"
            labels.append((x, acc, text + (" ⚠ chance" if r.near_chance else ""), colours[defense]))
    _zoom(ax, rows, metric)
    _place_labels(ax, labels)
    lines = [(f"baseline_{metric}_mean", "mean image", "--")]
    if metric == "sem_acc":  # the most a reconstruction can reach: the classifier on the clean images
        lines.append((f"{CLEAN_SEM_ACC}_mean", "clean images", "-."))
    for col, label, style in lines:
        if col in rows and rows[col].notna().any():
            x = rows[col].mean()
            ax.axvline(x, color="0.5", ls=style, lw=1)
            ax.annotate(
                label,
                (x, 0.98),
                xycoords=("data", "axes fraction"),
                rotation=90,
                fontsize=6,
                color="0.4",
                xytext=(2, 0),
                textcoords="offset points",
                va="top",
            )
    classes = rows.num_classes.dropna()
    low, high = ax.get_ylim()
    if len(classes) and classes.nunique() == 1 and low <= 100 / classes.iloc[0] <= high:  # only where it shows
        figure.labelled_line(ax, 100 / classes.iloc[0], "chance", ":")
    unit = f" {METRIC_UNIT[metric]}" if METRIC_UNIT.get(metric) else ""
    better = "higher" if ATTACKER_HIGHER[metric] else "lower"
    ax.set_xlabel(
        f"worst-case attack {METRIC_LABEL[metric]}{unit} ({better} = better reconstruction = less privacy)", fontsize=8
    )
    ax.set_ylabel("test accuracy (%)", fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best", title="defense", title_fontsize=7)


def _zoom(ax: Any, rows: pd.DataFrame, metric: str) -> None:
    """Axes around the points and their CI bars (and the mean-image line), not the metric's whole
    range: a grid whose accuracies lie within a few points gets those points, not 0-100%."""
    acc, acc_ci = 100 * rows.accuracy_mean, 100 * rows.accuracy_ci95.fillna(0)
    x, x_ci = rows[f"worst_{metric}_mean"], rows[f"worst_{metric}_ci95"].fillna(0)
    lo_y, hi_y = float((acc - acc_ci).min()), float((acc + acc_ci).max())
    xs = [float((x - x_ci).min()), float((x + x_ci).max())]
    base = f"baseline_{metric}_mean"
    if base in rows and rows[base].notna().any():
        xs.append(float(rows[base].mean()))
    pad_y, pad_x = max(0.5, 0.08 * (hi_y - lo_y)), max(0.005, 0.08 * (max(xs) - min(xs)))
    ax.set_ylim(max(ACCURACY_RANGE[0], lo_y - pad_y), min(ACCURACY_RANGE[1], hi_y + pad_y))
    ax.set_xlim(min(xs) - pad_x, max(xs) + 3 * pad_x)  # room on the right for the labels


def _place_labels(ax: Any, labels: list[tuple[float, float, str, str]]) -> None:
    """Each point's label beside it, moved down a line at a time until it no longer sits on a
    label already placed (positions compared in axes fractions)."""
    (x0, x1), (y0, y1) = ax.get_xlim(), ax.get_ylim()
    placed: list[tuple[float, float]] = []
    for x, y, text, colour in sorted(labels, key=lambda item: -item[1]):
        fx, fy = (x - x0) / (x1 - x0), (y - y0) / (y1 - y0)
        shift = 0
        while any(abs(fx - px) < 0.12 and abs(fy - shift * 0.035 - py) < 0.03 for px, py in placed) and shift < 12:
            shift += 1
        placed.append((fx, fy - shift * 0.035))
        ax.annotate(
            text,
            (x, y),
            xytext=(4, 4 - 9 * shift),
            textcoords="offset points",
            fontsize=6,
            color=colour,
            arrowprops={"arrowstyle": "-", "color": colour, "lw": 0.4} if shift else None,
        )


def _save(fig: Any, path: str | Path, **kw: Any) -> Path:
    plt = figure.pyplot()

    buf = io.BytesIO()
    fig.savefig(buf, format="png", **kw)
    plt.close(fig)
    path = Path(path)
    atomic_write_bytes(path, buf.getvalue())
    return path


def privacy_utility_plot(table: pd.DataFrame, path: str | Path) -> Path:
    """Write `privacy_utility_figure` as a PNG."""
    return _save(privacy_utility_figure(table), path)


# ------------------------------------------------------------------ reconstruction grid


def _per_image_ssim(folder: Path, recon: Any, originals: Any) -> list[float | None]:
    """The SSIM the attack recorded for its first images (per_image.csv), else computed here."""
    file = folder / "per_image.csv"
    n = len(originals)
    if file.is_file():
        with open(file, newline="") as f:
            values = [float(r["ssim"]) for r, _ in zip(csv.DictReader(f), range(n))]
        if len(values) == n:
            return values
    return _ssim(recon, originals)


def _ssim(recon: Any, originals: Any) -> list[float | None]:
    try:
        return ssim(recon.float(), originals.float()).tolist()
    except ValueError:  # images smaller than the SSIM window
        return [None] * len(originals)


def grid_rows(table: pd.DataFrame, long: pd.DataFrame, images: int = GRID_COLUMNS) -> list[dict[str, Any]]:
    """[{label, images [n,C,H,W], ssim [n] or None}]: the originals, one row per configuration and
    attack (first seed of each configuration, same test images only), the mean image last."""

    rows: list[dict[str, Any]] = []
    originals = mean_image = None
    attack_rows = long[(long.attack_dir != "") & long.attack_dir.notna() & (long.metric == "ssim")]
    several_settings = len(set(zip(table.dataset, table.preset))) > 1
    for _, r in table.iterrows():
        sub = attack_rows[attack_rows.config == r.config]
        if sub.empty:
            continue
        first_seed = sub[sub.seed == sub.seed.min()]
        for _, a in first_seed.drop_duplicates("attack_dir").iterrows():
            folder = Path(a.path) / "attacks" / a.attack_dir
            if not (folder / GRID_TENSORS).is_file():
                continue
            tiles = load_checkpoint(folder / GRID_TENSORS)  # damaged or hostile: one-line error
            if originals is None:
                originals, mean_image = tiles["original"][:images], tiles["mean_image"]
            elif not torch.equal(tiles["original"][:images], originals):
                continue  # other test images (another data set or evaluation seed): not comparable
            recon = tiles["reconstruction"][:images]
            label = f"{config_label(r.defense, r.channel, r.options)}\n{a.attack}"
            if several_settings:
                label = f"{r.dataset}, {r.preset}: {label}"
            rows.append({"label": label, "images": recon, "ssim": _per_image_ssim(folder, recon, originals)})
    if originals is None:
        return []
    mean_row = mean_image.expand_as(originals)
    return [
        {"label": "original", "images": originals, "ssim": None},
        *rows,
        {"label": "mean image", "images": mean_row, "ssim": _ssim(mean_row, originals)},
    ]


def reconstruction_figure(table: pd.DataFrame, long: pd.DataFrame, *, images: int = GRID_COLUMNS) -> Any:
    """The same test images reconstructed under every configuration: a row label per defense and
    attack, a header per column, the per-image SSIM under each tile. None without stored images."""
    plt = figure.pyplot()

    rows = grid_rows(table, long, images)
    if not rows:
        return None
    n = len(rows[0]["images"])
    _, h, w = rows[0]["images"].shape[1:]
    gap, band = max(1, w // 16), max(6, h // 3)  # px between tiles; px under a tile for its SSIM
    pitch_x, pitch_y = w + gap, h + band
    canvas = np.ones((len(rows) * pitch_y, n * pitch_x, 3))
    for i, row in enumerate(rows):
        imgs = row["images"].detach().float().cpu().clamp(0, 1)
        imgs = imgs.repeat(1, 3, 1, 1) if imgs.shape[1] == 1 else imgs[:, :3]
        for j, img in enumerate(imgs):
            canvas[i * pitch_y : i * pitch_y + h, j * pitch_x : j * pitch_x + w] = img.permute(1, 2, 0).numpy()
    fig, ax = plt.subplots(figsize=(2.0 + 0.75 * n, 0.4 + 0.9 * len(rows)), dpi=150)
    ax.imshow(canvas, interpolation="nearest")
    ax.axis("off")
    for j in range(n):
        ax.text(j * pitch_x + w / 2, -1, f"image {j + 1}", ha="center", va="bottom", fontsize=6)
    for i, row in enumerate(rows):
        y = i * pitch_y
        ax.text(-gap, y + h / 2, row["label"], ha="right", va="center", fontsize=6)
        for j, value in enumerate(row["ssim"] or []):
            if value is not None:
                ax.text(
                    j * pitch_x + w / 2, y + h + band / 2, f"SSIM {value:.2f}", ha="center", va="center", fontsize=5
                )
    ax.set_title("the same test images under each defense (first seed); SSIM [0,1] under each tile", fontsize=7, pad=10)
    return fig


def reconstruction_grid(
    table: pd.DataFrame, long: pd.DataFrame, path: str | Path, *, images: int = GRID_COLUMNS
) -> Path | None:
    """Write `reconstruction_figure` as a PNG; None when no attack folder holds stored images."""
    fig = reconstruction_figure(table, long, images=images)
    return None if fig is None else _save(fig, path, bbox_inches="tight")
