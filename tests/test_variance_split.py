"""`privbench precision RESULTS --split CONFIGURATION`: the seed x tile split, per-class accuracy,
misreads, and the test tiles by training neighbours, on tiny trained runs; the analysis by hand."""

import json
import math

import numpy as np
import pytest
import torch
from conftest import run_cli, tiny_config

from privbench.analysis import variance_split
from privbench.engine.config import TrainConfig
from privbench.engine.data import embedded_crops
from privbench.engine.train import load_data
from privbench.report.precision import render_split
from privbench.store.seeds import collect_seeds, configuration_label
from privbench.store.tiles import training_neighbours
from privbench.util import stats


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Two seeds of one tiny configuration: (results folder, its label, the last run)."""
    from privbench.store.runs import train_run

    folder = tmp_path_factory.mktemp("split")
    for seed in (0, 1):
        run, _ = train_run(tiny_config(bottleneck=8, noise=0.05, seed=seed), folder, log=lambda m: None)
    return folder, configuration_label(json.loads((run.path / "config.json").read_text())["train"]), run


def test_variance_split_of_trained_runs(trained, tmp_path, capsys):
    folder, label, run = trained
    out_json = tmp_path / "split.json"
    code, out, _ = run_cli(["precision", str(folder), "--split", label, "--json", str(out_json)], capsys)
    assert code == 0
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
    nb = training_neighbours(cfg, load_data(cfg, torch.device("cpu")))
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


def test_split_refuses_bad_input_in_one_line(trained, tmp_path, capsys):
    folder, label, _ = trained
    code, _, err = run_cli(["precision", str(folder), "--split", "none@plain"], capsys)
    assert code == 2 and err.count("\n") == 1
    assert f"no configuration 'none@plain' under {folder} (known: {label})" in err
    code, _, err = run_cli(["precision", str(tmp_path / "missing"), "--split", label], capsys)
    assert code == 2 and "does not exist" in err
    # It reads finished runs: options that would train or shape the table are refused, not ignored.
    code, _, err = run_cli(
        ["precision", str(folder), "--split", label, "--seeds", "3", "--resolve", "accuracy=1"], capsys
    )
    assert code == 2 and "takes no --seeds, --resolve" in err
    assert not (tmp_path / "missing").exists()


def test_a_label_two_configurations_share_is_refused_not_pooled(tmp_path, capsys):
    for data_seed in (0, 1):  # the data seed is identity but not part of the label
        for seed in (0, 1):
            run = tmp_path / f"none-d{data_seed}s{seed}"
            run.mkdir()
            train = TrainConfig(defense="none", bottleneck=8, noise=0.025, seed=seed, data_seed=data_seed).to_dict()
            (run / "config.json").write_text(json.dumps({"train": train}))
            (run / "metrics.json").write_text(json.dumps({"test_accuracy": 0.9}))
    assert len(collect_seeds(tmp_path)) == 2
    code, _, err = run_cli(["precision", str(tmp_path), "--split", "none@C8+0.025"], capsys)
    assert code == 2 and "2 configurations share the label 'none@C8+0.025'" in err
    code, _, err = run_cli(["precision", str(tmp_path), "--summarize", "--paired-with", "none@C8+0.025"], capsys)
    assert code == 2 and "names several configurations here" in err


def test_components_and_projections_by_hand():
    # Seeds x tiles [[1, 1, 1], [0, 0, 1]]: seed means 1 and 1/3, so the total variance is 2/9; the
    # residuals are +-1/6, +-1/6, +-1/3, MS_e = (1/3) / 2 = 1/6, and the model part 2/9 - 1/18 = 1/6.
    out = variance_split.components([[1.0, 1.0, 1.0], [0.0, 0.0, 1.0]])
    assert out["tiles"] == 3
    pts = out["components_points2"]
    assert pts["total"] == pytest.approx(1e4 * 2 / 9)
    assert pts["model"] == pytest.approx(1e4 / 6) and pts["interaction"] == pytest.approx(1e4 / 6)
    sds = out["sd_points"]
    assert sds["total"] == pytest.approx(100 * math.sqrt(2 / 9))
    assert sds["model"] == sds["tiles_unlimited"] == pytest.approx(100 * math.sqrt(1 / 6))
    assert sds["test_set"] == pytest.approx(100 * math.sqrt(1 / 18))
    assert sds["tiles_2x"] == pytest.approx(100 * math.sqrt(1 / 6 + 1 / 36))
    assert sds["tiles_4x"] == pytest.approx(100 * math.sqrt(1 / 6 + 1 / 72))


def test_class_sd_confusion_and_misreads_by_hand():
    assert variance_split.class_sd([[0.5, 1.0], [0.7, 1.0]]) == pytest.approx([100 * math.sqrt(0.02), 0.0])
    first = [[0.6, 0.3, 0.1], [0.0, 1.0, 0.0], [0.2, 0.2, 0.6]]
    second = [[0.8, 0.1, 0.1], [0.0, 0.9, 0.1], [0.0, 0.4, 0.6]]
    pooled = variance_split.pooled_confusion([first, second])
    assert np.allclose(pooled, [[0.7, 0.2, 0.1], [0.0, 0.95, 0.05], [0.1, 0.3, 0.6]])
    rows = variance_split.misreads(pooled, ["a", "b", "c"], top=2)
    assert [r["class"] for r in rows] == ["a", "b", "c"] and rows[1]["correct"] == pytest.approx(0.95)
    assert [n for n, _ in rows[0]["misread_as"]] == ["b", "c"]  # most first
    assert [n for n, _ in rows[2]["misread_as"]] == ["b", "a"]


def test_tiles_by_training_neighbours_by_hand():
    # Tiles 7 and 3 have one training neighbour, tile 5 none; tile 3 is a coin flip (0 and 100).
    rates = [[100.0, 0.0, 50.0], [100.0, 100.0, 50.0]]
    rows = variance_split.by_neighbours(rates, [7, 3, 5], {7: 1, 3: 1, 5: 0})
    assert rows[0] == {"neighbours": 0, "tiles": 1, "mean": 50.0, "mean_sd": 0.0, "coin_flips": 0}
    assert rows[1]["tiles"] == 2 and rows[1]["mean"] == pytest.approx(75.0)
    assert rows[1]["mean_sd"] == pytest.approx(100 / math.sqrt(2) / 2) and rows[1]["coin_flips"] == 1


def test_render_split_without_a_tile_grid():
    split = {
        "configuration": "none@plain",
        **variance_split.components([[1.0, 1.0, 1.0], [0.0, 0.0, 1.0]]),
        "classes": ["a", "b"],
        "class_sd": [14.142, 0.0],
        "confusion": [[0.6, 0.4], [0.0, 1.0]],
        "by_neighbours": None,
        "seeds": {"0": {"classes": [0.5, 1.0]}, "1": {"classes": [0.7, 1.0]}},
    }
    text = render_split(split)
    assert text.splitlines()[:3] == [
        "none@plain: 2 seeds, 3 test tiles (accuracy in points, tiles weighted equally)",
        "  seed sd 47.14: model part sd 40.82, test-set part sd 23.57",
        "  seed sd with 2x the test tiles 44.10, 4x 42.49, unlimited 40.82",
    ]
    assert "| 1 | 70.0 | 100.0 |" in text and "| sd | 14.1 | 0.0 |" in text
    assert "| a | 60.0 | b 40.0 |" in text and "| b | 100.0 |  |" in text  # a share of 0.0 is not listed
    assert "training neighbours" not in text
