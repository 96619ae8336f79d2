"""`privbench run` brackets every defense: it adds reference points until each defense's accuracy
lies within the reference's range, then judges it (stand-in cells with a known answer)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from conftest import run_cli
from test_strength import Frontier

from privbench import job


class FarDefenses(Frontier):
    """none's noise sweep is accuracy 0.95 - noise (0.925, 0.90, 0.85 at the default noise), SSIM
    0.70 - 2 noise; gmm-cem sits below the swept range (80%), slot-cem above it (94%), both 0.25
    SSIM under the reference line at their accuracy."""

    undefended = 0.96

    def point(self, cfg):
        if cfg.defense == "none" and cfg.bottleneck is None:
            return self.undefended, 0.80
        if cfg.defense == "none":
            return 0.95 - cfg.noise, 0.70 - 2 * cfg.noise
        acc = 0.80 if cfg.defense == "gmm-cem" else 0.94
        return acc, 0.70 - 2 * (0.95 - acc) - 0.25


@pytest.fixture
def stand_in(monkeypatch):
    work, real = FarDefenses(), job.run_grid
    monkeypatch.setattr(
        job,
        "run_grid",
        lambda grid, log=print, **kw: real(grid, train_fn=work.train, attack_fn=work.attack, validate=False, log=log),
    )
    return work


def run(args, tmp_path, capsys):
    code, out, err = run_cli(["run", "--attack", "decoder", "--results-dir", str(tmp_path), *args], capsys)
    assert code == 0, err
    return out, Path(out.strip().splitlines()[-1])


def test_reference_points_are_added_until_every_defense_is_judged(stand_in, tmp_path, capsys):
    out, out_dir = run([], tmp_path, capsys)
    assert "bracketing: adding none at noise" in out
    verdicts = pd.read_csv(out_dir / "verdicts.csv").set_index("family")
    assert verdicts.loc["gmm-cem", "verdict"] == "better" and verdicts.loc["slot-cem", "verdict"] == "better"
    assert verdicts.loc[["gmm-cem", "slot-cem"], "mean_gain"].tolist() == pytest.approx([0.25, 0.25])
    points = pd.read_csv(out_dir / "frontier.csv")
    added = points[points.added]
    assert set(added.family) == {"none"} and len(added) >= 2
    assert added.accuracy_mean.min() <= 0.80 and added.accuracy_mean.max() >= 0.94  # both sides bracketed
    assert not points[~points.added & (points.family == "none")].noise.isin(added.noise).any()
    tail = out[out.index("verdicts at matched accuracy") :]
    assert "gmm-cem: leaks less than none at the same accuracy (gain 0.250 SSIM" in tail
    # The added points are ordinary cells: a second run reuses every one and adds nothing.
    again, _ = run([], tmp_path, capsys)
    assert "bracketing: adding" not in again and "bracketing: reusing none at noise" in again
    assert "trained in" not in again  # every training cell, the added ones included, is reused


@pytest.mark.parametrize("undefended", [0.93, 0.96])
def test_the_cap_is_respected_and_the_verdict_says_what_it_would_need(stand_in, tmp_path, capsys, undefended):
    """One added point brackets gmm-cem (80%, the larger gap); slot-cem (94%) stays above every
    none point. With the undefended model at 96% the reference ends there and judges slot-cem
    on the line to it; at 93% slot-cem is more accurate than it and gets no verdict."""
    stand_in.undefended = undefended
    out, out_dir = run(["--bracket", "1"], tmp_path, capsys)
    assert out.count("bracketing: adding") == 1
    points = pd.read_csv(out_dir / "frontier.csv")
    assert points.added.sum() == 1
    verdicts = pd.read_csv(out_dir / "verdicts.csv").set_index("family")
    assert verdicts.loc["gmm-cem", "verdict"] == "better"
    assert "bracketing: could not bracket slot-cem (lam=" in out  # named as the table names it, not by hash
    line = next(v for v in out.splitlines() if v.strip().startswith("slot-cem: "))
    if undefended > 0.94:
        assert verdicts.loc["slot-cem", "verdict"] == "better"
        assert "judged against the line to the undefended model (96.0%)" in line
        assert "(94.0%) within 1 added point" in out
        assert "; it is judged against the line from the reference's most accurate point to the undefended model" in out
        return
    assert verdicts.loc["slot-cem", "verdict"] == "extrapolation only"
    assert "more accurate than the undefended model (94.0% against 93.0%)" in line
    assert "could not bracket slot-cem (lam=" in line and "would be needed" in line


def test_bracket_zero_keeps_the_reference_as_swept(stand_in, tmp_path, capsys):
    out, out_dir = run(["--bracket", "0"], tmp_path, capsys)
    assert "bracketing" not in out
    verdicts = pd.read_csv(out_dir / "verdicts.csv").set_index("family")
    # gmm-cem (80%) lies below every none point; slot-cem (94%) above them, judged on the line
    # from none's best point (92.5%) to the undefended model (96%)
    assert verdicts.loc["gmm-cem", "verdict"] == "extrapolation only"
    assert "the reference was not swept low enough" in out
    assert verdicts.loc["slot-cem", "verdict"] == "better" and "judged against the line to the undefended" in out


@pytest.mark.parametrize(
    "args,message",
    [
        (["--bracket", "-1"], "invalid bracket -1"),
        (["--reference", "auto", "--no-sweep"], "--reference auto: the grid has no noise sweep of none"),
        (["--reference", "dropout"], "reference 'dropout': the grid has 0 point(s) of it"),
        (
            [
                "--defense",
                "none@plain",
                "--defense",
                "dropout",
                "--sweep",
                "dropout.at_inference=true,false",
                "--reference",
                "dropout",
            ],
            "bracketing moves its strength knob (rate)",
        ),
    ],
)
def test_bad_bracketing_input_exits_2_before_training(args, message, tmp_path, capsys):
    code, _, err = run_cli(["run", "--results-dir", str(tmp_path / "r"), *args], capsys)
    assert code == 2 and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "r").exists()


class OnTheLine(FarDefenses):
    """gmm-cem 0.25 SSIM under the reference line (resolved at the first look); slot-cem exactly on
    it (gain 0: never resolved, so the run adds seeds up to the cap)."""

    def point(self, cfg):
        if cfg.defense != "slot-cem":
            return super().point(cfg)
        return 0.90, 0.70 - 2 * 0.05


def test_seeds_auto_adds_seeds_until_resolved_or_the_cap(monkeypatch, tmp_path, capsys):
    work, real = OnTheLine(), job.run_grid
    monkeypatch.setattr(
        job,
        "run_grid",
        lambda grid, log=print, **kw: real(grid, train_fn=work.train, attack_fn=work.attack, validate=False, log=log),
    )
    out, out_dir = run(["--seeds", "auto", "--seeds-cap", "4"], tmp_path, capsys)
    assert "sequential seeds: adding seed 2" in out and "sequential seeds: adding seed 3" in out
    assert "adding seed 4" not in out and "sequential seeds: 4 per configuration (Pocock" in out
    verdicts = pd.read_csv(out_dir / "verdicts.csv").set_index("family")
    assert verdicts.loc["gmm-cem", "verdict"] == "better" and verdicts.loc["slot-cem", "verdict"] == "indistinguishable"
    seeds = pd.read_csv(out_dir / "results.csv").groupby("defense").seed.nunique()
    assert seeds["slot-cem"] == 4 and seeds["gmm-cem"] == 4  # every configuration got the seeds


@pytest.mark.parametrize(
    "args,message",
    [(["--seeds", "many"], "invalid seeds 'many'"), (["--seeds", "auto", "--seeds-cap", "1"], "invalid seeds cap 1")],
)
def test_bad_seeds_exit_2(args, message, tmp_path, capsys):
    code, _, err = run_cli(["run", "--results-dir", str(tmp_path / "r"), *args], capsys)
    assert code == 2 and err.count("\n") == 1 and message in err, err
