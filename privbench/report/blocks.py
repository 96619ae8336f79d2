"""Generated blocks in Markdown files: tables and verdicts regenerated from committed rows.

A block is written between two comments, and everything between them is the generator's:

    <!-- privbench: summary data/main-job -->
    ...generated...
    <!-- privbench: end -->

Kinds: `summary` (the narrow table of a results folder's results.csv with its verdicts.csv),
`table` (the full Markdown table of its results.csv), `verdicts` (one line per family from its
verdicts.csv). The path is a folder holding those files, relative to the Markdown file.
`privbench report FILE.md ...` rewrites the blocks; with --check it only says which would change,
so a table and the rows it is made from cannot drift apart.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import pandas as pd

from privbench.analysis import tables
from privbench.errors import UserError
from privbench.report import table_format
from privbench.report.summary import summary_markdown
from privbench.store import rows

BLOCK = re.compile(r"(<!-- privbench: (\w+) ([^\s>]+) -->\n)(.*?)(<!-- privbench: end -->)", re.DOTALL)


def _verdicts(folder: Path) -> pd.DataFrame | None:
    path = folder / "verdicts.csv"
    return pd.read_csv(path) if path.is_file() else None


def _summary(folder: Path) -> str:
    return summary_markdown(tables.aggregate(rows.read_csv(folder / "results.csv")), _verdicts(folder))


def _table(folder: Path) -> str:
    return table_format.render(tables.aggregate(rows.read_csv(folder / "results.csv")), "md")


def _verdict_lines(folder: Path) -> str:
    frame = _verdicts(folder)
    if frame is None:
        raise UserError(f"{folder / 'verdicts.csv'} not found: verdicts come from a run with a reference")
    out = []
    for r in frame[frame.verdict != "reference"].itertuples():
        said = VERDICT_WORDS.get(r.verdict, r.verdict).format(ref=r.reference)
        gain = "" if pd.isna(r.mean_gain) else f" (gain {r.mean_gain:.3f}, 95% CI {r.gain_lo:.3f}..{r.gain_hi:.3f})"
        via = int(getattr(r, "n_via_undefended", 0) or 0)  # absent from older verdicts.csv
        via = f" ({via} on the line from {r.reference}'s best point to the undefended model)" if via else ""
        top = int(getattr(r, "n_at_top", 0) or 0)
        via += (
            f" ({top} compared with {r.reference}'s most accurate point, within the accuracies' resolution)"
            if top
            else ""
        )
        out.append(
            f"- **{r.family}**: {said}{gain}; {int(r.n_in_range)} of {int(r.n_points)} points at matched accuracy{via}"
        )
    return "\n".join(out) + "\n"


VERDICT_WORDS = {
    "better": "leaks less than {ref} at the same accuracy",
    "worse": "leaks more than {ref} at the same accuracy",
    "indistinguishable": "no difference from {ref} that its seeds resolve",
    "extrapolation only": "no verdict: no {ref} point at its accuracy",
}
KINDS: dict[str, Callable[[Path], str]] = {"summary": _summary, "table": _table, "verdicts": _verdict_lines}


def regenerate(text: str, base: Path) -> str:
    """`text` with every block regenerated from the folders it names (relative to `base`)."""

    def fill(m: re.Match) -> str:
        kind, where = m.group(2), m.group(3)
        if kind not in KINDS:
            raise UserError(f"unknown block kind {kind!r} (known: {', '.join(KINDS)})")
        folder = (base / where).resolve()
        if not folder.is_dir():
            raise UserError(f"block {kind} {where}: no such folder {folder}")
        return m.group(1) + KINDS[kind](folder) + m.group(5)

    return BLOCK.sub(fill, text)


def blocks(text: str) -> list[tuple[str, str]]:
    """(kind, folder) of every block in `text`."""
    return [(m.group(2), m.group(3)) for m in BLOCK.finditer(text)]
