"""Precision: how much accuracy and attack metrics move between training seeds, and how many seeds
a difference of a given size needs (`privbench precision`; docs/precision.md).

Input: the cells privbench.store.seeds.collect_seeds reads. Per configuration and quantity:
the mean and sample sd over seeds with the sd's 95% interval, the minimum detectable difference
(two-sided t test, alpha 0.05, power 0.8) at 3 and 5 seeds, whether the sd meets the preset's
target, and the seeds per arm that resolve a difference of a given size; paired rows do the same
for within-seed differences against one configuration.
"""

from __future__ import annotations

import math
from typing import Any

from privbench.errors import UserError
from privbench.util.stats import (
    mean,
    min_detectable_difference,
    paired_min_detectable_difference,
    sd,
    sd_ci95,
    seeds_needed,
)

TARGETS = {"accuracy": 1.0, "ssim": 0.010}  # the sd a stable preset must stay under
# The differences a reader wants resolved: two accuracy points, and for SSIM the same multiple of
# its sd target.
RESOLVE = {"accuracy": 2.0, "ssim": 0.02}


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
    return {
        "configuration": label,
        "quantity": quantity,
        "n": len(values),
        "mean": mean(values),
        "sd": spread,
        "sd_lo": lo,
        "sd_hi": hi,
        "mdd3": mdd(spread, 3),
        "mdd5": mdd(spread, 5),
        "target_sd": None,
        "meets": None,
        "resolve": size,
        "seeds_needed": needed,
        "values": values,
    }


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


def parse_resolve(pairs: list[str]) -> dict[str, float]:
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
