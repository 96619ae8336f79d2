"""Strength sweeps: `--sweep gmm-cem.lam=4,16,64` trains one cell per value of a defense's knob.

A sweep names a defense (a part of any stack in the grid) and a key: one of its options or
`noise`, the channel noise std of the cells of that defense. Without values it takes the
defense's default grid (`Defense.strength_grid` for its knob, `strength()`; `NOISE_GRID` for
`noise`, which is also the knob of a defense that has none, such as `none`). Without a key it
sweeps the knob. Every grid defense holding the named part is swept, stacks included; a
defense pinned to a channel with `@` is one point and is never swept. Two sweeps that reach the
same defense multiply.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

from privbench.errors import UserError
from privbench.plugin import registry, stack
from privbench.plugin.options import parse_value

CHANNEL = "noise"  # the sweep key of the channel noise
OFF = "off"  # `--no-sweep`: not even the default grid's sweep
# The base channel's default sweep: the paper's 0.025 and two stronger. On embedded (quick) the
# accuracy barely moves up to 0.05 (noise 0 gave 91.6%, 0.025 92.2%, 0.05 92.7%) and falls to
# about 87% at 0.1, so these three span the accuracies the CEM defenses reach.
NOISE_GRID = (0.025, 0.05, 0.1)


@dataclass(frozen=True)
class Sweep:
    part: str  # a defense name (a part of a stack)
    key: str  # an option of `part`, or CHANNEL
    values: tuple[Any, ...]

    def label(self) -> str:
        return f"{self.part}.{self.key}=" + ",".join(_text(v) for v in self.values)


def _text(value: Any) -> str:
    return format(value, "g") if isinstance(value, float) else str(value)


def knob(part: str) -> str:
    """The key a bare `--sweep NAME` sweeps: the defense's strength option, else the noise."""
    return registry.get("defense", part).knob or CHANNEL


def default_values(part: str, key: str) -> tuple[Any, ...]:
    if key == CHANNEL:
        return NOISE_GRID
    cls = registry.get("defense", part)
    grid = tuple(getattr(cls, "strength_grid", ()))
    if key != knob(part) or not grid:
        raise UserError(f"sweep {part}.{key}: no default grid for this option; give values, {part}.{key}=V1,V2,...")
    return grid


def parse(spec: Any, values: Any = None) -> Sweep:
    """`NAME`, `NAME.KEY` or `NAME.KEY=V1,V2,...` (the command line), or a key with a list of
    values (a TOML [sweep] table: "gmm-cem.lam" = [4, 16, 64]; "default" for the default grid)."""
    text = str(spec).strip()
    if values is None:
        text, eq, raw = text.partition("=")
        if eq:
            values = [parse_value(v.strip()) for v in raw.split(",")]
            if not raw.strip() or any(v == "" for v in values):
                raise UserError(f"invalid sweep {spec!r}: expected NAME[.KEY][=V1,V2,...] with no empty value")
    part, dot, key = text.strip().rpartition(".")
    if not dot:
        part, key = key, ""
    part, key = part.strip(), key.strip().replace("-", "_")
    if not part:
        raise UserError(f"invalid sweep {spec!r}: expected NAME[.KEY][=V1,V2,...], e.g. gmm-cem.lam=4,16,64")
    if "+" in part:
        raise UserError(f"invalid sweep {spec!r}: name one part of the stack ({' or '.join(stack.parts(part))})")
    defaults = registry.option_defaults(registry.get("defense", part))  # unknown: UserError naming those installed
    key = key or knob(part)
    if key != CHANNEL and key not in defaults:
        options = ", ".join(sorted(defaults)) or "none"
        raise UserError(f"sweep {spec!r}: defense {part!r} has no option {key!r} (options: {options}; or noise)")
    if values is None or values == "default":
        values = default_values(part, key)
    if not isinstance(values, list | tuple) or not values:
        raise UserError(f"sweep {spec!r}: expected a list of values, e.g. [4, 16, 64]")
    if key == CHANNEL:
        values = [_noise(spec, v) for v in values]
    return Sweep(part, key, tuple(dict.fromkeys(values)))


def _noise(spec: Any, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise UserError(f"sweep {spec!r}: invalid noise {value!r}, expected a number >= 0")
    return float(value)


def parse_all(raw: Any) -> list[Sweep]:
    """The grid's `sweep` field: None or "off" (no sweep), a list of specs, or a TOML table."""
    if raw is None or raw == OFF:
        return []
    if isinstance(raw, Sweep):
        return [raw]
    if isinstance(raw, dict):
        sweeps = [parse(k, v) for k, v in raw.items()]
    elif isinstance(raw, list | tuple):
        sweeps = [s if isinstance(s, Sweep) else parse(s) for s in raw]
    else:
        sweeps = [parse(raw)]
    seen: set[tuple[str, str]] = set()
    for s in sweeps:
        if (s.part, s.key) in seen:
            raise UserError(f"sweep {s.part}.{s.key} is given twice")
        seen.add((s.part, s.key))
    return sweeps


def variants(spec: str, sweeps: list[Sweep]) -> list[tuple[dict[str, dict[str, Any]], float | None]]:
    """The cells a sweep makes of one grid defense `spec`: (option overrides per part, channel
    noise or None), one per combination; [({}, None)] when no sweep reaches it."""
    name, pinned = spec.partition("@")[0], "@" in spec
    parts = stack.parts(name)
    mine = [s for s in sweeps if s.part in parts and not pinned]
    out = []
    for combo in itertools.product(*(s.values for s in mine)):
        options: dict[str, dict[str, Any]] = {}
        noise = None
        for s, value in zip(mine, combo):
            if s.key == CHANNEL:
                noise = value
            else:
                options.setdefault(s.part, {})[s.key] = value
        out.append((options, noise))
    return out


def check_reaches(sweeps: list[Sweep], specs: list[str]) -> None:
    """Every sweep must reach an unpinned grid defense."""
    for s in sweeps:
        if not any(s.part in stack.parts(spec.partition("@")[0]) and "@" not in spec for spec in specs):
            names = ", ".join(specs)
            raise UserError(f"sweep {s.label()}: no defense of the grid without @ has the part {s.part!r} ({names})")
