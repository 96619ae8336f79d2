"""Running a `privbench run` grid (privbench.grid.spec defines it): train each missing cell, attack
each run, write the tables and plots.

Finished cells are reused, so rerunning the same or an extended grid computes only what is
missing, and an interrupted run continues where it stopped. Folders are built atomically under
a lock, so two runs into the same results folder never corrupt each other; the output folder's
files are written atomically too. Output paths are checked before any work, and progress is a
running count of training and attack cells with an ETA.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from privbench.analysis import bracket as bracketing
from privbench.analysis import frontier, sequential, tables
from privbench.engine.train import check_configs
from privbench.executors.compute import compute_cells, open_executor
from privbench.grid.spec import Grid
from privbench.plugin import registry, strength
from privbench.report import plots, table_format
from privbench.report.plot_frontier import plot_frontier
from privbench.store import rows
from privbench.store.outputs import check_output_dir, write_manifest
from privbench.store.runs import run_name
from privbench.util.storage import atomic_write_text

# ---------------------------------------------------------------------------------- running


@dataclass
class GridResult:
    """What a grid run produced: the numeric table, where its files are, and what it cost."""

    table: Any  # pandas DataFrame (privbench.analysis.tables.aggregate)
    long: Any  # long-form pandas DataFrame
    out_dir: Path
    files: list[Path]
    runs: list[Path]
    attack_dirs: list[Path]
    computed: int = 0
    reused: int = 0
    timings: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    verdicts: list[str] = field(default_factory=list)  # one line per defense family (privbench.analysis.frontier)
    comparison: frontier.Comparison | None = None  # what the lines say, as frames (verdicts.csv: .families)
    # Reference points added to bracket the defenses' accuracy (run folders), and what bracketing said.
    added_runs: list[Path] = field(default_factory=list)
    bracket: bracketing.BracketResult | None = None
    # --seeds auto: each family's decision at the last look, and the seeds it took.
    sequential: dict[str, str] = field(default_factory=dict)
    seeds_used: int | None = None


def run_grid(
    grid: Grid,
    *,
    train_fn: Callable[..., Any] | None = None,
    attack_fn: Callable[..., list[dict[str, Any]]] | None = None,
    validate: bool = True,
    log: Callable[[str], None] = print,
) -> GridResult:
    """Compute the grid's missing cells with the grid's executor (privbench.executors.base), then write
    table.md, table.csv, results.csv (long form), privacy_utility.png, reconstructions.png and
    cells.json into the output folder, and, when the grid has a reference frontier, frontier.csv,
    verdicts.csv and frontier.png / .pdf with one verdict line per defense (`result.verdicts`).
    If some cells fail, the others are still computed and CellsFailed names the failed ones (no
    output files: the grid is incomplete).

    `train_fn(cfg, results_dir, log=...) -> (Run, trained)` and `attack_fn(run_dir, [attack],
    **settings) -> [result with "path" and "reused"]`, called once per attack cell, default to
    the real ones (tests inject cheap stand-ins; the local executor only).
    """
    t_start = time.perf_counter()
    check_output_dir(grid.results_dir, "results folder")  # before any work: a typo must not cost the grid
    out_dir = grid.out_dir()
    check_output_dir(out_dir, "output folder")
    # The executor starts (and bad executor settings fail) before any cell; it computes them all.
    with open_executor(grid, log=log) as executor:
        if validate:
            grid.validate()
        configs = grid.train_configs()
        if validate:
            check_configs(configs)  # every model and defense builds, before the first cell
        log(f"{len(configs)} training cells, {len(configs) * len(grid.attack)} attack cells -> {out_dir}")
        result = GridResult(table=None, long=None, out_dir=out_dir, files=[], runs=[], attack_dirs=[])
        compute_cells(executor, grid, configs, result, train_fn=train_fn, attack_fn=attack_fn, log=log)
        if grid.bracket_reference() is not None:
            result.bracket = bracket_reference(
                grid,
                result,
                lambda cfgs: compute_cells(
                    executor, grid, cfgs, result, train_fn=train_fn, attack_fn=attack_fn, log=log
                ),
                log=log,
            )
        if grid.sequential and grid.verdict_reference() is not None:
            result.sequential, result.seeds_used = sequential_seeds(
                grid,
                result,
                lambda cfgs: compute_cells(
                    executor, grid, cfgs, result, train_fn=train_fn, attack_fn=attack_fn, log=log
                ),
                log=log,
            )

    long = rows.collect(result.runs, attack_dirs=result.attack_dirs)
    table = tables.aggregate(long, rows.train_settings(long))
    result.long, result.table = long, table
    out_dir.mkdir(parents=True, exist_ok=True)
    write_manifest(out_dir, result.runs, result.attack_dirs)  # lets `table` / `plot` read this folder back
    files = {
        "table.md": table_format.render(table, "md"),
        "table.csv": table_format.render(table, "csv"),
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
        result.comparison, result.verdicts, paths = write_frontier(
            long,
            out_dir,
            reference=ref,
            privacy_metric=grid.privacy_metric,
            added=result.added_runs,
            bracket=result.bracket,
            sequential=result.sequential,
        )
        if result.sequential:
            result.verdicts.append(
                f"sequential seeds: {result.seeds_used} per configuration (Pocock, overall "
                f"false-verdict rate 5%, cap {grid.seeds_cap}; docs/frontier.md)"
            )
        result.files += paths
    result.seconds = time.perf_counter() - t_start
    return result


def frontier_points(long: Any, privacy_metric: str, *, per_image: bool = True) -> Any:
    """privbench.analysis.frontier.points of long-form rows, with the run facts and (unless
    `per_image` is False: accuracies only, no comparison) the per-image values the store reads."""
    images = rows.per_image(long, privacy_metric) if per_image else None
    return frontier.points(long, privacy_metric, infos=rows.run_infos(long), per_image=images)


def write_frontier(
    long: Any,
    out_dir: Path,
    *,
    reference: str,
    privacy_metric: str,
    added: list[Path] | None = None,
    bracket: bracketing.BracketResult | None = None,
    sequential: dict[str, str] | None = None,
) -> tuple[frontier.Comparison, list[str], list[Path]]:
    """frontier.csv (every point with its gain at matched accuracy; `added` marks the reference
    points added to bracket the defenses), verdicts.csv (one row per family) and frontier.png /
    .pdf into out_dir; returns the comparison, the verdict lines and the files."""
    pts = frontier_points(long, privacy_metric)
    added_paths = {str(p) for p in added or ()}
    pts["added"] = [bool(added_paths & {c.path for c in cells}) for cells in pts.cells]
    comparison = frontier.compare(pts, reference=reference)
    for family, decision in (sequential or {}).items():  # the sequential rule's verdict replaces the 95% CI's
        comparison.families.loc[comparison.families.family == family, "verdict"] = decision
    files = []
    for name, frame in (("frontier.csv", comparison.points), ("verdicts.csv", comparison.families)):
        atomic_write_text(out_dir / name, frame.to_csv(index=False))
        files.append(out_dir / name)
    files += plot_frontier(comparison, out_dir / "frontier")
    return comparison, frontier.verdict_lines(comparison, bracket=bracket) + comparison.notes, files


# ---------------------------------------------------------------------------- bracketing


def reference_knob(grid: Grid) -> tuple[Any, bracketing.Knob]:
    """The sweep of the grid's reference family and the knob bracketing moves (checked by
    Grid.validate: the reference has a sweep with a strength knob)."""
    ref = grid.bracket_reference()
    sweep = next(s for s in grid.sweep if s.part == ref)
    if sweep.key == strength.CHANNEL:
        return sweep, bracketing.NOISE
    cls = registry.get("defense", ref)
    lo, hi = cls.knob_range
    return sweep, bracketing.Knob(sweep.key, lo, hi, cls.knob_scale, falls=cls.knob_lowers_accuracy)


def bracket_reference(
    grid: Grid, result: GridResult, compute: Callable[[list[Any]], None], *, log: Callable[[str], None] = print
) -> bracketing.BracketResult:
    """Add points to the grid's reference family until every defense's accuracy lies within the
    reference's range, at most `grid.bracket` strengths (each at every seed), then return what
    bracketing found. The added points are ordinary cells: cached, and reused by a rerun."""
    sweep, knob = reference_knob(grid)

    undefended: list[float] = []

    def reference_and_targets() -> tuple[list[tuple[float, float]], dict[str, float]]:
        long = rows.collect(result.runs, attack_dirs=result.attack_dirs)
        pts = frontier_points(long, grid.privacy_metric, per_image=False)  # bracketing reads accuracies only
        undefended[:] = pts[pts.family == frontier.UNDEFENDED].accuracy_mean.tolist()
        family = frontier.reference_family(pts, grid.bracket_reference())
        ref = pts[pts.family == family]
        others = pts[(pts.family != family) & (pts.family != frontier.UNDEFENDED)]
        names = [frontier.point_name(f, s) for f, s in zip(others.family, others.strength)]
        if len(set(names)) < len(names):  # one family and strength in several groups: the config tells them apart
            names = [f"{n} [{c}]" for n, c in zip(names, others.config)]
        targets = dict(zip(names, others.accuracy_mean))
        return list(zip(ref.knob_value.astype(float), ref.accuracy_mean)), targets

    ref_rows, targets = reference_and_targets()
    if not targets:
        return bracketing.BracketResult([], ref_rows, {}, 0)
    before = {p.resolve() for p in result.runs}

    def train(strengths: list[float]) -> list[tuple[float, float]]:
        current = next(s for s in grid.sweep if s.part == sweep.part)
        swept = replace(current, values=tuple(dict.fromkeys((*current.values, *strengths))))
        grid.sweep = [swept if s is current else s for s in grid.sweep]
        done = {p.resolve() for p in result.runs}
        new = [c for c in grid.train_configs() if (Path(grid.results_dir) / run_name(c)).resolve() not in done]
        cached = all((Path(grid.results_dir) / run_name(c) / "metrics.json").is_file() for c in new)
        values = ", ".join(f"{s:g}" for s in strengths)
        log(
            f"bracketing: {'reusing' if cached else 'adding'} {sweep.part} at {knob.name} {values}, so that every "
            "defense has reference points at its accuracy"
        )
        compute(new)
        return [(s, a) for s, a in reference_and_targets()[0] if any(math.isclose(s, x) for x in strengths)]

    found = bracketing.bracket(train, ref_rows, targets, knob=knob, cap=grid.bracket)
    result.added_runs = [p for p in result.runs if p.resolve() not in before]
    top = max(undefended, default=math.nan)
    for t in found.targets.values():
        if t.message:  # compare() ends the reference at the undefended model: say where that judges a defense
            judged = found.high < t.accuracy <= top
            tail = "; it is judged against the line from the reference's most accurate point to the undefended model"
            log(f"bracketing: {t.message}" + (f"{tail} ({100 * top:.1f}%)" if judged else ""))
    return found


# --------------------------------------------------------------------------- sequential seeds


def sequential_seeds(
    grid: Grid, result: GridResult, compute: Callable[[list[Any]], None], *, log: Callable[[str], None] = print
) -> tuple[dict[str, str], int]:
    """--seeds auto: judge every family at the planned looks (seeds 2, 3, ... up to the cap) with
    Pocock boundaries (privbench.analysis.sequential), adding a seed to every configuration while
    some verdict is still open. Returns each family's decision and the seeds it took."""
    looks = sequential.plan_looks(grid.seeds, grid.seeds_cap)
    decisions: dict[str, str] = {}
    for look in looks:
        if grid.seeds < look.n:
            grid.seeds = look.n
            done = {p.resolve() for p in result.runs}
            open_ = ", ".join(f for f, d in decisions.items() if d == "continue")
            log(f"sequential seeds: adding seed {look.n - 1} ({open_} not yet resolved)")
            compute([c for c in grid.train_configs() if (Path(grid.results_dir) / run_name(c)).resolve() not in done])
        long = rows.collect(result.runs, attack_dirs=result.attack_dirs)
        cmp = frontier.compare(frontier_points(long, grid.privacy_metric), reference=grid.verdict_reference())
        judged = cmp.families[~cmp.families.verdict.isin([frontier.REFERENCE, "extrapolation only"])]
        decisions = {
            r.family: sequential.decide(look, r.mean_gain, r.gain_lo, r.gain_hi, dof=look.n - 1)
            for r in judged.itertuples()
        }
        if "continue" not in decisions.values():
            return decisions, look.n
    return decisions, grid.seeds
