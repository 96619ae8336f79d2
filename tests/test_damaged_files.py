"""Damaged and hostile files, and folder data sets that change: one-line errors, nothing run."""

import json
import os
import shutil

import pytest
import torch
from conftest import run_cli, tiny_config

from privbench.engine.config import TrainConfig
from privbench.engine.train import load_data
from privbench.errors import UserError
from privbench.store.attacks import write_combined_grid
from privbench.store.runs import Run, read_result, train_run
from privbench.util.storage import (
    read_json,
)

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
    from privbench.engine.data import image_folder

    root = tmp_path / "images"
    _image_folder(root)
    (root / "class1" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    with pytest.raises(UserError, match=r"cannot read image .*bad.png"):
        image_folder(root)


# ---------------------------------------------------------------------------------- provenance
