"""Strength sweeps (privbench.plugin.strength): parsing, expansion into cells, defaults, errors, and
the default run's verdict lines."""

import json
from pathlib import Path

import pandas as pd
import pytest
from conftest import run_cli

from privbench.errors import UserError
from privbench.grid.spec import DEFAULT_DEFENSES, Grid, grid_from_options
from privbench.plugin import registry, strength


def cells(grid):
    return [(c.defense, c.defense_options, c.bottleneck, c.noise) for c in grid.train_configs()]


def test_parse_forms_and_canonical_values():
    s = strength.parse("gmm-cem.lam=4,16,64")
    assert (s.part, s.key, s.values) == ("gmm-cem", "lam", (4, 16, 64))
    assert strength.parse("gmm-cem").key == "lam"  # no key: the knob
    assert strength.parse("dropout").values == registry.get("defense", "dropout").strength_grid
    assert strength.parse("none") == strength.Sweep("none", "noise", strength.NOISE_GRID)  # none's knob: the noise
    assert strength.parse("gmm-cem.lam", [4, 4, 8]).values == (4, 8)  # TOML form, repeats dropped
    assert strength.parse("none.noise=0,0.1").values == (0.0, 0.1)
    # 4 and 4.0 make the same cell: options are canonical before hashing
    a = Grid(defense=["gmm-cem"], sweep=["gmm-cem.lam=4"]).train_configs()[0]
    b = Grid(defense=["gmm-cem"], sweep={"gmm-cem.lam": [4.0]}).train_configs()[0]
    assert a.hash() == b.hash() and a.defense_options == {"lam": 4.0}


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("nope.lam=1", "unknown defense 'nope'"),
        ("gmm-cem.nope=1", "defense 'gmm-cem' has no option 'nope'"),
        ("gmm-cem.clusters", "no default grid for this option"),
        ("gmm-cem.lam=4,,8", "no empty value"),
        ("none.noise=-1", "invalid noise -1"),
        ("dropout+gmm-cem.lam=4", "name one part of the stack"),
        (".lam=4", "expected NAME"),
    ],
)
def test_bad_sweeps_are_one_line_errors(spec, message):
    with pytest.raises(UserError, match=message):
        strength.parse(spec)


def test_sweep_reaches_stacks_and_multiplies_but_not_pinned_defenses():
    grid = Grid(defense=["gmm-cem", "dropout+gmm-cem", "none@C8"], sweep=["gmm-cem.lam=4,64", "dropout.rate=0.1,0.4"])
    got = cells(grid)
    assert ("gmm-cem", {"lam": 4.0}, 8, 0.025) in got and ("gmm-cem", {"lam": 64.0}, 8, 0.025) in got
    stacked = [c[1] for c in got if c[0] == "dropout+gmm-cem"]
    assert len(stacked) == 4 and {"dropout": {"rate": 0.4}, "gmm-cem": {"lam": 4.0}} in stacked
    assert [c for c in got if c[0] == "none"] == [("none", {}, 8, 0.0)]  # pinned: one point
    with pytest.raises(UserError, match="no defense of the grid without @ has the part 'vib'"):
        Grid(defense=["gmm-cem"], sweep=["vib"])


def test_noise_sweep_replaces_the_noise_of_that_defense_only():
    grid = Grid(defense=["none", "gmm-cem"], noise=[0.05], sweep=["none.noise=0,0.1"])
    assert [c[3] for c in cells(grid) if c[0] == "none"] == [0.0, 0.1]
    assert [c[3] for c in cells(grid) if c[0] == "gmm-cem"] == [0.05]


def test_default_grid_sweeps_the_base_channel_noise_and_no_sweep_turns_it_off():
    grid = Grid()
    assert grid.defense == list(DEFAULT_DEFENSES)
    assert [c[3] for c in cells(grid) if c[0] == "none" and c[2] == 8] == list(strength.NOISE_GRID)
    assert grid.verdict_reference() == "none" and grid.reference_points("none") == 3
    off = Grid(sweep="off")
    assert len(off.train_configs()) == 4 and off.verdict_reference() is None
    assert Grid(defense=["none", "gmm-cem"]).sweep == []  # a grid of one's own: no implicit sweep


def test_toml_sweep_table(tmp_path):
    path = tmp_path / "grid.toml"
    toml = 'defense = ["none", "topk"]\nreference = "none"\n[sweep]\n"none.noise" = [0, 0.1]\ntopk = "default"\n'
    path.write_text(toml)
    grid = grid_from_options(str(path))
    assert len(grid.train_configs()) == 2 + 3 and grid.verdict_reference() == "none"


def test_cli_bad_sweep_value_and_thin_reference_exit_2_before_training(tmp_path, capsys):
    base = ["run", "--results-dir", str(tmp_path), "--epochs", "1", "--defense", "dropout"]
    code, _, err = run_cli([*base, "--sweep", "dropout.rate=0.1,2"], capsys)
    assert code == 2 and "invalid rate 2" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    code, _, err = run_cli([*base, "--reference", "dropout"], capsys)
    assert code == 2 and "reference 'dropout': the grid has 1 point(s)" in err
    code, _, err = run_cli([*base, "--sweep", "gmm-cem.lam=4,16"], capsys)
    assert code == 2 and "no defense of the grid without @ has the part 'gmm-cem'" in err
    assert not [p for p in tmp_path.iterdir() if not p.name.startswith(".")]  # nothing trained


class Frontier:
    """Stand-in cells with a known answer: none's noise sweep is a line from (95%, 0.70) down to
    (85%, 0.50); gmm-cem sits 0.2 SSIM below it at 90%, slot-cem 0.15 above it."""

    @staticmethod
    def point(cfg):
        if cfg.defense == "none" and cfg.bottleneck is None:
            return 0.96, 0.80
        if cfg.defense == "none":
            return 0.95 - cfg.noise, 0.70 - 2 * cfg.noise
        return (0.90, 0.40) if cfg.defense == "gmm-cem" else (0.90, 0.75)

    def train(self, cfg, results_dir, log=print):
        from privbench.store.runs import Run, run_name
        from privbench.util.storage import build_dir_once, write_json

        final = Path(results_dir) / run_name(cfg)

        def build(tmp):
            write_json(tmp / "config.json", {"train": cfg.to_dict(), "defense_options": {}})
            write_json(
                tmp / "metrics.json", {"test_accuracy": self.point(cfg)[0], "num_classes": 10, "test_groups": 200}
            )

        return Run(final), build_dir_once(final, build)

    def attack(self, run_dir, attacks, *, options=None, log=print, **settings):
        from privbench.store.runs import Run
        from privbench.util.storage import build_dir_once, write_json

        out = []
        for name in attacks:
            folder = run_dir / "attacks" / f"{name}-x"

            def build(tmp, name=name):
                ssim = {"mean": self.point(Run(run_dir).config())[1], "ci95": 0.01, "n": 64}
                write_json(
                    tmp / "metrics.json", {"attack": name, "metrics": {"ssim": ssim, "psnr": ssim}, "baseline": {}}
                )

            build_dir_once(folder, build)
            out.append(json.loads((folder / "metrics.json").read_text()) | {"path": str(folder), "reused": False})
        return out


def test_default_run_ends_with_one_verdict_line_per_defense(tmp_path, capsys, monkeypatch):
    from privbench import job as sweep

    work, real = Frontier(), sweep.run_grid
    monkeypatch.setattr(
        sweep,
        "run_grid",
        lambda grid, log=print, **kw: real(grid, train_fn=work.train, attack_fn=work.attack, validate=False, log=log),
    )
    code, out, err = run_cli(["run", "--attack", "decoder", "--results-dir", str(tmp_path)], capsys)
    assert code == 0, err
    tail = out[out.index("verdicts at matched accuracy") :]
    assert "gmm-cem: leaks less than none at the same accuracy (gain 0.200 SSIM" in tail
    assert "slot-cem: leaks more than none at the same accuracy (gain -0.150 SSIM" in tail
    out_dir = Path(out.strip().splitlines()[-1])
    verdicts = pd.read_csv(out_dir / "verdicts.csv").set_index("family")
    assert verdicts.loc["gmm-cem", "verdict"] == "better" and verdicts.loc["gmm-cem", "mean_gain"] == pytest.approx(0.2)
    assert (out_dir / "frontier.png").stat().st_size > 0 and (out_dir / "frontier.pdf").stat().st_size > 0
