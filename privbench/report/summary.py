"""The narrow summary of a privacy-utility table: one line per configuration that fits 100
columns (defense, channel, accuracy, the worst-case attack and its leakage, sem_acc, verdict).

The full table (every attack and metric) stays in table.md / table.csv; this is what a person
reads on a terminal and what the README shows.
"""

from __future__ import annotations

import pandas as pd

from privbench.report.table_format import plus_minus, worst_cell
from privbench.store.rows import METRIC_DIGITS, METRIC_LABEL

# A family's verdict in a few words (the verdict lines say it in full).
SHORT_VERDICT = {
    "better": "leaks less",
    "worse": "leaks more",
    "indistinguishable": "not resolved",
    "extrapolation only": "no verdict",
    "reference": "reference",
}


def verdict_of(table: pd.DataFrame, verdicts: pd.DataFrame | None) -> list[str]:
    """Per row of `table`, its family's short verdict ('' without verdicts, '–' for the
    undefended model), matched on the defense name."""
    if verdicts is None or verdicts.empty:
        return [""] * len(table)
    by_defense = dict(zip(verdicts.defense.astype(str).str.replace(" ", ""), verdicts.verdict))
    out = []
    for r in table.itertuples():
        plain = r.channel == "plain" and str(r.defense) == "none"
        out.append("–" if plain else SHORT_VERDICT.get(by_defense.get(str(r.defense).replace(" ", ""), ""), ""))
    return out


def summary_markdown(table: pd.DataFrame, verdicts: pd.DataFrame | None = None) -> str:
    """The summary as a Markdown table (± is the 95% CI: over seeds, or over test images with one)."""
    metric = table.attrs.get("privacy_metric", "ssim")
    # model and cut get a column only where the table holds several (a depth sweep)
    lead = [c for c in ("model", "cut") if c in table and table[c].astype(str).nunique() > 1]
    head = [*lead, "defense", "channel", "seeds", "accuracy (%)", f"worst-case {METRIC_LABEL[metric]}", "sem_acc"]
    show_verdict = verdicts is not None and not verdicts.empty
    head += ["verdict"] if show_verdict else []
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    if "noise" in table:  # the undefended model, the noise-only reference by noise, then the defenses
        key = zip(table.defense.astype(str) != "none", table.channel != "plain", table.noise)
        table = table.iloc[sorted(range(len(table)), key=list(key).__getitem__)]
    verdict = verdict_of(table, verdicts)
    for r, v in zip((row for _, row in table.iterrows()), verdict):
        sem = plus_minus(r.get("worst_sem_acc_mean"), r.get("worst_sem_acc_ci95"), METRIC_DIGITS["sem_acc"])
        accuracy = plus_minus(r.accuracy_mean, r.accuracy_ci95, 1, 100)
        cells = [
            *(str(r[c]) for c in lead),
            str(r.defense),
            str(r.channel),
            str(int(r.n_seeds)),
            accuracy,
            worst_cell(r, metric, metric),
            sem,
        ]
        lines.append("| " + " | ".join(cells + ([v] if show_verdict else [])) + " |")
    return "\n".join(lines) + "\n"
