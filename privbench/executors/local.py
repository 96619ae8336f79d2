"""The local executor: one cell after another in this process, with a running count and an ETA."""

from __future__ import annotations

import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from privbench.executors.base import Cell, Failure, attack_cells, cells_of, compute, count, one_line
from privbench.store.attacks import write_combined_grid
from privbench.util.progress import Progress, duration
from privbench.util.storage import atomic_write_text


def run_local(
    grid: Any, configs: list[Any], result: Any, *, train_fn=None, attack_fn=None, log: Callable[[str], None] = print
) -> tuple[list[Failure], int]:
    """One cell after another in this process, with a running count and an ETA."""
    progress = Progress({"training": len(configs), "attack": len(configs) * len(grid.attack)})
    failures: list[Failure] = []
    blocked = 0

    def attempt(cell: Cell) -> dict[str, Any] | None:
        lines: list[str] = []

        def tee(msg: str) -> None:
            lines.append(msg)
            log(msg)

        try:
            return compute(cell, tee, train_fn, attack_fn)
        except Exception as exc:  # the cell's failure, not the grid's: report it, go on
            failure = Failure(cell.label, one_line(exc), cell.log_path())
            atomic_write_text(failure.log, "\n".join(lines + [f"FAILED: {failure.error}", traceback.format_exc()]))
            failures.append(failure)
            log(f"  failed: {failure}")
            return None

    for train in cells_of(grid, configs, remote=False):
        label = train.label.removeprefix("training ")
        log(progress.start("training", train.label))
        out = attempt(train)
        seconds = progress.done("training")
        if out is None:
            progress.totals["attack"] -= len(grid.attack)
            blocked += len(grid.attack)
            continue
        result.runs.append(Path(out["path"]))
        count(result, out["computed"])
        result.timings.append({"cell": f"train {label}", "computed": out["computed"], "seconds": seconds})
        log(f"  {'trained in ' + duration(seconds) if out['computed'] else 'reused'}: {out['path']}")
        folders = []
        for cell in attack_cells(grid, train, out["path"], remote=False):
            # One call per attack cell, so the count and the ETA move per cell.
            log(progress.start("attack", cell.label))
            done = attempt(cell)
            seconds = progress.done("attack")
            if done is None:
                continue
            folders.append(Path(done["path"]))
            count(result, done["computed"])
            result.timings.append({"cell": cell.label, "computed": done["computed"], "seconds": seconds})
            log(f"  {'computed in ' + duration(seconds) if done['computed'] else 'reused'}: {done['path']}")
        result.attack_dirs += folders
        if len(folders) > 1:
            write_combined_grid(Path(out["path"]) / "attacks" / "grid.png", folders)
    return failures, blocked
