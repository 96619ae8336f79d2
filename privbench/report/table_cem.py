"""The CEM paper's Table 1 layout: base defenses as rows, {alone, + each top defense} as column
groups, each with accuracy and the worst-case SSIM over attacks.

A configuration `B + T` on a channel, with T one of the "top" defenses (by default the grid's
`tops` in privbench/engine/defaults.toml: gmm-cem and slot-cem), is the cell (row B on that
channel, column group "+ T"); a configuration without a top part is its row's "alone" cell; a top
alone (`gmm-cem`) sits on the row `none`, the channel alone, as in the paper, where CEM is added to
the bottleneck + noise base. The change that the top makes (its SSIM minus the alone cell's, and the
same for accuracy) is shown beside it.
"""

from __future__ import annotations

import math

import pandas as pd

from privbench.engine.config import DEFAULT_GRID
from privbench.errors import UserError
from privbench.report.table_format import caption, plus_minus
from privbench.util import stats

TOPS = tuple(DEFAULT_GRID["tops"])
ALONE = "alone"


def _split(defense: str, options: str, tops: tuple[str, ...]) -> tuple[str, str]:
    """('dropout + gmm-cem', 'dropout.rate=0.3, gmm-cem.lam=4') -> ('dropout (rate=0.3)', '+ gmm-cem (lam=4)')."""
    parts = defense.split(" + ")
    top = parts[-1] if parts[-1] in tops else None
    base = (parts[:-1] or ["none"]) if top else parts
    opts = [o for o in options.split(", ") if o]
    if len(parts) == 1:  # a lone defense's options are not prefixed with its name
        opts = [f"{parts[0]}.{o}" for o in opts]
    top_opts = [o.split(".", 1)[1] for o in opts if top and o.startswith(f"{top}.")]
    base_opts = [o.split(".", 1)[1] if len(base) == 1 else o for o in opts if not (top and o.startswith(f"{top}."))]
    base_label = " + ".join(base) + (f" ({', '.join(base_opts)})" if base_opts else "")
    column = f"+ {top}" + (f" ({', '.join(top_opts)})" if top_opts else "") if top else ALONE
    return base_label, column


def cem_frame(table: pd.DataFrame, tops: tuple[str, ...] = TOPS) -> pd.DataFrame:
    """Raw numbers: one row per (base, channel); per column group accuracy and worst SSIM
    (mean, ci95), and for every top group the difference to the alone group."""
    if table.empty:
        raise UserError("no finished runs to tabulate")
    cells: dict[tuple[str, str], dict[str, float]] = {}
    groups: list[str] = [ALONE]
    for r in table.itertuples():
        base, column = _split(r.defense, r.options or "", tops)
        if column not in groups:
            groups.append(column)
        cell = cells.setdefault((base, r.channel), {})
        cell.update(
            {
                f"{column}|accuracy_mean": r.accuracy_mean,
                f"{column}|accuracy_ci95": r.accuracy_ci95,
                f"{column}|worst_ssim_mean": r.worst_ssim_mean,
                f"{column}|worst_ssim_ci95": r.worst_ssim_ci95,
                f"{column}|worst_attack": r.worst_attack,
                f"{column}|n_seeds": r.n_seeds,
            }
        )
    rows = []
    for (base, channel), cell in cells.items():
        row: dict[str, object] = {"base": base, "channel": channel}
        for g in groups:
            keys = ("accuracy_mean", "accuracy_ci95", "worst_ssim_mean", "worst_ssim_ci95", "worst_attack", "n_seeds")
            for key in keys:
                row[f"{g}|{key}"] = cell.get(f"{g}|{key}", math.nan)
            if g != ALONE:
                for m in ("accuracy", "worst_ssim"):
                    row[f"{g}|delta_{m}"] = row[f"{g}|{m}_mean"] - row[f"{ALONE}|{m}_mean"]
                    row[f"{g}|delta_{m}_ci95"] = _welch(row, g, m)
        rows.append(row)
    frame = pd.DataFrame(rows)
    frame.attrs["groups"] = groups
    return frame


def _welch(row: dict[str, object], group: str, metric: str) -> float:
    """Welch 95% half width of the group's change over the alone cell (both over 2+ seeds)."""
    n_a, n_g = row[f"{ALONE}|n_seeds"], row[f"{group}|n_seeds"]
    if any(pd.isna(n) for n in (n_a, n_g)):
        return math.nan
    ci_a, ci_g = row[f"{ALONE}|{metric}_ci95"], row[f"{group}|{metric}_ci95"]
    return stats.welch_ci95(float(ci_a), int(n_a), float(ci_g), int(n_g))


def to_markdown(table: pd.DataFrame, tops: tuple[str, ...] = TOPS) -> str:
    """The layout as Markdown: accuracy (%) and worst SSIM per group, with the top's change."""
    frame = cem_frame(table, tops)
    groups = frame.attrs["groups"]
    header = ["base defense", "channel"]
    for g in groups:
        header += [f"{g}: accuracy (%)", f"{g}: worst SSIM"] + ([f"{g}: Δacc / ΔSSIM"] if g != ALONE else [])
    mixed = table.n_seeds.nunique() > 1  # then every cell says its number of seeds
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in frame.to_dict("records"):
        cells = [str(r["base"]), str(r["channel"])]
        for g in groups:
            n = r[f"{g}|n_seeds"]
            seeds = f" (n={int(n)})" if mixed and not pd.isna(n) else ""
            cells += [
                plus_minus(r[f"{g}|accuracy_mean"], r[f"{g}|accuracy_ci95"], 1, 100) + seeds,
                plus_minus(r[f"{g}|worst_ssim_mean"], r[f"{g}|worst_ssim_ci95"], 3),
            ]
            if g != ALONE:
                da, ds = r[f"{g}|delta_accuracy"], r[f"{g}|delta_worst_ssim"]
                ca, cs = r[f"{g}|delta_accuracy_ci95"], r[f"{g}|delta_worst_ssim_ci95"]
                if pd.isna(ds):
                    cells.append("–")
                elif pd.isna(cs):
                    cells.append(f"{100 * da:+.1f} / {ds:+.3f}")
                else:
                    cells.append(f"{100 * da:+.1f} ± {100 * ca:.1f} / {ds:+.3f} ± {cs:.3f}")
        lines.append("| " + " | ".join(cells) + " |")
    worst = sorted({str(v) for g in groups for v in frame[f"{g}|worst_attack"] if isinstance(v, str) and v})
    notes = [
        f"_{caption(table)}_",
        "",
        "Rows: base defenses on their channel; columns: the base alone and with each CEM defense on top "
        "(a CEM defense alone sits on the row `none`, the channel alone). Worst SSIM: the highest mean SSIM "
        f"over the attacks run ({', '.join(worst) or 'none'}); ± is the 95% CI (over seeds with 2 or more, "
        "else over test images). Δacc / ΔSSIM: the group's accuracy (points) and worst SSIM minus the alone "
        "cell's (a negative ΔSSIM = more privacy), ± the Welch 95% CI where both cells have 2 or more seeds.",
    ]
    return "\n".join(lines + [""] + notes) + "\n"


def to_csv(table: pd.DataFrame, tops: tuple[str, ...] = TOPS) -> str:
    return cem_frame(table, tops).to_csv(index=False)
