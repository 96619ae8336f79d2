"""The `privbench run` grid: defenses x channels x seeds, each attacked by every attack.

A grid expands into cells. A training cell is one `TrainConfig` (its run folder is named by the
config's hash); an attack cell is one attack on one run (its folder under the run is named by
the attack's hash). Finished cells are reused, so rerunning the same or an extended grid
computes only what is missing, and an interrupted run continues where it stopped. Folders are
built atomically under a lock, so two runs into the same results folder never corrupt each
other; the output folder's files are written atomically too.

How defenses and channels combine. The *channel* is what the client sends: an optional
bottleneck `C<c>` and Gaussian noise of std sigma. A defense spec is `NAME` or `NAME@CHANNEL`:
  - `NAME` runs on every base channel: each `--bottleneck` x each `--noise` (default C8 and
    0.025, the paper's base defense);
  - `NAME@CHANNEL` pins the channel: `plain` (no bottleneck, no noise), `C8`, `0.05` (noise
    only) or `C8+0.05`.
The default grid `none@plain none gmm-cem slot-cem` is the undefended model, the base channel
alone, and the two CEM regularizers on the base channel.

A `--config` TOML file holds the same keys as the options (lists for repeatable ones) and
tables that override the preset; options given on the command line win:

    defense = ["none@plain", "none", "gmm-cem"]
    attack = ["decoder"]
    seeds = 3
    noise = [0.0, 0.025, 0.05]     # a sweep of the base channel
    [train]                        # TrainConfig fields: epochs, n_train, width, lr, model, ...
    epochs = 1
    [attacks]                      # epochs, steps, eval_images, attacker_data
    eval_images = 64
    [attacks.decoder]              # one attack's options
    channels = 32
    [defenses.gmm-cem]             # one defense's options
    lam = 16
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from privbench.config import PRESETS, TrainConfig, config_hash
from privbench.errors import UserError

DEFAULT_DEFENSES = ("none@plain", "none", "gmm-cem", "slot-cem")
DEFAULT_ATTACKS = ("decoder", "optimization")
BASE_BOTTLENECK = 8  # C8, the reference
BASE_NOISE = 0.025
ATTACK_SETTINGS = ("epochs", "steps", "eval_images", "attacker_data")
# TrainConfig fields the grid itself sets; a [train] table may not override them.
GRID_FIELDS = ("dataset", "data_dir", "cut", "bottleneck", "noise", "defense", "defense_options", "seed", "preset",
               "device", "progress")  # fmt: skip
TOP_KEYS = ("preset", "dataset", "data_dir", "defense", "attack", "seeds", "cut", "bottleneck", "noise", "device",
            "results_dir", "out", "train", "attacks", "defenses")  # fmt: skip


@dataclass(frozen=True)
class Channel:
    """What the client sends: an optional C<c> bottleneck and the std of Gaussian noise."""

    bottleneck: int | None = None
    noise: float = 0.0

    @classmethod
    def parse(cls, spec: str) -> Channel:
        """'plain' | 'C8' | '0.05' | 'C8+0.05' (bottleneck and/or noise std, joined by '+')."""
        from privbench.models import parse_bottleneck

        spec = spec.strip()
        if spec in ("plain", ""):
            return cls()
        bottleneck, noise = None, 0.0
        for token in spec.split("+"):
            token = token.strip()
            if token[:1] in ("C", "c"):
                bottleneck = parse_bottleneck(token)
                continue
            try:
                noise = float(token.removeprefix("noise"))
            except ValueError:
                raise UserError(
                    f"invalid channel {spec!r}: expected plain, C<c>, <noise std> or C<c>+<noise std>"
                ) from None
            if noise < 0:
                raise UserError(f"invalid noise {noise}: the noise std must be >= 0")
        return cls(bottleneck, noise)

    def label(self) -> str:
        from privbench.tables import channel_label

        return channel_label(self.bottleneck, self.noise)


@dataclass
class Grid:
    """Everything `privbench run` computes. Field names match the command's options."""

    preset: str = "quick"
    dataset: str = "embedded"
    data_dir: str | None = None
    defense: list[str] = field(default_factory=lambda: list(DEFAULT_DEFENSES))
    attack: list[str] = field(default_factory=lambda: list(DEFAULT_ATTACKS))
    seeds: int = 1
    cut: int | None = None
    bottleneck: list[int | None] = field(default_factory=lambda: [BASE_BOTTLENECK])
    noise: list[float] = field(default_factory=lambda: [BASE_NOISE])
    device: str = "auto"
    results_dir: str = "results"
    out: str | None = None
    train: dict[str, Any] = field(default_factory=dict)  # TrainConfig fields over the preset
    attacks: dict[str, Any] = field(default_factory=dict)  # epochs/steps/eval_images/attacker_data + per-attack options
    defenses: dict[str, dict[str, Any]] = field(default_factory=dict)  # per-defense options
    progress: bool = True

    def __post_init__(self) -> None:
        from privbench.models import parse_bottleneck

        if self.preset not in PRESETS:
            raise UserError(f"unknown preset {self.preset!r} (known: {', '.join(PRESETS)})")
        if not isinstance(self.seeds, int) or self.seeds < 1:
            raise UserError(f"invalid seeds {self.seeds!r}: the number of seeds must be >= 1")
        self.defense, self.attack = _names(self.defense, "defense"), _names(self.attack, "attack")
        self.bottleneck = list(dict.fromkeys(parse_bottleneck(b) for b in _as_list(self.bottleneck)))
        self.noise = list(dict.fromkeys(_noise(n) for n in _as_list(self.noise)))
        if not self.bottleneck or not self.noise:
            raise UserError("the grid needs at least one bottleneck (or none) and one noise value")
        names = {f.name for f in fields(TrainConfig)}
        for key in self.train:
            if key in GRID_FIELDS:
                raise UserError(f"[train] key {key!r} is set by the grid: give it at the top level or as an option")
            if key not in names:
                raise UserError(f"unknown [train] key {key!r} (TrainConfig fields: {', '.join(sorted(names))})")
        for key, value in self.attacks.items():
            if key not in ATTACK_SETTINGS and not isinstance(value, dict):
                raise UserError(f"unknown [attacks] key {key!r} (settings: {', '.join(ATTACK_SETTINGS)}, "
                                "or a [attacks.<name>] table of one attack's options)")  # fmt: skip
        for key, value in self.defenses.items():
            if not isinstance(value, dict):
                raise UserError(f"[defenses] entry {key!r} must be a table of that defense's options")

    # ------------------------------------------------------------------ expansion

    def channels(self) -> list[Channel]:
        return [Channel(b, n) for b in self.bottleneck for n in self.noise]

    def train_configs(self) -> list[TrainConfig]:
        """One TrainConfig per training cell, deduplicated by hash, in grid order."""
        out: dict[str, TrainConfig] = {}
        for spec in self.defense:
            name, _, pinned = spec.partition("@")
            channels = [Channel.parse(pinned)] if pinned else self.channels()
            for ch in channels:
                for seed in range(self.seeds):
                    cfg = TrainConfig.from_preset(
                        self.preset, **self.train, dataset=self.dataset, data_dir=self.data_dir, cut=self.cut,
                        defense=name, defense_options=dict(self.defenses.get(name, {})), bottleneck=ch.bottleneck,
                        noise=ch.noise, seed=seed, device=self.device, progress=self.progress,
                    )  # fmt: skip
                    out.setdefault(cfg.hash(), cfg)
        return list(out.values())

    def attack_settings(self) -> dict[str, Any]:
        return {k: v for k, v in self.attacks.items() if k in ATTACK_SETTINGS}

    def attack_options(self) -> dict[str, dict[str, Any]]:
        return {k: dict(v) for k, v in self.attacks.items() if isinstance(v, dict) and k in self.attack}

    def hash(self) -> str:
        """Identity of the grid's cells: names its output folder."""
        return config_hash({
            "runs": [c.hash() for c in self.train_configs()], "attacks": self.attack,
            "settings": self.attack_settings(), "options": self.attack_options(),
        })  # fmt: skip

    def out_dir(self) -> Path:
        return Path(self.out) if self.out else Path(self.results_dir) / "tables" / self.hash()

    def validate(self) -> None:
        """Check every name and option before any work starts (bad input must not cost minutes)."""
        from privbench import registry
        from privbench.attack import ATTACKER_DATA, resolve_attack
        from privbench.data import load_dataset
        from privbench.train import make_model

        for name in self.defense:
            registry.get("defense", name.partition("@")[0])
        for name in self.attacks:
            if isinstance(self.attacks[name], dict) and name not in self.attack:
                raise UserError(f"[attacks.{name}] options given for an attack that is not run")
        for name in self.defenses:
            if name not in {d.partition("@")[0] for d in self.defense}:
                raise UserError(f"[defenses.{name}] options given for a defense that is not run")
        if self.attacks.get("attacker_data", "train") not in ATTACKER_DATA:
            raise UserError(f"invalid attacker_data {self.attacks['attacker_data']!r}: choose train or aux")
        budget = {"epochs": self.attacks.get("epochs", 1), "steps": self.attacks.get("steps", 1)}
        for name in self.attack:
            resolve_attack(name, self.attack_options().get(name, {}), budget, progress=False)
        configs = self.train_configs()
        first = configs[0]
        data = load_dataset(first.dataset, data_dir=first.data_dir, seed=first.data_seed, n_train=first.n_train)
        for cfg in configs:
            registry.create("defense", cfg.defense, cfg.defense_options)
            make_model(cfg, data)


def _as_list(value: Any) -> list[Any]:
    return list(value) if isinstance(value, list | tuple) else [value]


def _names(value: Any, kind: str) -> list[str]:
    names = list(dict.fromkeys(str(v).strip() for v in _as_list(value)))
    if not names or any(not n for n in names):
        raise UserError(f"the grid needs at least one {kind} name")
    return names


def _noise(value: Any) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise UserError(f"invalid noise {value!r}: expected a number") from None
    if v < 0:
        raise UserError(f"invalid noise {v}: the noise std must be >= 0")
    return v


def load_config(path: str | Path) -> dict[str, Any]:
    """Read a TOML grid file. Top-level keys mirror the command's options; lists for repeatable
    ones. Tables: [train] (TrainConfig fields over the preset), [attacks] (epochs, steps,
    eval_images, attacker_data; [attacks.<name>] one attack's options), [defenses.<name>]."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]

    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file not found: {path}")
    try:
        data = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"config file {path}: invalid TOML ({exc})") from None
    for key in data:
        if key not in TOP_KEYS:
            raise UserError(f"config file {path}: unknown key {key!r} (known: {', '.join(TOP_KEYS)})")
    for key in ("train", "attacks", "defenses"):
        if key in data and not isinstance(data[key], dict):
            raise UserError(f"config file {path}: {key!r} must be a table ([{key}])")
    return data


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


def run_grid(
    grid: Grid,
    *,
    train_fn: Callable[..., Any] | None = None,
    attack_fn: Callable[..., list[dict[str, Any]]] | None = None,
    validate: bool = True,
    log: Callable[[str], None] = print,
) -> GridResult:
    """Compute the grid's missing cells, then write table.md, table.csv, results.csv (long
    form), privacy_utility.png and reconstructions.png into the output folder.

    `train_fn(cfg, results_dir, log=...) -> (Run, trained)` and `attack_fn(run_dir, attacks,
    **settings) -> [result with "path" and "reused"]` default to the real ones (tests inject
    cheap stand-ins).
    """
    from privbench import plots, tables
    from privbench.storage import atomic_write_text

    if train_fn is None:
        from privbench.runs import train_run as train_fn
    if attack_fn is None:
        from privbench.attack import attack_run as attack_fn
    t_start = time.perf_counter()
    if validate:
        grid.validate()
    configs = grid.train_configs()
    settings = grid.attack_settings()
    options = grid.attack_options()
    out_dir = grid.out_dir()
    n_cells = len(configs) * (1 + len(grid.attack))
    log(f"grid: {len(configs)} training runs x {len(grid.attack)} attacks = {n_cells} cells -> {out_dir}")
    result = GridResult(table=None, long=None, out_dir=out_dir, files=[], runs=[], attack_dirs=[])
    for i, cfg in enumerate(configs, 1):
        label = f"{cfg.defense} ({Channel(cfg.bottleneck, cfg.noise).label()}) seed {cfg.seed}"
        t0 = time.perf_counter()
        run, trained = train_fn(cfg, grid.results_dir, log=log)
        seconds = time.perf_counter() - t0
        result.runs.append(Path(run.path))
        _count(result, trained)
        result.timings.append({"cell": f"train {label}", "computed": trained, "seconds": seconds})
        log(f"[train {i}/{len(configs)}] {label}: {'trained' if trained else 'reused'} ({seconds:.0f} s) {run.path}")
        t0 = time.perf_counter()
        outcomes = attack_fn(
            run.path, list(grid.attack), **settings, options=options, device=grid.device, seed=0,
            progress=grid.progress, log=log,
        )  # fmt: skip
        seconds = time.perf_counter() - t0
        for r in outcomes:
            result.attack_dirs.append(Path(r["path"]))
            _count(result, not r.get("reused", False))
            fit = r.get("timings", {})
            spent = sum(fit.values()) if not r.get("reused") else 0.0
            result.timings.append({"cell": f"attack {r['attack']} on {label}", "computed": not r.get("reused"),
                                   "seconds": spent})  # fmt: skip
            log(f"[attack] {r['attack']} on {label}: {'reused' if r.get('reused') else 'computed'}")
        log(f"[attacks {i}/{len(configs)}] {label}: {seconds:.0f} s")

    long = tables.collect(result.runs, attack_dirs=result.attack_dirs)
    table = tables.aggregate(long, result.runs)
    result.long, result.table = long, table
    out_dir.mkdir(parents=True, exist_ok=True)
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
    result.seconds = time.perf_counter() - t_start
    return result


def _count(result: GridResult, computed: bool) -> None:
    if computed:
        result.computed += 1
    else:
        result.reused += 1


def grid_from_options(config_file: str | None = None, **cli: Any) -> Grid:
    """Preset < TOML file < command-line options (None / empty tuple = not given)."""
    values: dict[str, Any] = load_config(config_file) if config_file else {}
    for key, value in cli.items():
        if value is None or (isinstance(value, tuple | list) and not value):
            continue
        values[key] = list(value) if isinstance(value, tuple) else value
    try:
        return Grid(**values)
    except TypeError as exc:
        raise UserError(f"invalid grid option: {exc}") from None
