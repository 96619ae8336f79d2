"""Options written `[NAME.]key=value`: parsed, typed and routed to a plugin in one place.

The command line (`-o`), TOML configs, sweeps and the API all come through here, so a plugin
option means the same wherever it is given. NAME is a plugin name exactly as registered
(`gmm-cem`, hyphens kept); only the option key is normalised (`warm-up` -> `warm_up`), because
plugin options are Python keyword arguments. A value is JSON when it parses (numbers, booleans,
lists), else the string itself; the registry later casts it to the option's declared type and
drops defaults (privbench.plugin.registry.canonical_options), so equal settings hash equally.

Routing a bare `key=value` (no NAME): to every defense part that has `key`; within one stack
it must name one part. When no defense has it and one attack is run, it goes to that attack.
NAME `model` is reserved: `model.KEY=VALUE` is a keyword argument of the model factory
(`split_model` takes those out before routing; TrainConfig.model_options holds them).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from privbench.errors import UserError
from privbench.plugin import registry

STACK_SEPARATOR = "+"
MODEL_TARGET = "model"  # `-o model.KEY=VALUE`: an option of the model, not of a plugin


def parse_value(text: str) -> Any:
    """An option value: JSON when it parses (numbers, booleans, lists), else the string itself."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def option_key(key: str) -> str:
    """The keyword an option key names: `warm-up` and `warm_up` are the same option."""
    return key.strip().replace("-", "_")


@dataclass(frozen=True)
class Option:
    """One parsed `[NAME.]key=value`: NAME is None for a bare key."""

    target: str | None
    key: str
    value: Any

    def __str__(self) -> str:
        return f"{self.target}.{self.key}" if self.target else self.key


def parse(pair: str | tuple[str, Any]) -> Option:
    """`gmm-cem.lam=8` -> Option("gmm-cem", "lam", 8); a (key, value) pair is taken as parsed."""
    if isinstance(pair, tuple):
        key, value = str(pair[0]), pair[1]
    else:
        key, eq, raw = str(pair).partition("=")
        if not eq or not key.strip():
            raise UserError(f"invalid option {pair!r}: expected [NAME.]key=value")
        value = parse_value(raw)
    target, dot, opt = key.strip().rpartition(".")
    if dot and not target.strip():
        raise UserError(f"invalid option {key!r}: expected NAME.key=value")
    if not opt.strip():
        raise UserError(f"invalid option {key!r}: no key after the name")
    return Option(target.strip() if dot else None, option_key(opt), value)


def parse_all(pairs: Iterable[str] | Mapping[str, Any] | None) -> list[Option]:
    """`key=value` strings, or a mapping (TOML, API) of `{key: value}`, `{"NAME.key": value}` or
    `{NAME: {key: value}}`, as Options in order."""
    if pairs is None:
        return []
    if not isinstance(pairs, Mapping):
        return [parse(str(p)) for p in pairs]
    out = []
    for key, value in pairs.items():
        if isinstance(value, Mapping):  # {NAME: {key: value}}
            out += [Option(str(key), option_key(str(k)), v) for k, v in value.items()]
        else:
            out.append(parse((str(key), value)))
    return out


def split_model(opts: Iterable[Option]) -> tuple[dict[str, Any], list[Option]]:
    """({KEY: VALUE} of every `model.KEY=VALUE`, the other options in order)."""
    model, rest = {}, []
    for o in opts:
        if o.target == MODEL_TARGET:
            model[o.key] = o.value
        else:
            rest.append(o)
    return model, rest


def as_dict(opts: Iterable[Option]) -> dict[str, Any]:
    """{"gmm-cem.lam": 8, "warmup": 0}: the form a stack routes (privbench.plugin.stack)."""
    return {str(o): o.value for o in opts}


def stack_parts(spec: str) -> list[str]:
    """The part names of a defense spec `a+b@CHANNEL`, unchecked."""
    return [p.strip() for p in spec.partition("@")[0].split(STACK_SEPARATOR) if p.strip()]


def takes(kind: str, name: str, key: str) -> bool:
    return key in registry.option_defaults(registry.get(kind, name))


def route(
    opts: Iterable[Option], *, defenses: Iterable[str] = (), attacks: Iterable[str] = (), where: str = "the grid"
) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
    """Options per defense part and per attack: ({part: {key: value}}, {attack: {key: value}}).

    `defenses` are defense specs (stacks `a+b` allowed, `@CHANNEL` ignored), `attacks` attack
    names. A named option must name one of them; a bare one follows the module docstring."""
    stacks = [stack_parts(s) for s in defenses]
    parts = list(dict.fromkeys(p for s in stacks for p in s))
    attacks = list(attacks)
    to_defense: dict[str, dict[str, Any]] = {}
    to_attack: dict[str, dict[str, Any]] = {}
    for o in opts:
        if o.target == MODEL_TARGET and MODEL_TARGET not in parts and MODEL_TARGET not in attacks:
            raise UserError(f"option {str(o)!r} is a model option: give it to privbench train, run or cuts")
        if o.target is not None:
            if o.target in parts:
                to_defense.setdefault(o.target, {})[o.key] = o.value
            elif o.target in attacks:
                to_attack.setdefault(o.target, {})[o.key] = o.value
            else:
                known = "; ".join(f"{k}: {', '.join(v)}" for k, v in (("defenses", parts), ("attacks", attacks)) if v)
                raise UserError(f"option {str(o)!r} names {o.target!r}, which is not in {where} ({known or 'nothing'})")
            continue
        takers = [p for p in parts if takes("defense", p, o.key)]
        for stack in stacks:
            mine = [p for p in stack if p in takers]
            if len(mine) > 1:
                raise UserError(
                    f"option {o.key!r} is ambiguous in {STACK_SEPARATOR.join(stack)!r}: "
                    f"{' and '.join(mine)} both have it; write {mine[0]}.{o.key}=VALUE"
                )
        if not takers and len(parts) == 1 and not attacks:
            takers = parts  # a lone defense: its own "has no option" error names its options
        if takers:
            for p in takers:
                to_defense.setdefault(p, {})[o.key] = o.value
        elif len(attacks) == 1 and not parts:
            to_attack.setdefault(attacks[0], {})[o.key] = o.value
        elif attacks and not parts:
            raise UserError(f"option {o.key!r} is ambiguous with several attacks: write ATTACK.{o.key}=VALUE")
        else:
            raise UserError(f"option {o.key!r}: no defense in {where} ({', '.join(parts) or 'none'}) has it")
    return to_defense, to_attack
