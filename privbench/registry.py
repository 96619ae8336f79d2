"""Name registries for attacks and defenses, and plugin discovery.

Sources, in order: the built-in folders (`privbench.attacks`, `privbench.defenses`), the
entry-point groups `privbench.attacks` / `privbench.defenses`, and files given with
`--plugin path.py`. A name taken by a different class is refused, never silently replaced.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import pkgutil
import sys
from importlib.metadata import entry_points
from pathlib import Path
from types import ModuleType
from typing import Any

from privbench.errors import UserError
from privbench.plugins import Attack, Defense

_KINDS: dict[str, type] = {"attack": Attack, "defense": Defense}
_REGISTRY: dict[str, dict[str, type]] = {"attack": {}, "defense": {}}
_discovered = False


def register(cls: type) -> type:
    """Register an Attack or Defense subclass under `cls.name`. Usable as a decorator."""
    kind = _kind_of(cls)
    if not cls.name:
        raise UserError(f"{cls.__qualname__} has no `name`: set a class attribute name = '...'")
    table = _REGISTRY[kind]
    old = table.get(cls.name)
    if old is not None and _same_class(old, cls) is False:
        raise UserError(
            f"{kind} name {cls.name!r} is taken by {old.__module__}.{old.__qualname__}; "
            f"rename {cls.__module__}.{cls.__qualname__}"
        )
    table[cls.name] = cls
    return cls


def _same_class(a: type, b: type) -> bool:
    # A module imported twice (file plugin re-loaded) gives a new class object for the same code.
    return a is b or (a.__module__ == b.__module__ and a.__qualname__ == b.__qualname__)


def _kind_of(cls: type) -> str:
    for kind, base in _KINDS.items():
        if isinstance(cls, type) and issubclass(cls, base) and cls is not base:
            return kind
    raise UserError(f"{cls!r} is neither an Attack nor a Defense subclass")


def register_module(module: ModuleType) -> list[type]:
    """Register every Attack/Defense subclass defined in `module` (not the ones it imports)."""
    found = []
    for _, obj in inspect.getmembers(module, inspect.isclass):
        if obj.__module__ == module.__name__ and obj not in _KINDS.values():
            if issubclass(obj, (Attack, Defense)) and obj.name:
                found.append(register(obj))
    return found


def load_plugin_file(path: str | Path) -> list[type]:
    """Import a plugin from a .py file and register its classes."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"plugin file not found: {path}")
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
    found = register_module(module)
    if not found:
        raise UserError(f"plugin file {path} defines no Attack or Defense subclass with a name")
    return found


def discover() -> None:
    """Load built-in plugins and installed entry points (once per process)."""
    global _discovered
    if _discovered:
        return
    _discovered = True
    for pkg_name in ("privbench.attacks", "privbench.defenses"):
        pkg = importlib.import_module(pkg_name)
        for info in pkgutil.iter_modules(pkg.__path__):
            if not info.name.startswith("_"):
                register_module(importlib.import_module(f"{pkg_name}.{info.name}"))
    for group in ("privbench.attacks", "privbench.defenses"):
        for ep in entry_points(group=group):
            obj = ep.load()
            if isinstance(obj, ModuleType):
                register_module(obj)
            else:
                register(obj)


def names(kind: str) -> list[str]:
    discover()
    return sorted(_REGISTRY[kind])


def get(kind: str, name: str) -> type:
    discover()
    try:
        return _REGISTRY[kind][name]
    except KeyError:
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


def create(kind: str, name: str, options: dict[str, Any] | None = None, *, strict: bool = True):
    """Instantiate a plugin. `None` values are dropped so plugin defaults stay in force;
    with strict=False, options the plugin does not take are ignored (preset budgets)."""
    cls = get(kind, name)
    defaults = option_defaults(cls)
    opts = {k: v for k, v in (options or {}).items() if v is not None}
    unknown = sorted(set(opts) - set(defaults))
    if unknown and strict:
        allowed = ", ".join(sorted(defaults)) or "none"
        raise UserError(f"{kind} {name!r} has no option {unknown[0]!r} (options: {allowed})")
    opts = {k: v for k, v in opts.items() if k in defaults}
    try:
        obj = cls(**opts)
    except (TypeError, ValueError) as exc:
        raise UserError(f"{kind} {name!r}: {exc}") from exc
    obj._options = {**defaults, **opts}
    return obj
