"""Running grid cells on a remote engine (Ray, SLURM): the worker's entry point and the driver.

The driver submits each cell whose inputs exist, reads finished cells from the run-folder store
instead of submitting them, and keeps no state of its own: everything it knows it reads from the
store, the cells' log files and the engine's answers (privbench.executors.base says why).
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from privbench.attack.harness import folder_key, resolve_attack
from privbench.engine.config import preset_value
from privbench.errors import UserError
from privbench.executors.base import Cell, Failure, attack_cells, cells_of, compute, count, one_line
from privbench.plugin import registry
from privbench.store.attacks import write_combined_grid
from privbench.store.runs import RUN_FILES, Run, run_name
from privbench.util.progress import duration
from privbench.util.storage import lock_state


def execute(cell: Cell, threads: int | None = None, plugins: tuple[str, ...] = ()) -> dict[str, Any]:
    """A cell in a worker process. Its log starts with a JSON header (host, pid, start time): the
    driver reads it to count the cell as running and to release its lock if the worker dies."""
    started = time.time()
    path = cell.log_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", buffering=1) as f:
        header = {"cell": cell.label, "host": socket.gethostname(), "pid": os.getpid(), "started": started}
        f.write(json.dumps(header) + "\n")
        try:
            if threads:
                torch.set_num_threads(threads)  # one cell per task's CPUs: no oversubscription
            for p in plugins:
                registry.load_plugin_file(p)
            out = compute(cell, lambda msg: f.write(f"{msg}\n"))
        except BaseException as exc:
            f.write(f"FAILED: {one_line(exc)}\n{traceback.format_exc()}")
            raise
    return out | {"started": started, "finished": time.time()}


def log_header(path: Path) -> dict[str, Any] | None:
    try:
        with open(path) as f:
            header = json.loads(f.readline())
    except (OSError, ValueError):
        return None
    return header if isinstance(header, dict) else None


def loaded_plugin_files() -> tuple[str, ...]:
    """Plugin files this process loaded (--plugin): every worker loads them too."""

    mods = [m for name, m in list(sys.modules.items()) if name.startswith("privbench_plugin_")]
    return tuple(sorted({str(Path(m.__file__).resolve()) for m in mods if getattr(m, "__file__", None)}))


def attack_folder(run: Path, name: str, settings: dict[str, Any], options: dict[str, Any], seed: int = 0) -> Path:
    """The folder attack_run writes for this cell (the same hash): a finished one is not submitted."""
    preset = Run.open(run).config().preset
    pick = {k: settings.get(k) for k in ("epochs", "steps", "eval_images")}
    budget = {k: pick[k] if pick[k] is not None else preset_value(preset, f"attack_{k}") for k in ("epochs", "steps")}
    n_eval = pick["eval_images"] if pick["eval_images"] is not None else preset_value(preset, "eval_images")
    preset_options = (preset_value(preset, "attack_options") or {}).get(name)
    attack, resolved = resolve_attack(name, options, budget, False, preset_options)
    key = folder_key(name, attack, resolved, settings.get("attacker_data", "train"), n_eval, seed)
    return Path(run) / "attacks" / f"{name}-{key}"


class Scheduler:
    """Drives a remote backend: submits each cell whose inputs exist (attack cells once their run
    is finished), takes what the store already holds instead of submitting it, waits for cells
    another privbench run is building, and logs done / running / failed / left with an ETA.

    A backend has submit(cells) -> handles, wait(handles, timeout) -> the finished ones,
    outcome(handle) -> execute()'s dict (raises if the cell failed), explain(exc), describe(),
    stop(handles), close(), and `limit`: the most cells in flight (None: the engine queues them)."""

    def __init__(self, backend: Any, grid: Any, log: Callable[[str], None]):
        self.backend, self.grid, self.log = backend, grid, log
        self.poll = float(grid.executor.get("poll", 2.0))
        self.queue: list[Cell] = []  # ready, waiting for room under the backend's limit
        self.inflight: dict[Any, tuple[Cell, float]] = {}  # handle -> (cell, submit time)
        self.elsewhere: list[Cell] = []  # locked by another privbench run
        self.told: set[str] = set()  # cells whose wait was announced
        self.folders: dict[tuple[int, int], Path] = {}  # (training cell, attack or -1) -> folder
        self.failures: list[Failure] = []
        self.blocked = self.done = 0
        self.spent: dict[str, list[float]] = {"train": [], "attack": []}
        self.shown: tuple[int, ...] = ()

    def run(self, configs: list[Any], result: Any) -> tuple[list[Failure], int]:
        self.total, self.result = len(configs) * (1 + len(self.grid.attack)), result
        self.log(f"executor {self.backend.describe()}; cell logs in {Path(self.grid.results_dir) / 'logs' / 'cells'}")
        self.ready(cells_of(self.grid, configs, remote=True))
        try:
            while self.inflight or self.elsewhere or self.queue:
                self.step()
        except KeyboardInterrupt:
            self.backend.stop(list(self.inflight))
            raise
        for i in range(len(configs)):  # grid order, whatever order the cells finished in
            if (i, -1) in self.folders:
                result.runs.append(self.folders[i, -1])
                found = [self.folders[i, k] for k in range(len(self.grid.attack)) if (i, k) in self.folders]
                result.attack_dirs += found
                if len(found) > 1:
                    write_combined_grid(self.folders[i, -1] / "attacks" / "grid.png", found)
        return self.failures, self.blocked

    def target(self, cell: Cell) -> tuple[Path, Path, tuple[str, ...]]:
        """(the folder the cell builds, its lock, the files a finished one holds)."""
        if cell.kind == "train":
            final, files = Path(cell.results_dir) / run_name(cell.cfg), RUN_FILES
        else:
            final, files = (
                attack_folder(Path(str(cell.run)), str(cell.attack), cell.settings, cell.options),
                ("metrics.json",),
            )
        return final, final.parent / f".{final.name}.lock", files

    def ready(self, cells: list[Cell]) -> None:
        for cell in cells:
            try:
                final, lock, files = self.target(cell)
            except Exception:  # a damaged run folder: the cell itself fails and says why
                self.queue.append(cell)
                continue
            state, who, _ = lock_state(lock)
            if all((final / f).is_file() for f in files):
                self.finish(cell, {"path": str(final), "computed": False}, 0.0)
            elif state in ("held", "remote"):
                if cell.id not in self.told:
                    self.told.add(cell.id)
                    self.log(f"  {cell.label}: another privbench run is building it ({who}); waiting for it")
                self.elsewhere.append(cell)
            else:
                self.queue.append(cell)
        room = len(self.queue) if self.backend.limit is None else max(self.backend.limit - len(self.inflight), 0)
        batch, self.queue = self.queue[:room], self.queue[room:]
        now = time.time()
        for cell, handle in zip(batch, self.backend.submit(batch) if batch else []):
            self.inflight[handle] = (cell, now)

    def step(self) -> None:
        finished = self.backend.wait(list(self.inflight), self.poll) if self.inflight else time.sleep(self.poll)
        for handle in finished or []:
            cell, submitted = self.inflight.pop(handle)
            try:
                out = self.backend.outcome(handle)
            except Exception as exc:
                self.fail(cell, exc)
            else:
                self.finish(cell, out, submitted)
        waiting, self.elsewhere = self.elsewhere, []
        self.ready(waiting)  # finished there: reused; lock gone (its builder died): submitted; else still waiting
        self.status()

    def finish(self, cell: Cell, out: dict[str, Any], submitted: float) -> None:
        self.done += 1
        computed, seconds = bool(out["computed"]), out.get("finished", 0.0) - out.get("started", 0.0)
        name = cell.label if cell.kind == "attack" else f"train {cell.label.removeprefix('training ')}"
        entry = {"cell": name, "computed": computed, "seconds": seconds if computed else 0.0}
        if "started" in out:
            entry["queued_seconds"] = max(0.0, out["started"] - submitted)  # submit to start: the engine's overhead
        self.result.timings.append(entry)
        count(self.result, computed)
        if computed:
            self.spent[cell.kind].append(seconds)
        what = (
            ("trained" if cell.kind == "train" else "computed") + f" in {duration(seconds)}" if computed else "reused"
        )
        self.log(f"  {cell.label}: {what}: {out['path']}")
        if cell.kind == "train":
            self.folders[cell.index, -1] = Path(out["path"])
            self.ready(attack_cells(self.grid, cell, out["path"], remote=True))
        else:
            self.folders[cell.index, self.grid.attack.index(cell.attack)] = Path(out["path"])

    def fail(self, cell: Cell, exc: BaseException) -> None:
        path, error = cell.log_path(), self.backend.explain(exc)
        try:
            lines = path.read_text(errors="replace").splitlines()
            error = next((ln.removeprefix("FAILED: ") for ln in lines if ln.startswith("FAILED: ")), error)
        except OSError:
            pass
        self.release_lock(cell, log_header(path))
        self.failures.append(Failure(cell.label, error, path))
        self.log(f"  failed: {self.failures[-1]}")
        self.blocked += len(self.grid.attack) if cell.kind == "train" else 0

    def release_lock(self, cell: Cell, header: dict[str, Any] | None) -> None:
        """A killed worker leaves its lock, and on another host no one can tell that its builder is
        dead. The engine says the task is over: remove the lock that task's process held."""
        try:
            _, lock, _ = self.target(cell)
            owner = json.loads(lock.read_text())
        except (OSError, ValueError, UserError):
            return
        if (
            header
            and isinstance(owner, dict)
            and [owner.get("host"), owner.get("pid")] == [header.get("host"), header.get("pid")]
        ):
            lock.unlink(missing_ok=True)

    def status(self) -> None:
        cells = [c for c, _ in self.inflight.values()]
        running = sum(
            1 for c, t in self.inflight.values() if (h := log_header(c.log_path())) and h.get("started", 0) >= t - 1
        )
        failed = len(self.failures) + self.blocked
        state = (self.done, running, failed, self.total - self.done - failed - running)
        if state != self.shown:
            self.shown = state
            # ETA: each kind's mean time over its finished cells, times its cells left, over the cells running at once.
            train = sum(c.kind == "train" for c in cells + self.queue + self.elsewhere)
            left = {"train": train, "attack": self.total - self.done - failed - train}
            tail = ""
            if state[3] + running and all(self.spent[k] or not n for k, n in left.items()):
                eta = sum(n * sum(self.spent[k]) / len(self.spent[k]) for k, n in left.items() if n) / max(running, 1)
                tail = f" ETA {duration(eta)}"
            self.log(
                f"[cells: {state[0]}/{self.total} done, {running} running, {failed} failed, {state[3]} left]{tail}"
            )
