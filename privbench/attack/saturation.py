"""Saturation check: does a learned attack still improve when its budget doubles?

A low SSIM means a strong defense only if the attack has converged. For every learned attack (one
that takes `epochs`) the check runs the same attack again at twice its epochs, into its own
folder, and records both figures in the first folder's metrics.json under "saturation". The
cell is `unsaturated` when the doubled budget raises the mean SSIM by more than the cell's 95% CI
(over test images); tables then mark it. The doubled folder says which folder it checks
(`saturation_check_of`) and is left out of tables: it is a check, not a cell.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from privbench.util.storage import read_json, write_json

BUDGET = "epochs"  # the option that makes an attack "learned"
FACTOR = 2


def verdict(ssim: float, ci95: float | None, doubled: float) -> bool:
    """True (unsaturated) when the doubled budget's SSIM exceeds the first by more than the CI."""
    return doubled - ssim > (ci95 if ci95 is not None else 0.0)


def check(
    run_dir: str | Path,
    results: list[dict[str, Any]],
    attack_fn: Callable[..., list[dict[str, Any]]],
    **settings: Any,
) -> list[dict[str, Any]]:
    """Add a "saturation" record to each learned attack's result (and its metrics.json);
    `attack_fn` is privbench.attack.harness.attack_run, `settings` its keyword arguments (log included)."""
    log: Callable[[str], None] = settings.get("log", print)
    out = []
    for r in results:
        options = dict(r.get("options") or {})
        if r.get("saturation"):  # recorded by an earlier run of this folder
            _say(log, r["attack"], r["saturation"])
        if BUDGET not in options or r.get("saturation") or r.get("saturation_check_of"):
            out.append(r)
            continue
        name, folder = r["attack"], Path(r["path"])
        doubled_options = options | {BUDGET: options[BUDGET] * FACTOR}
        log(f"{name}: saturation check at {BUDGET}={doubled_options[BUDGET]}")
        second = attack_fn(run_dir, [name], **settings, options={name: doubled_options}, check_saturation=False)[0]
        second_folder = Path(second["path"])
        marked = read_json(second_folder / "metrics.json")
        if marked.get("saturation_check_of") != folder.name:
            write_json(second_folder / "metrics.json", marked | {"saturation_check_of": folder.name})
        ssim, doubled = r["metrics"]["ssim"], second["metrics"]["ssim"]
        record = {
            "budget": {BUDGET: options[BUDGET]},
            "doubled_budget": {BUDGET: doubled_options[BUDGET]},
            "ssim": ssim["mean"],
            "ssim_ci95": ssim.get("ci95"),
            "ssim_doubled": doubled["mean"],
            "unsaturated": verdict(ssim["mean"], ssim.get("ci95"), doubled["mean"]),
            "doubled_folder": second_folder.name,
        }
        write_json(folder / "metrics.json", read_json(folder / "metrics.json") | {"saturation": record})
        _say(log, name, record)
        out.append(r | {"saturation": record})
    return out


def _say(log: Callable[[str], None], name: str, record: dict[str, Any]) -> None:
    word = "UNSATURATED" if record["unsaturated"] else "saturated"
    log(f"{name}: SSIM {record['ssim']:.4f} -> {record['ssim_doubled']:.4f} at twice the budget: {word}")
