"""Compute a grid's cells with the executor it names: local, Ray or SLURM (docs/executors.md)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from privbench.executors.base import CellsFailed
from privbench.executors.local import run_local
from privbench.executors.ray import RayBackend
from privbench.executors.remote import Scheduler
from privbench.executors.slurm import SlurmBackend


@contextmanager
def open_executor(grid: Any, log: Callable[[str], None] = print) -> Iterator[Any]:
    """The grid's executor, started (None for local); bad settings raise UserError before any cell."""
    kind = grid.executor.get("kind", "local")
    if kind == "local":
        yield None
        return
    backend_cls = RayBackend if kind == "ray" else SlurmBackend
    backend = backend_cls(grid.executor, device=grid.device, results_dir=grid.results_dir, log=log)
    try:
        yield backend
    finally:
        backend.close()


def compute_cells(
    backend: Any,
    grid: Any,
    configs: list[Any],
    result: Any,
    *,
    train_fn=None,
    attack_fn=None,
    log: Callable[[str], None] = print,
) -> None:
    """Compute every cell of `configs` x grid.attack and fill `result` (runs, attack_dirs, counts,
    timings) in grid order; raise CellsFailed at the end if some cells failed."""
    if backend is None:
        failures, blocked = run_local(grid, configs, result, train_fn=train_fn, attack_fn=attack_fn, log=log)
    else:
        failures, blocked = Scheduler(backend, grid, log).run(configs, result)
    if failures:
        raise CellsFailed(failures, blocked)
