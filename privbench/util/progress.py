"""Progress of a long command: a running count of cells with an ETA, and warnings said once.

The ETA of each kind of cell (training, attack) is the mean time of the cells of that kind
finished so far times the number left; it is shown once every kind with cells left has
finished at least one (before that there is nothing honest to extrapolate from).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")

_said: set[str] = set()


def warn_once(log: Callable[[str], None], message: str) -> None:
    """Log `message` the first time it comes up in this command; repeats are dropped."""
    if message not in _said:
        _said.add(message)
        log(message)


def reset_warnings() -> None:
    """Forget what was said: each command starts afresh (the CLI calls this per command)."""
    _said.clear()


def duration(seconds: float) -> str:
    """'42 s', '3 min 05 s', '1 h 02 min'."""
    s = int(round(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


class Progress:
    """Counts cells by kind; `start` returns the "[i/n] ..." line, `done` records the time."""

    def __init__(self, totals: dict[str, int], clock: Callable[[], float] = time.perf_counter):
        self.totals = dict(totals)
        self.finished = {kind: 0 for kind in totals}
        self.spent = {kind: 0.0 for kind in totals}
        self.clock = clock
        self._t0: float | None = None

    def start(self, kind: str, what: str) -> str:
        self._t0 = self.clock()
        line = f"[{self.finished[kind] + 1}/{self.totals[kind]}] {what} ..."
        eta = self.eta()
        return line + (f" (ETA {duration(eta)})" if eta is not None else "")

    def done(self, kind: str) -> float:
        """Record the end of the cell `start` began; returns its seconds."""
        seconds = self.clock() - (self._t0 if self._t0 is not None else self.clock())
        self.finished[kind] += 1
        self.spent[kind] += seconds
        self._t0 = None
        return seconds

    def eta(self) -> float | None:
        """Seconds left for every unfinished cell, or None while some kind has no finished cell."""
        total = 0.0
        for kind, n in self.totals.items():
            left = n - self.finished[kind]
            if left <= 0:
                continue
            if not self.finished[kind]:
                return None
            total += left * self.spent[kind] / self.finished[kind]
        return total


def bar(iterable: Iterable[T], *, desc: str, show: bool = True) -> Iterable[T]:
    """A progress bar on a terminal. Off a terminal (a log file, CI, a SLURM job) it draws
    nothing: its loop logs one line per epoch or cell instead of a redraw per step."""
    return tqdm(iterable, desc=desc, leave=False, disable=None if show else True)
