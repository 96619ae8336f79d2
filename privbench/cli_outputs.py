"""The commands that read finished runs: `privbench table` and `privbench plot` (added to the
group in privbench.cli)."""

from __future__ import annotations

import click

from privbench.errors import UserError
from privbench.table_rows import METRICS

# click.Choice: a bad value is a usage error, printed by privbench.cli.main as one line, exit 2.
privacy_metric_option = click.option(
    "--privacy-metric", type=click.Choice(METRICS), default="ssim", show_default=True,
    help="The metric of the worst case (worst_attack) and of the plot's privacy axis; sem_acc: the fraction of "
         "reconstructions an independent classifier labels with the true class.",
)  # fmt: skip


@click.command("table")
@click.argument("run_dirs", nargs=-1)
@click.option("--format", "fmt", type=click.Choice(["md", "csv", "latex"]), default="md", show_default=True)
@click.option("--out", default=None, help="Write the table to this file instead of printing it.")
@click.option("--layout", type=click.Choice(["rows", "cem"]), default="rows", show_default=True,
              help="rows: one row per configuration; cem: base defenses as rows and {alone, + gmm-cem, "
                   "+ slot-cem} as column groups (the CEM paper's Table 1; md or csv).")  # fmt: skip
@click.option(
    "--tops",
    default="gmm-cem,slot-cem",
    show_default=True,
    help="--layout cem: the defenses stacked on top of the bases, comma-separated.",
)
@privacy_metric_option
def table_cmd(run_dirs, fmt, out, layout, tops, privacy_metric) -> None:
    """Privacy-utility table of RUN_DIRS: run folders, results folders, or the output folder
    that `privbench run` prints (that grid's cells only), in any mix; default: results.

    One row per defense configuration (defense + channel + options) over seeds: accuracy and,
    per attack, SSIM / PSNR / LPIPS / MSE / sem_acc as mean ± 95% CI (over seeds, or over test
    images with one seed), per metric the worst case over attacks with the attack that reached it
    (the --privacy-metric's first) and the mean-image baseline.
    The csv format holds raw numbers (mean and ci95 in separate columns).
    """
    from privbench import tables
    from privbench.outputs import check_output_file, resolve_inputs
    from privbench.storage import atomic_write_text

    if out:
        check_output_file(out, "--out")
    runs, attack_dirs = resolve_inputs(run_dirs or ("results",))
    table = tables.results_table(runs, attack_dirs=attack_dirs, privacy_metric=privacy_metric)
    if layout == "cem":
        from privbench import table_cem

        if fmt == "latex":
            raise UserError("--layout cem writes md or csv")
        top_names = tuple(t.strip() for t in tops.split(",") if t.strip())
        text = (table_cem.to_csv if fmt == "csv" else table_cem.to_markdown)(table, top_names)
    else:
        text = tables.render(table, fmt)
    for line in tables.chance_warnings(table):
        click.echo(line, err=True)
    if out:
        atomic_write_text(out, text)
        click.echo(out)
    else:
        click.echo(text, nl=False)


@click.command("plot")
@click.argument("run_dirs", nargs=-1)
@click.option("--out", default="privacy_utility.png", show_default=True, help="PNG file of the plot.")
@click.option("--grid", "grid_out", default=None, help="Also write the cross-defense reconstruction grid here.")
@privacy_metric_option
def plot_cmd(run_dirs, out, grid_out, privacy_metric) -> None:
    """Accuracy against the worst-case attack's SSIM (or --privacy-metric), one point per
    configuration, 95% CI bars; with sem_acc, the classifier's clean accuracy as a reference line.
    RUN_DIRS are read as by `privbench table` (default: results)."""
    from privbench import plots, tables
    from privbench.outputs import check_output_file, resolve_inputs

    check_output_file(out, "--out")
    if grid_out:
        check_output_file(grid_out, "--grid")
    run_paths, attack_dirs = resolve_inputs(run_dirs or ("results",))
    long = tables.collect(run_paths, attack_dirs=attack_dirs)
    table = tables.aggregate(long, run_paths, privacy_metric=privacy_metric)
    for line in tables.chance_warnings(table):
        click.echo(line, err=True)
    if grid_out and plots.reconstruction_grid(table, long, grid_out) is None:
        click.echo("no stored reconstructions in these runs: no grid written", err=True)
    elif grid_out:
        click.echo(grid_out)
    click.echo(str(plots.privacy_utility_plot(table, out)))
