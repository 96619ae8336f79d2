"""The [executor] table of a grid (or `--executor KIND`), checked and normalized before any work.

Which executor computes the cells is part of the grid's description; the executors themselves
(privbench.executors) read the keys meant for them. docs/executors.md lists the keys.
"""

from __future__ import annotations

from typing import Any

from privbench.errors import UserError

KINDS = ("local", "ray", "slurm")
# [executor] keys: (types, smallest value). Each executor reads its own keys and ignores the
# others, so one table can serve several executors and `--executor` picks one (docs/executors.md).
KEYS: dict[str, tuple[tuple[type, ...], float | None]] = {
    "kind": ((str,), None),
    "poll": ((int, float), 0.01),
    "address": ((str,), None),
    "num_cpus": ((int,), 1),
    "retries": ((int,), 0),
    "cpus_per_task": ((int,), 1),
    "gpus_per_task": ((int,), 0),
    "partition": ((str,), None),
    "time": ((int, str), None),
    "mem": ((str,), None),
    "array_parallelism": ((int,), 1),
    "sbatch": ((dict,), None),
    "cluster": ((str,), None),
}


def parse_executor(value: Any) -> dict[str, Any]:
    """The [executor] table (or a bare kind name) checked and normalized; kind defaults to local."""
    if value is not None and not isinstance(value, str | dict):
        raise UserError(f"invalid executor {value!r}: expected local, ray, slurm or an [executor] table")
    table = {"kind": value} if isinstance(value, str) else dict(value or {})
    for key, v in table.items():
        if key not in KEYS:
            raise UserError(f"unknown [executor] key {key!r} (known: {', '.join(KEYS)})")
        types, low = KEYS[key]
        if isinstance(v, bool) or not isinstance(v, types) or (low is not None and v < low):
            kind = {str: "a string", int: "an integer", float: "a number", dict: "a table"}
            expected = " or ".join(kind[t] for t in types) + (f" >= {low}" if low is not None else "")
            raise UserError(f"invalid [executor] {key} {v!r}: expected {expected}")
    kind = table.setdefault("kind", "local")
    if kind not in KINDS:
        raise UserError(f"unknown executor {kind!r} (known: {', '.join(KINDS)})")
    if table.get("cluster", "slurm") not in ("slurm", "local"):
        raise UserError(f"invalid [executor] cluster {table['cluster']!r}: slurm, or local (submitit's local runner)")
    if "time" in table:
        slurm_minutes(table["time"])
    if kind != "ray" and "address" in table:
        raise UserError(f"a Ray address is given, but the executor is {kind}: add --executor ray")
    return table


def slurm_minutes(value: int | str) -> int:
    """A SLURM time limit in minutes: an integer, or "MM", "HH:MM:SS", "D-HH:MM[:SS]" as sbatch --time."""
    if isinstance(value, int):
        minutes = value
    else:
        try:
            days, _, clock = value.strip().rpartition("-")
            parts = [int(p) for p in clock.split(":")]
            h, m, s = (0, parts[0], 0) if len(parts) == 1 and not days else tuple((parts + [0, 0])[:3])
            minutes = int(days or 0) * 1440 + h * 60 + m + (s > 0) if len(parts) <= 3 else 0
        except ValueError:
            minutes = 0
    if minutes < 1:
        raise UserError(f"invalid [executor] time {value!r}: minutes >= 1, HH:MM:SS or D-HH:MM:SS")
    return minutes
