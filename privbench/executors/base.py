"""Executors: who computes the cells of a `privbench run` grid (docs/executors.md).

`local` (the default) computes the cells one after another in this process, as privbench always
has. `ray` and `slurm` (through submitit) hand each cell to the engine as one task: a training
cell, then, once it has finished, one task per attack on its run; independent cells run in
parallel up to the engine's resources. The run-folder store stays the one source of truth: an
executor keeps no state of its own, every cell is computed by train_run / attack_run (atomic
build under a lock), so a rerun with any executor reuses every finished cell and two runs on one
results folder never compute a cell twice. A cell that fails is reported with its log; the other
cells go on, and CellsFailed names the failed ones at the end (the command exits 1).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from privbench.engine.config import config_hash
from privbench.grid.spec import Channel
from privbench.store.attacks import attack_run
from privbench.store.runs import run_name, train_run

PIP = {"ray": "pip install 'privbench[ray]'", "slurm": "pip install 'privbench[slurm]'"}


# ------------------------------------------------------------------------------ cells


@dataclass
class Cell:
    """One task: a training cell (cfg), or one attack on the run folder of training cell `index`."""

    kind: str  # "train" | "attack"
    label: str  # what progress lines call it
    results_dir: str
    index: int = 0
    cfg: Any = None  # TrainConfig of a training cell
    run: str | None = None
    attack: str | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)
    device: str = "auto"
    progress: bool = False

    @property
    def id(self) -> str:
        if self.kind == "train":
            return run_name(self.cfg)
        return f"{Path(str(self.run)).name}.{self.attack}-{config_hash([self.settings, self.options])[:8]}"

    def log_path(self) -> Path:
        return Path(self.results_dir) / "logs" / "cells" / f"{self.id}.log"


@dataclass
class Failure:
    cell: str
    error: str
    log: Path

    def __str__(self) -> str:
        return f"{self.cell}: {self.error} (log: {self.log})"


class CellsFailed(Exception):
    """Some cells failed; the others finished. Rerunning the same command retries only these."""

    def __init__(self, failures: list[Failure], blocked: int = 0):
        self.failures, self.blocked = failures, blocked
        also = f" ({blocked} attack cells did not run: their training failed)" if blocked else ""
        lines = [f"error: {len(failures)} cells failed{also}; rerun the same command to retry them:"]
        super().__init__("\n".join(lines + [f"  {f}" for f in failures]))


def compute(cell: Cell, log: Callable[[str], None], train_fn=None, attack_fn=None) -> dict[str, Any]:
    """Compute one cell with train_run / attack_run (or stand-ins): {"path", "computed"}."""
    if cell.kind == "train":
        run, trained = (train_fn or train_run)(cell.cfg, cell.results_dir, log=log)
        return {"path": str(run.path), "computed": bool(trained)}
    options = {cell.attack: cell.options} if cell.options else {}
    (r,) = (attack_fn or attack_run)(
        Path(str(cell.run)),
        [cell.attack],
        **cell.settings,
        options=options,
        device=cell.device,
        seed=0,
        progress=cell.progress,
        log=log,
    )
    return {"path": str(r["path"]), "computed": not r.get("reused", False)}


def one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


# ------------------------------------------------------------------------------ running a grid


def cells_of(grid: Any, configs: list[Any], *, remote: bool) -> list[Cell]:
    """The training cells of `configs`. A remote worker draws no progress bars (they would go to its
    log) and gets an absolute results folder (its working directory is not the driver's)."""
    root = str(Path(grid.results_dir).resolve()) if remote else grid.results_dir
    return [
        Cell(
            "train",
            f"training {c.defense} ({Channel(c.bottleneck, c.noise).label()}) seed {c.seed}",
            root,
            i,
            replace(c, progress=False) if remote else c,
            device=grid.device,
        )
        for i, c in enumerate(configs)
    ]


def attack_cells(grid: Any, train: Cell, run: str, *, remote: bool) -> list[Cell]:
    options, settings = grid.attack_options(), grid.attack_settings()
    on = train.label.removeprefix("training ")
    return [
        Cell(
            "attack",
            f"attack {name} on {on}",
            train.results_dir,
            train.index,
            run=run,
            attack=name,
            settings=settings,
            options=options.get(name, {}),
            device=grid.device,
            progress=False if remote else grid.progress,
        )
        for name in grid.attack
    ]


def count(result: Any, computed: bool) -> None:
    if computed:
        result.computed += 1
    else:
        result.reused += 1
