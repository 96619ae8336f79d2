"""Privacy-utility tables, built from long-form rows; nothing here reads a file.

`collect` (privbench.store.rows) reads each run into long-form rows, one number per row.
`aggregate` pivots them into one row per defense configuration (defense + channel + options,
over seeds) with raw numbers: mean and 95% CI half width in separate columns; given the
configurations' training fields (privbench.store.rows.train_settings), it adds a column for each
field that differs between them. privbench.api.results does both steps for run folders. `render`
(privbench.report.table_format) formats that frame as Markdown, CSV or LaTeX; only the rendering
formats numbers, so the CSV stays raw.

Confidence intervals: with two or more seeds, a Student-t interval (n-1 dof) over the per-seed
means; with one seed, the interval over test images recorded by the attack (accuracy then has
one only if the run recorded it). The worst case is taken per metric: for each metric, the
attack with the highest mean SSIM / PSNR / sem_acc or the lowest LPIPS / MSE
(`worst_<metric>_attack`, `worst_<metric>_mean`/`_ci95`); `worst_attack` is the worst case by the
privacy metric (SSIM unless `privacy_metric` says otherwise).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from typing import Any

import pandas as pd

from privbench.errors import UserError
from privbench.store.rows import (
    ATTACKER_HIGHER,
    CHANCE_FACTOR,
    CLEAN_SEM_ACC,
    ID_COLUMNS,
    METRICS,
    NOT_A_SETTING,
    environment_differences,
    metric_of,
    natural_key,
)
from privbench.util import stats


def _settings_that_vary(long: pd.DataFrame, settings: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per config of `long`: its training fields (beyond the id columns) that differ between configs."""
    configs = sorted(set(long.config))
    missing = [c for c in configs if c not in settings]
    if missing:
        raise ValueError(f"no settings for config {missing[0]}: pass privbench.store.rows.train_settings(long)")
    per_config = {c: settings[c] for c in configs}
    shown = set(ID_COLUMNS) | NOT_A_SETTING
    keys = sorted({k for d in per_config.values() for k in d} - shown)
    varying = [k for k in keys if len({json.dumps(d.get(k), sort_keys=True) for d in per_config.values()}) > 1]
    return {c: {k: d.get(k) for k in varying} for c, d in per_config.items()}


def _joined(values: Iterable[Any]) -> str:
    """Distinct non-missing values, in natural order, as one string ('64 256', 'train')."""
    seen = {str(int(v)) if isinstance(v, float) and v.is_integer() else str(v) for v in values if not pd.isna(v)}
    return " ".join(sorted(seen, key=natural_key))


def check_privacy_metric(metric: str) -> str:
    if metric not in METRICS:
        raise UserError(f"unknown privacy metric {metric!r} (known: {', '.join(METRICS)})")
    return metric


def _worst(table: pd.DataFrame, attacks: list[str], metric: str) -> list[str]:
    """Per row, the attack that reached the worst case (for privacy) of `metric`; '' if none has it."""
    out = []
    for config in table.index:
        scores = {a: table.at[config, f"{a}_{metric}_mean"] for a in attacks if f"{a}_{metric}_mean" in table}
        scores = {a: s for a, s in scores.items() if not pd.isna(s)}
        pick = max if ATTACKER_HIGHER[metric] else min
        out.append(pick(scores, key=scores.get) if scores else "")
    return out


def aggregate(
    long: pd.DataFrame, settings: Mapping[str, Mapping[str, Any]] | None = None, *, privacy_metric: str = "ssim"
) -> pd.DataFrame:
    """One row per defense configuration, raw numbers: `<attack>_<metric>_mean` / `_ci95`.

    Also accuracy_mean/_ci95, clean_sem_acc_* (sem_acc's reference line), baseline_<metric>_*,
    worst_attack (by `privacy_metric`), per metric worst_<metric>_attack/_mean/_ci95, n_seeds,
    eval_images, attacker_data, near_chance, environments (what differs between the cells'
    environments, '' if nothing), notes (e.g. why LPIPS is missing) and the run folder names.
    `settings` maps each config to its training fields (privbench.store.rows.train_settings(long));
    with it, every field that differs between the configurations gets a column after the id columns.
    """
    check_privacy_metric(privacy_metric)
    if long.empty:
        return pd.DataFrame()
    # The mean over seeds of each (config, attack, metric); the CI over seeds or over images.
    cells = []
    for (config, attack, metric), g in long.groupby(["config", "attack", "metric"], sort=False):
        vals = [float(v) for v in g.value if not pd.isna(v)]
        if len(vals) >= 2:
            ci = stats.t_ci95(vals)
        elif len(vals) == 1 and g.ci95.notna().any():
            ci = float(g.ci95.dropna().iloc[0])
        else:
            ci = math.nan
        key = f"{attack}_{metric}" if attack else metric
        missing = not vals and g.note.notna().any()  # reported as missing (e.g. LPIPS offline)
        cells.append({"config": config, "key": key, "mean": stats.mean(vals), "ci95": ci, "missing": missing})
    cells_df = pd.DataFrame(cells)
    rank = {m: i for i, m in enumerate(METRICS)}
    keys = sorted(dict.fromkeys(cells_df.key), key=lambda k: rank.get(metric_of(k), -1))
    wide = cells_df.pivot(index="config", columns="key", values=["mean", "ci95"])
    wide.columns = [f"{key}_{stat}" for stat, key in wide.columns]
    wide = wide[[f"{k}_{stat}" for k in keys for stat in ("mean", "ci95")]]
    gone = cells_df[cells_df.missing].groupby("config").key.agg(lambda s: " ".join(s))

    attack_rows = long[(long.attack_dir != "") & long.attack_dir.notna()]
    info = long.groupby("config", sort=False).agg(
        **{c: (c, "first") for c in ID_COLUMNS},
        num_classes=("num_classes", "first"),
        n_seeds=("seed", "nunique"),
        seeds=("seed", lambda s: " ".join(str(v) for v in sorted(set(s)))),
        runs=("run", lambda s: " ".join(sorted(set(s)))),
        notes=("note", lambda s: "; ".join(sorted({v for v in s if isinstance(v, str) and v}))),
    )
    info["eval_images"] = [_joined(attack_rows.eval_images[attack_rows.config == c]) for c in info.index]
    info["attacker_data"] = [_joined(attack_rows.attacker_data[attack_rows.config == c]) for c in info.index]
    varying: list[str] = []
    if settings is not None:
        extra = _settings_that_vary(long, settings)
        varying = sorted({k for d in extra.values() for k in d})
        for k in varying:
            values = [extra[c][k] for c in info.index]
            info[k] = [json.dumps(v) if isinstance(v, list | dict) else v for v in values]
    table = info.join(wide)
    attacks = [a for a in dict.fromkeys(long.attack) if a not in ("", "baseline")]
    worst = _worst(table, attacks, privacy_metric)
    table["worst_attack"] = worst
    for metric in METRICS:  # the worst case of each metric, with the attack that reached it
        by = _worst(table, attacks, metric)
        table[f"worst_{metric}_attack"] = by
        for stat in ("mean", "ci95"):
            table[f"worst_{metric}_{stat}"] = [
                table.at[c, f"{w}_{metric}_{stat}"] if w and f"{w}_{metric}_{stat}" in table else math.nan
                for c, w in zip(table.index, by)
            ]
    for stat in ("mean", "ci95"):  # the worst attack's saturation flag travels with its numbers
        table[f"worst_unsaturated_{stat}"] = [
            table.at[c, f"{w}_unsaturated_{stat}"] if w and f"{w}_unsaturated_{stat}" in table else math.nan
            for c, w in zip(table.index, worst)
        ]
    table["near_chance"] = [
        bool(nc) and not pd.isna(acc) and acc < CHANCE_FACTOR / nc
        for acc, nc in zip(table.accuracy_mean, table.num_classes)
    ]
    table["missing"] = [gone.get(c, "") for c in table.index]
    envs = environment_differences(long)
    table["environments"] = [envs.get(c, "") for c in table.index]
    table["bottleneck"] = table.bottleneck.astype("Int64")
    front = [
        *ID_COLUMNS,
        *varying,
        "num_classes",
        "n_seeds",
        "seeds",
        "eval_images",
        "attacker_data",
        "accuracy_mean",
        "accuracy_ci95",
        *[c for c in (f"{CLEAN_SEM_ACC}_mean", f"{CLEAN_SEM_ACC}_ci95") if c in table],
    ]
    groups = [f"{a}_" for a in attacks] + ["baseline_", "worst_"]
    numbers = list(dict.fromkeys(c for p in groups for c in table.columns if c.startswith(p)))
    table = table[front + numbers + ["near_chance", "missing", "environments", "notes", "runs"]].copy()
    # Channels from plain to strongest; within a channel `none` (the base alone) comes first.
    table["_rank"] = [(d != "none", d) for d in table.defense]
    order = ["dataset", "model", "preset", "cut", "bottleneck", "noise", "_rank"]
    table = table.sort_values(order, na_position="first", kind="stable").drop(columns="_rank").reset_index()
    table.attrs["attacks"] = attacks
    table.attrs["settings"] = varying
    table.attrs["privacy_metric"] = privacy_metric
    return table


def chance_warnings(table: pd.DataFrame) -> list[str]:
    """One line per configuration whose accuracy is near chance."""
    out = []
    for _, r in table[table.near_chance].iterrows():
        out.append(
            f"warning: {r.defense} ({r.channel}) accuracy {r.accuracy_mean:.3f} is near chance "
            f"(1/{int(r.num_classes)} = {1 / r.num_classes:.3f}): its privacy numbers say little"
        )
    return out


def environment_warnings(long: pd.DataFrame) -> list[str]:
    """A line where the trainings of one table ran in different environments (thread count, torch,
    device): the run identity leaves them out, so a cache built elsewhere is reused, yet each can
    move a training's numbers (on 25 epochs, a seed's accuracy by points at another thread count)."""
    if long.empty:
        return []
    trainings = long[(long.attack == "") & (long.metric == "accuracy")].assign(config="trainings")
    differ = environment_differences(trainings).get("trainings")
    if not differ:
        return []
    return [
        f"note: these trainings ran in different environments ({differ}); each changes a training's numbers "
        "though not its run identity, so configurations trained alike compare best (every run folder's "
        "provenance.json records its own)"
    ]
