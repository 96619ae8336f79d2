"""The SLURM executor, through submitit: each cell is one SLURM job (docs/executors.md).

[executor] keys: partition, time, gpus_per_task, cpus_per_task, mem, array_parallelism, sbatch
(a table of any further sbatch options) and cluster = "local", which runs the jobs as local
processes with submitit's local runner (no SLURM needed: for trying a grid, and for the tests).
Job logs go under RESULTS/logs/slurm/<job id>/; each cell's own log under RESULTS/logs/cells/.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from privbench.errors import UserError
from privbench.executors.base import PIP, Cell, one_line
from privbench.executors.remote import execute, loaded_plugin_files
from privbench.grid.executor import slurm_minutes

LOCAL_TIME_MINUTES = 7 * 24 * 60  # submitit's local runner kills a job after 2 minutes unless told otherwise


def partitions() -> list[str] | None:
    """The cluster's partition names (sinfo), or None where sinfo cannot say."""
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%R"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return sorted(set(out.stdout.split())) if out.returncode == 0 else None


class SlurmBackend:
    def __init__(self, table: dict[str, Any], *, device: str, results_dir: str, log: Callable[[str], None]):
        try:
            import submitit
        except ImportError:
            raise UserError(f"--executor slurm needs submitit, which is not installed: {PIP['slurm']}") from None
        self.cpus, self.log = table.get("cpus_per_task", 1), log
        self.gpus = table.get("gpus_per_task", 1 if device == "cuda" else 0)
        self.folder = Path(results_dir) / "logs" / "slurm"
        self.plugins, self.jobs, self.next = loaded_plugin_files(), {}, 0
        self.local = table.get("cluster", "slurm") == "local"
        minutes = slurm_minutes(table["time"]) if "time" in table else None
        if self.local:
            self.ex: Any = submitit.LocalExecutor(folder=self.folder / "%j")
            self.ex.update_parameters(timeout_min=minutes or LOCAL_TIME_MINUTES, gpus_per_node=self.gpus)
            # The local runner starts every job at once: keep to the machine's cores.
            self.limit = table.get("array_parallelism") or max(1, (os.cpu_count() or 1) // self.cpus)
            self.where = f"submitit's local runner, up to {self.limit} cells at once"
            return
        if shutil.which("sbatch") is None:
            raise UserError(
                "--executor slurm: no sbatch command here (SLURM not found); run privbench where jobs can be "
                'submitted, or set cluster = "local" in [executor] to run the jobs as local processes'
            )
        known = partitions()
        if "partition" in table and known is not None and table["partition"] not in known:
            raise UserError(f"SLURM has no partition {table['partition']!r} (partitions: {', '.join(known) or 'none'})")
        try:
            self.ex = submitit.SlurmExecutor(folder=self.folder / "%j")
            self.ex.update_parameters(
                job_name="privbench",
                partition=table.get("partition"),
                time=minutes,
                nodes=1,
                ntasks_per_node=1,
                cpus_per_task=self.cpus,
                gpus_per_node=self.gpus or None,
                mem=table.get("mem"),
                array_parallelism=table.get("array_parallelism", 256),
                setup=[f"export OMP_NUM_THREADS={self.cpus}"],
                additional_parameters={k: v for k, v in table.get("sbatch", {}).items()},
            )
        except (RuntimeError, ValueError) as exc:
            raise UserError(f"--executor slurm: {one_line(exc)}") from None
        self.limit = None  # SLURM queues them; array_parallelism caps each submitted array
        self.where = f"partition {table.get('partition', '(default)')}"

    def describe(self) -> str:
        gpus = f"{self.gpus} GPU(s) + " if self.gpus else ""
        return f"slurm ({self.where}; {gpus}{self.cpus} CPU(s) per cell; job logs in {self.folder})"

    def submit(self, cells: list[Cell]) -> list[int]:
        try:
            with self.ex.batch():  # one job array per batch of ready cells
                jobs = [self.ex.submit(execute, cell, self.cpus, self.plugins) for cell in cells]
        except Exception as exc:  # sbatch refused: the partition, account or limits are wrong
            raise UserError(f"SLURM refused the jobs: {one_line(exc)}") from None
        handles = list(range(self.next, self.next + len(jobs)))
        self.next += len(jobs)
        self.jobs.update(zip(handles, jobs))
        return handles

    def wait(self, handles: list[int], timeout: float) -> list[int]:
        end = time.monotonic() + timeout
        while True:
            done = [h for h in handles if self.jobs[h].done()]
            if done or time.monotonic() >= end:
                return done
            time.sleep(min(0.5, max(end - time.monotonic(), 0)))

    def outcome(self, handle: int) -> dict[str, Any]:
        from submitit.core.utils import UncompletedJobError

        job = self.jobs.pop(handle)
        try:
            return job.result()
        except UncompletedJobError:  # no result at all: the process was killed
            state = "" if self.local else f"state {job.state}, "
            raise RuntimeError(
                f"job {job.job_id} ended without a result ({state}killed, out of memory or out of time; "
                f"its SLURM log: {job.paths.stderr})"
            ) from None

    def explain(self, exc: BaseException) -> str:
        return one_line(exc)

    def stop(self, handles: list[int]) -> None:
        if self.local:  # child processes of this one: end them with it
            for h in handles:
                self.jobs[h].cancel(check=False)
        elif handles:
            self.log(f"{len(handles)} SLURM jobs go on running; rerun the same command to wait for them again")

    def close(self) -> None:
        pass
