"""Precision report: how much do accuracy and attack metrics move between training seeds?

    python bench/precision.py RESULTS_DIR --seeds 5                  # train + attack the default grid
    python bench/precision.py RESULTS_DIR --seeds 5 --defense none --noise 0.1 --set epochs=20
    python bench/precision.py RESULTS_DIR --summarize                # only read finished run folders
    python bench/precision.py RESULTS_DIR --summarize --paired-with none@C8+0.025   # differences seed by seed

Trains seeds 0..N-1 of each configuration with `privbench run` (cached: finished cells are
reused), then prints, per configuration (every training setting but the seed), the mean and
sample sd over seeds of the test accuracy and of each attack metric, and the minimum
detectable difference (MDD) between two configurations at 3 and 5 seeds per arm: the smallest
true difference a two-sided two-sample t test (alpha 0.05) finds with power 0.8, given that
sd. A difference smaller than the MDD can read "indistinguishable" even when it is real. The
last column turns that round: the seeds per arm needed to resolve a difference of a given size
(default: 2 accuracy points, 0.02 SSIM; `--resolve QUANTITY=SIZE` for others).
A configuration's label names its defense, channel and options, plus every setting that differs
from its preset (`none@C8+0.025 (epochs=15)`: a run of an older quick preset), so runs of two
presets in one folder are never pooled. Accuracy is in points (%), SSIM in [0, 1], PSNR in dB.
`--json FILE` keeps the raw per-seed numbers. Exit 2 with one line on bad input (fewer than 2 seeds, a missing folder).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

from privbench.engine.config import PRESETS, TrainConfig, config_hash
from privbench.errors import UserError
from privbench.util.stats import (
    mean,
    min_detectable_difference,
    paired_min_detectable_difference,
    sd,
    sd_ci95,
    seeds_needed,
)
from privbench.util.storage import read_json

METRICS = ("ssim", "psnr")  # attack metrics reported; accuracy always comes first
TARGETS = {"accuracy": 1.0, "ssim": 0.010}  # the sd a stable preset must stay under
# The differences a reader wants resolved: two accuracy points, and for SSIM the same multiple of
# its sd target.
RESOLVE = {"accuracy": 2.0, "ssim": 0.02}


def _label(train: dict[str, Any]) -> str:
    channel = "plain" if not train.get("bottleneck") and not train.get("noise") else (
        f"C{train['bottleneck']}" if train.get("bottleneck") else "") + (
        f"+{train['noise']:g}" if train.get("noise") else "")  # fmt: skip
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


def collect(results_dir: Path) -> dict[str, dict[str, Any]]:
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
        cell["label"] = _label(train)
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


def summarize(cells: dict[str, dict[str, Any]], resolve: dict[str, float] | None = None) -> list[dict[str, Any]]:
    """One row per (configuration, quantity): n, mean, sd, MDD at 3 and 5 seeds, target met, and
    the seeds that resolve a difference of `resolve[metric]` (default RESOLVE)."""
    rows = []
    for cell in sorted(cells.values(), key=lambda c: c["label"]):
        for quantity, by_seed in cell["values"].items():
            values = [by_seed[s] for s in sorted(by_seed)]
            target = TARGETS.get(quantity.split()[-1])
            row = _row(cell["label"], quantity, values, resolve)
            row.update(target_sd=target, meets=None if target is None or len(values) < 2 else row["sd"] <= target)
            # Whether the seeds settle the verdict: the sd's 95% interval lies wholly on one side.
            row["resolved"] = row["meets"] is not None and not row["sd_lo"] <= target <= row["sd_hi"]
            rows.append(row)
    return rows


def _row(
    label: str, quantity: str, values: list[float], resolve: dict[str, float] | None, *, paired: bool = False
) -> dict[str, Any]:
    """`values` per seed; paired: they are within-seed differences, so MDD and seeds are paired ones."""
    spread = sd(values)
    lo, hi = sd_ci95(values)
    mdd = paired_min_detectable_difference if paired else min_detectable_difference
    size = (RESOLVE if resolve is None else resolve).get(quantity.split()[-1])
    needed = None if size is None else seeds_needed(spread, size, paired=paired)
    return {"configuration": label, "quantity": quantity, "n": len(values), "mean": mean(values), "sd": spread,
            "sd_lo": lo, "sd_hi": hi,
            "mdd3": mdd(spread, 3), "mdd5": mdd(spread, 5), "target_sd": None, "meets": None,
            "resolve": size, "seeds_needed": needed, "values": values}  # fmt: skip


def paired(
    cells: dict[str, dict[str, Any]], reference: str, resolve: dict[str, float] | None = None
) -> list[dict[str, Any]]:
    """Each configuration minus `reference` (a label), seed by seed over their common seeds: the
    mean and sd of the differences and the paired MDD at 3 and 5 seeds. A seed fixes the
    initialisation and batch order of every configuration, so the differences can cancel part of
    its luck (docs/precision.md: little, for accuracy over 15 seeds)."""
    matches = [c for c in cells.values() if c["label"] == reference]
    if len(matches) != 1:
        known = ", ".join(sorted(c["label"] for c in cells.values()))
        why = "is no configuration here" if not matches else "names several configurations here"
        raise UserError(f"--paired-with {reference!r} {why} (known: {known})")
    ref = matches[0]
    rows = []
    for cell in sorted(cells.values(), key=lambda c: c["label"]):
        if cell is ref:
            continue
        for quantity, by_seed in cell["values"].items():
            base = ref["values"].get(quantity, {})
            common = sorted(set(by_seed) & set(base))
            diffs = [by_seed[s] - base[s] for s in common]
            label = f"{cell['label']} - {reference}"
            rows.append(_row(label, quantity, diffs, resolve, paired=True) | {"seeds": common})
    return rows


def render(rows: list[dict[str, Any]]) -> str:
    """A Markdown table; sd and MDD are in the quantity's unit (accuracy in points)."""

    def num(v: float, quantity: str) -> str:
        digits = 3 if "ssim" in quantity else 2
        return "n/a" if v != v else f"{v:.{digits}f}"

    lines = [
        "| configuration | quantity | n | mean | sd | sd 95% CI | MDD (3 seeds) | MDD (5 seeds) | sd target "
        "| seeds to resolve |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        q = r["quantity"]
        mark = "" if r["meets"] is None else (" met" if r["meets"] else " **missed**")
        mark += " (CI spans it)" if r["meets"] is not None and not r.get("resolved") else ""
        ci = "n/a" if r["sd_lo"] != r["sd_lo"] else f"{num(r['sd_lo'], q)}..{num(r['sd_hi'], q)}"
        target = f"<= {r['target_sd']:g}{mark}" if r["target_sd"] is not None else ""
        needed = ""
        if r.get("resolve") is not None:
            count = "n/a" if r["sd"] != r["sd"] else (str(r["seeds_needed"]) if r["seeds_needed"] else "> 1000")
            needed = f"{count} for {r['resolve']:g}"
        lines.append(
            f"| {r['configuration']} | {q} | {r['n']} | {num(r['mean'], q)} | {num(r['sd'], q)} | {ci} | "
            f"{num(r['mdd3'], q)} | {num(r['mdd5'], q)} | {target} | {needed} |"
        )
    return "\n".join(lines)


def _resolve(pairs: list[str]) -> dict[str, float]:
    out = dict(RESOLVE)
    for pair in pairs:
        key, sep, value = pair.partition("=")
        try:
            size = float(value)
        except ValueError:
            size = float("nan")
        if not sep or not key or not (size > 0 and math.isfinite(size)):
            raise UserError(f"invalid --resolve {pair!r}: expected QUANTITY=SIZE with a positive SIZE (accuracy=2)")
        out[key] = size
    return out


def _overrides(pairs: list[str]) -> dict[str, Any]:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UserError(f"invalid --set {pair!r}: expected key=value")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("results_dir", type=Path, help="a results folder dedicated to this report")
    ap.add_argument("--seeds", type=int, default=5, help="seeds 0..N-1 per configuration (>= 2)")
    ap.add_argument("--defense", action="append", help="NAME[@CHANNEL], repeatable [default: the run grid]")
    ap.add_argument("--noise", action="append", type=float, help="channel noise, repeatable [default: 0.025]")
    ap.add_argument("--attack", action="append", help="repeatable [default: decoder]")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="TrainConfig field over the preset")
    ap.add_argument("--summarize", action="store_true", help="train nothing: report the run folders already there")
    ap.add_argument("--json", type=Path, help="write the rows (with per-seed values) to this file")
    ap.add_argument("--resolve", action="append", default=[], metavar="QUANTITY=SIZE",
                    help="the difference whose seeds to report, per metric (accuracy, ssim, psnr), "
                         "repeatable [default: accuracy=2 ssim=0.02]")  # fmt: skip
    ap.add_argument("--paired-with", metavar="CONFIGURATION",
                    help="also report every configuration minus this one (its label, e.g. none@C8+0.025), "
                         "seed by seed: the paired sd and MDD")  # fmt: skip
    args = ap.parse_args(argv)
    try:
        resolve = _resolve(args.resolve)
        if not args.summarize:
            if args.seeds < 2:
                raise UserError(f"invalid --seeds {args.seeds}: a spread needs at least 2 seeds")
            import privbench.api as pb

            grid: dict[str, Any] = {"seeds": args.seeds, "attack": args.attack or ["decoder"],
                                    "results_dir": str(args.results_dir), "train": _overrides(args.set)}  # fmt: skip
            if args.defense:
                grid["defense"] = args.defense
            if args.noise:
                grid["noise"] = args.noise
            pb.run(**grid)
        if not args.results_dir.is_dir():
            raise UserError(f"results folder {args.results_dir} does not exist")
        cells = collect(args.results_dir)
        rows = summarize(cells, resolve)
        pairs = paired(cells, args.paired_with, resolve) if args.paired_with else []
        if not rows:
            raise UserError(f"no finished run folders under {args.results_dir}")
        if all(r["n"] < 2 for r in rows):
            raise UserError(f"every configuration under {args.results_dir} has one seed: no spread to report")
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(render(rows))
    if pairs:
        print(f"\nPaired with {args.paired_with} over common seeds (mean and sd of the differences; paired MDD):\n")
        print(render(pairs))
    if args.json:
        args.json.write_text(json.dumps(rows + pairs, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
