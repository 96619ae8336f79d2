"""Running a `privbench run` grid (privbench.grid defines it): train each missing cell, attack
each run, write the tables and plots.

Finished cells are reused, so rerunning the same or an extended grid computes only what is
missing, and an interrupted run continues where it stopped. Folders are built atomically under
a lock, so two runs into the same results folder never corrupt each other; the output folder's
files are written atomically too. Output paths are checked before any work, and progress is a
running count of training and attack cells with an ETA.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# The grid's definition lives in privbench.grid; these names stay importable from here.
from privbench.grid import (  # noqa: F401
    ATTACK_SETTINGS,
    BASE_BOTTLENECK,
    BASE_NOISE,
    DEFAULT_ATTACKS,
    DEFAULT_DEFENSES,
    TOP_KEYS,
    Channel,
    Grid,
    grid_from_options,
    load_config,
)

# ---------------------------------------------------------------------------------- running


@dataclass
class GridResult:
    """What a grid run produced: the numeric table, where its files are, and what it cost."""

    table: Any  # pandas DataFrame (privbench.tables.aggregate)
    long: Any  # long-form pandas DataFrame
    out_dir: Path
    files: list[Path]
    runs: list[Path]
    attack_dirs: list[Path]
    computed: int = 0
    reused: int = 0
    timings: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    verdicts: list[str] = field(default_factory=list)  # one line per defense family (privbench.frontier)


def run_grid(
    grid: Grid,
    *,
    train_fn: Callable[..., Any] | None = None,
    attack_fn: Callable[..., list[dict[str, Any]]] | None = None,
    validate: bool = True,
    log: Callable[[str], None] = print,
) -> GridResult:
    """Compute the grid's missing cells with the grid's executor (privbench.executors), then write
    table.md, table.csv, results.csv (long form), privacy_utility.png, reconstructions.png and
    cells.json into the output folder, and, when the grid has a reference frontier, frontier.csv,
    verdicts.csv and frontier.png / .pdf with one verdict line per defense (`result.verdicts`).
    If some cells fail, the others are still computed and CellsFailed names the failed ones (no
    output files: the grid is incomplete).

    `train_fn(cfg, results_dir, log=...) -> (Run, trained)` and `attack_fn(run_dir, [attack],
    **settings) -> [result with "path" and "reused"]`, called once per attack cell, default to
    the real ones (tests inject cheap stand-ins; the local executor only).
    """
    from privbench import plots, tables
    from privbench.executors import compute_cells, open_executor
    from privbench.outputs import check_output_dir, write_manifest
    from privbench.storage import atomic_write_text

    t_start = time.perf_counter()
    check_output_dir(grid.results_dir, "results folder")  # before any work: a typo must not cost the grid
    out_dir = grid.out_dir()
    check_output_dir(out_dir, "output folder")
    # The executor starts (and bad executor settings fail) before any cell; it computes them all.
    with open_executor(grid, log=log) as executor:
        if validate:
            grid.validate()
        configs = grid.train_configs()
        log(f"{len(configs)} training cells, {len(configs) * len(grid.attack)} attack cells -> {out_dir}")
        result = GridResult(table=None, long=None, out_dir=out_dir, files=[], runs=[], attack_dirs=[])
        compute_cells(executor, grid, configs, result, train_fn=train_fn, attack_fn=attack_fn, log=log)

    long = tables.collect(result.runs, attack_dirs=result.attack_dirs)
    table = tables.aggregate(long, result.runs)
    result.long, result.table = long, table
    out_dir.mkdir(parents=True, exist_ok=True)
    write_manifest(out_dir, result.runs, result.attack_dirs)  # lets `table` / `plot` read this folder back
    files = {
        "table.md": tables.render(table, "md"),
        "table.csv": tables.render(table, "csv"),
        "results.csv": long.to_csv(index=False),
    }
    for name, text in files.items():
        atomic_write_text(out_dir / name, text)
        result.files.append(out_dir / name)
    plot_path = plots.privacy_utility_plot(table, out_dir / "privacy_utility.png")
    result.files.append(plot_path)
    grid_path = plots.reconstruction_grid(table, long, out_dir / "reconstructions.png")
    if grid_path is not None:
        result.files.append(grid_path)
    ref = grid.verdict_reference()
    if ref is not None:
        result.verdicts, paths = write_frontier(long, out_dir, reference=ref, privacy_metric=grid.privacy_metric)
        result.files += paths
    result.seconds = time.perf_counter() - t_start
    return result


def write_frontier(long: Any, out_dir: Path, *, reference: str, privacy_metric: str) -> tuple[list[str], list[Path]]:
    """frontier.csv (every point with its gain at matched accuracy), verdicts.csv (one row per
    family) and frontier.png / .pdf into out_dir; returns the verdict lines and the files."""
    from privbench import frontier
    from privbench.plot_frontier import plot_frontier
    from privbench.storage import atomic_write_text

    comparison = frontier.compare(frontier.points(long, privacy_metric=privacy_metric), reference=reference)
    files = []
    for name, frame in (("frontier.csv", comparison.points), ("verdicts.csv", comparison.families)):
        atomic_write_text(out_dir / name, frame.to_csv(index=False))
        files.append(out_dir / name)
    files += plot_frontier(comparison, out_dir / "frontier")
    return frontier.verdict_lines(comparison) + comparison.notes, files
