"""Hardening: damaged and hostile files, broken plugins, file modes, locks, canonical option
values, folder data set fingerprints and the provenance a run records."""

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from dataclasses import asdict

import pytest
import torch
from conftest import run_cli, tiny_config

from privbench import registry
from privbench.attack import resolve_attack, write_combined_grid
from privbench.config import NON_IDENTITY, TrainConfig, config_hash
from privbench.errors import UserError
from privbench.plugins import Defense
from privbench.runs import Run, provenance, read_result, train_run
from privbench.storage import (
    atomic_write_text,
    build_dir_once,
    current_umask,
    process_start_time,
    read_json,
)
from privbench.train import load_data

# ------------------------------------------------------------------ damaged and hostile files


class _Evil:
    """A pickle that would run a shell command when loaded without weights_only."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    cfg = tiny_config(epochs=1, n_train=200)
    run, _ = train_run(cfg, tmp_path_factory.mktemp("results"), log=lambda m: None)
    return run


@pytest.fixture
def run_copy(trained_run, tmp_path):
    """A copy of the trained run that a test may damage."""
    dest = tmp_path / "results" / trained_run.name
    shutil.copytree(trained_run.path, dest)
    return Run(dest)


@pytest.mark.parametrize(
    "content, why",
    [
        (b"", "the file is empty"),
        (b'{"train": {"epochs": 1', "invalid JSON"),
        (b"[1, 2]", "holds a JSON array, expected a JSON object"),
        (b"\xff\xfe\x00", "not UTF-8"),
    ],
)
def test_read_json_damage_is_one_line_error(tmp_path, content, why):
    path = tmp_path / "metrics.json"
    path.write_bytes(content)
    with pytest.raises(UserError, match=why) as exc:
        read_json(path)
    assert str(path) in str(exc.value) and "\n" not in str(exc.value)


def test_hostile_checkpoint_is_refused_and_never_runs(run_copy, tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"model": _Evil(marker)}, run_copy.path / "checkpoint.pt")
    data = load_data(run_copy.config(), torch.device("cpu"))
    with pytest.raises(UserError, match="refused: it holds objects other than tensors"):
        run_copy.load_model(data)
    assert not marker.exists()


def test_truncated_and_wrong_checkpoints(run_copy):
    path = run_copy.path / "checkpoint.pt"
    data = load_data(run_copy.config(), torch.device("cpu"))
    good = path.read_bytes()
    path.write_bytes(good[: len(good) // 2])
    with pytest.raises(UserError, match="checkpoint.pt is damaged: not a complete torch file"):
        run_copy.load_model(data)
    path.write_bytes(b"")
    with pytest.raises(UserError, match="checkpoint.pt is damaged"):
        run_copy.load_model(data)
    torch.save([1, 2, 3], path)
    with pytest.raises(UserError, match="holds a list, expected a dict"):
        run_copy.load_model(data)
    torch.save({"model": {"w": 3}}, path)
    with pytest.raises(UserError, match="no 'model' state dict of tensors"):
        run_copy.load_model(data)
    state = torch.load(io_bytes(good), weights_only=True)
    key = next(iter(state["model"]))
    state["model"][key] = torch.zeros(7, 7)  # the wrong shape
    torch.save(state, path)
    with pytest.raises(UserError, match="does not match its config.json"):
        run_copy.load_model(data)


def io_bytes(data: bytes):
    import io

    return io.BytesIO(data)


def test_damaged_run_files(run_copy):
    conf = run_copy.path / "config.json"
    conf.write_text('{"train": {"epochs": "ten"}}')
    with pytest.raises(UserError, match=r"config.json is damaged: invalid epochs 'ten': expected int"):
        run_copy.config()
    conf.write_text('{"nothing": 1}')
    with pytest.raises(UserError, match="config.json is damaged: no 'train' object"):
        run_copy.config()
    (run_copy.path / "metrics.json").write_text('{"test_accuracy": "high"}')
    with pytest.raises(UserError, match="metrics.json is damaged: test_accuracy is 'high'"):
        run_copy.metrics()
    (run_copy.path / "provenance.json").write_text("{")
    with pytest.raises(UserError, match="provenance.json is damaged"):
        run_copy.provenance()


def test_cli_attack_on_hostile_checkpoint_exits_2(run_copy, tmp_path, capsys):
    marker = tmp_path / "pwned"
    torch.save({"model": _Evil(marker)}, run_copy.path / "checkpoint.pt")
    args = ["attack", str(run_copy.path), "--attack", "decoder", "--epochs", "1", "--eval-images", "4", "--quiet"]
    code, out, err = run_cli([*args, "--device", "cpu"], capsys)
    assert code == 2 and "checkpoint.pt refused" in err and "Traceback" not in err + out
    assert len(err.strip().splitlines()) == 1 and not marker.exists()
    assert not (run_copy.path / "attacks").exists() or not any((run_copy.path / "attacks").iterdir())


def test_damaged_attack_results(tmp_path):
    folder = tmp_path / "decoder-abc"
    folder.mkdir()
    (folder / "metrics.json").write_text('{"attack": "decoder", "metrics": {"ssim": {"mean": null}}}')
    with pytest.raises(UserError, match=r"metrics.ssim.mean is None, expected a number"):
        read_result(folder)
    good = {"attack": "decoder", "metrics": {"ssim": {"mean": 0.5}, "psnr": {"mean": 20.0}}}
    (folder / "metrics.json").write_text(json.dumps(good))
    assert read_result(folder)["attack"] == "decoder"
    marker = tmp_path / "pwned"
    torch.save(_Evil(marker), folder / "grid_images.pt")
    with pytest.raises(UserError, match="grid_images.pt refused"):
        write_combined_grid(tmp_path / "grid.png", [folder, folder])
    torch.save({"original": torch.zeros(1)}, folder / "grid_images.pt")
    with pytest.raises(UserError, match="grid_images.pt is damaged: expected the tensors"):
        write_combined_grid(tmp_path / "grid.png", [folder, folder])
    assert not marker.exists()


def test_wrong_types_in_toml_are_one_line_errors(tmp_path, capsys):
    bad = tmp_path / "grid.toml"
    bad.write_text('defense = ["none"]\n[train]\nepochs = "ten"\n')
    code, _, err = run_cli(["run", "--config", str(bad), "--results-dir", str(tmp_path / "r")], capsys)
    assert code == 2 and "invalid epochs 'ten': expected int" in err and "Traceback" not in err


# ------------------------------------------------------------------------- broken plugins


class _Dist:
    def __init__(self, name):
        self.name = name


class _EntryPoint:
    def __init__(self, name, value, dist, load):
        self.name, self.value, self.dist, self._load = name, value, _Dist(dist), load

    def load(self):
        return self._load()


def _fail():
    raise ImportError("No module named 'missing_dependency'")


class Clash(Defense):
    name = "none"


class Fine(Defense):
    name = "fine-ep"


@pytest.fixture
def fresh_registry(monkeypatch):
    """An undiscovered registry whose entry points the test decides."""
    monkeypatch.setattr(registry, "_REGISTRY", {"attack": {}, "defense": {}})
    monkeypatch.setattr(registry, "_BROKEN", {"attack": {}, "defense": {}})
    monkeypatch.setattr(registry, "_ORIGIN", {})
    monkeypatch.setattr(registry, "_WARNED", set())
    monkeypatch.setattr(registry, "_discovered", False)

    def use(eps):
        monkeypatch.setattr(registry, "entry_points", lambda group: [e for e in eps if e.group == group])

    return use


def _ep(name, group, dist, load):
    ep = _EntryPoint(name, f"{dist.replace('-', '_')}:Plugin", dist, load)
    ep.group = group
    return ep


def test_broken_entry_points_warn_once_and_the_rest_works(fresh_registry, capsys):
    fresh_registry([
        _ep("broken", "privbench.defenses", "broken-dist", _fail),
        _ep("notaplugin", "privbench.attacks", "odd-dist", lambda: dict),
        _ep("fine-ep", "privbench.defenses", "fine-dist", lambda: Fine),
    ])  # fmt: skip
    assert {"none", "gmm-cem", "fine-ep"} <= set(registry.names("defense"))
    assert "decoder" in registry.names("attack")
    err = capsys.readouterr().err
    assert err.count("warning:") == 2
    assert "broken-dist" in err and "ImportError: No module named 'missing_dependency'" in err
    assert "odd-dist" in err and "neither an Attack nor a Defense" in err
    registry.names("defense")
    assert capsys.readouterr().err == ""  # once
    with pytest.raises(UserError, match="'broken' .* from distribution broken-dist is broken"):
        registry.get("defense", "broken")
    with pytest.raises(UserError, match="distribution odd-dist"):
        registry.get("attack", "notaplugin")


def test_name_clash_says_who_wins(fresh_registry, capsys):
    fresh_registry([_ep("none", "privbench.defenses", "clash-dist", lambda: Clash)])
    assert registry.get("defense", "none").__name__ == "NoDefense"
    err = capsys.readouterr().err
    assert "NoDefense (built in), which stays in force" in err
    assert "test_hardening.Clash (distribution clash-dist) is ignored" in err


def test_plugin_file_loaded_first_does_not_displace_a_built_in(fresh_registry, tmp_path):
    fresh_registry([])
    path = tmp_path / "mine.py"
    path.write_text("from privbench.plugins import Defense\n\nclass Mine(Defense):\n    name = 'none'\n")
    with pytest.raises(UserError, match=r"NoDefense \(built in\), which stays in force; .*Mine \(file .*\) is ignored"):
        registry.load_plugin_file(path)
    assert registry.get("defense", "none").__name__ == "NoDefense"


# ---------------------------------------------------------------------------------- file modes


@pytest.fixture
def umask():
    old = os.umask(0o022)
    os.umask(old)

    def set_mask(mask):
        os.umask(mask)

    yield set_mask
    os.umask(old)


def test_written_files_follow_the_umask(tmp_path, umask):
    umask(0o022)
    assert current_umask() == 0o022 and current_umask() == 0o022  # reading it leaves it alone
    atomic_write_text(tmp_path / "a.txt", "x")
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o644
    umask(0o027)
    atomic_write_text(tmp_path / "b.txt", "x")
    assert (tmp_path / "b.txt").stat().st_mode & 0o777 == 0o640

    def build(tmp):
        atomic_write_text(tmp / "g", "1")

    umask(0o022)
    build_dir_once(tmp_path / "cell", build)
    assert (tmp_path / "cell").stat().st_mode & 0o777 == 0o755
    assert (tmp_path / "cell" / "g").stat().st_mode & 0o777 == 0o644


# ---------------------------------------------------------------------------------------- locks


def _lock(final):
    return final.parent / f".{final.name}.lock"


def _make(tmp):
    (tmp / "done").write_text("ok")


def test_lock_records_host_pid_and_start(tmp_path):
    final = tmp_path / "cell"
    seen = {}

    def build(tmp):
        seen.update(json.loads(_lock(final).read_text()))
        _make(tmp)

    assert build_dir_once(final, build)
    assert seen["host"] == socket.gethostname() and seen["pid"] == os.getpid()
    assert seen["start"] == process_start_time(os.getpid()) and isinstance(seen["start"], int)
    assert not _lock(final).exists()


def test_empty_lock_left_by_a_kill_is_stale(tmp_path):
    final = tmp_path / "cell"
    _lock(final).write_text("")
    old = time.time() - 60
    os.utime(_lock(final), (old, old))
    t0 = time.perf_counter()
    assert build_dir_once(final, _make, poll=0.05, log=lambda m: None)
    assert time.perf_counter() - t0 < 5 and (final / "done").is_file()


def test_dead_and_reused_pids_do_not_keep_a_lock(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    host = socket.gethostname()
    cases = [
        {"host": host, "pid": proc.pid, "start": 1},  # its process is gone
        # Our own pid, alive, but started at another time: the pid was reused.
        {"host": host, "pid": os.getpid(), "start": process_start_time(os.getpid()) + 1},
    ]
    for i, owner in enumerate(cases):
        final = tmp_path / f"cell{i}"
        _lock(final).write_text(json.dumps(owner))
        assert build_dir_once(final, _make, poll=0.05, log=lambda m: None)
    final = tmp_path / "legacy"
    _lock(final).write_text(str(proc.pid))  # the bare-pid format of earlier versions
    assert build_dir_once(final, _make, poll=0.05, log=lambda m: None)


@pytest.mark.parametrize("remote", [False, True])
def test_live_lock_is_honoured_and_the_wait_message_says_how_to_remove_it(tmp_path, remote):
    final = tmp_path / "cell"
    owner = {"host": "elsewhere" if remote else socket.gethostname(), "pid": os.getpid(),
             "start": process_start_time(os.getpid())}  # fmt: skip
    _lock(final).write_text(json.dumps(owner))
    messages = []
    worker = threading.Thread(target=build_dir_once, args=(final, _make), kwargs={"poll": 0.02, "log": messages.append})
    worker.start()
    time.sleep(0.5)
    assert worker.is_alive() and not final.exists()  # waits for the holder
    _lock(final).unlink()  # what the message tells the user to do
    worker.join(10)
    assert (final / "done").is_file()
    assert len(messages) == 1  # said once, not every poll
    assert str(_lock(final)) in messages[0] and f"delete {_lock(final)}" in messages[0]
    assert ("another machine" in messages[0]) == remote


# ------------------------------------------------------------------------ canonical options


def test_equal_option_values_name_the_same_run():
    def cfg(opts):
        return TrainConfig.from_preset("quick", defense="gmm-cem", defense_options=opts)

    plain = cfg({}).hash()
    assert cfg({"lam": 16}).hash() == cfg({"lam": 16.0}).hash() == cfg({"lam": "16"}).hash() == plain
    assert cfg({"clusters": 5.0, "log_entropy": "true", "estimator": "reference"}).hash() == plain
    other = cfg({"lam": 8})
    assert other.hash() != plain and other.defense_options == {"lam": 8.0}
    assert cfg({"lam": 8.0}).hash() == other.hash() and cfg({"log_entropy": "false"}).defense_options == {
        "log_entropy": False
    }


def test_configs_without_options_keep_their_hash():
    cfg = TrainConfig.from_preset("quick", defense="slot-cem", bottleneck=8, noise=0.025)
    new_fields = ("data_fingerprint", "noise_warmup")  # left out of the identity while unset / off
    identity = {k: v for k, v in asdict(cfg).items() if k not in NON_IDENTITY and k not in new_fields}
    identity["milestones"] = list(cfg.milestones)
    assert cfg.hash() == config_hash(identity)  # the identity as it was before the new fields


def test_wrong_option_types_name_option_value_and_type(capsys):
    with pytest.raises(UserError, match="option clusters of defense gmm-cem expects an integer, got 2.5"):
        TrainConfig.from_preset("quick", defense="gmm-cem", defense_options={"clusters": 2.5})
    with pytest.raises(UserError, match="option log_entropy of defense gmm-cem expects true or false, got 'maybe'"):
        TrainConfig.from_preset("quick", defense="gmm-cem", defense_options={"log_entropy": "maybe"})
    code, _, err = run_cli(["train", "--defense", "gmm-cem", "-o", "lam=abc"], capsys)
    assert code == 2 and err.strip() == "error: option lam of defense gmm-cem expects a float, got 'abc'"


def test_attack_options_are_canonical_too():
    budget = {"epochs": 3, "steps": 5}
    _, a = resolve_attack("decoder", {"epochs": 2.0, "lr": 1}, budget, progress=False)
    _, b = resolve_attack("decoder", {"epochs": 2, "lr": 1.0}, budget, progress=False)
    assert a == b and type(a["epochs"]) is int and type(a["lr"]) is float
    with pytest.raises(UserError, match="option steps of attack optimization expects an integer, got 'many'"):
        resolve_attack("optimization", {"steps": "many"}, budget, progress=False)


# ------------------------------------------------------------------- folder data fingerprint


def _image_folder(root, per_class=3):
    from PIL import Image

    for c, colour in enumerate(("red", "blue")):
        (root / f"class{c}").mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.new("RGB", (8, 8), colour).save(root / f"class{c}" / f"{i}.png")


def test_changing_a_folder_data_set_changes_the_run(tmp_path):
    root = tmp_path / "images"
    _image_folder(root)
    first = TrainConfig.from_preset("quick", dataset=f"folder:{root}")
    assert first.data_fingerprint and first.hash() == TrainConfig.from_preset("quick", dataset=f"folder:{root}").hash()
    from PIL import Image

    Image.new("RGB", (8, 8), "green").save(root / "class0" / "new.png")
    second = TrainConfig.from_preset("quick", dataset=f"folder:{root}")
    assert second.data_fingerprint != first.data_fingerprint and second.hash() != first.hash()
    assert "data_fingerprint" not in TrainConfig.from_preset("quick").identity()
    # A run trained on the old images refuses to be attacked with the new ones.
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.json").write_text(json.dumps({"train": first.to_dict()}))
    assert Run(run_dir).config() == first
    with pytest.raises(UserError, match="changed since run run was trained"):
        Run(run_dir).check_data()


def test_damaged_image_is_one_line_error(tmp_path):
    from privbench.data import image_folder

    root = tmp_path / "images"
    _image_folder(root)
    (root / "class1" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    with pytest.raises(UserError, match=r"cannot read image .*bad.png"):
        image_folder(root)


# ---------------------------------------------------------------------------------- provenance


def test_provenance_records_threads_determinism_cpus_platform(trained_run):
    prov = trained_run.provenance()
    assert prov["num_threads"] == torch.get_num_threads() and prov["cpu_count"] == os.cpu_count()
    assert prov["deterministic"] is torch.are_deterministic_algorithms_enabled()
    assert isinstance(prov["platform"], str) and prov["platform"]
    assert provenance("cpu", 0).keys() >= {"num_threads", "deterministic", "cpu_count", "platform"}
