"""Name registries for attacks and defenses, and plugin discovery.

Sources, in order: the built-in folders (`privbench.attacks`, `privbench.defenses`), the
entry-point groups `privbench.attacks` / `privbench.defenses`, and files given with
`--plugin path.py`. A name taken by a different class is never silently replaced: the first
source keeps it (built-in before installed before files); an installed plugin that clashes, fails
to import or is no plugin class is skipped with one warning, and is an error only when asked for.
Option values are canonical (cast to the default's type, defaults dropped) before they are used
or hashed, so `lam=16`, `lam=16.0` and leaving lam at its default name the same run.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import math
import pkgutil
import sys
from importlib.metadata import entry_points
from pathlib import Path
from types import ModuleType
from typing import Any

from privbench.errors import UserError
from privbench.plugin.base import Attack, Defense

_KINDS: dict[str, type] = {"attack": Attack, "defense": Defense}
_REGISTRY: dict[str, dict[str, type]] = {"attack": {}, "defense": {}}
_ORIGIN: dict[tuple[str, str], str] = {}  # (kind, name) -> where the registered class came from
_BROKEN: dict[str, dict[str, str]] = {"attack": {}, "defense": {}}  # name -> why it is unusable
_WARNED: set[str] = set()
_discovered = False


def _warn(msg: str) -> None:
    if msg not in _WARNED:  # once per process, however often discovery runs
        _WARNED.add(msg)
        print(f"warning: {msg}", file=sys.stderr, flush=True)


def register(cls: type, *, origin: str | None = None) -> type:
    """Register an Attack or Defense subclass under `cls.name`. Usable as a decorator.
    Built-in and installed plugins are loaded first, so they keep their names."""
    discover()
    return _register(cls, origin)


def _register(cls: type, origin: str | None, *, clash_warns: bool = False) -> type:
    kind = _kind_of(cls)
    if not cls.name:
        raise UserError(f"{cls.__qualname__} has no `name`: set a class attribute name = '...'")
    table = _REGISTRY[kind]
    old = table.get(cls.name)
    new_origin = origin or cls.__module__
    if old is not None and not _same_class(old, cls):
        kept = f"{old.__module__}.{old.__qualname__} ({_ORIGIN.get((kind, cls.name), old.__module__)})"
        dropped = f"{cls.__module__}.{cls.__qualname__} ({new_origin})"
        msg = f"{kind} name {cls.name!r} is already taken by {kept}, which stays in force; {dropped} is ignored"
        if clash_warns:
            _warn(msg)
            return old
        raise UserError(msg + ": give it another name")
    table[cls.name] = cls
    _ORIGIN.setdefault((kind, cls.name), new_origin)
    _BROKEN[kind].pop(cls.name, None)
    return cls


def _same_class(a: type, b: type) -> bool:
    # A module imported twice (file plugin re-loaded) gives a new class object for the same code.
    return a is b or (a.__module__ == b.__module__ and a.__qualname__ == b.__qualname__)


def _kind_of(cls: type) -> str:
    for kind, base in _KINDS.items():
        if isinstance(cls, type) and issubclass(cls, base) and cls is not base:
            return kind
    raise UserError(f"{cls!r} is neither an Attack nor a Defense subclass")


def register_module(module: ModuleType, *, origin: str | None = None) -> list[type]:
    """Register every Attack/Defense subclass defined in `module` (not the ones it imports)."""
    discover()
    return _register_module(module, origin)


def _register_module(module: ModuleType, origin: str | None, *, clash_warns: bool = False) -> list[type]:
    found = []
    for _, obj in inspect.getmembers(module, inspect.isclass):
        if obj.__module__ == module.__name__ and obj not in _KINDS.values():
            if issubclass(obj, (Attack, Defense)) and obj.name:
                found.append(_register(obj, origin, clash_warns=clash_warns))
    return found


def load_plugin_file(path: str | Path) -> list[type]:
    """Import a plugin from a .py file and register its classes."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"plugin file not found: {path}")
    discover()  # built-in and installed plugins first: they keep their names
    mod_name = f"privbench_plugin_{path.stem}_{abs(hash(str(path.resolve()))) % 10**8}"
    spec = importlib.util.spec_from_file_location(mod_name, path)
    if spec is None or spec.loader is None:
        raise UserError(f"cannot import plugin file {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[mod_name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:  # a broken third-party file is bad input, not our crash
        del sys.modules[mod_name]
        raise UserError(f"plugin file {path} failed to import: {type(exc).__name__}: {exc}") from exc
    found = _register_module(module, f"file {path}")
    if not found:
        raise UserError(f"plugin file {path} defines no Attack or Defense subclass with a name")
    return found


def discover() -> None:
    """Load built-in plugins and installed entry points (once per process). A broken installed
    plugin is skipped with a warning naming its distribution; asking for it by name is an error."""
    global _discovered
    if _discovered:
        return
    _discovered = True
    for pkg_name in ("privbench.attacks", "privbench.defenses"):
        pkg = importlib.import_module(pkg_name)
        for info in pkgutil.iter_modules(pkg.__path__):
            if not info.name.startswith("_"):
                _register_module(importlib.import_module(f"{pkg_name}.{info.name}"), "built in")
    for kind in ("attack", "defense"):
        for ep in entry_points(group=f"privbench.{kind}s"):
            _load_entry_point(kind, ep)


def _load_entry_point(kind: str, ep: Any) -> None:
    dist = getattr(getattr(ep, "dist", None), "name", None) or "unknown"
    origin = f"distribution {dist}"
    try:
        obj = ep.load()
        if isinstance(obj, ModuleType):
            if not _register_module(obj, origin, clash_warns=True):
                raise UserError(f"module {obj.__name__} defines no Attack or Defense subclass with a name")
        else:
            _register(obj, origin, clash_warns=True)
    except Exception as exc:  # any failure of third-party code: skip it, keep the tool usable
        why = str(exc) if isinstance(exc, UserError) else f"{type(exc).__name__}: {exc}"
        msg = f"installed {kind} plugin {ep.name!r} ({ep.value}) from {origin} is broken and skipped: {why}"
        if ep.name not in _REGISTRY[kind]:
            _BROKEN[kind][ep.name] = msg
        _warn(msg)


def names(kind: str) -> list[str]:
    discover()
    return sorted(_REGISTRY[kind])


def get(kind: str, name: str) -> type:
    discover()
    try:
        return _REGISTRY[kind][name]
    except KeyError:
        if name in _BROKEN[kind]:
            raise UserError(_BROKEN[kind][name]) from None
        known = ", ".join(sorted(_REGISTRY[kind])) or "none"
        raise UserError(f"unknown {kind} {name!r} (installed: {known})") from None


def option_defaults(cls: type) -> dict[str, Any]:
    """Keyword options of a plugin class with their defaults."""
    sig = inspect.signature(cls.__init__)
    return {
        p.name: p.default
        for p in sig.parameters.values()
        if p.kind is p.KEYWORD_ONLY and p.default is not inspect.Parameter.empty
    }


def _option_type(cls: type, key: str, default: Any) -> type | None:
    """The scalar type an option takes: its default's, else the one its annotation names."""
    for t in (bool, int, float, str):
        if type(default) is t:
            return t
    if default is None:
        ann = inspect.signature(cls.__init__).parameters[key].annotation
        words = [w.strip() for w in str(getattr(ann, "__name__", ann)).split("|")]
        scalars = [t for t in (bool, int, float, str) if t.__name__ in words]
        return scalars[0] if len(scalars) == 1 else None
    return None


_TRUE, _FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")
_EXPECTS = {bool: "true or false", int: "an integer", float: "a float", str: "a string"}


def cast_option(value: Any, to: type | None) -> Any:
    """`value` as type `to` (int/float/bool/str); ValueError when it is not one."""
    if to is None or value is None:
        return value
    if to is bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower() if isinstance(value, str | int) else None
        if text in _TRUE or text in _FALSE:
            return text in _TRUE
    elif to is int and not isinstance(value, bool):
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return cast_option(float(value) if "." in value or "e" in value.lower() else int(value), int)
            except ValueError:
                pass
    elif to is float and not isinstance(value, bool):
        if isinstance(value, int | float):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif to is str:
        if isinstance(value, str):
            return value
        if isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)
    raise ValueError(_EXPECTS[to])


def _same(value: Any, default: Any) -> bool:
    if isinstance(default, tuple) and isinstance(value, list):  # JSON has no tuples
        value = tuple(value)
    if isinstance(value, float) and isinstance(default, float) and math.isnan(value) and math.isnan(default):
        return True
    return type(value) is type(default) and value == default


def canonical_options(kind: str, name: str, options: dict[str, Any] | None, *, strict: bool = True) -> dict[str, Any]:
    """The options of plugin `name` as they define a result: `None` values and values equal to
    the default dropped, the rest cast to the default's type (16 -> 16.0 for a float option).
    Unknown options are refused (strict) or dropped; a value of the wrong type is refused."""
    cls = get(kind, name)
    defaults = option_defaults(cls)
    opts = {k: v for k, v in (options or {}).items() if v is not None}
    unknown = sorted(set(opts) - set(defaults))
    if unknown and strict:
        allowed = ", ".join(sorted(defaults)) or "none"
        raise UserError(f"{kind} {name!r} has no option {unknown[0]!r} (options: {allowed})")
    out = {}
    for key, value in opts.items():
        if key not in defaults:
            continue
        try:
            value = cast_option(value, _option_type(cls, key, defaults[key]))
        except ValueError as exc:
            raise UserError(f"option {key} of {kind} {name} expects {exc}, got {value!r}") from None
        if not _same(value, defaults[key]):
            out[key] = value
    return dict(sorted(out.items()))


def create(kind: str, name: str, options: dict[str, Any] | None = None, *, strict: bool = True):
    """Instantiate a plugin with its canonical options (`None` values dropped so plugin defaults
    stay in force); with strict=False, options the plugin does not take are ignored (preset budgets)."""
    cls = get(kind, name)
    defaults = option_defaults(cls)
    opts = canonical_options(kind, name, options, strict=strict)
    try:
        obj = cls(**opts)
    except (TypeError, ValueError) as exc:
        raise UserError(f"{kind} {name!r}: {exc}") from exc
    obj._options = {**defaults, **opts}
    return obj
