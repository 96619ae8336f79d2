"""The layout is the architecture: each layer imports only the layers below it.

Every module's imports are read with ast (nothing is imported), so the rule holds for imports
written inside functions too. docs/architecture.md describes the layers.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Bottom to top. A module may import its own layer and the layers before it.
LAYERS = [
    "errors",
    "util",
    "plugin",
    "plugins",
    "engine",
    "attack",
    "store",
    "grid",
    "executors",
    "analysis",
    "report",
    "job",
    "api",
    "cli",
]
PLUGIN_PACKAGES = {"attacks": ROOT / "attacks", "defenses": ROOT / "defenses"}
# Optional heavy dependencies may be imported inside a function: each in one module only.
LAZY = {
    "ray": "privbench.executors.ray",
    "submitit": "privbench.executors.slurm",
    "matplotlib": "privbench.report.figure",
    "lpips": "privbench.attack.metrics",
    "timm": "privbench.engine.zoo",
    "huggingface_hub": "privbench.engine.zoo",
    "scipy": "privbench.util.stats",
}


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted((ROOT / "privbench").rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    for pkg, folder in PLUGIN_PACKAGES.items():
        for path in sorted(folder.glob("*.py")):
            name = f"privbench.{pkg}" + ("" if path.stem == "__init__" else f".{path.stem}")
            out[name] = path
    return out


MODULES = _modules()


def _imports(path: Path) -> list[tuple[str, bool, int]]:
    """(imported module, inside a function, line) for every import of the file."""
    tree = ast.parse(path.read_text(), str(path))
    found = []

    def visit(node: ast.AST, nested: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = nested or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef)
            if isinstance(child, ast.Import):
                found.extend((a.name, nested, child.lineno) for a in child.names)
            elif isinstance(child, ast.ImportFrom) and child.module and not child.level:
                found.append((child.module, nested, child.lineno))
                if child.module == "privbench":  # from privbench import errors
                    found.extend((f"privbench.{a.name}", nested, child.lineno) for a in child.names)
            visit(child, inner)

    visit(tree, False)
    return found


def _layer(module: str) -> int | None:
    parts = module.split(".")
    if parts[0] != "privbench" or len(parts) < 2 or parts[1] in PLUGIN_PACKAGES:
        return None
    return LAYERS.index(parts[1]) if parts[1] in LAYERS else None


def _core_edges() -> list[tuple[str, str, bool, int]]:
    edges = []
    for name, path in MODULES.items():
        for target, nested, line in _imports(path):
            if target.startswith("privbench") and target != "privbench":
                edges.append((name, target, nested, line))
    return edges


def test_every_core_module_belongs_to_a_layer():
    stray = [m for m in MODULES if m != "privbench" and _layer(m) is None and m.split(".")[1] not in PLUGIN_PACKAGES]
    assert not stray, f"modules outside the layers: {stray}"


def test_no_upward_import():
    upward = [
        f"{src}:{line} imports {dst}"
        for src, dst, _, line in _core_edges()
        if _layer(src) is not None and _layer(dst) is not None and _layer(dst) > _layer(src)
    ]
    assert not upward, "\n".join(upward)


def test_no_import_cycle():
    graph: dict[str, set[str]] = {}
    for src, dst, _, _ in _core_edges():
        target = dst if dst in MODULES else dst.rpartition(".")[0]  # from pkg.mod import name
        if target in MODULES and target != src:
            graph.setdefault(src, set()).add(target)
    state: dict[str, int] = {}
    stack: list[str] = []

    def walk(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := walk(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := walk(node)):
            pytest.fail("import cycle: " + " -> ".join(cycle))


def test_imports_inside_functions_only_for_optional_dependencies():
    bad = []
    for name, path in MODULES.items():
        for target, nested, line in _imports(path):
            if not nested:
                continue
            top = target.split(".")[0]
            if LAZY.get(top) != name:
                bad.append(f"{name}:{line} imports {target} inside a function")
    assert not bad, "\n".join(bad)


def test_plugins_are_leaves():
    """A plugin never imports another plugin, and the core never imports a plugin."""
    bad = []
    for src, dst, _, line in _core_edges():
        dst_pkg = dst.split(".")[1] if dst.count(".") else ""
        if dst_pkg in PLUGIN_PACKAGES and dst != f"privbench.{dst_pkg}":
            bad.append(f"{src}:{line} imports plugin {dst}")
    assert not bad, "\n".join(bad)


def _code_strings(path: Path) -> list[tuple[str, int]]:
    """String constants of a module's code: docstrings and comments (which may name anything) left out."""
    tree = ast.parse(path.read_text())
    docs = set()
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        first = body[0] if isinstance(body, list) and body else None
        if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
            docs.add(id(first.value))
    return [
        (n.value, n.lineno)
        for n in ast.walk(tree)
        if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docs
    ]


def test_the_core_names_no_plugin():
    """The default grid, the presets' per-attack options and the CEM table's columns are data
    (privbench/engine/defaults.toml); no core module spells a plugin's name in its code. `none`,
    the undefended model, is a word the core needs in many other senses."""
    names = {f.stem.replace("_", "-") for folder in PLUGIN_PACKAGES.values() for f in folder.glob("*.py")}
    names -= {"--init--", "none"}
    bad = [
        f"{module}:{line} names {value!r}"
        for module, path in MODULES.items()
        if not set(module.split(".")[1:2]) & set(PLUGIN_PACKAGES)
        for value, line in _code_strings(path)
        if value in names
    ]
    assert not bad, "\n".join(bad)


FILE_ACCESS = {
    "open",
    "read_text",
    "read_bytes",
    "write_text",
    "write_bytes",
    "read_json",
    "write_json",
    "read_csv",
    "to_csv",
    "load",
    "save",
    "exists",
    "is_file",
    "is_dir",
    "iterdir",
    "glob",
    "rglob",
    "mkdir",
}


def test_analysis_reads_and_writes_no_file():
    """privbench.analysis is functions over rows: reading run folders is the store's job, writing
    results the job's and the report's."""
    bad = []
    for module, path in MODULES.items():
        if module.startswith("privbench.analysis."):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Call):
                    f = node.func
                    name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""
                    if name in FILE_ACCESS:
                        bad.append(f"{module}:{node.lineno} calls {name}")
    assert not bad, "\n".join(bad)
