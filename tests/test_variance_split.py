"""bench/variance_split.py: the seed x tile split, per-class accuracy, misreads, and the test tiles
by training neighbours, on tiny trained runs."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_cli, tiny_config

from privbench.engine.config import TrainConfig
from privbench.engine.data import embedded_crops
from privbench.engine.train import load_data
from privbench.store.seeds import collect_seeds, configuration_label
from privbench.util import stats

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import variance_split  # noqa: E402


def test_variance_split_of_trained_runs(tmp_path, capsys):
    from privbench.store.runs import train_run

    for seed in (0, 1):
        run, _ = train_run(tiny_config(bottleneck=8, noise=0.05, seed=seed), tmp_path, log=lambda m: None)
    label = configuration_label(json.loads((run.path / "config.json").read_text())["train"])
    out_json = tmp_path / "split.json"
    assert variance_split.main([str(tmp_path), label, "--json", str(out_json)]) == 0
    out = capsys.readouterr().out
    assert f"{label}: 2 seeds, 192 test tiles" in out and "model part sd" in out
    split = json.loads(out_json.read_text())
    tiles = [split["seeds"][s]["tiles"] for s in ("0", "1")]
    comp = stats.seed_tile_components(tiles)
    assert split["components_points2"]["interaction"] == pytest.approx(1e4 * comp["interaction"])
    # Classes hold 200 test crops each, so the mean of class accuracies is the run's accuracy.
    assert np.mean(split["seeds"]["1"]["classes"]) == pytest.approx(run.metrics()["test_accuracy"], abs=1e-6)
    # Confusion rows: each sums to 1, the diagonal is the class accuracy, the pooled row the seeds' mean.
    for s in ("0", "1"):
        conf = np.array(split["seeds"][s]["confusion"])
        assert conf.shape == (10, 10) and np.allclose(conf.sum(1), 1)
        assert np.allclose(np.diag(conf), split["seeds"][s]["classes"])
    pooled = (np.array(split["seeds"]["0"]["confusion"]) + np.array(split["seeds"]["1"]["confusion"])) / 2
    assert np.allclose(split["confusion"], pooled)
    assert "| class | read correctly (%) | most often misread as (%) |" in out
    assert f"| astronaut | {100 * pooled[0, 0]:.1f} |" in out  # embedded's first class
    # Test tiles by training neighbours: every test tile counted once, each group's mean by hand.
    cfg = run.config()
    nb = variance_split.training_neighbours(cfg, load_data(cfg, torch.device("cpu")))
    ids = sorted(nb)
    assert len(ids) == 192 and sum(r["tiles"] for r in split["by_neighbours"]) == 192
    rates = 100 * np.array(tiles)
    for row in split["by_neighbours"]:
        own = np.array([nb[t] == row["neighbours"] for t in ids])
        assert row["mean"] == pytest.approx(rates[:, own].mean())
        assert row["mean_sd"] == pytest.approx(rates[:, own].std(0, ddof=1).mean())
    assert "| training neighbours (of 4) | test tiles |" in out
    # The counts, independently: a neighbour is a training tile when a training crop of the same
    # photograph lies wholly inside the 40-px square beside the test tile.
    crops = embedded_crops(cfg.data_seed, {"train": 300, "aux": 1000, "test": 2000}, version=cfg.data_version)
    _, train_labels, train_boxes, _ = crops["train"]
    _, test_labels, test_boxes, test_tiles = crops["test"]
    for tile in ids[::7]:
        i = int(np.flatnonzero(test_tiles == tile)[0])
        x, y = test_boxes[i, 0] - test_boxes[i, 0] % 40, test_boxes[i, 1] - test_boxes[i, 1] % 40
        inside = 0
        for dx, dy in ((40, 0), (-40, 0), (0, 40), (0, -40)):
            b = train_boxes[train_labels == test_labels[i]]
            x0, y0 = x + dx, y + dy
            inside += bool(((b[:, 0] >= x0) & (b[:, 2] <= x0 + 40) & (b[:, 1] >= y0) & (b[:, 3] <= y0 + 40)).any())
        assert nb[tile] == inside
    assert variance_split.main([str(tmp_path), "none@plain"]) == 2
    assert "no configuration 'none@plain'" in capsys.readouterr().err
    assert variance_split.main([str(tmp_path / "missing"), label]) == 2


def test_a_label_two_configurations_share_is_refused_not_pooled(tmp_path, capsys):
    for data_seed in (0, 1):  # the data seed is identity but not part of the label
        for seed in (0, 1):
            run = tmp_path / f"none-d{data_seed}s{seed}"
            run.mkdir()
            train = TrainConfig(defense="none", bottleneck=8, noise=0.025, seed=seed, data_seed=data_seed).to_dict()
            (run / "config.json").write_text(json.dumps({"train": train}))
            (run / "metrics.json").write_text(json.dumps({"test_accuracy": 0.9}))
    assert len(collect_seeds(tmp_path)) == 2
    assert variance_split.main([str(tmp_path), "none@C8+0.025"]) == 2
    assert "2 configurations share the label 'none@C8+0.025'" in capsys.readouterr().err
    code, _, err = run_cli(["precision", str(tmp_path), "--summarize", "--paired-with", "none@C8+0.025"], capsys)
    assert code == 2 and "names several configurations here" in err
