"""Executor overhead: what handing cells to Ray or SLURM costs against computing them in process.

    python bench/executor_overhead.py                                  # local, ray, slurm-local; 16 cells
    python bench/executor_overhead.py --executor ray --cpus 4 --seeds 8

Runs one tiny grid (defenses none@plain and none, `--seeds` seeds, the optimization attack with
5 steps: 2 x seeds training cells + as many attack cells, 16 by default) from scratch into a
fresh results folder per executor, and prints per executor: the start-up (ray.init, submitit
set-up), the wall time of the grid, the summed compute time of the cells, and the per-cell
overhead from submission to the cell's start in its worker (median and max; the local executor
calls the cell directly). `slurm-local` is submitit's local runner, which starts a fresh Python
process per cell, as a SLURM job does. The results of every executor must be identical; the
script says so. docs/executors.md records the figures with machine, load and date.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

from privbench import job as sweep
from privbench.errors import UserError
from privbench.executors.compute import open_executor
from privbench.grid.spec import Grid

EXECUTORS = {
    "local": {"kind": "local"},  # cpus_per_task is ignored
    "ray": {"kind": "ray", "cpus_per_task": 1, "poll": 0.1},
    "slurm-local": {"kind": "slurm", "cluster": "local", "poll": 0.1},
}


def tiny_grid(seeds: int, results_dir: Path, executor: dict) -> Grid:
    return Grid(
        defense=["none@plain", "none"],
        attack=["optimization"],
        seeds=seeds,
        device="cpu",
        progress=False,
        train={"epochs": 1, "n_train": 300, "width": 0.125},
        attacks={"steps": 5, "eval_images": 16},
        results_dir=str(results_dir),
        executor=executor,
    )


def measure(name: str, seeds: int, cpus: int, root: Path) -> dict:
    executor = dict(EXECUTORS[name])
    if name == "ray":
        executor["num_cpus"] = cpus
    if name == "slurm-local":
        executor["array_parallelism"] = cpus
    grid = tiny_grid(seeds, root / name, executor)
    t0 = time.perf_counter()
    with open_executor(grid, log=lambda _m: None):
        startup = time.perf_counter() - t0  # started once here, to time it alone; run_grid starts its own
    # Overhead: 2 training + 2 attack cells on 2 slots, so no cell queues behind another.
    small = sweep.run_grid(
        tiny_grid(1, root / f"{name}-overhead", executor | {"cpus_per_task": max(1, cpus // 2)}), log=lambda _m: None
    )
    queued = [t["queued_seconds"] for t in small.timings if "queued_seconds" in t]
    t0 = time.perf_counter()
    result = sweep.run_grid(grid, log=lambda _m: None)
    wall = time.perf_counter() - t0
    return {
        "executor": name,
        "cells": result.computed,
        "startup_s": startup,
        "wall_s": wall,
        "compute_s": sum(t["seconds"] for t in result.timings),
        "overhead_median_s": statistics.median(queued) if queued else 0.0,
        "overhead_max_s": max(queued) if queued else 0.0,
        "results": pd.read_csv(result.out_dir / "results.csv").drop(columns=["path"]),
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--executor", action="append", choices=list(EXECUTORS), help="repeatable [default: all]")
    ap.add_argument("--seeds", type=int, default=4, help="seeds per defense: 4 x seeds cells [default: 4]")
    ap.add_argument("--cpus", type=int, default=os.cpu_count() or 1, help="Ray CPUs / parallel local jobs")
    ap.add_argument("--results", default=None, help="where the results folders go [default: a temporary folder]")
    args = ap.parse_args(argv)
    root = Path(args.results or tempfile.mkdtemp(prefix="privbench-executors-"))
    rows = []
    try:
        for name in args.executor or list(EXECUTORS):
            rows.append(measure(name, args.seeds, args.cpus, root))
            r = rows[-1]
            print(
                f"{name:12s} {r['cells']:3d} cells  start-up {r['startup_s']:5.1f} s  wall {r['wall_s']:6.1f} s  "
                f"cell compute {r['compute_s']:6.1f} s  submit-to-start median {r['overhead_median_s']:.2f} s, "
                f"max {r['overhead_max_s']:.2f} s",
                flush=True,
            )
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    same = all(r["results"].equals(rows[0]["results"]) for r in rows[1:])
    print(f"results.csv identical across {', '.join(r['executor'] for r in rows)}: {same}")
    print(f"load average: {' '.join(f'{x:.2f}' for x in os.getloadavg())}; {os.cpu_count()} CPUs; results in {root}")
    if not same:
        sys.exit(1)


if __name__ == "__main__":
    main()
