"""The benchmark scripts stay runnable: a tiny end-to-end run, and their arithmetic by hand."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).parent.parent / "bench"


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def test_paper_protocol_projection_by_hand():
    bench = load("bench")
    rows = [{"what": "decoder training, reference net, 2 epochs", "images_per_s": 25_000.0}]
    train_rows = [{"what": "train none", "images_per_s": 40_000.0}]
    (p,) = bench.project_paper_protocol(None, train_rows, rows)
    # 240 x 50,000 / 40,000 = 300 s = 5 min; 50 x 50,000 / 25,000 = 100 s = 1 2/3 min.
    assert p["train_minutes"] == pytest.approx(5.0) and p["decoder_minutes"] == pytest.approx(100 / 60)
    assert p["minutes"] == pytest.approx(5.0 + 100 / 60)
    assert bench.project_paper_protocol(None, train_rows, []) == []  # no decoder figure, no projection


def test_lever_labels_and_settings():
    bench = load("bench")
    assert [lv.label for lv in bench.CUDA_LEVERS] == [
        "fp32",
        "bf16",
        "fp32 + channels-last",
        "bf16 + channels-last",
        "bf16 + channels-last + compile default",
        "bf16 + channels-last + compile reduce-overhead",
    ]
    assert [lv.label for lv in bench.CPU_LEVERS] == ["fp32", "fp32 + compile default"]


def test_batch_scaling_milestones_scale_the_papers():
    scaling = load("batch_scaling")
    assert scaling.milestones(240) == (60, 120, 180, 210)
    assert scaling.milestones(20) == (5, 10, 15, 18)
    assert scaling.parse_pair("512:0.2") == (512, 0.2)


def test_tiny_bench_run_writes_its_report(tmp_path, capsys):
    bench = load("bench")
    out = tmp_path / "b.json"
    args = [
        "--device",
        "cpu",
        "--n-train",
        "300",
        "--width",
        "0.125",
        "--epochs",
        "3",
        "--defense",
        "none",
        "--defense",
        "gmm-cem",
        "--skip-reference",
        "--attack-images",
        "64",
        "--metric-images",
        "64",
        "--out",
        str(out),
    ]
    bench.main(args)
    report = json.loads(out.read_text())
    rows = {r["what"]: r for r in report["rows"]}
    none, gmm = rows["train none [fp32]"], rows["train gmm-cem [fp32]"]
    assert none["images_per_s"] == pytest.approx(300 / none["epoch_seconds"])
    assert gmm["ratio_to_none"] == pytest.approx(gmm["epoch_seconds"] / none["epoch_seconds"])
    assert [p["what"] for p in report["paper_protocol_projection"]] == ["train none [fp32]", "train gmm-cem [fp32]"]
    assert "projected paper protocol" in capsys.readouterr().out


def test_lever_screen_augment_plan_and_summary(tmp_path):
    import torch

    from privbench.engine.data import augment

    screen = load("lever_screen")
    x = torch.randint(1, 256, (16, 3, 32, 32), dtype=torch.uint8)
    _, mode, pad = screen.ARMS["preset"]
    same = augment(x, generator=torch.Generator().manual_seed(3), pad=pad, mode=mode)
    assert torch.equal(same, augment(x, generator=torch.Generator().manual_seed(3)))  # the preset arm is the library's
    reflected = augment(x, generator=torch.Generator().manual_seed(3), mode="reflect")
    assert reflected.dtype == torch.uint8 and reflected.shape == x.shape
    assert (reflected > 0).all() and (same == 0).any()  # reflection adds no black border
    plan = screen.parse_plan(["0.1=preset,ep40", "0.025=preset"])
    assert screen.tasks(plan, range(2)) == [
        (0.1, "preset", 0),
        (0.1, "ep40", 0),
        (0.025, "preset", 0),
        (0.1, "preset", 1),
        (0.1, "ep40", 1),
        (0.025, "preset", 1),
    ]
    with pytest.raises(SystemExit, match="unknown-arm|expected NOISE=ARM"):
        screen.parse_plan(["0.1=unknown-arm"])
    rows = [
        {"noise": 0.1, "arm": "preset", "seed": s, "acc": a, "seconds": 10.0, "tile_rates": t}
        for s, a, t in ((0, 90.0, [0.8, 1.0]), (1, 92.0, [0.9, 0.94]), (2, 94.0, [1.0, 0.88]))
    ]
    rows.append({"noise": 0.1, "arm": "ramp20", "seed": 0, "acc": 91.0, "seconds": 10.0})
    path = tmp_path / "screen.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    table = screen.summary([path])
    assert "| 0.1 | preset | 0-2 (n=3) | 92.00 | 2.00 | 1.04..12.57 |" in table  # sd 2, chi-square interval
    assert "| 0.1 | ramp20 | 0-0 (n=1) | 91.00 | n/a | n/a |" in table  # one seed has no spread


def test_lever_screen_trains_one_task(monkeypatch):
    import privbench.engine.train as T

    screen = load("lever_screen")
    monkeypatch.setattr(T, "augment", T.augment)  # the task swaps it in its own process; restore it here
    monkeypatch.setattr(screen, "register_candidates", lambda: None)
    row = screen.train_task((0.1, "reflect4", 0), epochs=1)
    assert row["arm"] == "reflect4" and row["seed"] == 0 and 0 < row["acc"] <= 100
    # the test split has equally many crops per class: the class accuracies average to the accuracy
    assert sum(row["per_class"]) / len(row["per_class"]) == pytest.approx(row["acc"], abs=1e-3)
    assert len(row["tile_rates"]) == 192 and 0 < row["train_acc"] <= 1
