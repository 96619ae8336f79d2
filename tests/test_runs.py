import json
import multiprocessing as mp
import os
import subprocess
import sys
import time

import pytest
import torch
from conftest import tiny_config

from privbench.engine.diagnostics import read_curves_csv, reconstruction_bound
from privbench.engine.train import load_data, pick_device
from privbench.errors import UserError
from privbench.store.runs import Run, provenance, run_name, train_run
from privbench.util.storage import atomic_write_text, build_dir_once, load_checkpoint


def test_run_folder_round_trip(tmp_path):
    cfg = tiny_config(bottleneck=8, noise=0.05, seed=3)
    run, trained = train_run(cfg, tmp_path, log=lambda m: None)
    assert trained and run.path == tmp_path / run_name(cfg)
    assert sorted(p.name for p in run.path.iterdir()) == [
        "checkpoint.pt",
        "config.json",
        "curves.csv",
        "log.txt",
        "metrics.json",
        "provenance.json",
    ]
    assert run.config() == cfg
    prov = run.provenance()
    assert prov["seed"] == 3 and prov["torch_version"] == torch.__version__
    assert prov["device"] == pick_device(cfg.device).type
    assert prov["start_time"] <= prov["end_time"]
    metrics = run.metrics()
    assert 0 <= metrics["test_accuracy"] <= 1 and len(metrics["history"]) == 1
    assert "test_accuracy=" in (run.path / "log.txt").read_text()
    # Diagnostics: one curves row per epoch with z's spread; Eq. 3's bound from the k-means estimate.
    curves = read_curves_csv(run.path / "curves.csv")
    assert list(curves["epoch"]) == [1] and curves["z_total_var"][0] >= curves["z_intra_class_var"][0] > 0
    assert (run.path / "curves.csv").stat().st_mode & 0o777 == 0o644
    bound = metrics["entropy_bound"]
    assert bound["estimator"].startswith("k-means") and bound["noise_std"] == 0.05 and bound["dim"] == 3 * 32 * 32
    assert bound["mse_bound"] == pytest.approx(reconstruction_bound(bound["h_x_given_z"], bound["dim"]))
    # The checkpoint is plain tensors: it loads with weights_only=True and rebuilds the model.
    state = torch.load(run.path / "checkpoint.pt", weights_only=True)
    model = run.load_model(load_data(cfg, torch.device("cpu")))
    assert all(torch.equal(state["model"][k], v) for k, v in model.state_dict().items())
    # Same configuration again: reused, not retrained.
    again, trained = train_run(cfg, tmp_path, log=lambda m: None)
    assert not trained and again.path == run.path
    assert not list(tmp_path.glob(".*"))  # no temp folder or lock left behind


def test_checkpoint_config_mismatch(tmp_path):
    cfg = tiny_config()
    run, _ = train_run(cfg, tmp_path, log=lambda m: None)
    conf = json.loads((run.path / "config.json").read_text())
    conf["train"]["bottleneck"] = 4
    (run.path / "config.json").write_text(json.dumps(conf))
    with pytest.raises(UserError, match="does not match its config.json"):
        run.load_model(load_data(cfg, torch.device("cpu")))


def test_not_a_run(tmp_path):
    with pytest.raises(UserError, match="not a privbench run folder"):
        Run.open(tmp_path)
    with pytest.raises(UserError, match="no such folder"):
        Run.open(tmp_path / "missing")


def test_atomic_write_keeps_old_file_on_failure(tmp_path, monkeypatch):
    target = tmp_path / "a.txt"
    atomic_write_text(target, "old")

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr("os.replace", boom)
    with pytest.raises(OSError):
        atomic_write_text(target, "new")
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def _build_slowly(final, counter):
    def build(tmp):
        with open(counter, "a") as f:
            f.write("x")
        time.sleep(0.5)
        (tmp / "done").write_text("ok")

    build_dir_once(final, build, poll=0.05)


def test_two_processes_build_once(tmp_path):
    final, counter = tmp_path / "cell", tmp_path / "counter"
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_build_slowly, args=(final, counter)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
    assert counter.read_text() == "x" and (final / "done").read_text() == "ok"


def test_interrupted_build_leaves_no_folder(tmp_path):
    def fail(tmp):
        (tmp / "half").write_text("...")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        build_dir_once(tmp_path / "cell", fail)
    assert list(tmp_path.iterdir()) == []
    assert build_dir_once(tmp_path / "cell", lambda tmp: (tmp / "ok").write_text("1"))


def test_tensor_bytes_writes_detached_cpu_tensors_that_load_with_weights_only(tmp_path):
    from privbench.util.storage import tensor_bytes

    w = torch.ones(2, requires_grad=True) * 3
    blob = {"a": w, "nested": {"b": [torch.zeros(1), (torch.arange(3), 7)]}, "note": "x"}
    (tmp_path / "t.pt").write_bytes(tensor_bytes(blob))
    back = load_checkpoint(tmp_path / "t.pt")
    assert torch.equal(back["a"], torch.full((2,), 3.0)) and not back["a"].requires_grad
    assert back["a"].device.type == "cpu" and back["note"] == "x"
    assert torch.equal(back["nested"]["b"][1][0], torch.arange(3)) and back["nested"]["b"][1][1] == 7


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    run, _ = train_run(tiny_config(epochs=1, n_train=200), tmp_path_factory.mktemp("prov"), log=lambda _: None)
    return run


def test_provenance_records_threads_determinism_cpus_platform(trained_run):
    prov = trained_run.provenance()
    assert prov["num_threads"] == torch.get_num_threads() and prov["cpu_count"] == os.cpu_count()
    assert prov["deterministic"] is torch.are_deterministic_algorithms_enabled()
    assert isinstance(prov["platform"], str) and prov["platform"]
    assert provenance("cpu", 0).keys() >= {"num_threads", "deterministic", "cpu_count", "platform", "omp_wait_policy"}
    assert prov["omp_wait_policy"] == os.environ["OMP_WAIT_POLICY"]


@pytest.mark.parametrize("given,expect", [(None, "PASSIVE"), ("ACTIVE", "ACTIVE")])
def test_privbench_chooses_a_passive_wait_policy_unless_the_user_chose_one(given, expect):
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    env |= {"OMP_WAIT_POLICY": given} if given else {}
    code = "import privbench, os; print(os.environ['OMP_WAIT_POLICY'], privbench.WAIT_POLICY_GIVEN)"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.split() == [expect, str(given is not None)]
