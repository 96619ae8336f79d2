"""Privacy-utility tables, built from run folders alone.

`collect` reads config.json, metrics.json and attacks/*/metrics.json of each run into long-form
rows (one number per row: run, defense, channel, seed, attack, metric, value). `aggregate`
pivots them into one row per defense configuration (defense + channel + options, over seeds)
with raw numbers: mean and 95% CI half width in separate columns. `render` formats that frame
as Markdown, CSV or LaTeX; only the rendering formats numbers, so the CSV stays raw.

Confidence intervals: with two or more seeds, a Student-t interval over the per-seed means;
with one seed, the interval over test images recorded by the attack (accuracy then has none).
The worst case is the attack whose reconstructions score the highest mean SSIM.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pandas as pd

from privbench.config import TrainConfig, config_hash
from privbench.errors import UserError
from privbench.metrics import mean_ci
from privbench.storage import read_json

METRICS = ("ssim", "psnr", "lpips", "mse")  # table order; higher ssim/psnr = better reconstruction
METRIC_LABEL = {"ssim": "SSIM", "psnr": "PSNR", "lpips": "LPIPS", "mse": "MSE"}
METRIC_DIGITS = {"ssim": 3, "psnr": 2, "lpips": 3, "mse": 4}
CHANCE_FACTOR = 1.5  # accuracy below 1.5 / num_classes is flagged: the model learned ~nothing
CHANCE_MARK = "⚠ chance"
FORMATS = ("md", "csv", "latex")
# Columns that describe a row's configuration; they appear in front of the numbers.
ID_COLUMNS = ("dataset", "model", "cut", "defense", "channel", "bottleneck", "noise", "options")
# TrainConfig fields that never separate two configurations in a table (seed is aggregated over).
_NOT_A_SETTING = {"seed", "device", "data_dir", "progress", "compile", "defense_options"}
LONG_COLUMNS = [
    "run", "config", "dataset", "model", "cut", "defense", "channel", "bottleneck", "noise", "options",
    "seed", "num_classes", "attack", "attack_dir", "metric", "value", "ci95", "n", "note", "path",
]  # fmt: skip


# ----------------------------------------------------------------------------- run folders


def is_run_dir(path: Path) -> bool:
    return (path / "config.json").is_file() and (path / "metrics.json").is_file()


def expand_run_dirs(paths: Iterable[str | Path]) -> list[Path]:
    """Run folders named by `paths`; a folder holding run folders stands for all of them."""
    out: list[Path] = []
    for p in map(Path, paths):
        if is_run_dir(p):
            found = [p]
        elif p.is_dir():
            found = sorted(c for c in p.iterdir() if c.is_dir() and not c.name.startswith(".") and is_run_dir(c))
            if not found:
                raise UserError(f"{p} is not a privbench run folder and holds none (no config.json + metrics.json)")
        else:
            raise UserError(f"{p}: no such run folder")
        out += [f for f in found if f.resolve() not in {o.resolve() for o in out}]
    if not out:
        raise UserError("no run folders given")
    return out


def channel_label(bottleneck: int | None, noise: float) -> str:
    """'plain', 'C8', 'noise 0.025' or 'C8 + noise 0.025'."""
    parts = ([f"C{bottleneck}"] if bottleneck else []) + ([f"noise {noise:g}"] if noise else [])
    return " + ".join(parts) or "plain"


def _options_label(options: dict[str, Any]) -> str:
    return ", ".join(f"{k}={json.dumps(v)}" for k, v in sorted(options.items()))


# ----------------------------------------------------------------------------- long form


def collect(paths: Iterable[str | Path], *, attack_dirs: Iterable[str | Path] | None = None) -> pd.DataFrame:
    """Long-form results of the run folders in `paths` (results folders are expanded).

    One row per number: accuracy rows have attack '' and metric 'accuracy'; each attack folder
    gives one row per metric, and its mean-image baseline rows have attack 'baseline'. `value` is
    the run's mean, `ci95`/`n` the interval over test images recorded with it. With
    `attack_dirs`, only those attack folders are read (e.g. the ones a grid asked for).
    """
    keep = None if attack_dirs is None else {Path(a).resolve() for a in attack_dirs}
    rows: list[dict[str, Any]] = []
    seen: set[str] = set()
    for run_dir in expand_run_dirs(paths):
        if run_dir.name not in seen:  # a copy of a run elsewhere is not another seed
            seen.add(run_dir.name)
            rows += _run_rows(run_dir, keep)
    df = pd.DataFrame(rows, columns=LONG_COLUMNS)
    return _label_duplicate_attacks(df)


def _run_rows(run_dir: Path, keep: set[Path] | None) -> list[dict[str, Any]]:
    try:
        config = read_json(run_dir / "config.json")
        metrics = read_json(run_dir / "metrics.json")
        cfg = TrainConfig.from_dict(config["train"])
    except (OSError, ValueError, KeyError, TypeError, UserError) as exc:
        raise UserError(f"{run_dir}: unreadable run files ({type(exc).__name__}: {exc})") from None
    ident = {k: v for k, v in cfg.identity().items() if k != "seed"}
    base = {
        "run": run_dir.name, "config": config_hash(ident), "dataset": cfg.dataset, "model": cfg.model,
        "cut": cfg.cut, "defense": cfg.defense, "channel": channel_label(cfg.bottleneck, cfg.noise),
        "bottleneck": cfg.bottleneck, "noise": cfg.noise, "options": _options_label(cfg.defense_options),
        "seed": cfg.seed, "num_classes": metrics.get("num_classes"), "path": str(run_dir),
    }  # fmt: skip
    rows = [base | {"attack": "", "attack_dir": "", "metric": "accuracy", "value": metrics["test_accuracy"]}]
    root = run_dir / "attacks"
    folders = sorted(p for p in root.iterdir() if (p / "metrics.json").is_file()) if root.is_dir() else []
    baselines: list[dict[str, Any]] = []
    for folder in folders:
        if keep is not None and folder.resolve() not in keep:
            continue
        m = read_json(folder / "metrics.json")
        name = m.get("attack", folder.name.rsplit("-", 1)[0])
        if m.get("attacker_data", "train") != "train":  # another threat model: its own columns
            name = f"{name}[{m['attacker_data']}]"
        rows += _metric_rows(base | {"attack": name, "attack_dir": folder.name}, m.get("metrics", {}))
        # Attacks with the same attacker data score the same mean image; prefer the train split.
        baselines.insert(0 if m.get("attacker_data", "train") == "train" else len(baselines), m.get("baseline", {}))
    if baselines:
        rows += _metric_rows(base | {"attack": "baseline", "attack_dir": ""}, baselines[0])
    return rows


def _metric_rows(base: dict[str, Any], metrics: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for metric, stats in metrics.items():
        if not isinstance(stats, dict):
            continue
        if "missing" in stats:
            rows.append(base | {"metric": metric, "value": math.nan, "note": f"{metric} missing: {stats['missing']}"})
        else:
            rows.append(base | {
                "metric": metric, "value": stats.get("mean", math.nan), "ci95": stats.get("ci95", math.nan),
                "n": stats.get("n"),
            })  # fmt: skip
    return rows


def _label_duplicate_attacks(df: pd.DataFrame) -> pd.DataFrame:
    """Two folders of the same attack on one run (different options) get their folder names."""
    if df.empty:
        return df
    real = df[(df.attack != "") & (df.attack != "baseline")]
    dirs = real.groupby(["run", "attack"]).attack_dir.nunique()
    dup = {attack for (_, attack), n in dirs.items() if n > 1}
    if dup:
        mask = df.attack.isin(dup)
        df.loc[mask, "attack"] = df.loc[mask, "attack_dir"]
    return df


# ----------------------------------------------------------------------------- aggregation


def t_ci95(values: list[float]) -> float:
    """Half width of the Student-t 95% interval of the mean; NaN with fewer than two values."""
    half = mean_ci(list(values))["ci95"]
    return math.nan if half is None else half


def _settings_that_vary(long: pd.DataFrame, run_dirs: dict[str, Path]) -> dict[str, dict[str, Any]]:
    """Per config: the TrainConfig fields (beyond the id columns) that differ between configs."""
    per_config: dict[str, dict[str, Any]] = {}
    for config, run in long.groupby("config").run.first().items():
        per_config[config] = read_json(run_dirs[run] / "config.json")["train"]
    shown = {"dataset", "model", "cut", "defense", "bottleneck", "noise"} | _NOT_A_SETTING
    keys = sorted({k for d in per_config.values() for k in d} - shown)
    varying = [k for k in keys if len({json.dumps(d.get(k), sort_keys=True) for d in per_config.values()}) > 1]
    return {c: {k: d.get(k) for k in varying} for c, d in per_config.items()}


def aggregate(long: pd.DataFrame, run_dirs: Iterable[Path] | None = None) -> pd.DataFrame:
    """One row per defense configuration, raw numbers: `<attack>_<metric>_mean` / `_ci95`.

    Also accuracy_mean/_ci95, baseline_<metric>_*, worst_attack and worst_<metric>_*, n_seeds,
    near_chance, notes (e.g. why LPIPS is missing) and the run folder names.
    """
    if long.empty:
        return pd.DataFrame()
    # The mean over seeds of each (config, attack, metric); the CI over seeds or over images.
    cells = []
    for (config, attack, metric), g in long.groupby(["config", "attack", "metric"], sort=False):
        vals = [float(v) for v in g.value if not pd.isna(v)]
        mean = sum(vals) / len(vals) if vals else math.nan
        if len(vals) >= 2:
            ci = t_ci95(vals)
        elif len(vals) == 1:
            ci = float(g.ci95.dropna().iloc[0]) if g.ci95.notna().any() else math.nan
        else:
            ci = math.nan
        key = f"{attack}_{metric}" if attack else metric
        missing = not vals and g.note.notna().any()  # reported as missing (e.g. LPIPS offline)
        cells.append({"config": config, "key": key, "mean": mean, "ci95": ci, "missing": missing})
    cells_df = pd.DataFrame(cells)
    rank = {m: i for i, m in enumerate(METRICS)}
    keys = sorted(dict.fromkeys(cells_df.key), key=lambda k: rank.get(k.rsplit("_", 1)[-1], -1))
    wide = cells_df.pivot(index="config", columns="key", values=["mean", "ci95"])
    wide.columns = [f"{key}_{stat}" for stat, key in wide.columns]
    wide = wide[[f"{k}_{stat}" for k in keys for stat in ("mean", "ci95")]]
    gone = cells_df[cells_df.missing].groupby("config").key.agg(lambda s: " ".join(s))

    info = long.groupby("config", sort=False).agg(
        **{c: (c, "first") for c in ID_COLUMNS},
        num_classes=("num_classes", "first"),
        n_seeds=("seed", "nunique"),
        seeds=("seed", lambda s: " ".join(str(v) for v in sorted(set(s)))),
        runs=("run", lambda s: " ".join(sorted(set(s)))),
        notes=("note", lambda s: "; ".join(sorted({v for v in s if isinstance(v, str) and v}))),
    )
    settings: list[str] = []
    if run_dirs is not None:
        extra = _settings_that_vary(long, {p.name: p for p in run_dirs})
        settings = sorted({k for d in extra.values() for k in d})
        for k in settings:
            values = [extra[c][k] for c in info.index]
            info[k] = [json.dumps(v) if isinstance(v, list | dict) else v for v in values]
    table = info.join(wide)
    attacks = [a for a in dict.fromkeys(long.attack) if a not in ("", "baseline")]
    worst = []
    for config in table.index:
        scores = {a: table.at[config, f"{a}_ssim_mean"] for a in attacks if f"{a}_ssim_mean" in table}
        scores = {a: s for a, s in scores.items() if not pd.isna(s)}
        worst.append(max(scores, key=scores.get) if scores else "")
    table["worst_attack"] = worst
    for metric in METRICS:
        for stat in ("mean", "ci95"):
            table[f"worst_{metric}_{stat}"] = [
                table.at[c, f"{w}_{metric}_{stat}"] if w and f"{w}_{metric}_{stat}" in table else math.nan
                for c, w in zip(table.index, worst)
            ]
    table["near_chance"] = [
        bool(nc) and not pd.isna(acc) and acc < CHANCE_FACTOR / nc
        for acc, nc in zip(table.accuracy_mean, table.num_classes)
    ]
    table["missing"] = [gone.get(c, "") for c in table.index]
    table["bottleneck"] = table.bottleneck.astype("Int64")
    front = [*ID_COLUMNS, *settings, "num_classes", "n_seeds", "seeds", "accuracy_mean", "accuracy_ci95"]
    groups = [f"{a}_" for a in attacks] + ["baseline_", "worst_"]
    numbers = list(dict.fromkeys(c for p in groups for c in table.columns if c.startswith(p)))
    table = table[front + numbers + ["near_chance", "missing", "notes", "runs"]].copy()
    # Channels from plain to strongest; within a channel `none` (the base alone) comes first.
    table["_rank"] = [(d != "none", d) for d in table.defense]
    order = ["dataset", "model", "cut", "bottleneck", "noise", "_rank"]
    table = table.sort_values(order, na_position="first", kind="stable").drop(columns="_rank").reset_index()
    table.attrs["attacks"] = attacks
    table.attrs["settings"] = settings
    return table


def results_table(paths: Iterable[str | Path], *, attack_dirs: Iterable[str | Path] | None = None) -> pd.DataFrame:
    """`collect` + `aggregate`: the numeric privacy-utility table of the runs in `paths`."""
    run_dirs = expand_run_dirs(paths)
    long = collect(run_dirs, attack_dirs=attack_dirs)
    return aggregate(long, run_dirs)


def chance_warnings(table: pd.DataFrame) -> list[str]:
    """One line per configuration whose accuracy is near chance."""
    out = []
    for _, r in table[table.near_chance].iterrows():
        out.append(
            f"warning: {r.defense} ({r.channel}) accuracy {r.accuracy_mean:.3f} is near chance "
            f"(1/{int(r.num_classes)} = {1 / r.num_classes:.3f}): its privacy numbers say little"
        )
    return out


# ----------------------------------------------------------------------------- rendering


def _pm(mean: float, ci: float, digits: int, scale: float = 1.0) -> str:
    if pd.isna(mean):
        return "–"
    s = f"{mean * scale:.{digits}f}"
    return s if pd.isna(ci) else f"{s} ± {ci * scale:.{digits}f}"


def display_frame(table: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """Formatted strings for the human formats, plus footnote lines."""
    attacks = table.attrs.get("attacks", [])
    settings = table.attrs.get("settings", [])
    cols: dict[str, list[str]] = {"defense": list(table.defense), "channel": list(table.channel)}
    if (table.options != "").any():
        cols["options"] = list(table.options)
    for key in ("dataset", "model", "cut"):
        if table[key].nunique() > 1:
            cols[key] = [str(v) for v in table[key]]
    for key in settings:
        cols[key] = [str(v) for v in table[key]]
    cols["seeds"] = [str(n) for n in table.n_seeds]
    cols["accuracy (%)"] = [
        _pm(m, c, 1, 100) + (f" {CHANCE_MARK}" if flag else "")
        for m, c, flag in zip(table.accuracy_mean, table.accuracy_ci95, table.near_chance)
    ]
    notes: list[str] = []
    for attack in attacks:
        for metric in METRICS:
            mean_col = f"{attack}_{metric}_mean"
            if mean_col not in table:
                continue
            cells = []
            for _, r in table.iterrows():
                if f"{attack}_{metric}" in r.missing.split():
                    cells.append("missing")
                else:
                    cells.append(_pm(r[mean_col], r[f"{attack}_{metric}_ci95"], METRIC_DIGITS[metric]))
            cols[f"{attack} {METRIC_LABEL[metric]}"] = cells
    cols["worst case (SSIM)"] = [
        f"{w} {_pm(m, c, 3)}" if w else "–"
        for w, m, c in zip(table.worst_attack, table.worst_ssim_mean, table.worst_ssim_ci95)
    ]
    if "baseline_ssim_mean" in table:
        cols["mean-image SSIM"] = [_pm(m, c, 3) for m, c in zip(table.baseline_ssim_mean, table.baseline_ssim_ci95)]
    reasons = sorted({n for s in table.notes for n in s.split("; ") if n})
    for r in reasons:
        metric, _, why = r.partition(" missing: ")
        notes.append(f"{METRIC_LABEL.get(metric, metric)} missing: {why}")
    multi = (table.n_seeds > 1).any()
    single = (table.n_seeds == 1).any()
    over = " over seeds" if multi and not single else " over test images (one seed)" if single and not multi else ""
    if multi and single:
        over = " over seeds (rows with one seed: over test images)"
    notes.insert(0, f"± = 95% CI{over}. Higher SSIM/PSNR, lower LPIPS/MSE = better reconstruction = less privacy.")
    if table.near_chance.any():
        notes.append(f"{CHANCE_MARK}: accuracy below {CHANCE_FACTOR:g} / classes; its privacy numbers say little.")
    return pd.DataFrame(cols), notes


def to_markdown(table: pd.DataFrame) -> str:
    frame, notes = display_frame(table)
    header = list(frame.columns)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for row in frame.itertuples(index=False):
        lines.append("| " + " | ".join(str(v).replace("|", "\\|") for v in row) + " |")
    return "\n".join(lines) + "\n\n" + "\n".join(notes) + "\n"


def to_csv(table: pd.DataFrame) -> str:
    """Raw numbers only: means and CI half widths in separate columns, never formatted strings."""
    return table.to_csv(index=False)


_LATEX_ESCAPE = {
    "\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
    "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
}  # fmt: skip


def _latex(s: str) -> str:
    s = "".join(_LATEX_ESCAPE.get(ch, ch) for ch in str(s))
    return s.replace("±", r"$\pm$").replace(CHANCE_MARK, r"(chance)").replace("–", "--")


def to_latex(table: pd.DataFrame) -> str:
    frame, notes = display_frame(table)
    lines = [
        r"\begin{tabular}{" + "l" * len(frame.columns) + "}", r"\toprule",
        " & ".join(_latex(c) for c in frame.columns) + r" \\", r"\midrule",
    ]  # fmt: skip
    lines += [" & ".join(_latex(v) for v in row) + r" \\" for row in frame.itertuples(index=False)]
    lines += [r"\bottomrule", r"\end{tabular}"]
    lines += ["% " + n.replace("±", "+/-").replace(CHANCE_MARK, "(chance)") for n in notes]
    return "\n".join(lines) + "\n"


def render(table: pd.DataFrame, fmt: str = "md") -> str:
    if fmt not in FORMATS:
        raise UserError(f"unknown table format {fmt!r} (known: {', '.join(FORMATS)})")
    if table.empty:
        raise UserError("no results to tabulate")
    return {"md": to_markdown, "csv": to_csv, "latex": to_latex}[fmt](table)
