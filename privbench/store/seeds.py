"""Seeds of one configuration, read from a results folder: the input of the precision report.

Runs whose identity differs only in the seed are one configuration; each gives its test
accuracy and every attack metric per seed (privbench.analysis.precision summarises them), and
`configuration_runs` opens the run folders of one configuration by its label.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

from privbench.engine.config import PRESETS, TrainConfig, config_hash
from privbench.errors import UserError
from privbench.store.runs import Run
from privbench.util.storage import read_json

METRICS = ("ssim", "psnr")  # attack metrics collected; accuracy always comes first


def configuration_label(train: dict[str, Any]) -> str:
    channel = (
        "plain"
        if not train.get("bottleneck") and not train.get("noise")
        else (f"C{train['bottleneck']}" if train.get("bottleneck") else "")
        + (f"+{train['noise']:g}" if train.get("noise") else "")
    )
    # Settings that differ from the run's preset name it too: a folder holding runs of an older
    # preset (15 epochs) beside the current one must not pool them under one label. They are read
    # as the library reads the folder (a field it lacks has the value it trained with).
    cfg = TrainConfig.from_dict(train)
    values = cfg.to_dict()
    if not cfg.noise:
        del values["noise_warmup"]  # nothing to ramp: the same run whatever the preset says
    preset = PRESETS.get(cfg.preset, {})
    changed = {k: values[k] for k, v in preset.items() if k in values and json.dumps(values[k]) != json.dumps(v)}
    opts = {**(train.get("defense_options") or {}), **changed}
    text = ",".join(f"{k}={v}" for k, v in sorted(opts.items()))
    return f"{train['defense']}@{channel.lstrip('+')}" + (f" ({text})" if text else "")


def configuration_key(train: dict[str, Any]) -> str:
    """The run hash without the seed: runs with one key are seeds of one configuration."""
    return config_hash({k: v for k, v in TrainConfig.from_dict(train).identity().items() if k != "seed"})


def _budget(result: dict[str, Any]) -> str:
    options = result.get("options") or {}
    return ",".join(f"{k}={options[k]}" for k in ("epochs", "steps") if k in options)


def collect_seeds(results_dir: Path) -> dict[str, dict[str, Any]]:
    """{configuration key: {"label", "accuracy": {seed: %}, "<attack> <metric>": {seed: value}}}.
    An attack run at several budgets in the folder (a saturation check, a longer decoder) is one
    quantity per budget, "<attack> (epochs=6) <metric>", never one overwriting another."""
    cells: dict[str, dict[str, Any]] = defaultdict(lambda: {"values": defaultdict(dict)})
    finished = (p for p in results_dir.iterdir() if (p / "metrics.json").is_file() and (p / "config.json").is_file())
    attack_results = []
    for run in sorted(finished):
        train = read_json(run / "config.json")["train"]
        seed = train["seed"]
        cell = cells[configuration_key(train)]
        cell["label"] = configuration_label(train)
        cell["values"]["accuracy"][seed] = 100 * read_json(run / "metrics.json")["test_accuracy"]
        attack_results += [(cell, seed, read_json(f)) for f in sorted((run / "attacks").glob("*/metrics.json"))]
    budgets = defaultdict(set)
    for _, _, result in attack_results:
        budgets[result["attack"]].add(_budget(result))
    for cell, seed, result in attack_results:
        name = result["attack"]
        if len(budgets[name]) > 1:
            name += f" ({_budget(result) or 'budget not recorded'})"
        for metric in METRICS:
            stat = result["metrics"].get(metric) or {}
            if stat.get("mean") is not None:
                cell["values"][f"{name} {metric}"][seed] = stat["mean"]
    return dict(cells)


def configuration_runs(results_dir: Path, label: str) -> list[Run]:
    """The finished runs of the configuration `label`, one per seed, by seed. Runs are grouped as
    `collect_seeds` groups them (every identity setting but the seed), so a label that two
    configurations share (settings it does not show, such as the data seed) is refused, not pooled."""
    if not results_dir.is_dir():
        raise UserError(f"results folder {results_dir} does not exist")
    groups: dict[str, dict[int, Path]] = defaultdict(dict)
    labels: dict[str, str] = {}
    for path in sorted(results_dir.iterdir()):
        if (path / "metrics.json").is_file() and (path / "config.json").is_file():
            train = read_json(path / "config.json")["train"]
            key = configuration_key(train)
            labels[key] = configuration_label(train)
            groups[key][int(train["seed"])] = path
    matches = [k for k, v in labels.items() if v == label]
    if len(matches) != 1:
        why = "no configuration" if not matches else f"{len(matches)} configurations share the label"
        raise UserError(f"{why} {label!r} under {results_dir} (known: {', '.join(sorted(set(labels.values())))})")
    found = groups[matches[0]]
    if len(found) < 2:
        raise UserError(f"{label!r} has one seed under {results_dir}: a spread needs at least 2")
    return [Run.open(found[s]) for s in sorted(found)]
