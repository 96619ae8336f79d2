"""The commands that read finished runs: `privbench table`, `privbench plot` and `privbench report`
(added to the group in privbench.cli.commands)."""

from __future__ import annotations

import sys

import click
import pandas as pd

from privbench import api
from privbench.analysis import frontier, tables
from privbench.cli.help import examples
from privbench.errors import UserError
from privbench.report import plots, table_cem
from privbench.report.plot_frontier import plot_frontier
from privbench.report.run_diagnostics import write_run_diagnostics
from privbench.store.outputs import check_output_file
from privbench.store.rows import METRICS, expand_run_dirs
from privbench.util.storage import atomic_write_text

# click.Choice: a bad value is a usage error, printed by privbench.cli.commands.main as one line, exit 2.
privacy_metric_option = click.option(
    "--privacy-metric",
    type=click.Choice(METRICS),
    default="ssim",
    show_default=True,
    help="The metric of the worst case (worst_attack) and of the plot's privacy axis; sem_acc: the fraction of "
    "reconstructions an independent classifier labels with the true class.",
)


reference_option = click.option(
    "--reference",
    default="none",
    show_default=True,
    metavar="FAMILY",
    help="--layout frontier / --frontier: the family whose frontier the others are compared with at matched "
    "accuracy (a defense name, e.g. none: the base channel's noise sweep).",
)


def comparison_of(run_dirs: tuple[str, ...], reference: str, privacy_metric: str) -> frontier.Comparison:
    return api.frontier(list(run_dirs) or api.DEFAULT_RESULTS, reference=reference, privacy_metric=privacy_metric)


@click.command(
    "table",
    epilog=examples(
        "privbench table OUTPUT_FOLDER --format latex --out table.tex",
        "privbench table OUTPUT_FOLDER --layout frontier --reference none",
    ),
)
@click.argument("run_dirs", nargs=-1)
@click.option("--format", "fmt", type=click.Choice(["md", "csv", "latex"]), default="md", show_default=True)
@click.option("--out", default=None, help="Write the table to this file instead of printing it.")
@click.option(
    "--layout",
    type=click.Choice(["rows", "cem", "frontier"]),
    default="rows",
    show_default=True,
    help="rows: one row per configuration; cem: base defenses as rows and {alone, + gmm-cem, "
    "+ slot-cem} as column groups (the CEM paper's Table 1; md or csv); frontier: every "
    "point with its privacy gain over --reference at matched accuracy, then the verdicts.",
)
@click.option(
    "--tops",
    default="gmm-cem,slot-cem",
    show_default=True,
    help="--layout cem: the defenses stacked on top of the bases, comma-separated.",
)
@privacy_metric_option
@reference_option
def table_cmd(run_dirs, fmt, out, layout, tops, privacy_metric, reference) -> None:
    """Privacy-utility table of RUN_DIRS: run folders, results folders, or the output folder
    that `privbench run` prints (that grid's cells only), in any mix; default: results.

    One row per defense configuration (defense + channel + options) over seeds: accuracy and,
    per attack, SSIM / PSNR / LPIPS / MSE / sem_acc as mean ± 95% CI (over seeds, or over test
    images with one seed), per metric the worst case over attacks with the attack that reached it
    (the --privacy-metric's first) and the mean-image baseline.
    The csv format holds raw numbers (mean and ci95 in separate columns).
    """
    if out:
        check_output_file(out, "--out")
    if layout == "frontier":
        comparison = comparison_of(run_dirs, reference, privacy_metric)
        text = frontier_text(comparison, fmt)
        if out:
            atomic_write_text(out, text)
            click.echo(out)
        else:
            click.echo(text, nl=False)
        for line in frontier.verdict_lines(comparison) + comparison.notes:
            click.echo(line, err=bool(out))
        return
    table = api.results(list(run_dirs) or api.DEFAULT_RESULTS, privacy_metric=privacy_metric)
    if layout == "cem":
        if fmt == "latex":
            raise UserError("--layout cem writes md or csv")
        top_names = tuple(t.strip() for t in tops.split(",") if t.strip())
        text = (table_cem.to_csv if fmt == "csv" else table_cem.to_markdown)(table, top_names)
    else:
        text = api.table(table, fmt)
    for line in tables.chance_warnings(table):
        click.echo(line, err=True)
    if out:
        atomic_write_text(out, text)
        click.echo(out)
    else:
        click.echo(text, nl=False)


FRONTIER_COLUMNS = [
    "group",
    "family",
    "strength",
    "accuracy_mean",
    "accuracy_ci95",
    "privacy_mean",
    "privacy_ci95",
    "privacy_attack",
    "n_seeds",
    "on_frontier",
    "ref_value",
    "gain",
    "gain_lo",
    "gain_hi",
    "extrapolated",
]


def frontier_text(comparison, fmt: str) -> str:
    """The points of a comparison as md / csv / latex (csv: every column, raw)."""

    frame = comparison.points
    if fmt == "csv":
        return frame.to_csv(index=False)
    shown = frame[[c for c in FRONTIER_COLUMNS if c in frame.columns]].round(4)
    if fmt == "latex":
        return shown.to_latex(index=False)
    cells = [[str(c) for c in shown.columns]] + [["" if pd.isna(v) else str(v) for v in row] for row in shown.values]
    lines = ["| " + " | ".join(row) + " |" for row in cells]
    return "\n".join([lines[0], "|" + "---|" * len(shown.columns), *lines[1:]]) + "\n"


@click.command(
    "plot",
    epilog=examples(
        "privbench plot OUTPUT_FOLDER --frontier --out frontier.png",
        "privbench plot RUN_FOLDER --curves",
    ),
)
@click.argument("run_dirs", nargs=-1)
@click.option("--out", default="privacy_utility.png", show_default=True, help="PNG file of the plot.")
@click.option("--grid", "grid_out", default=None, help="Also write the cross-defense reconstruction grid here.")
@click.option(
    "--curves",
    is_flag=True,
    help="Per run folder given: RUN/curves.png (each loss term, z's spread, accuracy per epoch), "
    "the Eq. 3 bound beside the attacks' MSE, and RUN/slots.png for slot-cem / gmm-cem.",
)
@click.option(
    "--frontier",
    "frontier_plot",
    is_flag=True,
    help="The frontier plot instead: accuracy vs the worst-case privacy metric per family, the "
    "--reference's frontier, the undefended point, the mean-image baseline; --out's stem gets "
    ".png and .pdf.",
)
@privacy_metric_option
@reference_option
def plot_cmd(run_dirs, out, grid_out, curves, frontier_plot, privacy_metric, reference) -> None:
    """Accuracy against the worst-case attack's SSIM (or --privacy-metric), one point per
    configuration, 95% CI bars; with sem_acc, the classifier's clean accuracy as a reference line.
    RUN_DIRS are read as by `privbench table` (default: results). --curves: each run's diagnostics
    instead (docs/diagnostics.md)."""
    if curves:
        for run_dir in expand_run_dirs(run_dirs or ("results",)):
            for path in write_run_diagnostics(run_dir, log=click.echo):
                click.echo(str(path))
        return
    check_output_file(out, "--out")
    if frontier_plot:
        comparison = comparison_of(run_dirs, reference, privacy_metric)
        for line in frontier.verdict_lines(comparison) + comparison.notes:
            click.echo(line)
        for path in plot_frontier(comparison, str(out).removesuffix(".png").removesuffix(".pdf")):
            click.echo(str(path))
        return
    if grid_out:
        check_output_file(grid_out, "--grid")
    inputs = list(run_dirs) or api.DEFAULT_RESULTS
    table = api.results(inputs, privacy_metric=privacy_metric)
    for line in tables.chance_warnings(table):
        click.echo(line, err=True)
    # The grid needs the long rows too: read a second time only when it is asked for.
    if grid_out and plots.reconstruction_grid(table, api.results(inputs, long=True), grid_out) is None:
        click.echo("no stored reconstructions in these runs: no grid written", err=True)
    elif grid_out:
        click.echo(grid_out)
    click.echo(str(plots.privacy_utility_plot(table, out)))


@click.command(
    "report",
    epilog=examples(
        "privbench report README.md docs/frontier.md",
        "privbench report --check README.md      # CI: exit 1 if a table no longer matches its rows",
    ),
)
@click.argument("files", nargs=-1, required=True)
@click.option("--check", is_flag=True, help="Change nothing; exit 1 naming every file whose blocks are stale.")
def report_cmd(files: tuple[str, ...], check: bool) -> None:
    """Regenerate the tables and verdicts in Markdown files from the committed rows they name.

    \b
    A block sits between `<!-- privbench: KIND FOLDER -->` and `<!-- privbench: end -->`, KIND
    summary | table | verdicts, FOLDER a `privbench run` output folder (results.csv, verdicts.csv)
    relative to the file. Everything between the two comments is rewritten.
    """
    stale = [str(p) for p in api.report(files, check=check)]
    if check and stale:
        click.echo(f"stale generated blocks in {', '.join(stale)}: run privbench report {' '.join(stale)}", err=True)
        sys.exit(1)
    click.echo(("up to date: " if check or not stale else "regenerated: ") + ", ".join(stale or files))
