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
        "fp32", "bf16", "fp32 + channels-last", "bf16 + channels-last", "bf16 + channels-last + compile default",
        "bf16 + channels-last + compile reduce-overhead",
    ]  # fmt: skip
    assert [lv.label for lv in bench.CPU_LEVERS] == ["fp32", "fp32 + compile default"]


def test_batch_scaling_milestones_scale_the_papers():
    scaling = load("batch_scaling")
    assert scaling.milestones(240) == (60, 120, 180, 210)
    assert scaling.milestones(20) == (5, 10, 15, 18)
    assert scaling.parse_pair("512:0.2") == (512, 0.2)


def test_tiny_bench_run_writes_its_report(tmp_path, capsys):
    bench = load("bench")
    out = tmp_path / "b.json"
    args = ["--device", "cpu", "--n-train", "300", "--width", "0.125", "--epochs", "3", "--defense", "none",
            "--defense", "gmm-cem", "--skip-reference", "--attack-images", "64", "--metric-images", "64",
            "--out", str(out)]  # fmt: skip
    bench.main(args)
    report = json.loads(out.read_text())
    rows = {r["what"]: r for r in report["rows"]}
    none, gmm = rows["train none [fp32]"], rows["train gmm-cem [fp32]"]
    assert none["images_per_s"] == pytest.approx(300 / none["epoch_seconds"])
    assert gmm["ratio_to_none"] == pytest.approx(gmm["epoch_seconds"] / none["epoch_seconds"])
    assert [p["what"] for p in report["paper_protocol_projection"]] == ["train none [fp32]", "train gmm-cem [fp32]"]
    assert "projected paper protocol" in capsys.readouterr().out
