"""The Ray executor: each cell is one Ray task (docs/executors.md).

Connects to the cluster at [executor] address (`--ray-address`, else RAY_ADDRESS) or starts a
local instance of num_cpus CPUs (default: all). A task asks for cpus_per_task CPUs (default 1),
and one GPU when the cells run on CUDA; its torch and OpenMP threads are kept to its CPUs, so
parallel cells do not oversubscribe the cores. A worker that dies is retried `retries` times
(default 1): the retry finds the dead worker's lock stale and builds the cell afresh.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from typing import Any

from privbench.errors import UserError
from privbench.executors.base import PIP, Cell, one_line
from privbench.executors.remote import execute, loaded_plugin_files

LOCAL_OBJECT_STORE = 128 * 1024**2  # cells return small dicts: a local instance needs little shared memory


def check_reachable(address: str, timeout: float = 5.0) -> None:
    """A Ray address that does not answer fails in seconds with one line, not after Ray's retries."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise UserError(f"invalid Ray address {address!r}: expected HOST:PORT, ray://HOST:PORT or auto")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as exc:
        raise UserError(f"the Ray cluster at {address} does not answer ({exc.strerror or exc})") from None


class RayBackend:
    limit = None  # Ray queues tasks until their CPUs / GPUs are free

    def __init__(self, table: dict[str, Any], *, device: str, results_dir: str, log: Callable[[str], None]):
        try:
            import ray
        except ImportError:
            raise UserError(f"--executor ray needs Ray, which is not installed: {PIP['ray']}") from None
        self.ray, self.cpus, self.plugins = ray, table.get("cpus_per_task", 1), loaded_plugin_files()
        address = table.get("address") or os.environ.get("RAY_ADDRESS") or None
        self.own = not ray.is_initialized()  # a caller's own ray.init() is used as it is, and left running
        if self.own:
            start = address in (None, "local")
            if not start and address != "auto":
                check_reachable(address)
            env = {"OMP_NUM_THREADS": str(self.cpus), "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
            kwargs: dict[str, Any] = {"runtime_env": {"env_vars": env}, "log_to_driver": False}
            if start:
                kwargs.update(
                    num_cpus=table.get("num_cpus", os.cpu_count()),
                    include_dashboard=False,
                    object_store_memory=LOCAL_OBJECT_STORE,
                )
            try:
                ray.init(address=address, logging_level="ERROR", **kwargs)
            except Exception as exc:  # ConnectionError, RuntimeError, ValueError, ... from Ray's start-up
                ray.shutdown()
                where = f"connect to the Ray cluster at {address}" if not start else "start a local Ray instance"
                raise UserError(f"cannot {where}: {one_line(exc)}") from None
        have = ray.cluster_resources()
        self.gpu = device == "cuda" or (device == "auto" and have.get("GPU", 0) > 0)
        per_cell = f"{self.cpus} CPU(s){' + 1 GPU' if self.gpu else ''} per cell"
        self.where = f"{have.get('CPU', 0):g} CPUs, {have.get('GPU', 0):g} GPUs; {per_cell}"
        if (self.gpu and not have.get("GPU")) or self.cpus > have.get("CPU", 0):
            message = f"the Ray cluster ({self.where}) cannot run one cell: set [executor] cpus_per_task, or --device"
            if self.own and address in (None, "local"):
                self.close()
                raise UserError(message)
            log(f"warning: {message} (waiting for an autoscaler to add nodes)")
        self.task = ray.remote(execute).options(
            num_cpus=self.cpus,
            num_gpus=1 if self.gpu else 0,
            max_retries=table.get("retries", 1),
            retry_exceptions=False,
        )

    def describe(self) -> str:
        return f"ray ({self.where})"

    def submit(self, cells: list[Cell]) -> list[Any]:
        return [self.task.remote(cell, self.cpus, self.plugins) for cell in cells]

    def wait(self, handles: list[Any], timeout: float) -> list[Any]:
        ready, rest = self.ray.wait(handles, num_returns=1, timeout=timeout)
        if ready and rest:  # and every other one already finished
            ready += self.ray.wait(rest, num_returns=len(rest), timeout=0)[0]
        return ready

    def outcome(self, handle: Any) -> dict[str, Any]:
        return self.ray.get(handle)

    def explain(self, exc: BaseException) -> str:
        from ray import exceptions

        if isinstance(exc, exceptions.RayTaskError) and getattr(exc, "cause", None) is not None:
            return one_line(exc.cause)
        if isinstance(exc, exceptions.WorkerCrashedError | exceptions.NodeDiedError):
            return "its Ray worker died (killed, or out of memory)"
        return one_line(exc)

    def stop(self, handles: list[Any]) -> None:
        for h in handles:
            try:
                self.ray.cancel(h, force=True)
            except Exception:  # already finished, or the cluster is gone
                pass

    def close(self) -> None:
        if self.own:
            self.ray.shutdown()
