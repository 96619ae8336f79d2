"""matplotlib, imported once and only when a figure is drawn (the import costs about a second).

Every plotting module gets pyplot from `pyplot()`, which selects the non-interactive Agg backend,
so figures render on machines without a display (CI, SLURM nodes).
"""

from __future__ import annotations

from types import ModuleType
from typing import Any


def pyplot() -> ModuleType:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def labelled_line(ax: Any, y: float, label: str, ls: str) -> None:
    """A thin grey horizontal line at `y`, named at the left edge (the mean-image baseline,
    chance accuracy)."""
    ax.axhline(y, color="0.5", ls=ls, lw=1)
    ax.annotate(
        label,
        (0.01, y),
        xycoords=("axes fraction", "data"),
        fontsize=6,
        color="0.4",
        xytext=(0, 2),
        textcoords="offset points",
    )
