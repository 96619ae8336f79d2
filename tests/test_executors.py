"""Executors (docs/executors.md): the [executor] table, bad input, failure isolation, and the same
tiny grid through local, slurm (submitit's local runner) and ray giving the same results.csv."""

import socket
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from privbench import job as sweep
from privbench.errors import UserError
from privbench.executors.base import CellsFailed
from privbench.grid.executor import parse_executor
from privbench.grid.spec import Grid, grid_from_options
from tests.test_cli import run_cli
from tests.test_sweep import TINY_TOML, FakeWork

# One training cell and one cheap attack cell: what every executor must compute identically.
GRID = dict(
    defense=["none@plain"],
    attack=["optimization"],
    device="cpu",
    train={"epochs": 1, "n_train": 300, "width": 0.125},
    attacks={"steps": 5, "eval_images": 16},
)
SLURM_LOCAL = {"kind": "slurm", "cluster": "local", "poll": 0.2}


# ------------------------------------------------------------------ the [executor] table


def test_executor_table_and_command_line():
    assert Grid().executor == {"kind": "local"}
    assert Grid(executor="ray").executor == {"kind": "ray"}
    table = {"kind": "slurm", "partition": "gpu", "time": "1-02:00:00", "gpus_per_task": 1, "sbatch": {"qos": "hi"}}
    assert Grid(executor=table).executor == table
    # --executor picks the kind and keeps the file's other keys (each executor ignores the others' keys)
    toml = TINY_TOML + '\n[executor]\nkind = "slurm"\npartition = "gpu"\ncpus_per_task = 2\n'
    path = Path(__import__("tempfile").mkdtemp()) / "grid.toml"
    path.write_text(toml)
    grid = grid_from_options(str(path), executor={"kind": "ray"})
    assert grid.executor == {"kind": "ray", "partition": "gpu", "cpus_per_task": 2}
    assert grid.hash() == grid_from_options(str(path)).hash()  # where cells run is not what they are


@pytest.mark.parametrize(
    "value,message",
    [
        ("dask", "unknown executor 'dask'"),
        ({"kind": "ray", "gpus": 1}, "unknown [executor] key 'gpus'"),
        ({"kind": "ray", "cpus_per_task": 0}, "cpus_per_task 0: expected an integer >= 1"),
        ({"kind": "slurm", "time": "soon"}, "invalid [executor] time 'soon'"),
        ({"kind": "slurm", "cluster": "pbs"}, "invalid [executor] cluster"),
        ({"kind": "slurm", "array_parallelism": True}, "array_parallelism True"),
        ({"address": "h:1"}, "a Ray address is given, but the executor is local"),
    ],
)
def test_bad_executor_tables(value, message):
    with pytest.raises(UserError, match=message.replace("[", r"\[").replace("(", r"\(")):
        parse_executor(value)


def test_slurm_time_limits():
    from privbench.grid.executor import slurm_minutes

    assert [slurm_minutes(v) for v in (90, "90", "01:30:00", "1-00:00", "00:00:30")] == [90, 90, 90, 1440, 1]


# ------------------------------------------------------------------ bad input: one line, exit 2, no cell


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fake_slurm(tmp_path: Path) -> Path:
    """sbatch, srun and sinfo stand-ins: a machine that looks like a SLURM login node."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in {"sbatch": "exit 1", "srun": "exit 1", "sinfo": "printf 'gpu\\ncpu\\n'"}.items():
        (bin_dir / name).write_text(f"#!/bin/sh\n{text}\n")
        (bin_dir / name).chmod(0o755)
    return bin_dir


@pytest.mark.parametrize(
    "case", ["unknown", "address alone", "no sbatch", "partition", "ray address", "no ray", "no submitit"]
)
def test_bad_executor_input_exits_2_before_any_cell(tmp_path, capsys, monkeypatch, case):
    path = tmp_path / "grid.toml"
    path.write_text(TINY_TOML)
    args = ["run", "--config", str(path), "--results-dir", str(tmp_path / "r")]
    extra, message = {
        "unknown": (["--executor", "dask"], "Invalid value for '--executor'"),
        "address alone": (["--ray-address", "h:1"], "a Ray address is given, but the executor is local"),
        "no sbatch": (["--executor", "slurm"], "no sbatch command here"),
        "partition": (["--executor", "slurm"], "SLURM has no partition 'nope' (partitions: cpu, gpu)"),
        "ray address": (["--executor", "ray", "--ray-address", f"127.0.0.1:{closed_port()}"], "does not answer"),
        "no ray": (["--executor", "ray"], "pip install 'privbench[ray]'"),
        "no submitit": (["--executor", "slurm"], "pip install 'privbench[slurm]'"),
    }[case]
    if case == "no sbatch":
        monkeypatch.setenv("PATH", str(tmp_path))
    if case == "partition":
        monkeypatch.setenv("PATH", f"{fake_slurm(tmp_path)}:{Path(sys.executable).parent}")
        path.write_text(TINY_TOML + '\n[executor]\npartition = "nope"\n')
    if case in ("no ray", "no submitit"):
        monkeypatch.setitem(sys.modules, case.split()[1], None)  # as if not installed
    if case in ("ray address", "no sbatch", "partition"):
        pytest.importorskip("ray" if case == "ray address" else "submitit")
    code, _, err = run_cli(args + extra, capsys)
    assert code == 2 and err.count("\n") == 1 and message in err and "Traceback" not in err, err
    assert not (tmp_path / "r").exists()


# ------------------------------------------------------------------ failures


class FailingWork(FakeWork):
    def train(self, cfg, results_dir, log=print):
        if cfg.defense == "gmm-cem":
            log("step 1 of a doomed training")
            raise RuntimeError("loss is nan")
        return super().train(cfg, results_dir, log=log)


def test_a_failing_cell_does_not_stop_the_others(tmp_path):
    work = FailingWork()
    grid = Grid(defense=["gmm-cem", "none@plain"], results_dir=str(tmp_path))
    with pytest.raises(CellsFailed) as info:
        sweep.run_grid(grid, train_fn=work.train, attack_fn=work.attack, validate=False, log=lambda _m: None)
    (failure,) = info.value.failures
    assert failure.cell == "training gmm-cem (C8 + noise 0.025) seed 0" and failure.error == "RuntimeError: loss is nan"
    assert "step 1 of a doomed training" in failure.log.read_text() and "Traceback" in failure.log.read_text()
    assert info.value.blocked == 2 and len(work.trained) == 1 and len(work.attacked) == 2  # the rest was computed
    assert not grid.out_dir().exists()  # no table of an incomplete grid


def test_failed_cells_exit_1_naming_them(tmp_path, capsys, monkeypatch):
    work, real = FailingWork(), sweep.run_grid
    monkeypatch.setattr(
        sweep,
        "run_grid",
        lambda grid, log=print: real(grid, train_fn=work.train, attack_fn=work.attack, validate=False, log=log),
    )
    args = ["run", "--defense", "gmm-cem", "--defense", "none@plain", "--results-dir", str(tmp_path)]
    code, out, err = run_cli(args, capsys)
    assert code == 1 and "[2/2] training none (plain) seed 0" in out
    assert (
        err.splitlines()[0] == "error: 1 cells failed (2 attack cells did not run: their training failed); "
        "rerun the same command to retry them:"
    )
    assert "training gmm-cem (C8 + noise 0.025) seed 0: RuntimeError: loss is nan (log: " in err


class StandInEngine:
    """A remote backend that computes each cell in process with stand-in work, at once."""

    limit = None

    def __init__(self, work):
        self.work, self.outcomes, self.submitted = work, {}, []

    def describe(self):
        return "stand-in"

    def submit(self, cells):
        from privbench.executors.base import compute

        handles = []
        for cell in cells:
            self.submitted.append(cell.label)
            try:
                out = compute(cell, lambda _m: None, self.work.train, self.work.attack)
                self.outcomes[cell.label] = out | {"started": 0.0, "finished": 1.0}
            except Exception as exc:
                self.outcomes[cell.label] = exc
            handles.append(cell.label)
        return handles

    def wait(self, handles, timeout):
        return handles

    def outcome(self, handle):
        out = self.outcomes.pop(handle)
        if isinstance(out, Exception):
            raise out
        return out

    def explain(self, exc):
        return f"{type(exc).__name__}: {exc}"


def test_scheduler_orders_cells_isolates_failures_and_waits_for_another_runs_lock(tmp_path):
    import threading

    from privbench.executors.remote import Scheduler
    from privbench.store.runs import run_name
    from privbench.util.storage import lock_owner

    work = FailingWork()
    grid = Grid(
        defense=["none@plain", "gmm-cem", "none"],
        attack=["decoder"],
        results_dir=str(tmp_path),
        executor={"kind": "ray", "poll": 0.05},
    )
    configs = grid.train_configs()
    busy = tmp_path / f".{run_name(configs[2])}.lock"  # another privbench run is building this one
    busy.write_text(__import__("json").dumps(lock_owner()))

    def other_run_finishes():
        from privbench.store.runs import RUN_FILES

        folder = tmp_path / run_name(configs[2])
        folder.mkdir()
        for name in RUN_FILES:
            (folder / name).write_text('{"train": {}, "test_accuracy": 0.5}')
        busy.unlink()

    threading.Timer(0.3, other_run_finishes).start()
    engine, lines = StandInEngine(work), []
    result = sweep.GridResult(table=None, long=None, out_dir=tmp_path, files=[], runs=[], attack_dirs=[])
    failures, blocked = Scheduler(engine, grid, lines.append).run(configs, result)
    assert [f.cell for f in failures] == ["training gmm-cem (C8 + noise 0.025) seed 0"] and blocked == 1
    assert engine.submitted == [
        "training none (plain) seed 0",
        "training gmm-cem (C8 + noise 0.025) seed 0",
        "attack decoder on none (plain) seed 0",
        "attack decoder on none (C8 + noise 0.025) seed 0",
    ]
    assert sum("another privbench run is building it" in line for line in lines) == 1
    assert [p.name for p in result.runs] == [run_name(configs[0]), run_name(configs[2])]  # grid order
    assert (result.computed, result.reused) == (3, 1) and len(result.attack_dirs) == 2
    assert lines[-1].startswith("[cells: 4/6 done, 0 running, 2 failed, 0 left]")


# ------------------------------------------------------------------ the real thing, tiny


@pytest.fixture(scope="module")
def local_results(tmp_path_factory):
    """The tiny grid computed in this process, one thread, as each worker computes it."""
    root = tmp_path_factory.mktemp("local")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = sweep.run_grid(Grid(**GRID, results_dir=str(root)), log=lambda _m: None)
    finally:
        torch.set_num_threads(threads)
    return root, read_results(result)


def read_results(result: sweep.GridResult) -> pd.DataFrame:
    return pd.read_csv(result.out_dir / "results.csv").drop(columns=["path"])  # where the results folder is


def run_on(executor: dict, root: Path, **grid) -> sweep.GridResult:
    lines: list[str] = []
    result = sweep.run_grid(Grid(**(GRID | grid), results_dir=str(root), executor=executor), log=lines.append)
    result.lines = lines
    return result


KILLER = """
import os, signal
from pathlib import Path
from privbench.plugin.base import Attack

class KilledOnce(Attack):
    name = "killed-once"

    def fit(self, target, images, labels=None):
        marker = Path({marker!r})
        if not marker.exists():  # the first worker dies mid-cell, as under the OOM killer
            marker.touch()
            os.kill(os.getpid(), signal.SIGKILL)
        self.target = target

    def reconstruct(self, z):
        import torch
        return torch.full((len(z), *self.target.image_shape), 0.5)
"""


@pytest.mark.submitit
def test_slurm_local_runner_gives_the_local_results_and_survives_a_killed_worker(local_results, tmp_path):
    """Through submitit's local runner: one attack cell's worker is killed mid-cell (as by the OOM
    killer); the other cells finish, the killed one leaves no folder and no lock, the rerun
    submits only that cell, and the numbers are the local executor's."""
    from privbench.plugin import registry
    from privbench.store.runs import Run

    pytest.importorskip("submitit")
    plugin = tmp_path / "killed_once.py"
    plugin.write_text(KILLER.format(marker=str(tmp_path / "killed")))
    registry.load_plugin_file(plugin)  # as --plugin does: the workers load it too
    results = tmp_path / "results"
    with pytest.raises(CellsFailed) as info:
        run_on(SLURM_LOCAL, results, attack=["optimization", "killed-once"])
    (failure,) = info.value.failures
    assert failure.cell == "attack killed-once on none (plain) seed 0"
    assert "ended without a result (killed" in failure.error
    (run,) = [Run.open(p) for p in results.iterdir() if p.name.startswith("none-")]
    attacks = run.path / "attacks"
    assert [p.name.split("-")[0] for p in run.attack_dirs()] == ["optimization"]  # the other cells finished
    assert not [p for p in attacks.iterdir() if p.name.startswith("killed-once")]  # no half-built folder
    assert not list(attacks.glob(".*.lock"))  # the dead worker's lock was released
    jobs = len(list((results / "logs" / "slurm").iterdir()))

    done = run_on(SLURM_LOCAL, results, attack=["optimization", "killed-once"])
    assert (done.computed, done.reused) == (1, 2) and len(run.attack_dirs()) == 2
    assert len(list((results / "logs" / "slurm").iterdir())) == jobs + 1  # finished cells are not submitted
    assert any(line.startswith("[cells: 2/3 done") for line in done.lines)
    _, expected = local_results
    got = read_results(done)
    got = got[~got.attack.isin(["killed-once"])].reset_index(drop=True)
    pd.testing.assert_frame_equal(got, expected)


@pytest.mark.ray
def test_ray_gives_the_local_results(local_results, tmp_path):
    pytest.importorskip("ray")
    root, expected = local_results
    result = run_on({"kind": "ray", "num_cpus": 2, "cpus_per_task": 1, "poll": 0.2}, tmp_path)
    assert (result.computed, result.reused) == (2, 0)
    pd.testing.assert_frame_equal(read_results(result), expected)
    assert result.lines[1].startswith("executor ray (2 CPUs, 0 GPUs; 1 CPU(s) per cell)")
