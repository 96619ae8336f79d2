"""Run folders written before the package layout changed still load and are reused: every run
hash and attack-folder hash is unchanged (a small results folder committed as a fixture)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
from conftest import run_cli

FIXTURE = Path(__file__).parent / "fixtures" / "stored_runs"


def test_stored_runs_are_reused_and_give_the_same_rows(tmp_path, capsys):
    results = tmp_path / "results"
    shutil.copytree(FIXTURE / "results", results)
    before = {p: p.stat().st_mtime_ns for p in results.rglob("metrics.json")}
    code, out, err = run_cli(
        [
            "run",
            "--config",
            str(FIXTURE / "grid.toml"),
            "--results-dir",
            str(results),
            "--out",
            str(tmp_path / "out"),
            "--quiet",
        ],
        capsys,
    )
    assert code == 0, err
    assert "cells: 0 computed, 4 reused" in out
    assert {p: p.stat().st_mtime_ns for p in results.rglob("metrics.json")} == before  # nothing rewritten
    stored, now = pd.read_csv(FIXTURE / "results.csv"), pd.read_csv(tmp_path / "out" / "results.csv")
    assert [Path(p).name for p in stored.pop("path")] == [Path(p).name for p in now.pop("path")]
    pd.testing.assert_frame_equal(stored, now)
