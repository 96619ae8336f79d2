"""matplotlib, imported once and only when a figure is drawn (the import costs about a second).

Every plotting module gets pyplot from `pyplot()`, which selects the non-interactive Agg backend,
so figures render on machines without a display (CI, SLURM nodes).
"""

from __future__ import annotations

from types import ModuleType


def pyplot() -> ModuleType:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
