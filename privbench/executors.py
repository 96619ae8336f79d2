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

import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from privbench.errors import UserError

KINDS = ("local", "ray", "slurm")
# [executor] keys: (types, smallest value). Each executor reads its own keys and ignores the
# others, so one table can serve several executors and `--executor` picks one (docs/executors.md).
KEYS: dict[str, tuple[tuple[type, ...], float | None]] = {
    "kind": ((str,), None), "poll": ((int, float), 0.01), "address": ((str,), None), "num_cpus": ((int,), 1),
    "retries": ((int,), 0), "cpus_per_task": ((int,), 1), "gpus_per_task": ((int,), 0), "partition": ((str,), None),
    "time": ((int, str), None), "mem": ((str,), None), "array_parallelism": ((int,), 1), "sbatch": ((dict,), None),
    "cluster": ((str,), None),
}  # fmt: skip
PIP = {"ray": "pip install 'privbench[ray]'", "slurm": "pip install 'privbench[slurm]'"}


def parse_executor(value: Any) -> dict[str, Any]:
    """The [executor] table (or a bare kind name) checked and normalized; kind defaults to local."""
    if value is not None and not isinstance(value, str | dict):
        raise UserError(f"invalid executor {value!r}: expected local, ray, slurm or an [executor] table")
    table = {"kind": value} if isinstance(value, str) else dict(value or {})
    for key, v in table.items():
        if key not in KEYS:
            raise UserError(f"unknown [executor] key {key!r} (known: {', '.join(KEYS)})")
        types, low = KEYS[key]
        if isinstance(v, bool) or not isinstance(v, types) or (low is not None and v < low):
            kind = {str: "a string", int: "an integer", float: "a number", dict: "a table"}
            expected = " or ".join(kind[t] for t in types) + (f" >= {low}" if low is not None else "")
            raise UserError(f"invalid [executor] {key} {v!r}: expected {expected}")
    kind = table.setdefault("kind", "local")
    if kind not in KINDS:
        raise UserError(f"unknown executor {kind!r} (known: {', '.join(KINDS)})")
    if table.get("cluster", "slurm") not in ("slurm", "local"):
        raise UserError(f"invalid [executor] cluster {table['cluster']!r}: slurm, or local (submitit's local runner)")
    if "time" in table:
        from privbench.executor_slurm import slurm_minutes

        slurm_minutes(table["time"])
    if kind != "ray" and "address" in table:
        raise UserError(f"a Ray address is given, but the executor is {kind}: add --executor ray")
    return table


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
        from privbench.config import config_hash
        from privbench.runs import run_name

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
        if train_fn is None:
            from privbench.runs import train_run as train_fn
        run, trained = train_fn(cell.cfg, cell.results_dir, log=log)
        return {"path": str(run.path), "computed": bool(trained)}
    if attack_fn is None:
        from privbench.attack import attack_run as attack_fn
    options = {cell.attack: cell.options} if cell.options else {}
    (r,) = attack_fn(Path(str(cell.run)), [cell.attack], **cell.settings, options=options, device=cell.device, seed=0,
                     progress=cell.progress, log=log)  # fmt: skip
    return {"path": str(r["path"]), "computed": not r.get("reused", False)}


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


# ------------------------------------------------------------------------------ running a grid


def cells_of(grid: Any, configs: list[Any], *, remote: bool) -> list[Cell]:
    """The training cells of `configs`. A remote worker draws no progress bars (they would go to its
    log) and gets an absolute results folder (its working directory is not the driver's)."""
    from privbench.grid import Channel

    root = str(Path(grid.results_dir).resolve()) if remote else grid.results_dir
    return [
        Cell("train", f"training {c.defense} ({Channel(c.bottleneck, c.noise).label()}) seed {c.seed}",
             root, i, replace(c, progress=False) if remote else c, device=grid.device)
        for i, c in enumerate(configs)
    ]  # fmt: skip


def attack_cells(grid: Any, train: Cell, run: str, *, remote: bool) -> list[Cell]:
    options, settings = grid.attack_options(), grid.attack_settings()
    on = train.label.removeprefix("training ")
    return [
        Cell("attack", f"attack {name} on {on}", train.results_dir, train.index, run=run, attack=name,
             settings=settings, options=options.get(name, {}), device=grid.device,
             progress=False if remote else grid.progress)
        for name in grid.attack
    ]  # fmt: skip


@contextmanager
def open_executor(grid: Any, log: Callable[[str], None] = print) -> Iterator[Any]:
    """The grid's executor, started (None for local); bad settings raise UserError before any cell."""
    kind = grid.executor.get("kind", "local")
    if kind == "local":
        yield None
        return
    if kind == "ray":
        from privbench.executor_ray import RayBackend as backend_cls
    else:
        from privbench.executor_slurm import SlurmBackend as backend_cls
    backend = backend_cls(grid.executor, device=grid.device, results_dir=grid.results_dir, log=log)
    try:
        yield backend
    finally:
        backend.close()


def compute_cells(backend: Any, grid: Any, configs: list[Any], result: Any, *, train_fn=None, attack_fn=None,
                  log: Callable[[str], None] = print) -> None:  # fmt: skip
    """Compute every cell of `configs` x grid.attack and fill `result` (runs, attack_dirs, counts,
    timings) in grid order; raise CellsFailed at the end if some cells failed."""
    if backend is None:
        failures, blocked = run_local(grid, configs, result, train_fn=train_fn, attack_fn=attack_fn, log=log)
    else:
        from privbench.executor_remote import Scheduler

        failures, blocked = Scheduler(backend, grid, log).run(configs, result)
    if failures:
        raise CellsFailed(failures, blocked)


def run_local(grid: Any, configs: list[Any], result: Any, *, train_fn=None, attack_fn=None,
              log: Callable[[str], None] = print) -> tuple[list[Failure], int]:  # fmt: skip
    """One cell after another in this process, with a running count and an ETA."""
    from privbench.attack import write_combined_grid
    from privbench.progress import Progress, duration

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
            from privbench.storage import atomic_write_text

            failure = Failure(cell.label, _one_line(exc), cell.log_path())
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
        _count(result, out["computed"])
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
            _count(result, done["computed"])
            result.timings.append({"cell": cell.label, "computed": done["computed"], "seconds": seconds})
            log(f"  {'computed in ' + duration(seconds) if done['computed'] else 'reused'}: {done['path']}")
        result.attack_dirs += folders
        if len(folders) > 1:
            write_combined_grid(Path(out["path"]) / "attacks" / "grid.png", folders)
    return failures, blocked


def _count(result: Any, computed: bool) -> None:
    if computed:
        result.computed += 1
    else:
        result.reused += 1
