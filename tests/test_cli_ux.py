"""Command-line ergonomics: `table` / `plot` read what `run` prints, the options of `run` and
its TOML keys, output paths checked before any work, `list` shows a preset's defaults, and
progress (cell counts, ETA, warnings and log lines said once)."""

import json
import re
import shutil
import time
from pathlib import Path

import pandas as pd
import pytest
from conftest import run_cli, tiny_config

import privbench.api as pb
from privbench import job as sweep
from privbench.engine.config import PRESETS
from privbench.grid.spec import TOP_KEYS, Grid, grid_from_options
from privbench.store.runs import Run, run_name
from privbench.util.progress import Progress
from tests.test_sweep import TINY_TOML, FakeWork, fake_run

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------ 8: table / plot inputs


@pytest.fixture
def two_grids(tmp_path):
    """Two grids on the same runs: A attacks with decoder only, B adds optimization."""
    work = FakeWork()
    results = tmp_path / "results"
    a = fake_run(Grid(defense=["none@plain", "gmm-cem"], attack=["decoder"], results_dir=str(results)), work)
    b = fake_run(Grid(defense=["none@plain", "gmm-cem"], results_dir=str(results)), work)
    return results, a, b


def _csv(out: str) -> pd.DataFrame:
    from io import StringIO

    return pd.read_csv(StringIO(out))


def test_table_reads_the_output_folder_run_prints_with_only_that_grids_cells(two_grids, capsys):
    results, a, b = two_grids
    code, out, err = run_cli(["table", str(a.out_dir), "--format", "csv"], capsys)
    assert code == 0, err
    table = _csv(out)
    assert len(table) == 2 and "decoder_ssim_mean" in table and "optimization_ssim_mean" not in table
    code, out, _ = run_cli(["table", str(b.out_dir), "--format", "csv"], capsys)
    assert code == 0 and "optimization_ssim_mean" in _csv(out)


def test_table_takes_output_results_and_run_folders_in_any_mix(two_grids, capsys):
    results, a, _ = two_grids
    run_dir = a.runs[0]
    for args in ([str(a.out_dir), str(run_dir)], [str(run_dir), str(results)], [str(results / "tables")]):
        code, out, err = run_cli(["table", *args, "--format", "csv"], capsys)
        assert code == 0, (args, err)
        assert len(_csv(out)) == 2 or args == [str(run_dir)]
    # a run folder given directly brings all its attacks, next to grid A's decoder-only cells
    code, out, _ = run_cli(["table", str(a.out_dir), str(run_dir), "--format", "csv"], capsys)
    table = _csv(out)
    assert table.optimization_ssim_mean.notna().sum() == 1 and table.decoder_ssim_mean.notna().sum() == 2


def test_output_folder_survives_a_move_and_reads_without_its_manifest(two_grids, tmp_path, capsys):
    results, a, _ = two_grids
    moved = tmp_path / "elsewhere" / "results"
    shutil.move(results, moved)
    out_dir = moved / "tables" / a.out_dir.name
    code, out, err = run_cli(["table", str(out_dir), "--format", "csv"], capsys)
    assert code == 0 and len(_csv(out)) == 2 and "optimization_ssim_mean" not in _csv(out), err
    (out_dir / "cells.json").unlink()  # an output folder written before cells.json existed
    code, out, err = run_cli(["table", str(out_dir), "--format", "csv"], capsys)
    assert code == 0 and len(_csv(out)) == 2 and "optimization_ssim_mean" not in _csv(out), err


def test_plot_and_api_read_the_output_folder(two_grids, tmp_path, capsys):
    _, a, _ = two_grids
    png = tmp_path / "p.png"
    code, out, err = run_cli(["plot", str(a.out_dir), str(a.runs[0]), "--out", str(png)], capsys)
    assert code == 0 and png.stat().st_size > 0, err
    df = pb.results(a.out_dir)
    assert len(df) == 2 and "decoder_ssim_mean" in df and "optimization_ssim_mean" not in df


def test_table_and_plot_name_a_path_that_is_none_of_these(two_grids, tmp_path, capsys):
    _, a, _ = two_grids
    stray = tmp_path / "notes.txt"
    stray.write_text("x")
    empty = tmp_path / "empty"
    empty.mkdir()
    for cmd in ("table", "plot"):
        for bad in (stray, empty, tmp_path / "missing"):
            code, _, err = run_cli([cmd, str(a.out_dir), str(bad), "--out", str(tmp_path / "t.png")], capsys)
            assert code == 2 and err.count("\n") == 1 and str(bad) in err and "Traceback" not in err
    assert not (tmp_path / "t.png").exists()


# ------------------------------------------------------------------ 9: run options and TOML keys


class Capture(FakeWork):
    """FakeWork that records the training configs and the attack settings it was given."""

    def __init__(self):
        super().__init__()
        self.configs, self.settings = [], []

    def train(self, cfg, results_dir, log=print):
        self.configs.append(cfg)
        return super().train(cfg, results_dir, log=log)

    def attack(self, run_dir, attacks, *, options=None, log=print, **settings):
        self.settings.append(settings | {"options": options})
        return super().attack(run_dir, attacks, options=options, log=log, **settings)


@pytest.fixture
def captured(monkeypatch):
    """`privbench run` with stand-in work: returns what reached the training and attack code."""
    work = Capture()
    real = sweep.run_grid

    def run_grid(grid, log=print, **kw):
        return real(grid, train_fn=work.train, attack_fn=work.attack, validate=False, log=log)

    monkeypatch.setattr(sweep, "run_grid", run_grid)
    return work


def test_run_options_reach_training_and_attacks(captured, tmp_path, capsys):
    args = [
        "run",
        "--defense",
        "none@plain",
        "--defense",
        "gmm-cem",
        "--defense",
        "slot-cem",
        "--attack",
        "decoder",
        "--epochs",
        "2",
        "--model",
        "vgg11",
        "--preset",
        "quick",
        "-o",
        "gmm-cem.lam=8",
        "-o",
        "warmup=0",
        "--attacker-data",
        "aux",
        "--eval-images",
        "8",
        "--results-dir",
        str(tmp_path / "r"),
    ]
    code, out, err = run_cli(args, capsys)
    assert code == 0, err
    cfgs = {c.defense: c for c in captured.configs}
    assert {c.epochs for c in cfgs.values()} == {2} and {c.model for c in cfgs.values()} == {"vgg11"}
    assert cfgs["gmm-cem"].defense_options == {"lam": 8, "warmup": 0}
    assert cfgs["slot-cem"].defense_options == {"warmup": 0}  # a bare key: every defense that has it
    assert cfgs["none"].defense_options == {}
    assert {(s["attacker_data"], s["eval_images"]) for s in captured.settings} == {("aux", 8)}


@pytest.mark.parametrize(
    "option,message",
    [
        ("lam=16", "option 'lam': no defense in the grid (none) has it"),
        ("gmm-cem.lam=16", "option 'gmm-cem.lam' names 'gmm-cem', which is not in the grid"),
        ("lam", "invalid option 'lam'"),
    ],
)
def test_run_option_no_defense_has_exits_2(option, message, tmp_path, capsys):
    code, _, err = run_cli(["run", "--defense", "none", "-o", option, "--results-dir", str(tmp_path / "r")], capsys)
    assert code == 2 and err.count("\n") == 1 and message in err
    assert not (tmp_path / "r").exists()


def test_toml_takes_the_same_keys_and_the_command_line_wins(tmp_path):
    path = tmp_path / "grid.toml"
    path.write_text(
        'defense = ["none", "gmm-cem"]\nepochs = 3\nmodel = "vgg11"\neval_images = 8\n'
        'attacker_data = "aux"\noption = ["lam=8"]\npreset = "quick"\n'
    )
    grid = grid_from_options(str(path))
    assert {c.epochs for c in grid.train_configs()} == {3}
    assert grid.attack_settings() == {"eval_images": 8, "attacker_data": "aux"}
    assert grid.defenses == {"gmm-cem": {"lam": 8}}
    grid = grid_from_options(str(path), epochs=2, eval_images=4, option=("gmm-cem.lam=4",))
    assert {c.epochs for c in grid.train_configs()} == {2} and grid.attack_settings()["eval_images"] == 4
    assert grid.defenses == {"gmm-cem": {"lam": 4}}  # -o adds to the file's list; the later pair wins


def test_toml_shortcut_and_its_table_entry_together_exit_2(tmp_path, capsys):
    path = tmp_path / "grid.toml"
    path.write_text("epochs = 3\n[train]\nepochs = 4\n")
    code, _, err = run_cli(["run", "--config", str(path), "--results-dir", str(tmp_path / "r")], capsys)
    assert code == 2 and "'epochs' is given both at the top level and in [train]" in err


def test_run_help_summarises_the_toml_schema_and_docs_describe_every_key(capsys):
    code, out, _ = run_cli(["run", "--help"], capsys)
    assert code == 0
    for word in (
        "docs/config.md",
        "[train]",
        "[attacks.<name>]",
        "[defenses.<name>]",
        "--attacker-data",
        "--eval-images",
        "--epochs",
        "--model",
        "--option",
        "--preset",
    ):
        assert word in out, word
    doc = (ROOT / "docs" / "config.md").read_text()
    for key in TOP_KEYS:
        assert (f"`[{key}" if key in ("train", "attacks", "defenses") else f"`{key}`") in doc, key


def test_docs_config_example_is_a_valid_grid(tmp_path):
    doc = (ROOT / "docs" / "config.md").read_text()
    example = re.search(r"```toml\n(.*?)```", doc, re.S).group(1)
    path = tmp_path / "example.toml"
    path.write_text(example)
    grid = grid_from_options(str(path))
    assert grid.seeds == 3 and grid.attack_settings()["attacker_data"] == "aux"
    assert {c.epochs for c in grid.train_configs()} == {20}
    assert grid.defenses["gmm-cem"] == {"lam": 16, "warmup": 2}


# ------------------------------------------------------------------ 10: output paths first


@pytest.fixture
def no_work(monkeypatch):
    """Fail the test if anything loads data or trains."""
    import privbench.engine.data
    import privbench.store.runs

    def boom(*a, **k):
        raise AssertionError("work started before the output paths were checked")

    monkeypatch.setattr(privbench.engine.data, "load_dataset", boom)
    monkeypatch.setattr(privbench.store.runs, "train_run", boom)


def test_file_as_results_dir_exits_2_at_once_and_trains_nothing(no_work, tmp_path, capsys):
    file = tmp_path / "results.txt"
    file.write_text("mine")
    t0 = time.perf_counter()
    for args in (
        ["run", "--results-dir", str(file)],
        ["run", "--results-dir", str(file / "sub")],
        ["run", "--results-dir", str(tmp_path / "r"), "--out", str(file)],
        ["train", "--results-dir", str(file)],
    ):
        code, _, err = run_cli(args, capsys)
        assert code == 2 and err.count("\n") == 1 and str(file) in err and "Traceback" not in err, (args, err)
    assert time.perf_counter() - t0 < 10
    assert file.read_text() == "mine" and not (tmp_path / "r").exists()


def test_unwritable_folder_exits_2_at_once(no_work, tmp_path, capsys, monkeypatch):
    import privbench.store.outputs

    # os.access is what the check asks; faking it works under root too, where chmod does not.
    monkeypatch.setattr(privbench.store.outputs.os, "access", lambda path, mode: Path(path) != tmp_path)
    code, _, err = run_cli(["run", "--results-dir", str(tmp_path / "r")], capsys)
    assert code == 2 and "is not writable" in err and err.count("\n") == 1


def test_table_and_plot_out_checked_before_reading(two_grids, tmp_path, capsys):
    _, a, _ = two_grids
    folder = tmp_path / "a_folder"
    folder.mkdir()
    for args in (
        ["table", str(a.out_dir), "--out", str(folder)],
        ["plot", str(a.out_dir), "--out", str(folder)],
        ["plot", str(a.out_dir), "--grid", str(folder)],
    ):
        code, _, err = run_cli(args, capsys)
        assert code == 2 and "is a folder, not a file" in err, (args, err)
    assert list(folder.iterdir()) == []


# ------------------------------------------------------------------ 12: list shows a preset


def test_list_shows_the_defaults_of_the_preset_in_force(capsys):
    for preset, other in (("quick", "paper"), ("paper", "quick")):
        code, out, _ = run_cli(["list"] + (["--preset", preset] if preset != "quick" else []), capsys)
        p = PRESETS[preset]
        assert code == 0 and f"defaults of preset {preset}" in out and f"defaults of preset {other}" not in out
        assert f"epochs {p['epochs']}," in out and f"lr {p['lr']}," in out and f"width {p['width']}," in out
        assert f"steps {p['attack_steps']} " in out and f"eval images {p['eval_images']}" in out
        decoder = next(line for line in out.splitlines() if line.strip().startswith("decoder"))
        assert f"epochs={p['attack_epochs']}," in decoder  # the attack's budget under this preset
    code, _, err = run_cli(["list", "--preset", "slow"], capsys)
    assert code == 2 and "slow" in err


# ------------------------------------------------------------------ 13: progress


def test_progress_counts_cells_with_an_eta_of_the_same_kind():
    now = [0.0]
    p = Progress({"training": 2, "attack": 4}, clock=lambda: now[0])
    assert p.start("training", "training a") == "[1/2] training a ..."
    now[0] = 10.0
    p.done("training")
    assert "ETA" not in p.start("attack", "attack x")  # no attack cell finished yet
    now[0] = 15.0
    p.done("attack")
    # one training cell of 10 s and three attack cells of 5 s left
    assert p.start("attack", "attack y") == "[2/4] attack y ... (ETA 25 s)"


def test_run_prints_cell_counts_and_a_running_count(tmp_path):
    lines = []
    grid = Grid(defense=["none@plain", "gmm-cem"], results_dir=str(tmp_path))
    work = FakeWork()
    sweep.run_grid(grid, train_fn=work.train, attack_fn=work.attack, validate=False, log=lines.append)
    assert lines[0].startswith("2 training cells, 4 attack cells")
    starts = [line for line in lines if line.startswith("[")]
    assert [s.split(" ...")[0] for s in starts] == [
        "[1/2] training none (plain) seed 0",
        "[1/4] attack decoder on none (plain) seed 0",
        "[2/4] attack optimization on none (plain) seed 0",
        "[2/2] training gmm-cem (C8 + noise 0.025) seed 0",
        "[3/4] attack decoder on gmm-cem (C8 + noise 0.025) seed 0",
        "[4/4] attack optimization on gmm-cem (C8 + noise 0.025) seed 0",
    ]
    assert "ETA" not in starts[1] and all("(ETA " in s for s in starts[2:])
    assert json.loads((grid.out_dir() / "cells.json").read_text())["runs"]  # the manifest is written


def test_real_run_says_a_repeated_warning_once(tmp_path, capsys, monkeypatch):
    import privbench.attack.harness

    monkeypatch.setattr(privbench.store.attacks, "load_lpips", lambda dev: (None, "AlexNet weights not found (test)"))
    path = tmp_path / "tiny.toml"
    path.write_text(TINY_TOML.replace('["decoder", "optimization"]', '["optimization"]'))
    code, out, err = run_cli(["run", "--config", str(path), "--results-dir", str(tmp_path / "r"), "--quiet"], capsys)
    assert code == 0, err
    assert "2 training cells, 2 attack cells" in out and "[2/2] attack optimization on none (C8 + noise 0.025)" in out
    assert out.count("lpips: missing (AlexNet weights not found (test))") == 1  # two attack cells, said once


def test_each_line_of_a_defense_log_is_printed_once(tmp_path):
    from privbench.store.runs import train_run

    cfg = tiny_config(
        n_train=128,
        batch_size=64,
        defense="slot-cem",
        bottleneck=8,
        noise=0.025,
        defense_options={"warmup": 0, "num_slots": 2, "num_iterations": 1, "hidden": 8},
    )
    lines = []
    run, _ = train_run(cfg, tmp_path, log=lines.append)
    assert sum("rob_loss=" in line for line in lines) == cfg.epochs  # once per epoch, not twice
    assert len(lines) == len(set(lines))
    assert (Path(run.path) / "log.txt").read_text().splitlines() == lines
    assert run_name(cfg) == Run.open(run.path).name
