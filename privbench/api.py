"""The Python API: what the command line does, from a script or a notebook.

    run = pb.train(defense="gmm-cem", bottleneck=8, noise=0.025, epochs=10)
    pb.attack(run, ["decoder"])
    df = pb.results([run])
    print(df[["defense", "channel", "accuracy_mean", "decoder_ssim_mean", "decoder_ssim_ci95"]])

Every function returns plain objects: a `Run` (its folder is `run.path`), lists of dicts (the
attacks' metrics.json contents) and pandas DataFrames of raw numbers. Work is cached exactly as
on the command line: the same configuration maps to the same run folder and is reused.
`run(...)` is `privbench run`: the whole grid, returning a `GridResult` (its `.table`, `.out_dir`,
`.computed`, `.reused`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pandas as pd

from privbench import job
from privbench.analysis import tables
from privbench.engine import zoo
from privbench.engine.config import PRESETS, TrainConfig
from privbench.engine.cuts import CutInfo, list_cuts
from privbench.engine.models import MODELS, builtin_cuts, parse_bottleneck
from privbench.errors import UserError
from privbench.grid.spec import Grid
from privbench.job import GridResult
from privbench.plugin import stack
from privbench.report import table_format
from privbench.store import rows
from privbench.store.attacks import attack_run
from privbench.store.outputs import resolve_inputs
from privbench.store.runs import DEFAULT_RESULTS, Run, train_run


def train(
    defense: str = "none",
    *,
    bottleneck: int | str | None = None,
    noise: float = 0.0,
    epochs: int | None = None,
    seed: int = 0,
    dataset: str = "embedded",
    preset: str = "quick",
    options: dict[str, Any] | None = None,
    results_dir: str | Path = DEFAULT_RESULTS,
    force: bool = False,
    progress: bool = False,
    log: Callable[[str], None] | None = print,
    **settings: Any,
) -> Run:
    """Train a split model under `defense` (options in `options`) on the channel given by
    `bottleneck` (C<c> channels, e.g. 8) and `noise` (std); reuses a finished identical run.
    Other TrainConfig fields (width, cut, lr, n_train, model, device, ...) go in `settings`."""
    stack.parts(defense)
    cfg = TrainConfig.from_preset(
        preset, defense=defense, defense_options=dict(options or {}), bottleneck=parse_bottleneck(bottleneck),
        noise=noise, epochs=epochs, seed=seed, dataset=dataset, progress=progress, **settings,
    )  # fmt: skip
    run, _ = train_run(cfg, results_dir, force=force, log=log or (lambda _msg: None))
    return run


def attack(
    run: Run | str | Path,
    attacks: Iterable[str] = ("decoder", "optimization"),
    *,
    attacker_data: str = "train",
    epochs: int | None = None,
    steps: int | None = None,
    eval_images: int | None = None,
    options: dict[str, dict[str, Any]] | None = None,
    device: str = "auto",
    seed: int = 0,
    progress: bool = False,
    log: Callable[[str], None] | None = print,
) -> list[dict[str, Any]]:
    """Attack a trained run with each named attack; returns each attack's metrics.json content
    plus "path" (its folder) and "reused". `options` maps attack name -> {option: value}."""
    return attack_run(
        _path(run), list(attacks), attacker_data=attacker_data, epochs=epochs, steps=steps,
        eval_images=eval_images, options=options, device=device, seed=seed, progress=progress,
        log=log or (lambda _msg: None),
    )  # fmt: skip


RunLike = Run | str | Path


def results(runs: Iterable[RunLike] | RunLike = DEFAULT_RESULTS, *, long: bool = False) -> pd.DataFrame:
    """The privacy-utility table of `runs` (run folders, results folders holding runs, or a
    `run()` output folder, which stands for that grid's cells): one row per defense
    configuration, raw numbers (`<attack>_<metric>_mean` / `_ci95`, `accuracy_mean`,
    `worst_attack`, ...). With long=True, the long-form rows it is pivoted from (run, defense,
    channel, seed, attack, metric, value, ...)."""
    if isinstance(runs, RunLike):
        runs = [runs]
    paths, attack_dirs = resolve_inputs([_path(r) for r in runs])
    frame = rows.collect(paths, attack_dirs=attack_dirs)
    return frame if long else tables.aggregate(frame, paths)


def table(df: pd.DataFrame, fmt: str = "md") -> str:
    """Render a `results()` table as Markdown, CSV (raw numbers) or LaTeX."""

    return table_format.render(df, fmt)


def run(
    grid: Grid | None = None, *, executor: str | dict[str, Any] | None = None,
    log: Callable[[str], None] | None = print, **fields: Any,
) -> GridResult:  # fmt: skip
    """`privbench run` as a function: keyword arguments are the Grid fields (defense=[...],
    attack=[...], seeds, bottleneck=[...], noise=[...], epochs, model, eval_images,
    attacker_data, option=["gmm-cem.lam=16"], train={...}, attacks={...}, defenses={...}, ...);
    docs/config.md describes each. `executor` is "local" (default), "ray", "slurm" or the
    [executor] table as a dict (docs/executors.md); if cells fail, the others are still computed
    and privbench.executors.base.CellsFailed names the failed ones. A ready `grid` (a Grid, e.g.
    from privbench.grid.spec.grid_from_options) is run as it is."""
    if grid is None:
        grid = Grid(executor=executor, **fields)
    return job.run_grid(grid, log=log or (lambda _msg: None))


def cuts(
    model: str,
    *,
    image_size: int = 32,
    options: dict[str, Any] | None = None,
    width: float | None = None,
    num_classes: int = 10,
) -> list[CutInfo]:
    """Every cut point of `model` (a built-in name or torchvision:NAME, timm:NAME,
    pkg.module:callable built with `options`) for square images of `image_size` pixels, in the
    order the cuts fall: name, valid or why not, z's shape and kind, the client's share of the
    parameters and FLOPs (privbench.engine.cuts.list_cuts). A built-in model's cuts are its entry
    counts, at `width` (default: the quick preset's)."""
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise UserError(f"invalid image size {image_size!r}: a positive number of pixels")
    if model in MODELS:
        if options:
            raise UserError(f"model options apply to torchvision, timm and user models, not the built-in {model}")
        width = PRESETS["quick"]["width"] if width is None else width
        return builtin_cuts(model, width=width, image_shape=(3, image_size, image_size), num_classes=num_classes)
    if not zoo.is_model_spec(model):
        raise UserError(f"unknown model {model!r}: expected {', '.join(MODELS)}, torchvision:NAME, timm:NAME or "
                        "pkg.module:callable")  # fmt: skip
    if width is not None:
        raise UserError("width applies to the built-in models; give a model's own options with -o model.KEY=VALUE")
    net = zoo.build_model(model, num_classes=num_classes, options=options)
    return list_cuts(net, image_size)


def _path(run: Run | str | Path) -> Path:
    return run.path if isinstance(run, Run) else Path(run)
