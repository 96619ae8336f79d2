"""Help that teaches: options in named groups, and examples at the end of every command's help."""

from __future__ import annotations

from typing import Any

import click


def examples(*lines: str) -> str:
    """An epilog of example command lines, printed after the options."""
    return "\b\nExamples:\n" + "\n".join(f"  {line}" for line in lines)


class GroupedCommand(click.Command):
    """A command whose --help lists its options under headings: `option_groups` maps a heading to
    the parameter names it holds; options not named go under "Other options"."""

    def __init__(self, *args: Any, option_groups: dict[str, list[str]] | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.option_groups = option_groups or {}

    def format_options(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        records = {p.name: p.get_help_record(ctx) for p in self.get_params(ctx)}
        records = {name: rec for name, rec in records.items() if rec is not None}
        placed: set[str] = set()
        for heading, names in self.option_groups.items():
            rows = [records[n] for n in names if n in records]
            placed.update(names)
            if rows:
                with formatter.section(heading):
                    formatter.write_dl(rows)
        rest = [rec for name, rec in records.items() if name not in placed]
        if rest:
            with formatter.section("Other options"):
                formatter.write_dl(rest)
