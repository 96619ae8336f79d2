"""The `privbench run` grid: expansion, caching (reuse, extension), config files, bad input."""

import json
from pathlib import Path

import pandas as pd
import pytest

from privbench.engine.config import config_hash
from privbench.errors import UserError
from privbench.grid.spec import Channel, Grid, grid_from_options
from privbench.job import run_grid
from privbench.plugin.strength import NOISE_GRID
from privbench.store.runs import Run, run_name
from tests.test_cli import run_cli

TINY_TOML = """
defense = ["none@plain", "none"]
attack = ["decoder", "optimization"]
device = "cpu"

[train]
epochs = 1
n_train = 300
width = 0.125

[attacks]
epochs = 1
steps = 5
eval_images = 16
"""


def labels(grid):
    return [(c.defense, c.bottleneck, c.noise, c.seed) for c in grid.train_configs()]


def test_default_grid_is_plain_none_plus_each_defense_on_the_base_channel():
    # The base channel alone is swept over its noise: the reference frontier of the verdicts.
    assert labels(Grid()) == [
        ("none", None, 0.0, 0),
        *[("none", 8, n, 0) for n in NOISE_GRID],
        ("gmm-cem", 8, 0.025, 0),
        ("slot-cem", 8, 0.025, 0),
    ]
    assert 0.025 in NOISE_GRID and len(NOISE_GRID) >= 3
    assert Grid().attack == ["decoder", "optimization"]


def test_grid_sweeps_channels_and_seeds_and_pins_channels():
    grid = Grid(defense=["none@plain", "gmm-cem", "none@C4+0.1"], bottleneck=["C8"], noise=[0.0, 0.05], seeds=2)
    got = labels(grid)
    assert len(got) == 2 + 2 * 2 + 2
    assert ("none", None, 0.0, 1) in got and ("gmm-cem", 8, 0.0, 0) in got and ("gmm-cem", 8, 0.05, 1) in got
    assert ("none", 4, 0.1, 0) in got
    # the same configuration reached twice is one cell
    assert len(Grid(defense=["none@plain", "none"], bottleneck=["none"], noise=[0.0]).train_configs()) == 1


@pytest.mark.parametrize(
    "spec,expected",
    [
        ("plain", Channel()),
        ("C8", Channel(8, 0.0)),
        ("0.05", Channel(None, 0.05)),
        ("C8+0.025", Channel(8, 0.025)),
        ("c16 + noise0.1", Channel(16, 0.1)),
    ],
)
def test_channel_specs(spec, expected):
    assert Channel.parse(spec) == expected


@pytest.mark.parametrize("spec", ["C0", "Cx", "abc", "C8+-1"])
def test_bad_channel_specs(spec):
    with pytest.raises(UserError):
        Channel.parse(spec)


# ------------------------------------------------------------------ caching with stand-in work


class FakeWork:
    """Stand-ins for training and attacking that write the files the tables read."""

    def __init__(self):
        self.trained, self.attacked = [], []

    def train(self, cfg, results_dir, log=print):
        from privbench.util.storage import build_dir_once, write_json

        final = Path(results_dir) / run_name(cfg)

        def build(tmp):
            self.trained.append(cfg.hash())
            write_json(tmp / "config.json", {"train": cfg.to_dict(), "defense_options": {}})
            write_json(tmp / "metrics.json", {"test_accuracy": 0.5 + 0.1 * cfg.seed, "num_classes": 10})

        built = build_dir_once(final, build)
        return Run(final), built

    def attack(self, run_dir, attacks, *, options=None, log=print, **settings):
        from privbench.util.storage import build_dir_once, write_json

        out = []
        for name in attacks:
            folder = run_dir / "attacks" / f"{name}-{config_hash([name, settings, options])}"
            reused = folder.exists()

            def build(tmp, name=name):
                self.attacked.append((run_dir.name, name))
                ssim = {"mean": 0.4 if name == "decoder" else 0.3, "ci95": 0.02, "n": 16}
                write_json(tmp / "metrics.json", {"attack": name, "metrics": {"ssim": ssim}, "baseline": {}})

            build_dir_once(folder, build)
            out.append(json.loads((folder / "metrics.json").read_text()) | {"path": str(folder), "reused": reused})
        return out


def fake_run(grid, work):
    return run_grid(grid, train_fn=work.train, attack_fn=work.attack, validate=False, log=lambda _m: None)


def test_rerun_computes_nothing_and_extension_computes_only_new_cells(tmp_path):
    work = FakeWork()
    grid = Grid(defense=["none@plain", "gmm-cem"], results_dir=str(tmp_path), attacks={"epochs": 1})
    first = fake_run(grid, work)
    assert (first.computed, first.reused) == (6, 0) and len(work.trained) == 2 and len(work.attacked) == 4
    for name in ("table.md", "table.csv", "results.csv", "privacy_utility.png"):
        assert (first.out_dir / name).is_file()
    assert first.out_dir == tmp_path / "tables" / grid.hash()
    table = pd.read_csv(first.out_dir / "table.csv")
    assert list(table.worst_attack) == ["decoder", "decoder"] and list(table.decoder_ssim_mean) == [0.4, 0.4]

    again = fake_run(grid, work)
    assert (again.computed, again.reused) == (0, 6) and len(work.trained) == 2 and len(work.attacked) == 4

    more = fake_run(
        Grid(defense=["none@plain", "gmm-cem"], seeds=2, results_dir=str(tmp_path), attacks={"epochs": 1}), work
    )
    assert (more.computed, more.reused) == (6, 6)
    assert len(work.trained) == 4 and len(work.attacked) == 8
    assert more.out_dir != first.out_dir  # another grid, another output folder
    assert list(more.table.n_seeds) == [2, 2]
    # other attack settings are other attack cells on the same runs
    other = fake_run(Grid(defense=["none@plain", "gmm-cem"], results_dir=str(tmp_path), attacks={"epochs": 2}), work)
    assert (other.computed, other.reused) == (4, 2)


def test_interrupted_run_continues(tmp_path):
    work = FakeWork()
    calls = {"n": 0}

    def attack_then_crash(run_dir, attacks, **kw):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return work.attack(run_dir, attacks, **kw)

    grid = Grid(defense=["none@plain", "gmm-cem"], attack=["decoder"], results_dir=str(tmp_path))
    with pytest.raises(KeyboardInterrupt):
        run_grid(grid, train_fn=work.train, attack_fn=attack_then_crash, validate=False, log=lambda _m: None)
    done = fake_run(grid, work)
    assert (done.computed, done.reused) == (1, 3)  # only the attack on the second run was missing


# ------------------------------------------------------------------ config files and bad input


def test_toml_config_sets_grid_and_cli_wins(tmp_path):
    path = tmp_path / "grid.toml"
    path.write_text(TINY_TOML + "\n[defenses.none]\n\n[attacks.decoder]\nchannels = 8\n")
    grid = grid_from_options(str(path), seeds=2, defense=(), noise=(0.1,))
    assert grid.defense == ["none@plain", "none"] and grid.seeds == 2 and grid.noise == [0.1]
    cfgs = grid.train_configs()
    assert {c.epochs for c in cfgs} == {1} and {c.width for c in cfgs} == {0.125} and {c.n_train for c in cfgs} == {300}
    assert grid.attack_settings() == {"epochs": 1, "steps": 5, "eval_images": 16}
    assert grid.attack_options() == {"decoder": {"channels": 8}}


@pytest.mark.parametrize(
    "text,message",
    [
        ("bogus = 1\n", "unknown key 'bogus'"),
        ("[train]\nepochz = 1\n", "unknown [train] key 'epochz'"),
        ("[train]\nnoise = 0.1\n", "[train] key 'noise' is set by the grid"),
        ("[attacks]\nsteps_ = 1\n", "unknown [attacks] key 'steps_'"),
        ("defense = [\n", "invalid TOML"),
        ('defense = ["nope"]\n', "unknown defense 'nope'"),
        ('attack = ["nope"]\n', "unknown attack 'nope'"),
        ('defense = ["none@C8+x"]\n', "invalid channel"),
        ("seeds = 0\n", "invalid seeds"),
        ('[attacks]\nattacker_data = "x"\n', "invalid attacker_data"),
        ("[attacks.decoder]\nnope = 1\n", "has no option 'nope'"),
    ],
)
def test_bad_config_is_one_line_exit_2(tmp_path, capsys, text, message):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    results = tmp_path / "results"
    code, _, err = run_cli(["run", "--config", str(path), "--results-dir", str(results)], capsys)
    assert code == 2 and err.count("\n") == 1 and message in err and "Traceback" not in err
    assert not results.exists()  # nothing computed


def test_bad_options_exit_2(tmp_path, capsys):
    for args, message in [
        (["--config", str(tmp_path / "none.toml")], "config file not found"),
        (["--noise", "-1"], "invalid noise"),
        (["--bottleneck", "C0"], "invalid bottleneck"),
        (["--cut", "99"], "invalid cut 99"),
    ]:
        code, _, err = run_cli(["run", *args, "--results-dir", str(tmp_path / "r")], capsys)
        assert code == 2 and err.count("\n") == 1 and message in err, (args, err)
    assert not (tmp_path / "r").exists()


# ------------------------------------------------------------------ the real thing, tiny


def test_real_tiny_run_then_rerun(tmp_path, capsys):
    path = tmp_path / "tiny.toml"
    path.write_text(TINY_TOML.replace('"none@plain", "none"', '"none@plain"'))
    args = ["run", "--config", str(path), "--results-dir", str(tmp_path / "results"), "--quiet"]
    code, out, _ = run_cli(args, capsys)
    lines = out.strip().splitlines()
    assert code == 0, out
    out_dir = tmp_path / "results" / "tables" / lines[-1].rsplit("/", 1)[-1]
    assert str(out_dir) == lines[-1]
    assert "cells: 3 computed, 0 reused" in out
    for name in ("table.md", "table.csv", "results.csv", "privacy_utility.png", "reconstructions.png"):
        assert (out_dir / name).stat().st_size > 0
    table = pd.read_csv(out_dir / "table.csv")
    assert len(table) == 1 and table.defense[0] == "none" and table.channel[0] == "plain"
    assert 0 <= table.decoder_ssim_mean[0] <= 1 and table.worst_attack[0] in ("decoder", "optimization")
    assert (out_dir / "table.md").read_text().splitlines()[0].startswith("| defense | channel")

    code, out, _ = run_cli(args, capsys)
    assert code == 0 and "cells: 0 computed, 3 reused" in out and out.strip().splitlines()[-1] == str(out_dir)


def test_a_grid_reads_its_data_folder_and_weights_file_once(tmp_path, monkeypatch):
    """The folder's fingerprint and the weights' digest are part of every cell's identity; the grid
    computes them once, however often it expands (output folder, validation, cells, bracketing)."""
    from privbench.engine import config

    (tmp_path / "images" / "cat").mkdir(parents=True)
    (tmp_path / "images" / "cat" / "a.png").write_bytes(b"png")
    (tmp_path / "w.pt").write_bytes(b"weights")
    calls = {"folder": 0, "weights": 0}
    real_folder, real_weights = config.folder_fingerprint, config.weights_digest

    def folder(path):
        calls["folder"] += 1
        return real_folder(path)

    def weights(path):
        calls["weights"] += 1
        return real_weights(path)

    monkeypatch.setattr(config, "folder_fingerprint", folder)
    monkeypatch.setattr(config, "weights_digest", weights)
    grid = Grid(
        dataset=f"folder:{tmp_path / 'images'}",
        defense=["none@plain", "none"],
        model="torchvision:resnet18",
        weights=str(tmp_path / "w.pt"),
        seeds=3,
    )
    first = grid.train_configs()
    assert [grid.train_configs() for _ in range(3)][-1] == first and len(first) == 6
    assert calls == {"folder": 1, "weights": 1}
    single = config.TrainConfig.from_preset(dataset=f"folder:{tmp_path / 'images'}", weights=str(tmp_path / "w.pt"))
    assert (single.data_fingerprint, single.weights_digest) == (first[0].data_fingerprint, first[0].weights_digest)
