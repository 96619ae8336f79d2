"""The `privbench` command line: a thin layer over the Python API.

Bad input raises UserError (or a click usage error) and is printed as one line, exit code 2.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import click

from privbench import api
from privbench.analysis import tables
from privbench.attack.harness import format_table
from privbench.cli.help import GroupedCommand, examples
from privbench.cli.outputs import plot_cmd, report_cmd, table_cmd
from privbench.engine.config import PRESETS, TrainConfig
from privbench.engine.cuts import CutInfo
from privbench.engine.data import DATASETS
from privbench.engine.models import MODELS
from privbench.errors import UserError
from privbench.executors.base import CellsFailed
from privbench.grid.spec import Grid, grid_from_options
from privbench.plugin import options as options_mod
from privbench.plugin import registry
from privbench.report import precision as precision_table
from privbench.report.summary import summary_markdown
from privbench.util.progress import reset_warnings
from privbench.util.storage import atomic_write_text

PLUGIN_HELP = "Python file defining an Attack or Defense class (repeatable)."


def load_plugins(paths: tuple[str, ...]) -> None:
    for p in paths:
        registry.load_plugin_file(p)


def plugin_option(f):
    return click.option("--plugin", "plugins", multiple=True, type=str, help=PLUGIN_HELP)(f)


def compile_option(f):
    # A flag with an optional value: `--compile` alone is mode "default".
    return click.option(
        "--compile",
        "compile_mode",
        is_flag=False,
        flag_value="default",
        default=None,
        metavar="[MODE]",
        help="torch.compile the model halves and the defense's hot path; MODE: default | reduce-overhead "
        "(CUDA graphs) | max-autotune | max-autotune-no-cudagraphs. Not part of the run's identity.",
    )(f)


MODEL_HELP = (
    "vgg11 | resnet20 (built in), torchvision:NAME (e.g. torchvision:resnet18), timm:NAME (e.g. "
    "timm:vit_tiny_patch16_224) or pkg.module:callable (a function returning a torch.nn.Module); "
    "docs/models.md [default: vgg11]"
)
CUT_HELP = (
    "Where the model is cut: for vgg11 / resnet20 the number of entries on the client; for any other "
    "model a module name (the cut falls after it, e.g. layer2 or blocks.3) or K, the K-th valid cut "
    "from 0. `privbench cuts MODEL` lists them [default: 4]."
)


def model_options(f):
    """--image-size, --pretrained and --weights, shared by train and run."""
    f = click.option(
        "--weights",
        default=None,
        metavar="FILE",
        help="A state dict of the whole model (torch.save(model.state_dict(), FILE)) loaded before "
        "training; its sha256, not its path, is part of the run's identity.",
    )(f)
    f = click.option(
        "--pretrained",
        is_flag=True,
        default=None,
        help="torchvision / timm models: start from the default pretrained weights (downloaded, or "
        "from the local cache offline; docs/models.md).",
    )(f)
    return click.option(
        "--image-size",
        type=click.IntRange(min=1),
        default=None,
        metavar="N",
        help="Resize every image of the data set to N x N pixels (antialiased bilinear) "
        "[default: the data set's own size, 32 for embedded and CIFAR].",
    )(f)


def attack_options(pairs: tuple[str, ...], attacks: list[str]) -> dict[str, dict[str, Any]]:
    """`-o [ATTACK.]key=value` pairs per attack."""
    return options_mod.route(options_mod.parse_all(pairs), attacks=attacks, where="the attacks run")[1]


def parse_options(pairs: tuple[str, ...]) -> dict[str, Any]:
    """`-o [NAME.]key=value` pairs as the {"NAME.key": value} mapping a stack routes."""
    return options_mod.as_dict(options_mod.parse_all(pairs))


CPU_AMP_HELP = (
    "bf16 autocast and channels-last on the CPU too: 1.5-1.9x faster training on CPUs with native "
    "bf16 (AVX-512 BF16, AMX), slower elsewhere; it changes the numbers, so its runs are cells of their "
    "own."
)


@click.group(
    context_settings={"help_option_names": ["-h", "--help"]},
    epilog=examples(
        "privbench run                      # the main job: every default defense, attacked, with verdicts",
        "privbench train --defense gmm-cem --bottleneck C8 --noise 0.025 && privbench attack RUN_FOLDER",
    ),
)
@click.version_option(package_name="privbench")
def cli() -> None:
    """Train split models under defenses, attack them by model inversion, and report how much
    each leaks next to its accuracy (docs/getting-started.md)."""


@cli.command("list", epilog=examples("privbench list", "privbench list --preset paper --plugin my_defense.py"))
@click.option(
    "--preset", type=click.Choice(list(PRESETS)), default="quick", show_default=True, help="Whose defaults to show."
)
@plugin_option
def list_cmd(preset: str, plugins: tuple[str, ...]) -> None:
    """Print the installed attacks, defenses and datasets, and the defaults of a preset."""
    load_plugins(plugins)
    for kind, found in api.plugins(preset).items():
        click.echo(f"{kind}s:")
        for p in found:
            opts = ", ".join(f"{k}={v}" for k, v in p["defaults"].items())
            sweep = f"  sweep: {p['sweep']}" if p["sweep"] else ""
            click.echo(f"  {p['name']:<14} {p['summary']}" + (f"  [{opts}]" if opts else "") + sweep)
    click.echo("datasets:\n" + "".join(f"  {d}\n" for d in DATASETS), nl=False)
    click.echo("models:\n" + "".join(f"  {m}\n" for m in MODELS), nl=False)
    click.echo("  torchvision:NAME | timm:NAME | pkg.module:callable  (cut by module name: privbench cuts MODEL)")
    click.echo("channel options (compose with every defense):\n  --bottleneck C<c>\n  --noise SIGMA")
    click.echo("defense stacks: --defense dropout+gmm-cem (parts left to right; -o PART.key=value)")
    click.echo("strength sweeps: --sweep gmm-cem.lam=4,16,64 | --sweep NAME (its knob over its default grid)")
    click.echo(preset_defaults(preset))


def preset_defaults(preset: str) -> str:
    """The budgets `train`, `attack` and `run` use under `preset` when no option overrides them."""
    cfg, p, grid = TrainConfig.from_preset(preset), PRESETS[preset], Grid()
    schedule = cfg.schedule + (
        f" (milestones {list(cfg.milestones)}, gamma {cfg.gamma})" if cfg.schedule == "multistep" else ""
    )
    others = [name for name in PRESETS if name != preset]
    channel = f"C{grid.bottleneck[0]} + noise {grid.noise[0]}"
    return "\n".join(
        [
            f"defaults of preset {preset} (--preset {' | '.join(others)} shows the other{'s' * (len(others) > 1)}):",
            f"  training: model {cfg.model}, width {cfg.width}, cut {cfg.cut}, epochs {cfg.epochs}, "
            f"batch size {cfg.batch_size}, lr {cfg.lr}, schedule {schedule}, momentum {cfg.momentum}, "
            f"weight decay {cfg.weight_decay}, warm-up {cfg.warmup_epochs:g} epochs, "
            f"label smoothing {cfg.label_smoothing:g}, weight average {cfg.ema:g}, noise ramp {cfg.noise_warmup:g}",
            f"  attacks: epochs {p['attack_epochs']} (learned), steps {p['attack_steps']} (optimization), "
            f"eval images {p['eval_images']}, attacker data train",
            f"  run grid: defenses {' '.join(grid.defense)}; attacks {' '.join(grid.attack)}; "
            f"base channel {channel}; seeds {grid.seeds}",
        ]
    )


@cli.command(
    epilog=examples(
        "privbench train --defense gmm-cem --bottleneck C8 --noise 0.025 --epochs 10",
        "privbench train --model torchvision:resnet18 --cut layer2 --defense dropout+gmm-cem -o gmm-cem.lam=8",
    )
)
@click.option("--dataset", default="embedded", show_default=True, help="embedded | cifar10 | cifar100 | folder:PATH")
@click.option("--data-dir", default=None, help="Folder holding the CIFAR python-pickle folder.")
@click.option("--download", is_flag=True, help="Download CIFAR into --data-dir when absent (needs internet).")
@click.option("--defense", default="none", show_default=True)
@click.option(
    "-o",
    "--option",
    "options",
    multiple=True,
    metavar="[DEFENSE.]KEY=VALUE",
    help="Defense option key=value, or model.KEY=VALUE: a keyword argument of the model factory "
    "(e.g. -o model.img_size=32) (repeatable).",
)
@click.option("--preset", default="quick", show_default=True, help="quick (CPU minutes) | paper (240 epochs)")
@click.option("--model", default=None, help=MODEL_HELP)
@click.option("--width", type=float, default=None, help="Channel width multiplier (vgg11 and resnet20).")
@click.option(
    "--epochs",
    type=click.IntRange(min=0),
    default=None,
    help="Training epochs; 0 evaluates the model as it is (pretrained or --weights) and writes its "
    "run folder, ready for attacks [default: the preset's].",
)
@click.option("--batch-size", type=int, default=None)
@click.option("--lr", type=float, default=None)
@click.option("--schedule", default=None, help="cosine | multistep")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--cut", default=None, metavar="NAME|K", help=CUT_HELP)
@click.option("--bottleneck", default=None, help="C<c>: client conv to c channels + Sigmoid.")
@click.option("--noise", type=float, default=None, help="Std of Gaussian noise on the activation.")
@click.option("--n-train", type=int, default=None, help="embedded: number of training crops.")
@model_options
@click.option("--device", default="auto", show_default=True)
@compile_option
@click.option("--amp/--no-amp", default=True, show_default=True, help="bf16 autocast on CUDA (fp32 with --no-amp).")
@click.option("--cpu-amp", is_flag=True, default=None, help=CPU_AMP_HELP)
@click.option(
    "--channels-last/--no-channels-last", default=True, show_default=True, help="Channels-last memory format on CUDA."
)
@click.option("--results-dir", default="results", show_default=True)
@click.option("--force", is_flag=True, help="Retrain even if this configuration has a finished run.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@plugin_option
def train(
    dataset,
    data_dir,
    download,
    defense,
    options,
    preset,
    model,
    width,
    epochs,
    batch_size,
    lr,
    schedule,
    seed,
    cut,
    bottleneck,
    noise,
    n_train,
    image_size,
    pretrained,
    weights,
    device,
    compile_mode,
    amp,
    cpu_amp,
    channels_last,
    results_dir,
    force,
    quiet,
    plugins,
) -> None:
    """Train a split model under a defense; the last line printed is the run folder.

    \b
    privbench train --defense gmm-cem --bottleneck C8 --noise 0.025
    privbench train --model torchvision:resnet18 --cut layer2 --epochs 1 --n-train 200
    """
    load_plugins(plugins)
    run = api.train(
        defense,
        bottleneck=bottleneck,
        noise=noise,
        epochs=epochs,
        seed=seed,
        dataset=dataset,
        preset=preset,
        options=parse_options(options),
        results_dir=results_dir,
        force=force,
        progress=not quiet,
        log=click.echo,
        model=model,
        width=width,
        cut=cut,
        batch_size=batch_size,
        lr=lr,
        schedule=schedule,
        n_train=n_train,
        image_size=image_size,
        pretrained=pretrained,
        weights=weights,
        device=device,
        compile=compile_mode,
        amp=amp,
        cpu_amp=cpu_amp,
        channels_last=channels_last,
        data_dir=data_dir,
        download=download,
    )
    click.echo(f"test accuracy: {run.metrics()['test_accuracy']:.4f}")
    click.echo(str(run.path))


@cli.command(
    epilog=examples(
        "privbench attack RUN_FOLDER --attack decoder --attack optimization",
        "privbench attack RUN_FOLDER --attack shadow --attacker-data aux -o shadow.epochs=12",
    )
)
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
@click.option(
    "--check-saturation/--no-check-saturation",
    default=None,
    help="Repeat every learned attack at twice its epochs and flag it unsaturated when SSIM rises by "
    "more than its 95% CI [default: the preset's: off for quick, on for paper].",
)
@click.option(
    "--semantic/--no-semantic",
    default=None,
    help="Score sem_acc: does an independent classifier still read each reconstruction's true class? "
    "[default: the preset's (on)]",
)
def attack(
    run_dir,
    attacks,
    attacker_data,
    epochs,
    steps,
    eval_images,
    options,
    device,
    seed,
    quiet,
    plugins,
    check_saturation,
    semantic,
) -> None:
    """Attack a trained run; writes RUN_DIR/attacks/<attack>-<hash>/ and prints a table."""
    load_plugins(plugins)
    names = list(dict.fromkeys(attacks or api.DEFAULT_ATTACKS))
    results = api.attack(
        run_dir,
        names,
        attacker_data=attacker_data,
        epochs=epochs,
        steps=steps,
        eval_images=eval_images,
        options=attack_options(options, names),
        device=device,
        seed=seed,
        progress=not quiet,
        log=click.echo,
        check_saturation=check_saturation,
        semantic=semantic,
    )
    first = results[0]
    click.echo(f"run {first['run']}: {first['eval_images']} {first['eval_split']} images; {first['threat_model']}")
    click.echo(format_table(results))


RUN_GROUPS = {
    "Grid": [
        "defenses",
        "options",
        "attacks",
        "sweeps",
        "no_sweep",
        "reference",
        "bracket",
        "privacy_metric",
        "seeds",
        "seeds_cap",
        "config_file",
        "preset",
    ],
    "Data and model": [
        "dataset",
        "data_dir",
        "model",
        "cut",
        "image_size",
        "pretrained",
        "weights",
        "bottlenecks",
        "noises",
        "epochs",
    ],
    "Attacks": ["attacker_data", "eval_images", "check_saturation", "semantic"],
    "Execution": ["device", "compile_mode", "cpu_amp", "executor", "ray_address", "plugins"],
    "Output": ["results_dir", "out", "quiet"],
}
RUN_EPILOG = """\b
TOML file (--config FILE.toml; the full schema with types, defaults and an example is in
docs/config.md). Top-level keys are the options above, lists for repeatable ones:
  preset, dataset, data_dir, defense, attack, seeds, cut, bottleneck, noise, device,
  results_dir, out, epochs, model, image_size, pretrained, weights, eval_images,
  attacker_data, option (-o pairs; model.KEY=VALUE for the model), executor (local | ray | slurm),
  sweep, reference, bracket, privacy_metric, seeds_cap
Tables:
  [train]             TrainConfig fields over the preset: epochs, lr, width, n_train,
                      batch_size, schedule, amp, model, model_options, ...
  [attacks]           epochs, steps, eval_images, attacker_data (train | aux)
  [attacks.<name>]    one attack's options, e.g. [attacks.decoder] channels = 32
  [defenses.<name>]   one defense's options, e.g. [defenses.gmm-cem] lam = 16
  [executor]          kind, and the Ray or SLURM settings (docs/executors.md), e.g.
                      kind = "slurm", partition = "gpu", gpus_per_task = 1, time = "12:00:00"
Top-level keys win over table entries; options on the command line win over the file.

""" + examples(
    "privbench run --seeds 3                     # the main job at three seeds: verdicts worth citing",
    "privbench run --defense none --defense nopeek --sweep nopeek --seeds auto --executor ray",
)


@cli.command("run", cls=GroupedCommand, option_groups=RUN_GROUPS, epilog=RUN_EPILOG)
@click.option("--preset", type=click.Choice(list(PRESETS)), default=None, help="Budgets [default: quick].")
@click.option("--dataset", default=None, help="embedded | cifar10 | cifar100 | folder:PATH [default: embedded]")
@click.option("--data-dir", default=None, help="Folder holding the CIFAR python-pickle folder.")
@click.option(
    "--defense",
    "defenses",
    multiple=True,
    metavar="NAME[@CHANNEL]",
    help="Repeatable. NAME runs on every base channel; NAME@CHANNEL pins one: plain, C8, 0.05 or "
    "C8+0.05. [default: none@plain none gmm-cem slot-cem]",
)
@click.option(
    "-o",
    "--option",
    "options",
    multiple=True,
    metavar="[DEFENSE.]KEY=VALUE",
    help="Defense option, repeatable: gmm-cem.lam=16 sets it for one defense; a bare lam=16 for "
    "every defense in the grid that has it. ATTACK.KEY=VALUE sets an attack's option.",
)
@click.option("--attack", "attacks", multiple=True, help="Repeatable. [default: decoder optimization]")
@click.option(
    "--sweep",
    "sweeps",
    multiple=True,
    metavar="NAME[.KEY][=V1,V2,...]",
    help="Train one cell per value of a defense's option or of its channel noise (KEY noise); "
    "no KEY: its strength knob; no values: its default grid. Repeatable. [default grid: "
    "none.noise=0.025,0.05,0.1]",
)
@click.option("--no-sweep", is_flag=True, help="Not even the default grid's noise sweep.")
@click.option(
    "--reference",
    default=None,
    metavar="FAMILY",
    help="The family the verdicts compare against, at matched accuracy: auto (none, if swept) or a defense "
    "name [default: auto].",
)
@click.option(
    "--bracket",
    type=int,
    default=None,
    metavar="N",
    help="Reference strengths the run may add (each at every seed) so that every defense has reference "
    "points at its accuracy; 0: keep the reference as swept [default: 3].",
)
@click.option(
    "--privacy-metric",
    type=click.Choice(["ssim", "psnr", "lpips", "mse", "sem_acc"]),
    default=None,
    help="The privacy axis of the frontier and verdicts (worst case over attacks) [default: ssim].",
)
@click.option(
    "--seeds",
    default=None,
    metavar="N|auto",
    help="Train seeds 0..N-1 of every configuration; auto: add seeds until every verdict is resolved or "
    "--seeds-cap is reached, keeping the overall false-verdict rate at 5% [default: 1].",
)
@click.option("--seeds-cap", type=int, default=None, help="The most seeds --seeds auto trains [default: 5].")
@click.option(
    "--epochs",
    type=click.IntRange(min=0),
    default=None,
    help="Training epochs; 0 evaluates each model as it is [default: the preset's].",
)
@click.option("--model", default=None, help=MODEL_HELP)
@click.option("--cut", default=None, metavar="NAME|K", help=CUT_HELP)
@model_options
@click.option(
    "--bottleneck",
    "bottlenecks",
    multiple=True,
    metavar="C<c>|none",
    help="Base channel bottleneck; repeat to sweep [default: C8].",
)
@click.option(
    "--noise",
    "noises",
    multiple=True,
    type=float,
    metavar="SIGMA",
    help="Base channel noise std; repeat to sweep [default: 0.025].",
)
@click.option(
    "--attacker-data",
    type=click.Choice(["train", "aux"]),
    default=None,
    help="The attacker's training images: train (the private split, worst case) or aux (disjoint) [default: train].",
)
@click.option(
    "--eval-images",
    type=click.IntRange(min=1),
    default=None,
    help="Test images each attack reconstructs [default: the preset's].",
)
@click.option("--device", default=None, help="auto | cpu | cuda [default: auto]")
@compile_option
@click.option("--cpu-amp", is_flag=True, default=None, help=CPU_AMP_HELP)
@click.option("--results-dir", default=None, help="Where run folders go [default: results].")
@click.option("--out", default=None, help="Output folder [default: RESULTS_DIR/tables/<grid hash>].")
@click.option(
    "--config",
    "config_file",
    default=None,
    metavar="FILE.toml",
    help="TOML file with the same keys plus [train], [attacks] and [defenses.<name>] tables (below).",
)
@click.option(
    "--executor",
    type=click.Choice(["local", "ray", "slurm"]),
    default=None,
    help="Who computes the cells: local (this process, one after another), ray or slurm (one task per "
    "cell; settings in an [executor] table, docs/executors.md) [default: local].",
)
@click.option(
    "--ray-address",
    default=None,
    metavar="HOST:PORT|auto",
    help="Ray cluster to connect to (default: $RAY_ADDRESS, else a local Ray instance).",
)
@click.option(
    "--check-saturation/--no-check-saturation",
    default=None,
    help="Repeat every learned attack at twice its epochs; mark cells whose SSIM still rises "
    "(unsaturated) [default: the preset's: off for quick, on for paper].",
)
@click.option("--semantic/--no-semantic", default=None, help="Score sem_acc for every attack [default: on].")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@plugin_option
def run(
    preset,
    dataset,
    data_dir,
    defenses,
    options,
    attacks,
    sweeps,
    no_sweep,
    reference,
    bracket,
    privacy_metric,
    seeds,
    seeds_cap,
    epochs,
    model,
    cut,
    image_size,
    pretrained,
    weights,
    bottlenecks,
    noises,
    attacker_data,
    eval_images,
    device,
    compile_mode,
    cpu_amp,
    results_dir,
    out,
    config_file,
    executor,
    ray_address,
    check_saturation,
    semantic,
    quiet,
    plugins,
) -> None:
    """The main job: train every defense, attack each, and judge each against adding noise alone.

    \b
    The channel is what the client sends: bottleneck C<c> and/or Gaussian noise. The base
    channel (--bottleneck x --noise, default C8 + noise 0.025) applies to every --defense
    given without @; NAME@plain is the undefended model. The default grid is the plain model,
    the base channel alone with its noise swept (0.025, 0.05, 0.1: the reference), and gmm-cem
    and slot-cem on the base channel. Where a defense's accuracy lies outside the reference's
    range, the run adds reference points (--bracket, default 3 strengths); it ends with one
    verdict per defense at matched accuracy (docs/frontier.md). It prints a summary and writes
    table.md, table.csv, results.csv, frontier.csv, verdicts.csv, frontier.png/.pdf,
    privacy_utility.png and reconstructions.png into the folder named by its last line.
    Finished cells are reused: rerunning computes only what is missing. --executor ray / slurm
    computes the cells in parallel on a cluster (docs/executors.md).
    """

    t0 = time.perf_counter()
    load_plugins(plugins)
    grid = grid_from_options(
        config_file,
        preset=preset,
        dataset=dataset,
        data_dir=data_dir,
        defense=defenses,
        attack=attacks,
        seeds=seeds,
        seeds_cap=seeds_cap,
        epochs=epochs,
        model=model,
        cut=cut,
        image_size=image_size,
        pretrained=pretrained,
        weights=weights,
        bottleneck=bottlenecks,
        noise=noises,
        attacker_data=attacker_data,
        eval_images=eval_images,
        option=options,
        device=device,
        results_dir=results_dir,
        out=out,
        progress=False if quiet else None,
        reference=reference,
        sweep="off" if no_sweep else (list(sweeps) or None),
        privacy_metric=privacy_metric,
        bracket=bracket,
        executor={k: v for k, v in (("kind", executor), ("address", ray_address)) if v} or None,
    )
    if compile_mode:
        grid.train["compile"] = compile_mode
    if cpu_amp:
        grid.train["cpu_amp"] = True
    for key, value in (("check_saturation", check_saturation), ("semantic", semantic)):
        if value is not None:  # the command line wins over the file's [attacks] table
            grid.attacks[key] = value
    try:
        result = api.run(grid, log=click.echo)
    except CellsFailed as exc:  # the other cells are done; a rerun retries only these
        click.echo(str(exc), err=True)
        sys.exit(1)
    click.echo("")
    verdicts = None if result.comparison is None else result.comparison.families
    click.echo(summary_markdown(result.table, verdicts), nl=False)
    click.echo(f"(every attack and metric: {result.out_dir / 'table.md'})")
    for line in tables.chance_warnings(result.table) + tables.environment_warnings(result.long):
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


@cli.command(
    "cuts",
    epilog=examples(
        "privbench cuts torchvision:resnet18 --image-size 32",
        "privbench cuts timm:vit_tiny_patch16_224 -o model.img_size=32 -o model.patch_size=4",
    ),
)
@click.argument("model")
@click.option(
    "--image-size",
    type=click.IntRange(min=1),
    default=32,
    show_default=True,
    metavar="N",
    help="Square input size the cuts are traced at (train with the same --image-size).",
)
@click.option(
    "-o",
    "--option",
    "options",
    multiple=True,
    metavar="[model.]KEY=VALUE",
    help="A keyword argument of the model factory, e.g. -o model.img_size=32 (repeatable).",
)
@click.option("--width", type=float, default=None, help="vgg11 / resnet20: width multiplier [default: the preset's].")
def cuts_cmd(model, image_size, options, width) -> None:
    """List every point where MODEL can be cut, in order: the cut's name, whether it is valid (or
    why not), the shape of z it sends, and the client's share of parameters and FLOPs.

    \b
    privbench cuts torchvision:resnet18 --image-size 32
    privbench cuts timm:vit_tiny_patch16_224 -o model.img_size=32 -o model.patch_size=4
    """
    model_opts: dict[str, Any] = {}
    for o in options_mod.parse_all(options):
        if o.target not in (None, options_mod.MODEL_TARGET):
            raise UserError(f"option {str(o)!r}: privbench cuts takes model options only (model.KEY=VALUE)")
        model_opts[o.key] = o.value
    infos = api.cuts(model, image_size=image_size, options=model_opts, width=width)
    click.echo(format_cuts(model, infos, image_size, builtin=model in MODELS))


def format_cuts(model: str, infos: list[CutInfo], image_size: int, *, builtin: bool) -> str:
    """An aligned table of cut points (privbench cuts)."""
    valid = sum(c.valid for c in infos)
    how = (
        "--cut K puts the first K entries on the client"
        if builtin
        else "--cut NAME, or --cut K for the valid cut numbered K"
    )
    lines = [f"{model} at {image_size}x{image_size} px: {len(infos)} cut points, {valid} valid; {how}"]
    rows = [["#", "cut", "z", "kind", "params", "FLOPs", "status"]]
    k = 0
    for c in infos:
        number = "" if builtin or not c.valid else str(k)
        k += c.valid
        shape = "x".join(map(str, c.z_shape)) or "-"
        share = [f"{100 * c.client_param_share:.1f}%", f"{100 * c.client_flops_share:.1f}%"]
        rows.append([number, c.name, shape, c.kind, *share, "valid" if c.valid else f"invalid: {c.reason}"])
    if builtin:
        rows = [r[1:] for r in rows]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    right = {0, 4, 5} if not builtin else {3, 4}
    for r in rows:
        cells = [v.rjust(w) if i in right else v.ljust(w) for i, (v, w) in enumerate(zip(r, widths))]
        lines.append("  ".join(cells).rstrip())
    lines.append("params, FLOPs: the client's share of the model's (FLOPs of convolutions and matrix products)")
    return "\n".join(lines)


@cli.command(
    "precision",
    epilog=examples(
        "privbench precision results/precision --seeds 5                 # train and attack the default grid",
        "privbench precision results/precision --summarize --paired-with none@C8+0.025",
    ),
)
@click.argument("results_dir")
@click.option("--seeds", type=int, default=5, show_default=True, help="Seeds 0..N-1 per configuration (>= 2).")
@click.option(
    "--defense",
    "defenses",
    multiple=True,
    metavar="NAME[@CHANNEL]",
    help="Repeatable [default: the run grid's defenses].",
)
@click.option("--noise", "noises", multiple=True, type=float, help="Channel noise, repeatable [default: 0.025].")
@click.option("--attack", "attacks", multiple=True, help="Repeatable [default: decoder].")
@click.option("--set", "settings", multiple=True, metavar="KEY=VALUE", help="A training setting over the preset.")
@click.option("--summarize", is_flag=True, help="Train nothing: report the run folders already there.")
@click.option(
    "--json",
    "json_out",
    default=None,
    metavar="FILE",
    help="Also write the rows (with --split: the split), per-seed values included.",
)
@click.option(
    "--resolve",
    multiple=True,
    metavar="QUANTITY=SIZE",
    help="The difference whose seeds to report, per metric (accuracy, ssim, psnr), repeatable "
    "[default: accuracy=2 ssim=0.02].",
)
@click.option(
    "--paired-with",
    metavar="CONFIGURATION",
    help="Also report every configuration minus this one (its label, e.g. none@C8+0.025), seed by seed.",
)
@click.option(
    "--split",
    "split_label",
    metavar="CONFIGURATION",
    help="Train nothing: split this configuration's accuracy sd over seeds into a model part and a "
    'test-set part (its label, e.g. "none@C8+0.025"), evaluating each seed\'s model per test tile.',
)
def precision_cmd(
    results_dir, seeds, defenses, noises, attacks, settings, summarize, json_out, resolve, paired_with, split_label
) -> None:
    """How much accuracy and attack metrics move between training seeds, and how many seeds a
    difference of a given size needs (docs/precision.md).

    \b
    Trains seeds 0..N-1 of each configuration (finished cells are reused), then prints per
    configuration the mean and sd over seeds with the sd's 95% interval, the minimum detectable
    difference at 3 and 5 seeds (two-sided t test, alpha 0.05, power 0.8), whether the sd meets
    the preset's target, and the seeds per arm that resolve a difference of a given size.

    \b
    With --split CONFIGURATION, trains nothing and reads every seed's model of that configuration
    on its test split per tile: the seed sd split into a model part and a test-set part (which
    more test tiles would average out) with the sd at 2x, 4x and unlimited test tiles, per-class
    accuracy per seed, what each class is misread as, and the test tiles by training neighbours.
    """
    if split_label is not None:
        # The split reads finished runs only: options that train or shape the table would be ignored.
        ctx = click.get_current_context()
        given = [
            p.opts[0]
            for p in ctx.command.params
            if p.name in {"seeds", "defenses", "noises", "attacks", "settings", "resolve", "paired_with"}
            and ctx.get_parameter_source(p.name) is not click.core.ParameterSource.DEFAULT
        ]
        if given:
            raise UserError(f"--split reads finished runs and takes no {', '.join(given)}")
        split = api.variance_split(results_dir, split_label)
        click.echo(precision_table.render_split(split))
        if json_out:
            atomic_write_text(json_out, json.dumps(split, indent=2) + "\n")
        return
    found = api.precision(
        results_dir,
        seeds=seeds,
        defense=defenses,
        noise=noises,
        attack=attacks,
        train=settings,
        summarize=summarize,
        resolve=resolve,
        paired_with=paired_with,
        log=click.echo,
    )
    rows, pairs = found["rows"], found["pairs"]
    click.echo(precision_table.render(rows))
    if pairs:
        click.echo(f"\nPaired with {paired_with} over common seeds (mean and sd of the differences; paired MDD):\n")
        click.echo(precision_table.render(pairs))
    if json_out:
        atomic_write_text(json_out, json.dumps(rows + pairs, indent=2) + "\n")


cli.add_command(table_cmd)
cli.add_command(plot_cmd)
cli.add_command(report_cmd)


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
