"""Run folders -> long-form rows: one number per row, with what produced it and where.

`collect` reads config.json, metrics.json, provenance.json and attacks/*/metrics.json of each
run into rows (run, defense, channel, seed, attack, metric, value, ...). Each row also carries
the environment of its cell (torch version, device, threads, determinism), so a table can say
when the seeds of one configuration were computed on different machines. What the analysis needs
besides the rows is read here too: `run_infos` (run facts) and `per_image` (per-image values of
the attack folders) for frontiers, `train_settings` (training fields) for tables.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from privbench.engine.config import TrainConfig, config_hash
from privbench.errors import UserError
from privbench.plugin.stack import label as stack_label
from privbench.store.attacks import read_per_image
from privbench.util.storage import read_json

# Table order; higher ssim/psnr/sem_acc = better reconstruction. sem_acc: the fraction of
# reconstructions the evaluation classifier labels with the true class (privbench.attack.semantic).
METRICS = ("ssim", "psnr", "lpips", "mse", "sem_acc")
METRIC_LABEL = {"ssim": "SSIM", "psnr": "PSNR", "lpips": "LPIPS", "mse": "MSE", "sem_acc": "sem_acc"}
METRIC_UNIT = {"ssim": "[0,1]", "psnr": "(dB)", "lpips": "", "mse": "", "sem_acc": "[0,1]"}
METRIC_DIGITS = {"ssim": 3, "psnr": 2, "lpips": 3, "mse": 4, "sem_acc": 3}
METRIC_RANGE = {
    "ssim": (0.0, 1.0),
    "psnr": (0.0, math.inf),
    "lpips": (0.0, math.inf),
    "mse": (0.0, 1.0),
    "sem_acc": (0.0, 1.0),
}
# Privacy cells that do no better than the mean image: higher is better for the attacker here.
ATTACKER_HIGHER = {"ssim": True, "psnr": True, "lpips": False, "mse": False, "sem_acc": True}
# Run-level metric: the evaluation classifier's accuracy on the clean evaluation images, sem_acc's reference line.
CLEAN_SEM_ACC = "clean_sem_acc"

CHANCE_FACTOR = 1.5  # accuracy below 1.5 / num_classes is flagged: the model learned ~nothing
CHANCE_MARK = "⚠ chance"
# Columns that describe a row's configuration; they appear in front of the numbers.
ID_COLUMNS = ("dataset", "model", "preset", "cut", "defense", "channel", "bottleneck", "noise", "options")
# TrainConfig fields that never separate two configurations in a table (seed is aggregated over).
NOT_A_SETTING = {"seed", "device", "data_dir", "progress", "compile", "defense_options", "weights"}
# Provenance fields that make two cells' numbers differ beyond the seed (reproducibility).
ENV_FIELDS = ("torch_version", "device_name", "num_threads", "deterministic")
LONG_COLUMNS = [
    "run",
    "config",
    "dataset",
    "model",
    "preset",
    "cut",
    "defense",
    "channel",
    "bottleneck",
    "noise",
    "options",
    "seed",
    "num_classes",
    "attack",
    "attack_dir",
    "variant",
    "attacker_data",
    "eval_images",
    "metric",
    "value",
    "ci95",
    "n",
    "note",
    *ENV_FIELDS,
    "path",
]


def metric_of(key: str) -> str | None:
    """The metric a column key ends with: 'decoder_sem_acc' -> 'sem_acc' (metric names hold '_')."""
    for metric in sorted(METRICS, key=len, reverse=True):
        if key == metric or key.endswith(f"_{metric}"):
            return metric
    return None


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


def config_label(defense: str, channel: str, options: str = "") -> str:
    """'gmm-cem', 'C8 + noise 0.025', 'lam=16' -> 'gmm-cem@C8+0.025 (lam=16)'."""
    short = channel.replace(" + noise ", "+").replace("noise ", "n")
    return f"{defense}@{short}" + (f" ({options})" if options else "")


def options_label(options: dict[str, Any]) -> str:
    """{'lam': 16} -> 'lam=16'; a stack's {'gmm-cem': {'lam': 16}} -> 'gmm-cem.lam=16'."""
    flat = {}
    for k, v in options.items():
        if isinstance(v, dict):
            flat.update({f"{k}.{kk}": vv for kk, vv in v.items()})
        else:
            flat[k] = v
    return ", ".join(f"{k}={json.dumps(v)}" for k, v in sorted(flat.items()))


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
    return _label_attack_variants(df)


TEXT_COLUMNS = (
    "run",
    "config",
    "dataset",
    "model",
    "preset",
    "defense",
    "channel",
    "options",
    "attack",
    "attack_dir",
    "variant",
    "attacker_data",
    "metric",
    "note",
    "path",
)


def read_csv(path: str | Path) -> pd.DataFrame:
    """Long-form rows written by `privbench run` (results.csv) read back as `collect` returns them:
    empty text stays '' (the accuracy rows' attack), not NaN. A missing or malformed file is a
    one-line UserError."""
    path = Path(path)
    try:
        df = pd.read_csv(
            path,
            dtype={c: str for c in (*TEXT_COLUMNS, *ENV_FIELDS)},  # provenance stays text, as collect gives it
            keep_default_na=False,
            na_values={c: [""] for c in LONG_COLUMNS if c not in TEXT_COLUMNS},
        )
    except (OSError, ValueError, pd.errors.ParserError) as exc:
        raise UserError(f"cannot read results rows from {path}: {str(exc).splitlines()[0]}") from None
    missing = [c for c in ("config", "defense", "channel", "attack", "metric", "value") if c not in df]
    if missing:
        raise UserError(
            f"{path} is not a long-form results file (no column {missing[0]!r}); pass the results.csv "
            "that privbench run writes"
        )
    return df


def _environment(prov: Any) -> dict[str, str | None]:
    """The ENV_FIELDS of a provenance dict as strings; absent fields are None (unknown)."""
    prov = prov if isinstance(prov, dict) else {}
    return {k: None if prov.get(k) is None else str(prov[k]) for k in ENV_FIELDS}


def _run_rows(run_dir: Path, keep: set[Path] | None) -> list[dict[str, Any]]:
    try:
        config = read_json(run_dir / "config.json")
        metrics = read_json(run_dir / "metrics.json")
        cfg = TrainConfig.from_dict(config["train"])
        accuracy = float(metrics["test_accuracy"])
    except (OSError, ValueError, KeyError, TypeError, UserError) as exc:
        raise UserError(f"{run_dir}: unreadable run files ({type(exc).__name__}: {exc})") from None
    try:
        prov = read_json(run_dir / "provenance.json")
    except (OSError, ValueError, UserError):
        prov = {}  # no provenance: its environment is unknown, never a difference
    ident = {k: v for k, v in cfg.identity().items() if k != "seed"}
    base = {
        "run": run_dir.name,
        "config": config_hash(ident),
        "dataset": cfg.dataset,
        "model": cfg.model,
        "preset": cfg.preset,
        "cut": cfg.cut,
        "defense": stack_label(cfg.defense),
        "channel": channel_label(cfg.bottleneck, cfg.noise),
        "bottleneck": cfg.bottleneck,
        "noise": cfg.noise,
        "options": options_label(cfg.defense_options),
        "seed": cfg.seed,
        "num_classes": metrics.get("num_classes"),
        "path": str(run_dir),
    }
    # An accuracy measured as an expectation over noise draws may carry its CI over test images.
    rows = [
        base
        | _environment(prov)
        | {
            "attack": "",
            "attack_dir": "",
            "metric": "accuracy",
            "value": accuracy,
            "ci95": metrics.get("test_accuracy_ci95"),
        }
    ]
    root = run_dir / "attacks"
    folders = sorted(p for p in root.iterdir() if (p / "metrics.json").is_file()) if root.is_dir() else []
    baselines: list[dict[str, Any]] = []
    cleans: list[dict[str, Any]] = []  # sem_acc reference lines, as baselines: one per run
    for folder in folders:
        if keep is not None and folder.resolve() not in keep:
            continue
        m = read_json(folder / "metrics.json")
        if m.get("saturation_check_of"):  # a doubled-budget check of another folder, not a cell
            continue
        name = m.get("attack", folder.name.rsplit("-", 1)[0])
        data = m.get("attacker_data", "train")
        if data != "train":  # another threat model: its own columns
            name = f"{name}[{data}]"
        info = m.get("info")
        if isinstance(info, dict) and info.get("query_free"):  # never queried the target: say so in its name
            name = f"{name} (query-free)"
        variant = {"options": m.get("options", {}), "eval_images": m.get("eval_images"), "seed": m.get("seed")}
        cell = (
            base
            | _environment(m.get("provenance"))
            | {
                "attack": name,
                "attack_dir": folder.name,
                "variant": json.dumps(variant, sort_keys=True),
                "attacker_data": data,
                "eval_images": m.get("eval_images"),
            }
        )
        rows += _metric_rows(cell, m.get("metrics", {}))
        saturation = m.get("saturation")
        if isinstance(saturation, dict) and "unsaturated" in saturation:  # 1: doubling the budget still helped
            rows.append(cell | {"metric": "unsaturated", "value": float(bool(saturation["unsaturated"]))})
        # Attacks with the same attacker data score the same mean image; prefer the train split.
        baselines.insert(0 if data == "train" else len(baselines), m.get("baseline", {}))
        sem = m.get("semantic")
        if isinstance(sem, dict) and sem.get("clean_accuracy") is not None:
            clean = {"mean": sem["clean_accuracy"], "ci95": sem.get("clean_accuracy_ci95"), "n": m.get("eval_images")}
            cleans.insert(0 if data == "train" else len(cleans), {CLEAN_SEM_ACC: clean})
    if baselines:
        rows += _metric_rows(base | {"attack": "baseline", "attack_dir": ""}, baselines[0])
    if cleans:  # a run-level number like accuracy: attack ''
        rows += _metric_rows(base | {"attack": "", "attack_dir": ""}, cleans[0])
    return rows


def _metric_rows(base: dict[str, Any], metrics: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for metric, stats in metrics.items():
        if not isinstance(stats, dict):
            continue
        if "missing" in stats:
            rows.append(base | {"metric": metric, "value": math.nan, "note": f"{metric} missing: {stats['missing']}"})
        else:
            rows.append(
                base
                | {
                    "metric": metric,
                    "value": stats.get("mean", math.nan),
                    "ci95": stats.get("ci95", math.nan),
                    "n": stats.get("n"),
                }
            )
    return rows


def _label_attack_variants(df: pd.DataFrame) -> pd.DataFrame:
    """Two folders of one attack on one run (other options, images or seed) become two columns,
    each named by what differs: 'decoder (blocks=4)'; never by a folder hash."""
    if df.empty:
        return df
    real = df[(df.attack != "") & (df.attack != "baseline")]
    dirs = real.groupby(["run", "attack"]).attack_dir.nunique()
    for attack in sorted({a for (_, a), n in dirs.items() if n > 1}):
        mask = df.attack == attack
        variants = list(dict.fromkeys(df.loc[mask, "variant"]))
        flat = [_flatten(json.loads(v) if isinstance(v, str) else {}) for v in variants]
        keys = sorted({k for f in flat for k in f})
        differ = [k for k in keys if len({json.dumps(f.get(k), sort_keys=True) for f in flat}) > 1]
        labels = {}
        for i, (v, f) in enumerate(zip(variants, flat), 1):
            what = ", ".join(f"{k}={_short(f.get(k))}" for k in differ) or f"variant {i}"
            labels[v] = f"{attack} ({what})"
        df.loc[mask, "attack"] = df.loc[mask, "variant"].map(labels)
    return df


def _flatten(variant: dict[str, Any]) -> dict[str, Any]:
    """{'options': {'blocks': 4}, 'eval_images': 64} -> {'blocks': 4, 'eval_images': 64}."""
    out = dict(variant.get("options") or {})
    out |= {k: v for k, v in variant.items() if k != "options" and k not in out}
    return out


def _short(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def natural_key(value: str) -> tuple[float, str]:
    """Numbers in numeric order ('2' before '10'), then text."""
    try:
        return float(value), value
    except ValueError:
        return math.inf, value


def environment_differences(long: pd.DataFrame) -> dict[str, str]:
    """Per configuration whose cells (seeds, training and attacks) come from different
    environments: which provenance fields differ, e.g. 'num_threads 1 vs 2'. A field a cell
    did not record is unknown and never counts as a difference."""
    out: dict[str, str] = {}
    if long.empty:
        return out
    for config, g in long.groupby("config", sort=False):
        parts = []
        for field in ENV_FIELDS:
            values = sorted({v for v in g.get(field, []) if isinstance(v, str)}, key=natural_key)
            if len(values) > 1:
                parts.append(f"{field} {' vs '.join(values)}")
        if parts:
            out[str(config)] = "; ".join(parts)
    return out


# ------------------------------------------------------------------------- run facts for frontiers

# TrainConfig fields a frontier point shows elsewhere, so they never separate two points of a family.
FRONTIER_NAMED = {"dataset", "model", "preset", "defense", "bottleneck", "defense_options"} | NOT_A_SETTING


def flat_options(options: dict[str, Any]) -> dict[str, Any]:
    """{"gmm-cem": {"lam": 8}, "warmup": 0} -> {"gmm-cem.lam": 8, "warmup": 0}."""
    out: dict[str, Any] = {}
    for k, v in options.items():
        out.update({f"{k}.{kk}": vv for kk, vv in v.items()} if isinstance(v, dict) else {k: v})
    return out


def run_info(path: str) -> dict[str, Any]:
    """Spec, settings (options in force, flattened, plus the identity fields that may differ
    inside a family) and accuracy's sample size of one run folder."""
    run = Path(path)
    try:
        config, metrics = read_json(run / "config.json"), read_json(run / "metrics.json")
        cfg = TrainConfig.from_dict(config["train"])
    except (OSError, ValueError, KeyError, TypeError, UserError) as exc:
        raise UserError(f"{run}: unreadable run files ({type(exc).__name__}: {exc})") from None
    options = config.get("defense_options") or cfg.defense_options or {}
    settings = flat_options(options)  # a model field named like an option (width) is written train.width
    identity = {k: v for k, v in cfg.identity().items() if k not in FRONTIER_NAMED}
    settings.update({(f"train.{k}" if k in settings else k): v for k, v in identity.items()})
    acc_n = metrics.get("test_images") or metrics.get("test_groups") or 0
    return {"spec": cfg.defense, "options": options, "settings": settings, "acc_n": int(acc_n)}


def run_infos(long: pd.DataFrame) -> dict[str, dict[str, Any]]:
    """`run_info` of every run folder in long-form rows: what privbench.analysis.frontier.points
    needs besides the rows."""
    return {p: run_info(p) for p in dict.fromkeys(long.path)}


def per_image(long: pd.DataFrame, metric: str) -> dict[tuple[str, str], tuple[np.ndarray, np.ndarray] | None]:
    """Per attack folder of long-form rows that reports `metric`, keyed by the rows' (path,
    attack_dir): the (image indices, values) of its per_image.csv, None where that file gives none
    (`read_per_image`). What privbench.analysis.frontier.points(..., per_image=) resamples test
    images with; read for the same metric as the points."""
    scored = long[(long.metric == metric) & long.attack_dir.notna() & (long.attack_dir != "")]
    folders = dict.fromkeys(zip(scored.path.astype(str), scored.attack_dir.astype(str)))
    return {(p, d): read_per_image(Path(p) / "attacks" / d / "per_image.csv", metric) for p, d in folders}


# ------------------------------------------------------------------------------ run facts for tables


def train_settings(long: pd.DataFrame) -> dict[str, dict[str, Any]]:
    """Per configuration of long-form rows: the training fields of its first run's config.json
    (`train`), from which privbench.analysis.tables.aggregate(..., settings=) shows those that
    differ between configurations. An unreadable file is a one-line UserError."""
    out: dict[str, dict[str, Any]] = {}
    for config, path in long.groupby("config").path.first().items():
        run = Path(path)
        try:
            out[config] = dict(read_json(run / "config.json")["train"])
        except (OSError, ValueError, KeyError, TypeError, UserError) as exc:
            raise UserError(f"{run}: unreadable run files ({type(exc).__name__}: {exc})") from None
    return out
