"""Figures built from run folders: the accuracy-privacy plot and a cross-defense image grid.

Both read only what the tables module collected (numbers from metrics.json files) and the
image tensors that each attack folder stores (`grid_images.pt`), so they can be redrawn at
any time without touching a model.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from privbench.errors import UserError
from privbench.storage import atomic_write_bytes

GRID_COLUMNS = 8  # test images per row of the reconstruction grid


def short_label(defense: str, channel: str) -> str:
    """'gmm-cem', 'C8 + noise 0.025' -> 'gmm-cem C8+0.025'."""
    return f"{defense} {channel.replace(' + noise ', '+').replace('noise ', 'n')}"


def privacy_utility_plot(table: pd.DataFrame, path: str | Path) -> Path:
    """Accuracy (y) against the worst-case attack's SSIM (x), one point per configuration,
    95% CI bars on both axes; the mean-image SSIM and chance accuracy as reference lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if table.empty or "worst_ssim_mean" not in table:
        raise UserError("nothing to plot: no attack results in these runs")
    path = Path(path)
    fig, ax = plt.subplots(figsize=(6.4, 4.6), dpi=150)
    for i, r in table.reset_index(drop=True).iterrows():
        if pd.isna(r.worst_ssim_mean):
            continue
        xerr = None if pd.isna(r.worst_ssim_ci95) else r.worst_ssim_ci95
        yerr = None if pd.isna(r.accuracy_ci95) else 100 * r.accuracy_ci95
        label = f"{short_label(r.defense, r.channel)} ({r.worst_attack})"
        if r.options:
            label += f" [{r.options}]"
        ax.errorbar(
            r.worst_ssim_mean, 100 * r.accuracy_mean, xerr=xerr, yerr=yerr, fmt="o", capsize=3,
            color=f"C{i % 10}", label=label + (" ⚠ chance" if r.near_chance else ""),
        )  # fmt: skip
    if "baseline_ssim_mean" in table and table.baseline_ssim_mean.notna().any():
        ax.axvline(table.baseline_ssim_mean.mean(), color="0.5", ls="--", lw=1, label="mean-image SSIM")
    classes = table.num_classes.dropna()
    if len(classes) and classes.nunique() == 1:
        ax.axhline(100 / classes.iloc[0], color="0.5", ls=":", lw=1, label="chance accuracy")
    ax.set_xlabel("worst-case attack SSIM (higher = better reconstruction = less privacy)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("privacy vs utility (95% CI)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return path


def reconstruction_grid(
    table: pd.DataFrame, long: pd.DataFrame, path: str | Path, *, images: int = GRID_COLUMNS
) -> Path | None:
    """One PNG: the same test images on top, then one row per configuration and attack (first
    seed of each configuration), the mean-image baseline last. Returns None when no attack
    folder holds stored images."""
    import torch

    from privbench.attack import GRID_TENSORS, image_grid

    rows, labels, originals, mean_image = [], [], None, None
    attack_rows = long[(long.attack_dir != "") & (long.metric == "ssim")]
    for _, r in table.iterrows():
        sub = attack_rows[attack_rows.config == r.config]
        if sub.empty:
            continue
        first_seed = sub[sub.seed == sub.seed.min()]
        for _, a in first_seed.drop_duplicates("attack_dir").iterrows():
            file = Path(a.path) / "attacks" / a.attack_dir / GRID_TENSORS
            if not file.is_file():
                continue
            tiles = torch.load(file, weights_only=True)
            if originals is None:
                originals, mean_image = tiles["original"][:images], tiles["mean_image"]
            elif not torch.equal(tiles["original"][:images], originals):
                continue  # other test images (another data set or evaluation seed): not comparable
            rows.append(tiles["reconstruction"][:images])
            labels.append(f"{short_label(r.defense, r.channel)} {a.attack}")
    if originals is None:
        return None
    rows = [originals, *rows, mean_image.expand_as(originals)]
    labels = ["original", *labels, "mean image"]
    path = Path(path)
    atomic_write_bytes(path, image_grid(rows, labels=labels))
    return path
