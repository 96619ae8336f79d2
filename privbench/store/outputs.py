"""Output folders: checking where results will go before any work, and reading a grid's
output folder back.

The output folder of `privbench run` (RESULTS_DIR/tables/<grid hash>, or --out) holds the
tables and plots plus `cells.json`, which lists that grid's run folders and attack folders
relative to it. `table` and `plot` accept such a folder, a results folder, a folder of output
folders, or run folders, in any mix. Output folders written before `cells.json` existed are
read back from their results.csv.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import pandas as pd

from privbench.errors import UserError
from privbench.store.rows import is_run_dir
from privbench.util.storage import read_json, write_json

MANIFEST = "cells.json"
KINDS = "a run folder, a results folder or the output folder of `privbench run`"


# ------------------------------------------------------------------ checks before work


def _nearest_existing(path: Path) -> Path:
    p = path
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def check_output_dir(path: str | Path, what: str) -> None:
    """A folder that will be written to (created if absent) must not be a file, nor sit under
    a file, nor be in a folder this user cannot write. Creates nothing."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{what} {path} is a file, not a folder")
    base = _nearest_existing(path)
    if not base.is_dir():
        raise UserError(f"{what} {path} cannot be created: {base} is a file")
    if not os.access(base, os.W_OK | os.X_OK):
        raise UserError(f"{what} {path} is not writable ({base} does not allow it)")


def check_output_file(path: str | Path, what: str) -> None:
    """A file that will be (re)written: not a folder, and its folder writable or creatable."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{what} {path} is a folder, not a file")
    if path.exists() and not os.access(path, os.W_OK):
        raise UserError(f"{what} {path} is not writable")
    check_output_dir(path.parent, f"{what} {path}: folder")


# ------------------------------------------------------------------ a grid's output folder


def write_manifest(out_dir: Path, runs: Iterable[Path], attack_dirs: Iterable[Path]) -> Path:
    """cells.json: the grid's run and attack folders, relative to `out_dir` so the tree can move."""
    base = Path(out_dir).resolve()

    def rel(paths: Iterable[Path]) -> list[str]:
        return list(dict.fromkeys(os.path.relpath(Path(p).resolve(), base) for p in paths))

    path = Path(out_dir) / MANIFEST
    write_json(path, {"runs": rel(runs), "attack_dirs": rel(attack_dirs)})
    return path


def is_output_dir(path: Path) -> bool:
    return (path / MANIFEST).is_file() or ((path / "results.csv").is_file() and (path / "table.csv").is_file())


def read_output_dir(out_dir: Path) -> tuple[list[Path], list[Path]]:
    """(run folders, attack folders) of a grid's output folder."""
    if (out_dir / MANIFEST).is_file():
        try:
            cells = read_json(out_dir / MANIFEST)
            runs = [out_dir / p for p in cells["runs"]]
            attack_dirs = [out_dir / p for p in cells["attack_dirs"]]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise UserError(f"{out_dir / MANIFEST}: unreadable ({type(exc).__name__}: {exc})") from None
    else:
        runs, attack_dirs = _from_results_csv(out_dir)
    for run in runs:
        if not is_run_dir(run):
            raise UserError(f"{out_dir}: its run folder {os.path.normpath(run)} is missing")
    return [Path(os.path.normpath(r)) for r in runs], [Path(os.path.normpath(a)) for a in attack_dirs]


def _from_results_csv(out_dir: Path) -> tuple[list[Path], list[Path]]:
    try:
        long = pd.read_csv(out_dir / "results.csv", dtype=str, keep_default_na=False)
        rows = long[["run", "path", "attack_dir"]].drop_duplicates()
    except (OSError, ValueError, KeyError, pd.errors.ParserError) as exc:
        raise UserError(f"{out_dir / 'results.csv'}: unreadable ({type(exc).__name__}: {exc})") from None
    runs: dict[str, Path] = {}
    attack_dirs: list[Path] = []
    for row in rows.itertuples():
        if row.run not in runs:
            # The recorded path is relative to where `run` ran; the default layout is RESULTS/tables/<hash>.
            recorded, default = Path(row.path), out_dir.parent.parent / row.run
            runs[row.run] = recorded if is_run_dir(recorded) else default
        if row.attack_dir:
            attack_dirs.append(runs[row.run] / "attacks" / row.attack_dir)
    return list(runs.values()), attack_dirs


def _all_attack_dirs(run: Path) -> list[Path]:
    root = run / "attacks"
    return sorted(p for p in root.iterdir() if (p / "metrics.json").is_file()) if root.is_dir() else []


def resolve_inputs(paths: Iterable[str | Path]) -> tuple[list[Path], list[Path] | None]:
    """(run folders, attack folders to read or None for all) named by `paths`: run folders,
    results folders (every run in them), grid output folders (that grid's cells only) and
    folders of output folders, in any mix. Anything else is a UserError naming it."""
    runs: list[Path] = []
    attack_dirs: list[Path] = []
    any_grid = False

    def add_runs(found: list[Path], every_attack: bool) -> None:
        runs.extend(found)
        if every_attack:
            attack_dirs.extend(a for r in found for a in _all_attack_dirs(r))

    for p in map(Path, paths):
        if not p.exists():
            raise UserError(f"{p}: no such folder (expected {KINDS})")
        if not p.is_dir():
            raise UserError(f"{p} is a file, not {KINDS}")
        if is_run_dir(p):
            add_runs([p], True)
            continue
        if is_output_dir(p):
            found, dirs = read_output_dir(p)
            add_runs(found, False)
            attack_dirs.extend(dirs)
            any_grid = True
            continue
        children = sorted(c for c in p.iterdir() if c.is_dir() and not c.name.startswith("."))
        run_children = [c for c in children if is_run_dir(c)]
        grid_children = [c for c in children if is_output_dir(c)]
        if run_children:
            add_runs(run_children, True)
        elif grid_children:
            for child in grid_children:
                found, dirs = read_output_dir(child)
                add_runs(found, False)
                attack_dirs.extend(dirs)
            any_grid = True
        else:
            raise UserError(f"{p} is not {KINDS}, and holds none")
    if not runs:
        raise UserError("no run folders given")
    unique = list({r.resolve(): r for r in runs}.values())
    return unique, (list({a.resolve(): a for a in attack_dirs}.values()) if any_grid else None)
