"""The precision report as Markdown: the table of privbench.analysis.precision's rows, and one
configuration's variance split (privbench.analysis.variance_split)."""

from __future__ import annotations

from typing import Any

from privbench.analysis.variance_split import COIN_FLIP_SD, misreads


def render(rows: list[dict[str, Any]]) -> str:
    """A Markdown table; sd and MDD are in the quantity's unit (accuracy in points)."""

    def num(v: float, quantity: str) -> str:
        digits = 3 if "ssim" in quantity else 2
        return "n/a" if v != v else f"{v:.{digits}f}"

    lines = [
        "| configuration | quantity | n | mean | sd | sd 95% CI | MDD (3 seeds) | MDD (5 seeds) | sd target "
        "| seeds to resolve |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        q = r["quantity"]
        mark = "" if r["meets"] is None else (" met" if r["meets"] else " **missed**")
        mark += " (CI spans it)" if r["meets"] is not None and not r.get("resolved") else ""
        ci = "n/a" if r["sd_lo"] != r["sd_lo"] else f"{num(r['sd_lo'], q)}..{num(r['sd_hi'], q)}"
        target = f"<= {r['target_sd']:g}{mark}" if r["target_sd"] is not None else ""
        needed = ""
        if r.get("resolve") is not None:
            count = "n/a" if r["sd"] != r["sd"] else (str(r["seeds_needed"]) if r["seeds_needed"] else "> 1000")
            needed = f"{count} for {r['resolve']:g}"
        lines.append(
            f"| {r['configuration']} | {q} | {r['n']} | {num(r['mean'], q)} | {num(r['sd'], q)} | {ci} | "
            f"{num(r['mdd3'], q)} | {num(r['mdd5'], q)} | {target} | {needed} |"
        )
    return "\n".join(lines)


def render_split(split: dict[str, Any]) -> str:
    """The seed sd and its two parts, then Markdown tables: per-class accuracy per seed with its sd
    over seeds, what each class is misread as (pooled over seeds), and the test tiles by training
    neighbours where the data set has a tile grid. Everything in points."""
    sds, names = split["sd_points"], split["classes"]
    lines = [
        f"{split['configuration']}: {len(split['seeds'])} seeds, {split['tiles']} test tiles "
        "(accuracy in points, tiles weighted equally)",
        f"  seed sd {sds['total']:.2f}: model part sd {sds['model']:.2f}, test-set part sd {sds['test_set']:.2f}",
        f"  seed sd with 2x the test tiles {sds['tiles_2x']:.2f}, 4x {sds['tiles_4x']:.2f}, "
        f"unlimited {sds['tiles_unlimited']:.2f}",
        "",
        "| seed | " + " | ".join(names) + " |",
        "|---" * (len(names) + 1) + "|",
    ]
    for seed, rates in split["seeds"].items():
        lines.append(f"| {seed} | " + " | ".join(f"{100 * c:.1f}" for c in rates["classes"]) + " |")
    lines.append("| sd | " + " | ".join(f"{v:.1f}" for v in split["class_sd"]) + " |")
    lines += ["", "| class | read correctly (%) | most often misread as (%) |", "|---|---|---|"]
    for row in misreads(split["confusion"], names):
        # a share that rounds to 0.0 is no misreading worth a column entry
        wrong = ", ".join(f"{n} {100 * v:.1f}" for n, v in row["misread_as"] if round(100 * v, 1) > 0)
        lines.append(f"| {row['class']} | {100 * row['correct']:.1f} | {wrong} |")
    if split["by_neighbours"] is not None:
        lines += [
            "",
            f"| training neighbours (of 4) | test tiles | mean accuracy (%) | mean sd over seeds | "
            f"tiles with sd > {COIN_FLIP_SD:g} |",
            "|---|---|---|---|---|",
        ]
        for row in split["by_neighbours"]:
            lines.append(
                f"| {row['neighbours']} | {row['tiles']} | {row['mean']:.1f} | {row['mean_sd']:.1f} | "
                f"{row['coin_flips']} |"
            )
    return "\n".join(lines)
