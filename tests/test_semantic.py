"""Semantic leakage (sem_acc) and the per-metric worst case over attacks."""

import json
from pathlib import Path

import pytest
import torch
from conftest import run_cli, tiny_config

from privbench import api
from privbench.attack import semantic
from privbench.attack.harness import eval_indices, split_attacker_eval
from privbench.engine import train as training
from privbench.engine.data import to_float
from privbench.report import table_format
from privbench.store.attacks import attack_run
from privbench.store.runs import train_run

QUIET = dict(log=lambda m: None, progress=False)
TINY = {"quick": dict(width=0.125, epochs=1)}  # the classifier at a tiny budget: about a second


@pytest.fixture(autouse=True)
def _tiny_classifier(monkeypatch):
    monkeypatch.setattr(semantic, "BUDGETS", TINY)


@pytest.fixture
def count_trainings(monkeypatch):
    calls = []
    real = training.train

    def counted(*args, **kw):
        calls.append(args[0])
        return real(*args, **kw)

    monkeypatch.setattr(training, "train", counted)
    return calls


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    run, _ = train_run(tiny_config(), tmp_path_factory.mktemp("runs"), log=lambda m: None)
    return run


def test_classifier_is_cached_and_reused_and_retrained_when_damaged(tmp_path, monkeypatch, count_trainings):
    monkeypatch.setattr(semantic, "cache_dir", lambda: tmp_path)
    cfg = tiny_config()
    data = training.load_data(cfg, torch.device("cpu"))
    model, info = semantic.load_or_train(cfg, data, torch.device("cpu"), log=lambda m: None)
    assert len(count_trainings) == 1 and info["model"] == "resnet20" and info["seed"] == semantic.SEED
    trained_cfg = count_trainings[0]
    assert (trained_cfg.model, trained_cfg.defense, trained_cfg.noise) == ("resnet20", "none", 0.0)
    again, info2 = semantic.load_or_train(cfg, data, torch.device("cpu"), log=lambda m: None)
    assert len(count_trainings) == 1 and info2 == info  # the second call does not train
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    (semantic.cache_folder(semantic.classifier_config(cfg)) / "classifier.pt").write_bytes(b"not a torch file")
    lines = []
    semantic.load_or_train(cfg, data, torch.device("cpu"), log=lines.append)
    assert len(count_trainings) == 2
    assert [line for line in lines if "classifier.pt" in line and "retraining" in line and "\n" not in line], lines


def test_sem_acc_of_true_images_is_clean_accuracy_and_mean_image_is_near_chance(run):
    cfg = run.config()
    data = training.load_data(cfg, torch.device("cpu"))
    attacker, pool, _, _ = split_attacker_eval(data, "train")
    perm, _ = eval_indices(pool, attacker, 200, 0)
    eval_x = to_float(pool[perm])
    sem = semantic.prepare(cfg, data, "train", perm, eval_x, None, torch.device("cpu"), log=lambda m: None)
    assert torch.equal(sem.labels, data.test.labels[perm])
    true_scores, _ = sem.correct(eval_x)
    assert sum(true_scores) / len(true_scores) == pytest.approx(sem.record()["clean_accuracy"])
    mean_image = to_float(attacker).mean(0, keepdim=True).expand_as(eval_x)
    scores, pred = sem.correct(mean_image)
    assert len(set(pred.tolist())) == 1  # one image, one label: sem_acc is that class's share
    assert sum(scores) / len(scores) == pytest.approx(float((sem.labels == pred[0]).float().mean()))
    assert sum(scores) / len(scores) < 0.25  # 10 balanced classes: chance is 0.1


def test_sem_acc_in_metrics_json_table_and_plot(run, tmp_path, capsys):
    old = attack_run(run.path, ["optimization"], steps=2, eval_images=32, semantic=False, **QUIET)[0]
    new = attack_run(run.path, ["decoder"], epochs=1, eval_images=32, semantic=True, **QUIET)[0]
    assert "sem_acc" not in old["metrics"] and "semantic" not in old
    m = json.loads((Path(new["path"]) / "metrics.json").read_text())
    assert 0 <= m["metrics"]["sem_acc"]["mean"] <= 1 and m["metrics"]["sem_acc"]["ci95"] is not None
    assert "sem_acc" in m["baseline"] and m["semantic"]["classifier"]["model"] == "resnet20"
    clean = m["semantic"]["clean_accuracy"]
    rows = (Path(new["path"]) / "semantic.csv").read_text().splitlines()
    assert rows[0] == "index,label,predicted,correct" and len(rows) == 33
    code, out, err = run_cli(["table", str(run.path)], capsys)
    assert code == 0 and "decoder sem_acc [0,1]" in out and "clean evaluation images" in out
    assert f"{clean:.3f}" in out  # the reference line in the footnote
    cells = dict(zip(*(line.strip("|").split("|") for line in out.splitlines()[:3:2])))
    cells = {k.strip(): v.strip() for k, v in cells.items()}
    # A folder from before sem_acc (or with it off) still tabulates: its other metrics, no sem_acc column.
    assert cells["optimization SSIM [0,1]"] and "optimization sem_acc [0,1]" not in cells
    code, out, _ = run_cli(["table", str(run.path), "--privacy-metric", "sem_acc", "--format", "csv"], capsys)
    assert code == 0
    code, md, _ = run_cli(["table", str(run.path), "--privacy-metric", "sem_acc"], capsys)
    worst = [h.strip() for h in md.splitlines()[0].strip("|").split("|") if h.strip().startswith("worst case")]
    assert code == 0 and worst[0] == "worst case sem_acc [0,1]"
    png = tmp_path / "p.png"
    code, out, _ = run_cli(["plot", str(run.path), "--privacy-metric", "sem_acc", "--out", str(png)], capsys)
    assert code == 0 and png.stat().st_size > 0
    from privbench.report import plots

    table = api.results([run.path], privacy_metric="sem_acc")
    ax = plots.privacy_utility_figure(table).axes[0]
    assert "sem_acc" in ax.get_xlabel() and "clean images" in {t.get_text() for t in ax.texts}


def test_bad_privacy_metric_exits_2_with_one_line(run, capsys):
    for command in ("table", "plot"):
        code, _, err = run_cli([command, str(run.path), "--privacy-metric", "ssim2"], capsys)
        assert code == 2 and len(err.strip().splitlines()) == 1 and "privacy-metric" in err


def _fake_run(root, attacks):
    from privbench.engine.config import TrainConfig

    cfg = TrainConfig(progress=False)
    run = root / f"none-{cfg.hash()}"
    run.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"train": cfg.to_dict()}))
    (run / "metrics.json").write_text(json.dumps({"test_accuracy": 0.9, "num_classes": 10}))
    for name, values in attacks.items():
        folder = run / "attacks" / f"{name}-000000000000"
        folder.mkdir(parents=True)
        metrics = {k: {"mean": v, "ci95": 0.01, "n": 64} for k, v in values.items()}
        baseline = {k: {"mean": 0.0 if k != "mse" else 1.0, "ci95": 0.01, "n": 64} for k in values}
        body = {
            "attack": name,
            "attacker_data": "train",
            "eval_images": 64,
            "metrics": metrics,
            "baseline": baseline,
            "semantic": {"clean_accuracy": 0.875, "clean_accuracy_ci95": 0.02},
        }
        (folder / "metrics.json").write_text(json.dumps(body))


def test_worst_case_per_metric_names_the_attack(tmp_path):
    # alpha wins SSIM and LPIPS, beta wins PSNR, MSE and sem_acc: each worst case is a different attack.
    _fake_run(
        tmp_path,
        {
            "alpha": {"ssim": 0.6, "psnr": 18.0, "lpips": 0.30, "mse": 0.020, "sem_acc": 0.2},
            "beta": {"ssim": 0.5, "psnr": 22.0, "lpips": 0.40, "mse": 0.010, "sem_acc": 0.7},
        },
    )
    row = api.results([tmp_path]).iloc[0]
    picks = {m: row[f"worst_{m}_attack"] for m in ("ssim", "psnr", "lpips", "mse", "sem_acc")}
    assert picks == {"ssim": "alpha", "psnr": "beta", "lpips": "alpha", "mse": "beta", "sem_acc": "beta"}
    assert (row.worst_psnr_mean, row.worst_lpips_mean, row.worst_mse_mean) == (22.0, 0.30, 0.010)
    assert row.worst_attack == "alpha" and row.clean_sem_acc_mean == 0.875
    by_sem = api.results([tmp_path], privacy_metric="sem_acc")
    assert by_sem.worst_attack[0] == "beta" and by_sem.worst_sem_acc_mean[0] == 0.7
    md = table_format.render(by_sem, "md")
    header, _, cells = (line.strip("|").split("|") for line in md.splitlines()[:3])
    shown = {h.strip(): c.strip() for h, c in zip(header, cells)}
    assert shown["worst case sem_acc [0,1]"] == "beta 0.700 ± 0.010"
    assert shown["worst case SSIM [0,1]"] == "alpha 0.600 ± 0.010"
    assert shown["worst case MSE"] == "beta 0.0100 ± 0.0100"
    assert "0.875 ± 0.020" in md  # the reference line in the footnote
