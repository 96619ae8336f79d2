"""The `privbench` command line: a thin layer over the Python API.

Bad input raises UserError (or a click usage error) and is printed as one line, exit code 2.
"""

from __future__ import annotations

import sys

import click

from privbench import registry
from privbench.errors import UserError

PLUGIN_HELP = "Python file defining an Attack or Defense class (repeatable)."


def load_plugins(paths: tuple[str, ...]) -> None:
    for p in paths:
        registry.load_plugin_file(p)


def plugin_option(f):
    return click.option("--plugin", "plugins", multiple=True, type=str, help=PLUGIN_HELP)(f)


def parse_options(pairs: tuple[str, ...]) -> dict:
    """`key=value` pairs -> dict, values parsed as JSON when they parse (numbers, booleans)."""
    import json

    out = {}
    for pair in pairs:
        if "=" not in pair:
            raise UserError(f"invalid option {pair!r}: expected key=value")
        k, v = pair.split("=", 1)
        try:
            out[k.strip().replace("-", "_")] = json.loads(v)
        except json.JSONDecodeError:
            out[k.strip().replace("-", "_")] = v
    return out


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="privbench")
def cli() -> None:
    """privbench: train split models under defenses, attack them, report privacy vs utility."""


@cli.command("list")
@plugin_option
def list_cmd(plugins: tuple[str, ...]) -> None:
    """Print the installed attacks, defenses and datasets."""
    from privbench.data import DATASETS
    from privbench.models import MODELS

    load_plugins(plugins)
    for kind in ("attack", "defense"):
        click.echo(f"{kind}s:")
        for name in registry.names(kind):
            cls = registry.get(kind, name)
            opts = ", ".join(f"{k}={v}" for k, v in registry.option_defaults(cls).items())
            click.echo(f"  {name:<14} {cls.summary}" + (f"  [{opts}]" if opts else ""))
    click.echo("datasets:\n" + "".join(f"  {d}\n" for d in DATASETS), nl=False)
    click.echo("models:\n" + "".join(f"  {m}\n" for m in MODELS), nl=False)
    click.echo("channel options (compose with every defense):\n  --bottleneck C<c>\n  --noise SIGMA")


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
@click.option("--results-dir", default="results", show_default=True)
@click.option("--force", is_flag=True, help="Retrain even if this configuration has a finished run.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@plugin_option
def train(
    dataset, data_dir, download, defense, options, preset, model, width, epochs, batch_size, lr,
    schedule, seed, cut, bottleneck, noise, n_train, device, results_dir, force, quiet, plugins,
) -> None:  # fmt: skip
    """Train a split model under a defense; the last line printed is the run folder."""
    from privbench.config import TrainConfig
    from privbench.data import load_dataset
    from privbench.models import parse_bottleneck
    from privbench.runs import train_run

    load_plugins(plugins)
    registry.get("defense", defense)  # fail fast on an unknown name
    if noise is not None and noise < 0:
        raise UserError(f"invalid noise {noise}: the noise std must be >= 0")
    cfg = TrainConfig.from_preset(
        preset, dataset=dataset, data_dir=data_dir, defense=defense, defense_options=parse_options(options),
        model=model, width=width, epochs=epochs, batch_size=batch_size, lr=lr, schedule=schedule, seed=seed,
        cut=cut, bottleneck=parse_bottleneck(bottleneck), noise=noise, n_train=n_train, device=device,
        progress=not quiet,
    )  # fmt: skip
    # Validate everything that can be checked cheaply before any training starts.
    data = load_dataset(cfg.dataset, data_dir=cfg.data_dir, download=download, seed=cfg.data_seed, n_train=cfg.n_train)
    from privbench.train import make_model

    make_model(cfg, data)
    registry.create("defense", cfg.defense, cfg.defense_options)
    run, trained = train_run(cfg, results_dir, force=force, log=click.echo)
    acc = run.metrics()["test_accuracy"]
    if not trained:
        click.echo("reused finished run (same configuration); --force retrains")
    click.echo(f"test accuracy: {acc:.4f}")
    click.echo(str(run.path))


def main(argv: list[str] | None = None) -> None:
    """Entry point: one-line errors with exit code 2 for bad input."""
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
