"""What `privbench run` computes: a grid of defenses x channels x seeds, each attacked by every attack.

A grid expands into cells. A training cell is one `TrainConfig` (its run folder is named by the
config's hash); an attack cell is one attack on one run (its folder under the run is named by
the attack's hash). `privbench.job.run_grid` computes the cells.

How defenses and channels combine. The *channel* is what the client sends: an optional
bottleneck `C<c>` and Gaussian noise of std sigma. A defense spec is `NAME` or `NAME@CHANNEL`:
  - `NAME` runs on every base channel: each `--bottleneck` x each `--noise` (default C8 and
    0.025, the paper's base defense);
  - `NAME@CHANNEL` pins the channel: `plain` (no bottleneck, no noise), `C8`, `0.05` (noise
    only) or `C8+0.05`.
The default grid `none@plain none gmm-cem slot-cem` is the undefended model, the base channel
alone, and the two CEM regularizers on the base channel.

A `--config` TOML file holds the same keys as the options plus [train], [attacks],
[attacks.<name>] and [defenses.<name>] tables; docs/config.md is the schema. Precedence:
preset < TOML tables < top-level keys (TOML, then the command line, which wins).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from privbench.attack.harness import ATTACKER_DATA, resolve_attack

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]


from privbench.engine.config import DEFAULT_GRID, PRESETS, TrainConfig, config_hash
from privbench.engine.models import parse_bottleneck
from privbench.errors import UserError
from privbench.grid.executor import parse_executor
from privbench.plugin import options, registry, stack, strength
from privbench.store.rows import METRICS, channel_label

# The default grid (privbench/engine/defaults.toml): defenses, attacks, sweep and reference.
DEFAULT_DEFENSES = tuple(DEFAULT_GRID["defense"])
DEFAULT_ATTACKS = tuple(DEFAULT_GRID["attack"])
BASE_BOTTLENECK = 8  # C8, the reference
BASE_NOISE = 0.025
ATTACK_SETTINGS = ("epochs", "steps", "eval_images", "attacker_data", "check_saturation", "semantic")
# TrainConfig fields the grid itself sets; a [train] table may not override them.
GRID_FIELDS = (
    "dataset",
    "data_dir",
    "cut",
    "bottleneck",
    "noise",
    "defense",
    "defense_options",
    "seed",
    "preset",
    "device",
    "progress",
    "data_fingerprint",
    "weights_digest",
)
# Top-level shortcuts for one table entry each: (table, key in that table).
SHORTCUTS = {
    "epochs": ("train", "epochs"),
    "model": ("train", "model"),
    "image_size": ("train", "image_size"),
    "pretrained": ("train", "pretrained"),
    "weights": ("train", "weights"),
    "eval_images": ("attacks", "eval_images"),
    "attacker_data": ("attacks", "attacker_data"),
}
TOP_KEYS = (
    "preset",
    "dataset",
    "data_dir",
    "defense",
    "attack",
    "seeds",
    "cut",
    "bottleneck",
    "noise",
    "device",
    "results_dir",
    "out",
    *SHORTCUTS,
    "option",
    "train",
    "attacks",
    "defenses",
    "executor",
    "sweep",
    "reference",
    "privacy_metric",
    "bracket",
    "seeds_cap",
)
DEFAULT_SWEEP = tuple(DEFAULT_GRID["sweep"])
DEFAULT_REFERENCE = DEFAULT_GRID["reference"]
AUTO = "auto"  # --reference auto: the default reference family; --seeds auto: sequential seeds
SEEDS_AUTO_START = 2  # the first look: a verdict over seeds needs at least two
SEEDS_CAP = 5
BRACKET_CAP = 3


@dataclass(frozen=True)
class Channel:
    """What the client sends: an optional C<c> bottleneck and the std of Gaussian noise."""

    bottleneck: int | None = None
    noise: float = 0.0

    @classmethod
    def parse(cls, spec: str) -> Channel:
        """'plain' | 'C8' | '0.05' | 'C8+0.05' (bottleneck and/or noise std, joined by '+')."""
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
        return channel_label(self.bottleneck, self.noise)


@dataclass
class Grid:
    """Everything `privbench run` computes. Field names match the command's options."""

    preset: str = "quick"
    dataset: str = "embedded"
    data_dir: str | None = None
    defense: list[str] = field(default_factory=lambda: list(DEFAULT_DEFENSES))
    attack: list[str] = field(default_factory=lambda: list(DEFAULT_ATTACKS))
    seeds: int | str = 1  # or "auto": sequential seeds from SEEDS_AUTO_START up to seeds_cap
    seeds_cap: int = SEEDS_CAP
    cut: int | str | None = None  # built-in models: an entry count; others: a module name or a cut index
    bottleneck: list[int | None] = field(default_factory=lambda: [BASE_BOTTLENECK])
    noise: list[float] = field(default_factory=lambda: [BASE_NOISE])
    device: str = "auto"
    results_dir: str = "results"
    out: str | None = None
    # Shortcuts (see SHORTCUTS): folded into train / attacks, where they win over the table's entry.
    epochs: int | None = None
    model: str | None = None
    image_size: int | None = None
    pretrained: bool | None = None
    weights: str | None = None
    eval_images: int | None = None
    attacker_data: str | None = None
    option: list[str] = field(default_factory=list)  # "[NAME.]key=value", as `-o`
    train: dict[str, Any] = field(default_factory=dict)  # TrainConfig fields over the preset
    attacks: dict[str, Any] = field(default_factory=dict)  # epochs/steps/eval_images/attacker_data + per-attack options
    defenses: dict[str, dict[str, Any]] = field(default_factory=dict)  # per-defense options
    progress: bool = True
    # Who computes the cells: "local" | "ray" | "slurm", or the [executor] table (privbench.executors.base).
    executor: str | dict[str, Any] | None = None
    # Strength sweeps (privbench.plugin.strength): specs or a [sweep] table; None: the default grid's
    # noise sweep of `none` when the defenses are the default ones, else no sweep.
    sweep: Any = None
    reference: str | None = None  # the family verdicts compare against (None or "auto": none, if swept)
    privacy_metric: str = "ssim"
    # Reference strengths `run` may add (each at every seed) so that every defense's accuracy lies
    # within the reference's range (privbench.analysis.bracket); 0: the reference stays as swept.
    bracket: int = BRACKET_CAP
    # The data folder's fingerprint and the weights file's digest, read once per grid: every
    # expansion (output folder, validation, cells, each bracketing round) reuses them.
    _identity: dict[str, str] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.executor = parse_executor(self.executor)

        if self.preset not in PRESETS:
            raise UserError(f"unknown preset {self.preset!r} (known: {', '.join(PRESETS)})")
        if isinstance(self.bracket, bool) or not isinstance(self.bracket, int) or self.bracket < 0:
            raise UserError(
                f"invalid bracket {self.bracket!r}: the number of reference strengths to add must be an integer >= 0"
            )
        self.sequential = self.seeds == AUTO
        if isinstance(self.seeds_cap, bool) or not isinstance(self.seeds_cap, int) or self.seeds_cap < SEEDS_AUTO_START:
            raise UserError(f"invalid seeds cap {self.seeds_cap!r}: an integer >= {SEEDS_AUTO_START}")
        if self.sequential:
            self.seeds = SEEDS_AUTO_START
        if isinstance(self.seeds, str) and self.seeds.isdigit():
            self.seeds = int(self.seeds)
        if isinstance(self.seeds, bool) or not isinstance(self.seeds, int) or self.seeds < 1:
            raise UserError(f"invalid seeds {self.seeds!r}: the number of seeds (>= 1) or auto")
        self.defense, self.attack = _names(self.defense, "defense"), _names(self.attack, "attack")
        self.bottleneck = list(dict.fromkeys(parse_bottleneck(b) for b in _as_list(self.bottleneck)))
        self.noise = list(dict.fromkeys(_noise(n) for n in _as_list(self.noise)))
        if not self.bottleneck or not self.noise:
            raise UserError("the grid needs at least one bottleneck (or none) and one noise value")
        for key, table in (("train", self.train), ("attacks", self.attacks), ("defenses", self.defenses)):
            if not isinstance(table, dict):
                raise UserError(f"{key!r} must be a table ([{key}])")
        names = {f.name for f in fields(TrainConfig)}
        for key in self.train:
            if key in GRID_FIELDS:
                raise UserError(f"[train] key {key!r} is set by the grid: give it at the top level or as an option")
            if key not in names:
                raise UserError(f"unknown [train] key {key!r} (TrainConfig fields: {', '.join(sorted(names))})")
        for key, value in self.attacks.items():
            if key not in ATTACK_SETTINGS and not isinstance(value, dict):
                raise UserError(
                    f"unknown [attacks] key {key!r} (settings: {', '.join(ATTACK_SETTINGS)}, "
                    "or a [attacks.<name>] table of one attack's options)"
                )
        for key, value in self.defenses.items():
            if not isinstance(value, dict):
                raise UserError(f"[defenses] entry {key!r} must be a table of that defense's options")
        self._fold_shortcuts()
        if self.sweep is None and self.defense == list(DEFAULT_DEFENSES):
            self.sweep = list(DEFAULT_SWEEP)
        self.sweep = strength.parse_all(self.sweep)
        strength.check_reaches(self.sweep, self.defense)

    def _fold_shortcuts(self) -> None:
        """Top-level shortcuts and `-o` pairs into the tables they stand for (copies, never the caller's dicts)."""
        self.train = dict(self.train)
        self.attacks = {k: dict(v) if isinstance(v, dict) else v for k, v in self.attacks.items()}
        self.defenses = {k: dict(v) for k, v in self.defenses.items()}
        for key, least in (("epochs", 0), ("eval_images", 1), ("image_size", 1)):
            value = getattr(self, key)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < least):
                raise UserError(f"invalid {key} {value!r}: expected an integer >= {least}")
        for key, kind, example in (
            ("model", str, "a name such as vgg11"),
            ("weights", str, "a file name"),
            ("pretrained", bool, "true or false"),
        ):
            value = getattr(self, key)
            if value is not None and not isinstance(value, kind):
                raise UserError(f"invalid {key} {value!r}: expected {example}")
        if self.cut is not None and (isinstance(self.cut, bool) or not isinstance(self.cut, int | str)):
            raise UserError(f"invalid cut {self.cut!r}: expected a number or a module name")
        for key, (table, entry) in SHORTCUTS.items():
            if getattr(self, key) is not None:
                getattr(self, table)[entry] = getattr(self, key)
        self.option = [str(o) for o in _as_list(self.option)] if self.option else []
        model_options, rest = options.split_model(options.parse_all(self.option))  # the one parse
        if model_options:  # `-o model.KEY=VALUE`: over the [train] table's model_options
            table = self.train.get("model_options") or {}
            if not isinstance(table, dict):
                raise UserError("[train] model_options must be a table of the model factory's keyword arguments")
            self.train["model_options"] = {**table, **model_options}
        for table, routed in zip((self.defenses, self.attacks), self._routed_options(rest)):
            for name, opts in routed.items():
                table.setdefault(name, {}).update(opts)

    def _routed_options(
        self, parsed: list[options.Option]
    ) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
        """`-o NAME.key=value` to that defense part or attack; a bare `key=value` to every defense
        of the grid that takes `key` (privbench.plugin.options)."""
        for spec in self.defense:
            stack.parts(spec.partition("@")[0])  # unknown defense names fail here, with the installed ones
        return options.route(parsed, defenses=self.defense, attacks=self.attack)

    def defense_parts(self) -> list[str]:
        """Every defense named in the grid, stacks split into their parts, in order."""
        return list(dict.fromkeys(p for spec in self.defense for p in stack.parts(spec.partition("@")[0])))

    # ------------------------------------------------------------------ expansion

    def channels(self) -> list[Channel]:
        return [Channel(b, n) for b in self.bottleneck for n in self.noise]

    def train_configs(self) -> list[TrainConfig]:
        """One TrainConfig per training cell, deduplicated by hash, in grid order."""
        out: dict[str, TrainConfig] = {}
        for spec in self.defense:
            name, _, pinned = spec.partition("@")
            names = stack.parts(name)
            for swept, noise in strength.variants(spec, self.sweep):
                # [defenses.<part>] tables apply to that part wherever it is stacked; a sweep's value wins
                per_part = {p: {**self.defenses.get(p, {}), **swept.get(p, {})} for p in names}
                options = per_part[name] if len(names) == 1 else {p: o for p, o in per_part.items() if o}
                channels = [Channel.parse(pinned)] if pinned else self.channels()
                if noise is not None:  # a noise sweep replaces the grid's noise values for this defense
                    channels = list(dict.fromkeys(Channel(b, noise) for b in self.bottleneck))
                for ch in channels:
                    for seed in range(self.seeds):
                        cfg = TrainConfig.from_preset(
                            self.preset,
                            **self.train,
                            dataset=self.dataset,
                            data_dir=self.data_dir,
                            cut=self.cut,
                            defense=name,
                            defense_options=options,
                            bottleneck=ch.bottleneck,
                            noise=ch.noise,
                            seed=seed,
                            device=self.device,
                            progress=self.progress,
                            **self._identity,
                        )
                        if not self._identity:
                            facts = {"data_fingerprint": cfg.data_fingerprint, "weights_digest": cfg.weights_digest}
                            self._identity.update({k: v for k, v in facts.items() if v})
                        out.setdefault(cfg.hash(), cfg)
        return list(out.values())

    def reference_points(self, family: str) -> int:
        """Distinct configurations of `family` on one bottleneck (the most of any): its frontier's points."""
        per_bottleneck: dict[Any, int] = {}
        for cfg in self.train_configs():
            if cfg.defense == family and cfg.seed == 0:
                per_bottleneck[cfg.bottleneck] = per_bottleneck.get(cfg.bottleneck, 0) + 1
        return max(per_bottleneck.values(), default=0)

    def verdict_reference(self) -> str | None:
        """The reference of the run's verdicts: the one given, else `none` when it has a frontier."""
        if self.reference not in (None, AUTO):
            return self.reference
        return DEFAULT_REFERENCE if self.reference_points(DEFAULT_REFERENCE) >= 2 else None

    def bracket_reference(self) -> str | None:
        """The reference family that bracketing extends: the verdicts' reference where it is one
        defense swept by a strength sweep and `bracket` > 0, else None."""
        ref = self.verdict_reference()
        if not self.bracket or ref is None or not any(s.part == ref for s in self.sweep):
            return None
        return ref

    def attack_settings(self) -> dict[str, Any]:
        return {k: v for k, v in self.attacks.items() if k in ATTACK_SETTINGS}

    def attack_options(self) -> dict[str, dict[str, Any]]:
        return {k: dict(v) for k, v in self.attacks.items() if isinstance(v, dict) and k in self.attack}

    def hash(self) -> str:
        """Identity of the grid's cells: names its output folder."""
        return config_hash(
            {
                "runs": [c.hash() for c in self.train_configs()],
                "attacks": self.attack,
                "settings": self.attack_settings(),
                "options": self.attack_options(),
            }
        )

    def out_dir(self) -> Path:
        return Path(self.out) if self.out else Path(self.results_dir) / "tables" / self.hash()

    def validate(self) -> None:
        """Check every name and option before any work starts (bad input must not cost minutes);
        whether each model and defense can be built is the engine's check
        (privbench.engine.train.check_configs)."""
        parts = self.defense_parts()  # unknown or repeated parts fail here
        if self.privacy_metric not in METRICS:
            raise UserError(f"unknown privacy metric {self.privacy_metric!r} (known: {', '.join(METRICS)})")
        if self.reference == AUTO and self.verdict_reference() is None:
            raise UserError(
                "--reference auto: the grid has no noise sweep of none to bracket; sweep a "
                "reference (--sweep none.noise=0.025,0.05,0.1) or name one with --reference"
            )
        if self.reference not in (None, AUTO):
            n, ref = self.reference_points(self.reference), self.reference
            if n < 2:
                raise UserError(
                    f"reference {ref!r}: the grid has {n} point(s) of it; a frontier needs two or more "
                    f"(sweep it: --sweep {ref})"
                )
        ref = self.bracket_reference()
        if ref is not None:
            sweep = next(s for s in self.sweep if s.part == ref)
            knob = registry.get("defense", ref).knob
            if sweep.key not in (strength.CHANNEL, knob):
                raise UserError(
                    f"reference {ref}: bracketing moves its strength knob ({knob or 'it has none'}) or its "
                    f"noise, but the grid sweeps {ref}.{sweep.key}; sweep {ref}.{knob or 'noise'} or "
                    "pass --bracket 0"
                )
        for name in self.attacks:
            if isinstance(self.attacks[name], dict) and name not in self.attack:
                raise UserError(f"[attacks.{name}] options given for an attack that is not run")
        for name in self.defenses:
            if name not in parts:
                hint = " (options are per part: one [defenses.<part>] table each)" if "+" in name else ""
                raise UserError(f"[defenses.{name}] options given for a defense that is not run{hint}")
        if self.attacks.get("attacker_data", "train") not in ATTACKER_DATA:
            raise UserError(f"invalid attacker_data {self.attacks['attacker_data']!r}: choose train or aux")
        budget = {"epochs": self.attacks.get("epochs", 1), "steps": self.attacks.get("steps", 1)}
        for name in self.attack:
            resolve_attack(name, self.attack_options().get(name, {}), budget, progress=False)


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
    """Read a TOML grid file (schema: docs/config.md). Top-level keys mirror the command's
    options, lists for repeatable ones; [train], [attacks], [attacks.<name>], [defenses.<name>]."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file not found: {path}")
    try:
        data = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"config file {path}: invalid TOML ({exc})") from None
    except OSError as exc:
        raise UserError(f"cannot read config file {path}: {exc.strerror or exc}") from None
    for key in data:
        if key not in TOP_KEYS:
            raise UserError(f"config file {path}: unknown key {key!r} (known: {', '.join(TOP_KEYS)})")
    for key in ("train", "attacks", "defenses"):
        if key in data and not isinstance(data[key], dict):
            raise UserError(f"config file {path}: {key!r} must be a table ([{key}])")
    for key, (table, entry) in SHORTCUTS.items():
        if key in data and entry in data.get(table, {}):
            raise UserError(f"config file {path}: {key!r} is given both at the top level and in [{table}]")
    return data


def grid_from_options(config_file: str | None = None, **cli: Any) -> Grid:
    """Preset < TOML file < command-line options (None / empty tuple = not given). `-o` pairs
    add to the file's `option` list (later pairs win)."""
    values: dict[str, Any] = load_config(config_file) if config_file else {}
    for key, value in cli.items():
        if value is None or (isinstance(value, tuple | list) and not value):
            continue
        if key == "option":
            value = _as_list(values.get("option", [])) + list(value)
        if key == "executor" and isinstance(value, dict):  # --executor / --ray-address over the file's table
            file_table = values.get("executor", {})
            value = {**({"kind": file_table} if isinstance(file_table, str) else file_table), **value}
        values[key] = list(value) if isinstance(value, tuple) else value
    try:
        return Grid(**values)
    except TypeError as exc:
        raise UserError(f"invalid grid option: {exc}") from None
