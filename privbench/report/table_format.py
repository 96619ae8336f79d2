"""Rendering of the aggregated privacy-utility table: Markdown, CSV (raw numbers) and LaTeX.

Human formats carry what a reader needs to judge a cell without the run folders: readable
column names with units, a caption (data set, preset, attacker data, evaluation images,
seeds), a dagger on privacy cells no better than the mean-image baseline, and footnotes
(what ± means, why a metric is missing, mixed environments). LaTeX tables wider than
MAX_LATEX_COLUMNS are split into one table per metric.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import pandas as pd

from privbench.errors import UserError
from privbench.store.rows import (
    ATTACKER_HIGHER,
    CHANCE_FACTOR,
    CHANCE_MARK,
    CLEAN_SEM_ACC,
    METRIC_DIGITS,
    METRIC_LABEL,
    METRIC_UNIT,
    METRICS,
    config_label,
    natural_key,
)
from privbench.util import stats

FORMATS = ("md", "csv", "latex")
DAGGER = "†"
MAX_LATEX_COLUMNS = 8
ATTACKER_DATA_TEXT = {"train": "the private training split", "aux": "a disjoint auxiliary split"}
UNITS_NOTE = (
    "SSIM and LPIPS in [0,1], PSNR in dB (data range 1), MSE of pixel values in [0,1]. "
    "Higher SSIM/PSNR, lower LPIPS/MSE = better reconstruction = less privacy."
)
DAGGER_NOTE = (
    f"{DAGGER} no better than the mean training image (SSIM/PSNR at or below it, LPIPS/MSE at or above it): "
    "the attack learned nothing measurable there."
)

UNSATURATED = "(unsaturated)"
UNSATURATED_NOTE = (
    f"{UNSATURATED}: twice the attack's budget raised its SSIM by more than the 95% CI (in at least one seed): "
    "the attack had not converged, so the cell understates the leakage (--check-saturation)."
)


@dataclass
class Column:
    header: str
    cells: list[str]
    kind: str = "id"  # id | attack | worst | baseline
    metric: str | None = None


def metric_header(name: str, metric: str) -> str:
    """'decoder', 'psnr' -> 'decoder PSNR (dB)'."""
    unit = METRIC_UNIT.get(metric, "")
    return f"{name} {METRIC_LABEL[metric]}" + (f" {unit}" if unit else "")


def plus_minus(mean: float, ci: float, digits: int, scale: float = 1.0) -> str:
    if pd.isna(mean):
        return "–"
    s = f"{mean * scale:.{digits}f}"
    return s if pd.isna(ci) else f"{s} ± {ci * scale:.{digits}f}"


def no_better_than_baseline(value: float, baseline: float, metric: str) -> bool:
    """True when a privacy cell does not beat the mean-image baseline (the attack learned nothing)."""
    if pd.isna(value) or pd.isna(baseline):
        return False
    return value <= baseline if ATTACKER_HIGHER[metric] else value >= baseline


def _privacy_cell(r: pd.Series, prefix: str, metric: str) -> str:
    mean, ci = r.get(f"{prefix}_{metric}_mean"), r.get(f"{prefix}_{metric}_ci95")
    cell = plus_minus(mean, ci, METRIC_DIGITS[metric])
    mark = prefix != "baseline" and no_better_than_baseline(mean, r.get(f"baseline_{metric}_mean"), metric)
    unsaturated = r.get(f"{prefix}_unsaturated_mean")
    return cell + (f" {DAGGER}" if mark else "") + (f" {UNSATURATED}" if unsaturated and unsaturated > 0 else "")


def worst_cell(r: pd.Series, metric: str, privacy_metric: str) -> str:
    """'decoder 0.612 ± 0.010': the attack that reached the worst case of `metric`, and its number.
    The saturation flag travels with worst_attack, the worst case by the privacy metric."""
    attack = r.get("worst_attack" if metric == privacy_metric else f"worst_{metric}_attack")
    if not isinstance(attack, str) or not attack:
        return "–"
    mean = r.get(f"worst_{metric}_mean")
    cell = plus_minus(mean, r.get(f"worst_{metric}_ci95"), METRIC_DIGITS[metric])
    mark = no_better_than_baseline(mean, r.get(f"baseline_{metric}_mean"), metric)
    unsaturated = metric == privacy_metric and (r.get("worst_unsaturated_mean") or 0) > 0
    return f"{attack} {cell}" + (f" {DAGGER}" if mark else "") + (f" {UNSATURATED}" if unsaturated else "")


def columns(table: pd.DataFrame) -> list[Column]:
    """Every displayable column, formatted; `display_frame` and the LaTeX split pick from it."""
    attacks = table.attrs.get("attacks", [])
    cols = [Column("defense", list(table.defense)), Column("channel", list(table.channel))]
    if (table.options != "").any():
        cols.append(Column("options", list(table.options)))
    for key in ("dataset", "model", "preset", "cut"):
        if key in table and table[key].nunique() > 1:
            cols.append(Column(key, [str(v) for v in table[key]]))
    cols += [Column(key, [str(v) for v in table[key]]) for key in table.attrs.get("settings", [])]
    cols.append(Column("seeds", [f"n={n}" for n in table.n_seeds]))
    cols.append(
        Column(
            "accuracy (%)",
            [
                plus_minus(m, c, 1, 100) + (f" {CHANCE_MARK}" if flag else "")
                for m, c, flag in zip(table.accuracy_mean, table.accuracy_ci95, table.near_chance)
            ],
        )
    )
    rows = [r for _, r in table.iterrows()]
    for attack in attacks:
        for metric in METRICS:
            if f"{attack}_{metric}_mean" not in table:
                continue
            cells = [
                "missing" if f"{attack}_{metric}" in r.missing.split() else _privacy_cell(r, attack, metric)
                for r in rows
            ]
            cols.append(Column(metric_header(attack, metric), cells, "attack", metric))
    privacy = table.attrs.get("privacy_metric", "ssim")
    for metric in (privacy, *(m for m in METRICS if m != privacy)):  # the privacy metric's worst case first
        cells = [worst_cell(r, metric, privacy) for r in rows]
        if metric == privacy or any(c != "–" for c in cells):
            cols.append(Column(metric_header("worst case", metric), cells, "worst", metric))
    for metric in METRICS:
        if f"baseline_{metric}_mean" in table:
            cells = [_privacy_cell(r, "baseline", metric) for r in rows]
            cols.append(Column(metric_header("mean-image", metric), cells, "baseline", metric))
    return cols


def _md_columns(cols: list[Column], privacy_metric: str = "ssim") -> list[Column]:
    """The Markdown table shows the mean image's SSIM (and privacy metric) only; the rest is in the CSV."""
    return [c for c in cols if c.kind != "baseline" or c.metric in ("ssim", privacy_metric)]


def caption(table: pd.DataFrame) -> str:
    """Data set(s), preset(s), attacker data, evaluation images and seeds of the table's cells."""

    def distinct(col: str) -> list[str]:
        values = {v for s in table.get(col, pd.Series(dtype=str)).astype(str) for v in s.split() if v}
        return sorted(values, key=natural_key)

    datasets, presets = distinct("dataset"), distinct("preset")
    parts = [
        f"data set {', '.join(datasets)}" if len(datasets) < 2 else f"data sets {', '.join(datasets)}",
        f"{'/'.join(presets)} preset" if len(presets) < 2 else f"presets {', '.join(presets)}",
    ]
    data = distinct("attacker_data")
    if data:
        parts.append("attacker data: " + ", ".join(f"{d} ({ATTACKER_DATA_TEXT.get(d, d)})" for d in data))
    images = distinct("eval_images")
    if images:
        parts.append(f"{' or '.join(images)} evaluation images per attack")
    seeds = sorted(set(table.n_seeds))
    if len(seeds) == 1:
        parts.append(f"{seeds[0]} seed{'s' if seeds[0] > 1 else ''} per configuration (n={seeds[0]})")
    else:
        parts.append(f"{seeds[0]} to {seeds[-1]} seeds per configuration (column 'seeds')")
    return "; ".join(parts) + "."


def environment_note(table: pd.DataFrame) -> str | None:
    """One line naming the configurations whose cells come from different environments, or None."""
    if table.empty or "environments" not in table:
        return None
    mixed = table[table.environments.fillna("") != ""]
    if mixed.empty:
        return None
    names = [config_label(r.defense, r.channel, r.options) for r in mixed.itertuples()]
    why = "; ".join(dict.fromkeys(part for s in mixed.environments for part in s.split("; ")))
    return f"note: cells of {', '.join(names)} come from different environments ({why})"


def footnotes(table: pd.DataFrame, cols: list[Column]) -> list[str]:
    multi = (table.n_seeds > 1).any()
    single = (table.n_seeds == 1).any()
    if multi and not single:
        over = " over seeds (Student t, n-1 dof)"
    elif single and not multi:
        over = " over test images (one seed)"
    else:
        over = " over seeds (Student t, n-1 dof; rows with n=1: over test images)"
    notes = [f"± = 95% CI{over}. {UNITS_NOTE}"]
    resolution = resolution_note(table)
    if resolution:
        notes.append(resolution)
    if any(DAGGER in cell for c in cols for cell in c.cells):
        notes.append(DAGGER_NOTE)
    if any(UNSATURATED in cell for c in cols for cell in c.cells):
        notes.append(UNSATURATED_NOTE)
    for reason in sorted({n for s in table.notes for n in s.split("; ") if n}):
        metric, _, why = reason.partition(" missing: ")
        notes.append(f"{METRIC_LABEL.get(metric, metric)} missing: {why}")
    sem = semantic_note(table)
    if sem:
        notes.append(sem)
    if table.near_chance.any():
        notes.append(f"{CHANCE_MARK}: accuracy below {CHANCE_FACTOR:g} / classes; its privacy numbers say little.")
    env = environment_note(table)
    if env:
        notes.append(env)
    return notes


def resolution_note(table: pd.DataFrame) -> str | None:
    """With seeds: the smallest accuracy difference the table's seeds detect (two-sided t test,
    alpha 0.05, power 0.8), from the seed sd pooled over its configurations; None without seeds."""
    rows = table[(table.n_seeds > 1) & table.accuracy_ci95.notna()]
    if rows.empty:
        return None
    # Each row's sd over its n seeds, back from its Student-t half width; pooled by degrees of freedom.
    dofs = [int(n) - 1 for n in rows.n_seeds]
    sds = [100 * stats.sd_from_t_ci95(ci, k + 1) for ci, k in zip(rows.accuracy_ci95, dofs)]
    pooled = math.sqrt(sum(k * v**2 for k, v in zip(dofs, sds)) / sum(dofs))
    n = min(dofs) + 1
    mdd = stats.min_detectable_difference(pooled, n)
    return (
        f"Resolution: at {n} seeds, accuracy differences under {mdd:.1f} points are not resolved "
        f"(minimum detectable difference, power 0.8, from the seed sd pooled over {len(rows)} "
        f"configuration{'s' if len(rows) > 1 else ''}: {pooled:.2f} points; docs/precision.md)."
    )


def semantic_note(table: pd.DataFrame) -> str | None:
    """What sem_acc means, with its reference line: the classifier's accuracy on the clean images."""
    if not any(c.endswith("_sem_acc_mean") and not c.startswith(("worst_", "baseline_")) for c in table.columns):
        return None
    note = (
        "sem_acc: fraction of reconstructions that an evaluation classifier (ResNet-20, trained on the training "
        "split, independent of the target) labels with the true class; higher = more leakage"
    )
    col = f"{CLEAN_SEM_ACC}_mean"
    if col in table and table[col].notna().any():
        values = {
            config_label(r.defense, r.channel, r.options): plus_minus(r[col], r.get(f"{CLEAN_SEM_ACC}_ci95"), 3)
            for _, r in table.iterrows()
            if not pd.isna(r[col])
        }
        same = len(set(values.values())) == 1
        ref = next(iter(values.values())) if same else ", ".join(f"{k} {v}" for k, v in values.items())
        note += f". Reference line, its accuracy on the clean evaluation images: {ref}"
    if "baseline_sem_acc_mean" in table and table.baseline_sem_acc_mean.notna().any():
        note += f"; the mean image scores {table.baseline_sem_acc_mean.mean():.3f} (about chance)"
    return note + "."


def display_frame(table: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """Formatted strings for the human formats, plus footnote lines."""
    cols = _md_columns(columns(table), table.attrs.get("privacy_metric", "ssim"))
    return pd.DataFrame({c.header: c.cells for c in cols}), footnotes(table, cols)


def to_markdown(table: pd.DataFrame) -> str:
    frame, notes = display_frame(table)
    header = list(frame.columns)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for row in frame.itertuples(index=False):
        lines.append("| " + " | ".join(str(v).replace("|", "\\|") for v in row) + " |")
    # Pandoc reads "Table: ..." after a table as its caption; the table stays the first line.
    return "\n".join(lines) + f"\n\nTable: {caption(table)}\n\n" + "\n".join(notes) + "\n"


def to_csv(table: pd.DataFrame) -> str:
    """Raw numbers only: means and CI half widths in separate columns, never formatted strings."""
    return table.to_csv(index=False)


_LATEX_ESCAPE = {
    "\\": r"\textbackslash{}",
    "&": r"\&",
    "%": r"\%",
    "$": r"\$",
    "#": r"\#",
    "_": r"\_",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
}
# An absolute path (two components or more, POSIX or Windows): LaTeX output keeps its last part.
_PATH = re.compile(r"(?<![\w.])(?:[A-Za-z]:)?(?:[/\\][\w.+@~-]+){2,}")


def without_paths(text: str) -> str:
    return _PATH.sub(lambda m: re.split(r"[/\\]", m.group(0))[-1], text)


def _latex(s: str) -> str:
    s = "".join(_LATEX_ESCAPE.get(ch, ch) for ch in without_paths(str(s)))
    s = s.replace("±", r"$\pm$").replace(CHANCE_MARK, r"(chance)").replace("–", "--")
    return s.replace(DAGGER, r"$^\dagger$").replace("⚠", "")


def _latex_table(cols: list[Column], title: str, notes: list[str]) -> list[str]:
    lines = [
        r"\begin{table}[htbp]",
        r"\centering",
        r"\caption{" + _latex(title) + "}",
        r"\begin{tabular}{" + "l" * len(cols) + "}",
        r"\toprule",
        " & ".join(_latex(c.header) for c in cols) + r" \\",
        r"\midrule",
    ]
    lines += [" & ".join(_latex(v) for v in row) + r" \\" for row in zip(*(c.cells for c in cols))]
    lines += [r"\bottomrule", r"\end{tabular}"]
    lines += [r"\par{\footnotesize " + _latex(n) + "}" for n in notes]
    return [*lines, r"\end{table}"]


def latex_tables(table: pd.DataFrame) -> list[list[Column]]:
    """The column sets of the LaTeX tables: all in one when it fits in MAX_LATEX_COLUMNS, else
    one table per metric (attack columns in chunks if one metric alone is still too wide)."""
    cols = columns(table)
    shown = _md_columns(cols, table.attrs.get("privacy_metric", "ssim"))
    if len(shown) <= MAX_LATEX_COLUMNS:
        return [shown]
    ids = [c for c in cols if c.kind == "id"]
    out = []
    for metric in METRICS:
        attack = [c for c in cols if c.kind == "attack" and c.metric == metric]
        extra = [c for c in cols if c.kind in ("worst", "baseline") and c.metric == metric]
        if not attack:
            continue
        width = max(1, MAX_LATEX_COLUMNS - len(ids) - len(extra))
        for i in range(0, len(attack), width):
            out.append(ids + attack[i : i + width] + extra)
    return out


def to_latex(table: pd.DataFrame) -> str:
    parts = latex_tables(table)
    notes = footnotes(table, [c for cols in parts for c in cols])
    text = caption(table)
    blocks = []
    for i, cols in enumerate(parts):
        metrics = sorted({c.metric for c in cols if c.kind == "attack"}, key=METRICS.index)
        title = text if len(parts) == 1 else f"{', '.join(METRIC_LABEL[m] for m in metrics)}: {text}"
        blocks.append("\n".join(_latex_table(cols, title, notes if i == len(parts) - 1 else [])))
    return "\n\n".join(blocks) + "\n"


def render(table: pd.DataFrame, fmt: str = "md") -> str:
    if fmt not in FORMATS:
        raise UserError(f"unknown table format {fmt!r} (known: {', '.join(FORMATS)})")
    if table.empty:
        raise UserError("no results to tabulate")
    return {"md": to_markdown, "csv": to_csv, "latex": to_latex}[fmt](table)
