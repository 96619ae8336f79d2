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

from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from privbench import job
from privbench.analysis import frontier as frontier_analysis
from privbench.analysis import precision as precision_stats
from privbench.analysis import tables
from privbench.analysis import variance_split as seed_tile_split
from privbench.engine import zoo
from privbench.engine.config import PRESETS, TrainConfig
from privbench.engine.cuts import CutInfo, list_cuts
from privbench.engine.data import load_dataset
from privbench.engine.models import MODELS, builtin_cuts, parse_bottleneck
from privbench.errors import UserError
from privbench.grid.spec import DEFAULT_ATTACKS, Grid
from privbench.job import GridResult
from privbench.plugin import options as options_mod
from privbench.plugin import registry, strength
from privbench.report import blocks, table_format
from privbench.store import rows
from privbench.store.attacks import attack_run
from privbench.store.outputs import check_output_dir, resolve_inputs
from privbench.store.runs import DEFAULT_RESULTS, Run, train_run
from privbench.store.seeds import collect_seeds, configuration_runs
from privbench.store.tiles import evaluate_tiles
from privbench.util.storage import atomic_write_text


def train(
    defense: str = "none",
    *,
    bottleneck: int | str | None = None,
    noise: float | None = 0.0,
    epochs: int | None = None,
    seed: int = 0,
    dataset: str = "embedded",
    preset: str = "quick",
    options: Mapping[str, Any] | Iterable[str] | None = None,
    results_dir: str | Path = DEFAULT_RESULTS,
    force: bool = False,
    progress: bool = False,
    log: Callable[[str], None] | None = print,
    model: str | None = None,
    width: float | None = None,
    cut: int | str | None = None,
    batch_size: int | None = None,
    lr: float | None = None,
    schedule: str | None = None,
    n_train: int | None = None,
    image_size: int | None = None,
    pretrained: bool | None = None,
    weights: str | Path | None = None,
    model_options: Mapping[str, Any] | None = None,
    device: str | None = None,
    compile: bool | str | None = None,
    amp: bool | None = None,
    channels_last: bool | None = None,
    data_dir: str | Path | None = None,
    download: bool = False,
    **settings: Any,
) -> Run:
    """`privbench train`: train a split model under `defense` (a name or a stack `a+b`) on the
    channel given by `bottleneck` (C<c> channels, e.g. 8 or "C8") and `noise` (std); reuses a
    finished identical run (force=True retrains) and says so through `log`.

    `options` holds defense options in any form privbench.plugin.options takes ({"lam": 8},
    {"gmm-cem.lam": 8}, {"gmm-cem": {"lam": 8}}, or "gmm-cem.lam=8" strings) plus model options
    as "model.KEY" entries; `model_options` gives the latter as a dict. None means the preset's
    (or the training configuration's) value; other TrainConfig fields (momentum, ema, ...) go in
    `settings`. `download` fetches CIFAR into `data_dir` when absent. Names, the data, the model,
    its cut and whether the defense takes the cut's z are checked before the first step: training
    builds the defense and the model once, and refuses before it starts."""
    check_output_dir(results_dir, "results folder")
    model_opts, defense_opts = options_mod.split_model(options_mod.parse_all(options))
    model_opts |= dict(model_options or {})
    if width is not None and model is not None and model not in MODELS:
        raise UserError(f"width applies to {' and '.join(MODELS)}; give {model} options with -o model.KEY=VALUE")
    cfg = TrainConfig.from_preset(
        preset,
        dataset=dataset,
        data_dir=None if data_dir is None else str(data_dir),
        defense=defense,
        defense_options=options_mod.as_dict(defense_opts),
        model=model,
        width=width,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        schedule=schedule,
        seed=seed,
        cut=cut,
        bottleneck=parse_bottleneck(bottleneck),
        noise=noise,
        n_train=n_train,
        device=device,
        compile=compile,
        amp=amp,
        channels_last=channels_last,
        progress=progress,
        image_size=image_size,
        pretrained=pretrained,
        weights=None if weights is None else str(weights),
        model_options=model_opts or None,
        **settings,
    )
    if download:  # fetched here, so that training finds it in data_dir
        load_dataset(
            cfg.dataset,
            data_dir=cfg.data_dir,
            download=True,
            seed=cfg.data_seed,
            n_train=cfg.n_train,
            image_size=cfg.image_size,
        )
    say = log or (lambda _msg: None)
    run, trained = train_run(cfg, results_dir, force=force, log=say)
    if not trained:
        say("reused finished run (same configuration); --force / force=True retrains")
    return run


def attack(
    run: Run | str | Path,
    attacks: Iterable[str] = DEFAULT_ATTACKS,
    *,
    attacker_data: str = "train",
    epochs: int | None = None,
    steps: int | None = None,
    eval_images: int | None = None,
    options: Mapping[str, Any] | Iterable[str] | None = None,
    device: str = "auto",
    seed: int = 0,
    progress: bool = False,
    log: Callable[[str], None] | None = print,
    check_saturation: bool | None = None,
    semantic: bool | None = None,
) -> list[dict[str, Any]]:
    """`privbench attack`: attack a trained run with each named attack; returns each attack's
    metrics.json content plus "path" (its folder) and "reused". `options` maps attack name ->
    {option: value}, or takes any form privbench.plugin.options takes ({"decoder.channels": 64};
    a bare key goes to the one attack run). `check_saturation` repeats every learned attack at twice
    its budget and flags it unsaturated; `semantic` scores sem_acc; None: the run's preset's."""
    names = list(dict.fromkeys([attacks] if isinstance(attacks, str) else attacks))
    opts = options_mod.parse_all(options)
    per_attack = options_mod.route(opts, attacks=names, where="the attacks run")[1] if opts else {}
    return attack_run(
        _path(run),
        names,
        attacker_data=attacker_data,
        epochs=epochs,
        steps=steps,
        eval_images=eval_images,
        options=per_attack,
        device=device,
        seed=seed,
        progress=progress,
        log=log or (lambda _msg: None),
        check_saturation=check_saturation,
        semantic=semantic,
    )


RunLike = Run | str | Path


def results(
    runs: Iterable[RunLike] | RunLike = DEFAULT_RESULTS, *, long: bool = False, privacy_metric: str = "ssim"
) -> pd.DataFrame:
    """The privacy-utility table of `runs` (run folders, results folders holding runs, or a
    `run()` output folder, which stands for that grid's cells): one row per defense
    configuration, raw numbers (`<attack>_<metric>_mean` / `_ci95`, `accuracy_mean`,
    `worst_attack` by `privacy_metric`, ...). With long=True, the long-form rows it is pivoted
    from (run, defense, channel, seed, attack, metric, value, ...)."""
    tables.check_privacy_metric(privacy_metric)  # before any folder is read
    if isinstance(runs, RunLike):
        runs = [runs]
    paths, attack_dirs = resolve_inputs([_path(r) for r in runs])
    frame = rows.collect(paths, attack_dirs=attack_dirs)
    return frame if long else tables.aggregate(frame, rows.train_settings(frame), privacy_metric=privacy_metric)


def frontier(
    runs: Iterable[RunLike] | RunLike = DEFAULT_RESULTS, *, reference: str = "none", privacy_metric: str = "ssim"
) -> frontier_analysis.Comparison:
    """Every configuration of `runs` against the `reference` family at matched accuracy: the points
    with their gains, one verdict per family (`.families`), and `frontier_analysis.verdict_lines`
    turns it into the sentences `privbench run` prints (docs/frontier.md)."""
    long = results(runs, long=True, privacy_metric=privacy_metric)
    return frontier_analysis.compare(job.frontier_points(long, privacy_metric), reference=reference)


def table(df: pd.DataFrame, fmt: str = "md") -> str:
    """Render a `results()` table as Markdown, CSV (raw numbers) or LaTeX."""

    return table_format.render(df, fmt)


def run(
    grid: Grid | None = None,
    *,
    executor: str | dict[str, Any] | None = None,
    log: Callable[[str], None] | None = print,
    **fields: Any,
) -> GridResult:
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


def precision(
    results_dir: str | Path,
    *,
    seeds: int = 5,
    defense: Iterable[str] | None = None,
    noise: Iterable[float] | None = None,
    attack: Iterable[str] | None = None,
    train: Mapping[str, Any] | Iterable[str] | None = None,
    summarize: bool = False,
    resolve: Mapping[str, float] | Iterable[str] | None = None,
    paired_with: str | None = None,
    log: Callable[[str], None] | None = print,
) -> dict[str, list[dict[str, Any]]]:
    """`privbench precision`: how much accuracy and attack metrics move between training seeds.

    Unless `summarize`, trains seeds 0..seeds-1 of the grid's defenses (`defense`, `noise`,
    `attack` narrow it; `train` sets training fields over the preset, as {"epochs": 10} or
    "epochs=10" strings), reusing finished cells; then reads every configuration under
    `results_dir`. Returns {"rows": one per (configuration, quantity): n, mean, sd and its 95%
    interval, MDD at 3 and 5 seeds, target met, seeds to resolve `resolve` (QUANTITY: SIZE, or
    "accuracy=2" strings; default accuracy 2 points, SSIM 0.02)}, and "pairs": the same for the
    seed-by-seed differences against the configuration labelled `paired_with`
    (docs/precision.md)."""
    sizes = precision_stats.parse_resolve(
        [f"{k}={v}" for k, v in resolve.items()] if isinstance(resolve, Mapping) else list(resolve or ())
    )
    folder = Path(results_dir)
    if not summarize:
        if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 2:
            raise UserError(f"invalid --seeds {seeds}: a spread needs at least 2 seeds")
        try:
            fields = options_mod.parse_all(train)
        except UserError as exc:
            raise UserError(f"invalid training setting: {exc}") from None
        named = [str(o) for o in fields if o.target is not None]
        if named:
            raise UserError(f"invalid training setting {named[0]!r}: a TrainConfig field, without a NAME. part")
        grid = {"defense": list(defense)} if defense else {}
        grid |= {"noise": list(noise)} if noise else {}
        # The default grid's first attack, the decoder: learned, so its own training spread is measured too.
        run(
            seeds=seeds,
            attack=list(attack or ()) or list(DEFAULT_ATTACKS[:1]),
            results_dir=str(folder),
            train={o.key: o.value for o in fields},
            log=log,
            **grid,
        )
    if not folder.is_dir():
        raise UserError(f"results folder {folder} does not exist")
    cells = collect_seeds(folder)
    found = precision_stats.summarize(cells, sizes)
    if not found:
        raise UserError(f"no finished run folders under {folder}")
    if all(r["n"] < 2 for r in found):
        raise UserError(f"every configuration under {folder} has one seed: no spread to report")
    pairs = precision_stats.paired(cells, paired_with, sizes) if paired_with else []
    return {"rows": found, "pairs": pairs}


def variance_split(results_dir: str | Path, configuration: str) -> dict[str, Any]:
    """Where the accuracy spread over seeds of `configuration` (a label as `privbench precision`
    prints it, e.g. "none@C8+0.025") under `results_dir` comes from: every seed's model is read on
    the test split per tile, and the variance over seeds is split into a model part and a test-set
    part (privbench.analysis.variance_split.split describes the keys; accuracies in points, per-seed
    rates as fractions). Needs a data set with test tiles and at least 2 seeds."""
    runs = configuration_runs(Path(results_dir), configuration)
    return seed_tile_split.split(configuration, evaluate_tiles(runs, configuration))


def plugins(preset: str = "quick") -> dict[str, list[dict[str, Any]]]:
    """`privbench list`: every installed attack and defense (built in, from entry points, or loaded
    with `registry.load_file`), each as {"name", "summary", "defaults", "sweep"}. `defaults` are its
    options as a run under `preset` uses them (an attack gets the preset's epochs / steps and
    options); `sweep` is a defense's strength knob and default sweep (`lam=4,16,64`), the knob
    alone where it has no default grid, or None."""
    if preset not in PRESETS:
        raise UserError(f"unknown preset {preset!r} (known: {', '.join(PRESETS)})")
    p = PRESETS[preset]
    out: dict[str, list[dict[str, Any]]] = {}
    for kind in ("attack", "defense"):
        out[kind] = []
        for name in registry.names(kind):
            cls = registry.get(kind, name)
            defaults = registry.option_defaults(cls)
            sweep = None
            if kind == "attack":
                budget = {"epochs": p["attack_epochs"], "steps": p["attack_steps"], **p["attack_options"].get(name, {})}
                defaults |= {k: v for k, v in budget.items() if k in defaults}
            else:
                try:
                    found = strength.parse(name)
                    sweep = f"{found.key}={','.join(format(v, 'g') for v in found.values)}"
                except UserError:  # a knob without a default grid
                    sweep = strength.knob(name)
            out[kind].append({"name": name, "summary": cls.summary, "defaults": defaults, "sweep": sweep})
    return out


def report(files: Iterable[str | Path], *, check: bool = False) -> list[Path]:
    """`privbench report`: regenerate the generated blocks (`<!-- privbench: KIND FOLDER -->` ...
    `<!-- privbench: end -->`) of Markdown files from the committed rows they name; returns the
    files whose blocks were stale (rewritten unless `check`)."""
    paths = [Path(f) for f in files]
    texts = {}
    for path in paths:  # every file is checked before any is written
        if not path.is_file():
            raise UserError(f"{path}: no such file")
        text = path.read_text()
        if not blocks.blocks(text):
            raise UserError(f"{path} has no block: <!-- privbench: KIND FOLDER --> ... <!-- privbench: end -->")
        texts[path] = (text, blocks.regenerate(text, path.parent))
    stale = [path for path, (old, new) in texts.items() if new != old]
    if not check:
        for path in stale:
            atomic_write_text(path, texts[path][1])
    return stale


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
        raise UserError(
            f"unknown model {model!r}: expected {', '.join(MODELS)}, torchvision:NAME, timm:NAME or pkg.module:callable"
        )
    if width is not None:
        raise UserError("width applies to the built-in models; give a model's own options with -o model.KEY=VALUE")
    net = zoo.build_model(model, num_classes=num_classes, options=options)
    return list_cuts(net, image_size)


def _path(run: Run | str | Path) -> Path:
    return run.path if isinstance(run, Run) else Path(run)
