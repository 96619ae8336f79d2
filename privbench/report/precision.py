"""The precision report as a Markdown table (privbench.analysis.precision's rows)."""

from __future__ import annotations

from typing import Any


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
