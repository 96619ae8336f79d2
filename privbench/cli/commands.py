"""The `privbench` command line: a thin layer over the Python API.

Bad input raises UserError (or a click usage error) and is printed as one line, exit code 2.
"""

from __future__ import annotations

import sys
import time
from typing import Any

import click

from privbench import api
from privbench.analysis import tables
from privbench.attack.harness import format_table
from privbench.cli.outputs import plot_cmd, table_cmd
from privbench.engine.config import PRESETS, TrainConfig
from privbench.engine.data import DATASETS, load_dataset
from privbench.engine.models import MODELS, parse_bottleneck
from privbench.engine.train import make_model
from privbench.errors import UserError
from privbench.executors.base import CellsFailed
from privbench.grid.spec import Grid, grid_from_options
from privbench.plugin import options as options_mod
from privbench.plugin import registry, stack, strength
from privbench.report import table_format
from privbench.store.attacks import attack_run
from privbench.store.outputs import check_output_dir
from privbench.store.runs import train_run
from privbench.util.progress import reset_warnings

PLUGIN_HELP = "Python file defining an Attack or Defense class (repeatable)."


def load_plugins(paths: tuple[str, ...]) -> None:
    for p in paths:
        registry.load_plugin_file(p)


def plugin_option(f):
    return click.option("--plugin", "plugins", multiple=True, type=str, help=PLUGIN_HELP)(f)


def compile_option(f):
    # A flag with an optional value: `--compile` alone is mode "default".
    return click.option(
        "--compile", "compile_mode", is_flag=False, flag_value="default", default=None, metavar="[MODE]",
        help="torch.compile the model halves and the defense's hot path; MODE: default | reduce-overhead "
             "(CUDA graphs) | max-autotune | max-autotune-no-cudagraphs. Not part of the run's identity.",
    )(f)  # fmt: skip


def attack_options(pairs: tuple[str, ...], attacks: list[str]) -> dict[str, dict[str, Any]]:
    """`-o [ATTACK.]key=value` pairs per attack."""
    return options_mod.route(options_mod.parse_all(pairs), attacks=attacks, where="the attacks run")[1]


def parse_options(pairs: tuple[str, ...]) -> dict[str, Any]:
    """`-o [NAME.]key=value` pairs as the {"NAME.key": value} mapping a stack routes."""
    return options_mod.as_dict(options_mod.parse_all(pairs))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="privbench")
def cli() -> None:
    """privbench: train split models under defenses, attack them, report privacy vs utility."""


@cli.command("list")
@click.option("--preset", type=click.Choice(list(PRESETS)), default="quick", show_default=True,
              help="Whose defaults to show.")  # fmt: skip
@plugin_option
def list_cmd(preset: str, plugins: tuple[str, ...]) -> None:
    """Print the installed attacks, defenses and datasets, and the defaults of a preset."""
    load_plugins(plugins)
    for kind in ("attack", "defense"):
        click.echo(f"{kind}s:")
        for name in registry.names(kind):
            cls = registry.get(kind, name)
            opts = ", ".join(f"{k}={v}" for k, v in plugin_defaults(kind, name, preset).items())
            click.echo(f"  {name:<14} {cls.summary}" + (f"  [{opts}]" if opts else "") + sweep_note(kind, name))
    click.echo("datasets:\n" + "".join(f"  {d}\n" for d in DATASETS), nl=False)
    click.echo("models:\n" + "".join(f"  {m}\n" for m in MODELS), nl=False)
    click.echo("channel options (compose with every defense):\n  --bottleneck C<c>\n  --noise SIGMA")
    click.echo("defense stacks: --defense dropout+gmm-cem (parts left to right; -o PART.key=value)")
    click.echo("strength sweeps: --sweep gmm-cem.lam=4,16,64 | --sweep NAME (its knob over its default grid)")
    click.echo(preset_defaults(preset))


def sweep_note(kind: str, name: str) -> str:
    """A defense's strength knob and default sweep, as `--sweep NAME` uses them."""
    if kind != "defense":
        return ""
    try:
        sweep = strength.parse(name)
    except UserError:  # a knob without a default grid
        return f"  sweep: {strength.knob(name)}"
    return f"  sweep: {sweep.key}={','.join(format(v, 'g') for v in sweep.values)}"


def plugin_defaults(kind: str, name: str, preset: str) -> dict:
    """A plugin's option defaults as a run under `preset` uses them: an attack gets the preset's
    budget (epochs / steps, where it takes them) and the preset's options for it."""
    defaults = registry.option_defaults(registry.get(kind, name))
    if kind == "attack":
        p = PRESETS[preset]
        preset_opts = {"epochs": p["attack_epochs"], "steps": p["attack_steps"], **p["attack_options"].get(name, {})}
        defaults |= {k: v for k, v in preset_opts.items() if k in defaults}
    return defaults


def preset_defaults(preset: str) -> str:
    """The budgets `train`, `attack` and `run` use under `preset` when no option overrides them."""
    cfg, p, grid = TrainConfig.from_preset(preset), PRESETS[preset], Grid()
    schedule = cfg.schedule + (f" (milestones {list(cfg.milestones)}, gamma {cfg.gamma})"
                               if cfg.schedule == "multistep" else "")  # fmt: skip
    others = [name for name in PRESETS if name != preset]
    channel = f"C{grid.bottleneck[0]} + noise {grid.noise[0]}"
    return "\n".join([
        f"defaults of preset {preset} (--preset {' | '.join(others)} shows the other{'s' * (len(others) > 1)}):",
        f"  training: model {cfg.model}, width {cfg.width}, cut {cfg.cut}, epochs {cfg.epochs}, "
        f"batch size {cfg.batch_size}, lr {cfg.lr}, schedule {schedule}, momentum {cfg.momentum}, "
        f"weight decay {cfg.weight_decay}, warm-up {cfg.warmup_epochs:g} epochs, "
        f"label smoothing {cfg.label_smoothing:g}, weight average {cfg.ema:g}, noise ramp {cfg.noise_warmup:g}",
        f"  attacks: epochs {p['attack_epochs']} (learned), steps {p['attack_steps']} (optimization), "
        f"eval images {p['eval_images']}, attacker data train",
        f"  run grid: defenses {' '.join(grid.defense)}; attacks {' '.join(grid.attack)}; "
        f"base channel {channel}; seeds {grid.seeds}",
    ])  # fmt: skip


@cli.command()
@click.option("--dataset", default="embedded", show_default=True, help="embedded | cifar10 | cifar100 | folder:PATH")
@click.option("--data-dir", default=None, help="Folder holding the CIFAR python-pickle folder.")
@click.option("--download", is_flag=True, help="Download CIFAR into --data-dir when absent (needs internet).")
@click.option("--defense", default="none", show_default=True)
@click.option("-o", "--option", "options", multiple=True, help="Defense option key=value (repeatable).")
@click.option("--preset", default="quick", show_default=True, help="quick (CPU minutes) | paper (240 epochs)")
@click.option("--model", default=None, help="vgg11 | resnet20")
@click.option("--width", type=float, default=None, help="Channel width multiplier.")
@click.option("--epochs", type=int, default=None)
@click.option("--batch-size", type=int, default=None)
@click.option("--lr", type=float, default=None)
@click.option("--schedule", default=None, help="cosine | multistep")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--cut", type=int, default=None, help="Cut layer k: the first k VGG entries run on the client.")
@click.option("--bottleneck", default=None, help="C<c>: client conv to c channels + Sigmoid.")
@click.option("--noise", type=float, default=None, help="Std of Gaussian noise on the activation.")
@click.option("--n-train", type=int, default=None, help="embedded: number of training crops.")
@click.option("--device", default="auto", show_default=True)
@compile_option
@click.option("--amp/--no-amp", default=True, show_default=True, help="bf16 autocast on CUDA (fp32 with --no-amp).")
@click.option("--channels-last/--no-channels-last", default=True, show_default=True,
              help="Channels-last memory format on CUDA.")  # fmt: skip
@click.option("--results-dir", default="results", show_default=True)
@click.option("--force", is_flag=True, help="Retrain even if this configuration has a finished run.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@plugin_option
def train(
    dataset, data_dir, download, defense, options, preset, model, width, epochs, batch_size, lr,
    schedule, seed, cut, bottleneck, noise, n_train, device, compile_mode, amp, channels_last, results_dir,
    force, quiet, plugins,
) -> None:  # fmt: skip
    """Train a split model under a defense; the last line printed is the run folder."""
    load_plugins(plugins)
    check_output_dir(results_dir, "results folder")
    cfg = TrainConfig.from_preset(
        preset, dataset=dataset, data_dir=data_dir, defense=defense, defense_options=parse_options(options),
        model=model, width=width, epochs=epochs, batch_size=batch_size, lr=lr, schedule=schedule, seed=seed,
        cut=cut, bottleneck=parse_bottleneck(bottleneck), noise=noise, n_train=n_train, device=device,
        compile=compile_mode or False, amp=amp, channels_last=channels_last, progress=not quiet,
    )  # fmt: skip
    # Validate everything that can be checked cheaply before any training starts.
    stack.create(cfg.defense, cfg.defense_options)
    data = load_dataset(cfg.dataset, data_dir=cfg.data_dir, download=download, seed=cfg.data_seed, n_train=cfg.n_train)
    make_model(cfg, data)
    run, trained = train_run(cfg, results_dir, force=force, log=click.echo)
    acc = run.metrics()["test_accuracy"]
    if not trained:
        click.echo("reused finished run (same configuration); --force retrains")
    click.echo(f"test accuracy: {acc:.4f}")
    click.echo(str(run.path))


@cli.command()
@click.argument("run_dir")
@click.option("--attack", "attacks", multiple=True, help="Attack name (repeatable; default: decoder, optimization).")
@click.option(
    "--attacker-data",
    type=click.Choice(["train", "aux"]),
    default="train",
    show_default=True,
    help="train: the private training split (worst case); aux: a disjoint split.",
)
@click.option("--epochs", type=int, default=None, help="Training epochs of learned attacks (default: the preset's).")
@click.option("--steps", type=int, default=None, help="Steps of optimization attacks (default: the preset's).")
@click.option("--eval-images", type=int, default=None, help="Test images to reconstruct (default: the preset's).")
@click.option("-o", "--option", "options", multiple=True, help="Attack option ATTACK.key=value (repeatable).")
@click.option("--device", default="auto", show_default=True)
@click.option("--seed", type=int, default=0, show_default=True, help="Seeds the evaluation images and the attacks.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@plugin_option
@click.option("--check-saturation/--no-check-saturation", default=None,
              help="Repeat every learned attack at twice its epochs and flag it unsaturated when SSIM rises by "
                   "more than its 95% CI [default: the preset's: off for quick, on for paper].")  # fmt: skip
@click.option("--semantic/--no-semantic", default=None,
              help="Score sem_acc: does an independent classifier still read each reconstruction's true class? "
                   "[default: the preset's (on)]")  # fmt: skip
def attack(
    run_dir, attacks, attacker_data, epochs, steps, eval_images, options, device, seed, quiet, plugins,
    check_saturation, semantic,
) -> None:  # fmt: skip
    """Attack a trained run; writes RUN_DIR/attacks/<attack>-<hash>/ and prints a table."""
    load_plugins(plugins)
    names = list(dict.fromkeys(attacks or ("decoder", "optimization")))
    results = attack_run(
        run_dir, names, attacker_data=attacker_data, epochs=epochs, steps=steps, eval_images=eval_images,
        options=attack_options(options, names), device=device, seed=seed, progress=not quiet,
        log=click.echo, check_saturation=check_saturation, semantic=semantic,
    )  # fmt: skip
    first = results[0]
    click.echo(f"run {first['run']}: {first['eval_images']} {first['eval_split']} images; {first['threat_model']}")
    click.echo(format_table(results))


RUN_EPILOG = """\b
TOML file (--config FILE.toml; the full schema with types, defaults and an example is in
docs/config.md). Top-level keys are the options above, lists for repeatable ones:
  preset, dataset, data_dir, defense, attack, seeds, cut, bottleneck, noise, device,
  results_dir, out, epochs, model, eval_images, attacker_data, option (-o pairs),
  executor (local | ray | slurm)
Tables:
  [train]             TrainConfig fields over the preset: epochs, lr, width, n_train,
                      batch_size, schedule, amp, model, ...
  [attacks]           epochs, steps, eval_images, attacker_data (train | aux)
  [attacks.<name>]    one attack's options, e.g. [attacks.decoder] channels = 32
  [defenses.<name>]   one defense's options, e.g. [defenses.gmm-cem] lam = 16
  [executor]          kind, and the Ray or SLURM settings (docs/executors.md), e.g.
                      kind = "slurm", partition = "gpu", gpus_per_task = 1, time = "12:00:00"
Top-level keys win over table entries; options on the command line win over the file.
"""


@cli.command("run", epilog=RUN_EPILOG)
@click.option("--preset", type=click.Choice(list(PRESETS)), default=None, help="Budgets [default: quick].")
@click.option("--dataset", default=None, help="embedded | cifar10 | cifar100 | folder:PATH [default: embedded]")
@click.option("--data-dir", default=None, help="Folder holding the CIFAR python-pickle folder.")
@click.option("--defense", "defenses", multiple=True, metavar="NAME[@CHANNEL]",
              help="Repeatable. NAME runs on every base channel; NAME@CHANNEL pins one: plain, C8, 0.05 or "
                   "C8+0.05. [default: none@plain none gmm-cem slot-cem]")  # fmt: skip
@click.option("-o", "--option", "options", multiple=True, metavar="[DEFENSE.]KEY=VALUE",
              help="Defense option, repeatable: gmm-cem.lam=16 sets it for one defense; a bare lam=16 for "
                   "every defense in the grid that has it. ATTACK.KEY=VALUE sets an attack's option.")  # fmt: skip
@click.option("--attack", "attacks", multiple=True, help="Repeatable. [default: decoder optimization]")
@click.option("--sweep", "sweeps", multiple=True, metavar="NAME[.KEY][=V1,V2,...]",
              help="Train one cell per value of a defense's option or of its channel noise (KEY noise); "
                   "no KEY: its strength knob; no values: its default grid. Repeatable. [default grid: "
                   "none.noise=0.025,0.05,0.1]")  # fmt: skip
@click.option("--no-sweep", is_flag=True, help="Not even the default grid's noise sweep.")
@click.option(
    "--reference",
    default=None,
    metavar="FAMILY",
    help="The family the verdicts compare against, at matched accuracy: auto (none, if swept) or a defense "
    "name [default: auto].",
)
@click.option("--bracket", type=int, default=None, metavar="N",
              help="Reference strengths the run may add (each at every seed) so that every defense has reference "
                   "points at its accuracy; 0: keep the reference as swept [default: 3].")
@click.option(
    "--privacy-metric",
    type=click.Choice(["ssim", "psnr", "lpips", "mse", "sem_acc"]),
    default=None,
    help="The privacy axis of the frontier and verdicts (worst case over attacks) [default: ssim].",
)
@click.option("--seeds", default=None, metavar="N|auto",
              help="Train seeds 0..N-1 of every configuration; auto: add seeds until every verdict is resolved or "
                   "--seeds-cap is reached, keeping the overall false-verdict rate at 5% [default: 1].")
@click.option("--seeds-cap", type=int, default=None, help="The most seeds --seeds auto trains [default: 5].")
@click.option("--epochs", type=click.IntRange(min=1), default=None, help="Training epochs [default: the preset's].")
@click.option("--model", default=None, help="vgg11 | resnet20 [default: vgg11]")
@click.option("--cut", type=int, default=None, help="Cut layer k: the first k VGG entries run on the client.")
@click.option("--bottleneck", "bottlenecks", multiple=True, metavar="C<c>|none",
              help="Base channel bottleneck; repeat to sweep [default: C8].")  # fmt: skip
@click.option("--noise", "noises", multiple=True, type=float, metavar="SIGMA",
              help="Base channel noise std; repeat to sweep [default: 0.025].")  # fmt: skip
@click.option("--attacker-data", type=click.Choice(["train", "aux"]), default=None,
              help="The attacker's training images: train (the private split, worst case) or aux (disjoint) "
                   "[default: train].")  # fmt: skip
@click.option("--eval-images", type=click.IntRange(min=1), default=None,
              help="Test images each attack reconstructs [default: the preset's].")  # fmt: skip
@click.option("--device", default=None, help="auto | cpu | cuda [default: auto]")
@compile_option
@click.option("--results-dir", default=None, help="Where run folders go [default: results].")
@click.option("--out", default=None, help="Output folder [default: RESULTS_DIR/tables/<grid hash>].")
@click.option("--config", "config_file", default=None, metavar="FILE.toml",
              help="TOML file with the same keys plus [train], [attacks] and [defenses.<name>] tables "
                   "(below).")  # fmt: skip
@click.option("--executor", type=click.Choice(["local", "ray", "slurm"]), default=None,
              help="Who computes the cells: local (this process, one after another), ray or slurm (one task per "
                   "cell; settings in an [executor] table, docs/executors.md) [default: local].")  # fmt: skip
@click.option("--ray-address", default=None, metavar="HOST:PORT|auto",
              help="Ray cluster to connect to (default: $RAY_ADDRESS, else a local Ray instance).")  # fmt: skip
@click.option("--check-saturation/--no-check-saturation", default=None,
              help="Repeat every learned attack at twice its epochs; mark cells whose SSIM still rises "
                   "(unsaturated) [default: the preset's: off for quick, on for paper].")  # fmt: skip
@click.option("--semantic/--no-semantic", default=None, help="Score sem_acc for every attack [default: on].")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@plugin_option
def run(
    preset, dataset, data_dir, defenses, options, attacks, sweeps, no_sweep, reference, bracket, privacy_metric,
    seeds, seeds_cap, epochs, model, cut, bottlenecks, noises, attacker_data, eval_images, device, compile_mode,
    results_dir, out, config_file, executor, ray_address, check_saturation, semantic, quiet, plugins,
) -> None:  # fmt: skip
    """The main job: train every defense configuration, attack each, print the privacy-utility
    table and write table.md, table.csv, results.csv, privacy_utility.png and reconstructions.png.

    \b
    The channel is what the client sends: bottleneck C<c> and/or Gaussian noise. The base
    channel (--bottleneck x --noise, default C8 + noise 0.025) applies to every --defense
    given without @; NAME@plain is the undefended model. The default grid is the plain model,
    the base channel alone with its noise swept (0.025, 0.05, 0.1), and gmm-cem and slot-cem on
    the base channel; the run ends with one verdict per defense: better, worse or
    indistinguishable from the reference (none) at matched accuracy (docs/frontier.md).
    Finished cells (a run folder per training config, an attack folder per attack) are reused:
    rerunning computes only what is missing. The last line printed is the output folder;
    `privbench table` and `privbench plot` accept it. --executor ray / slurm computes the cells
    in parallel on a Ray or SLURM cluster; a failed cell does not stop the others, and the
    command then exits 1 naming the failed cells (docs/executors.md).
    """

    t0 = time.perf_counter()
    load_plugins(plugins)
    grid = grid_from_options(
        config_file, preset=preset, dataset=dataset, data_dir=data_dir, defense=defenses, attack=attacks,
        seeds=seeds, seeds_cap=seeds_cap, epochs=epochs, model=model, cut=cut, bottleneck=bottlenecks, noise=noises,
        attacker_data=attacker_data, eval_images=eval_images, option=options, device=device,
        results_dir=results_dir, out=out, progress=False if quiet else None, reference=reference,
        sweep="off" if no_sweep else (list(sweeps) or None), privacy_metric=privacy_metric, bracket=bracket,
        executor={k: v for k, v in (("kind", executor), ("address", ray_address)) if v} or None,
    )  # fmt: skip
    if compile_mode:
        grid.train["compile"] = compile_mode
    for key, value in (("check_saturation", check_saturation), ("semantic", semantic)):
        if value is not None:  # the command line wins over the file's [attacks] table
            grid.attacks[key] = value
    try:
        result = api.run(grid, log=click.echo)
    except CellsFailed as exc:  # the other cells are done; a rerun retries only these
        click.echo(str(exc), err=True)
        sys.exit(1)
    click.echo("")
    click.echo(table_format.render(result.table, "md"), nl=False)
    for line in tables.chance_warnings(result.table):
        click.echo(line, err=True)
    if result.verdicts:
        metric = grid.privacy_metric
        click.echo(f"\nverdicts at matched accuracy ({metric}, worst case over attacks; docs/frontier.md):")
        for line in result.verdicts:
            click.echo(f"  {line}")
        if grid.seeds == 1 and not grid.sequential:
            click.echo("  (one seed: the CIs cover test images, not training seeds; cite verdicts from --seeds 3)")
    click.echo(f"cells: {result.computed} computed, {result.reused} reused; {time.perf_counter() - t0:.0f} s")
    click.echo("files: " + ", ".join(p.name for p in result.files) + " in")
    click.echo(str(result.out_dir))


cli.add_command(table_cmd)
cli.add_command(plot_cmd)


def main(argv: list[str] | None = None) -> None:
    """Entry point: one-line errors with exit code 2 for bad input."""
    reset_warnings()  # "once per command", also when main() runs several times in one process
    try:
        cli.main(args=argv, prog_name="privbench", standalone_mode=False)
    except UserError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except click.UsageError as exc:
        click.echo(f"error: {exc.format_message()}", err=True)
        sys.exit(2)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)


if __name__ == "__main__":
    main()
