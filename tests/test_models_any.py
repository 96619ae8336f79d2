"""Any model, end to end: torchvision and timm models (and a researcher's own factory) cut by
module name, trained for a tiny epoch into a run folder, attacked through the harness; every
attack on maps and tokens; every defense trained on both or refused in one line. CPU, tiny."""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from conftest import run_cli
from PIL import Image

from privbench.attack.harness import make_target
from privbench.engine.config import TrainConfig
from privbench.engine.data import load_dataset
from privbench.engine.models import build_model
from privbench.engine.train import train
from privbench.errors import UserError
from privbench.plugin import registry
from privbench.plugin.base import takes_keyword
from privbench.store.attacks import attack_run
from privbench.store.runs import Run

RESNET = "torchvision:resnet18"
VIT = "timm:vit_tiny_patch16_224"
VIT_OPTIONS = {"img_size": 32, "patch_size": 4, "depth": 2}
VIT_ARGS = [a for k, v in VIT_OPTIONS.items() for a in ("-o", f"model.{k}={v}")]
CLASSES = 3
# Two cuts each: ResNet maps [C,H,W]; ViT tokens [N,D] before the class token is added and after.
RUNS = [(RESNET, "layer1"), (RESNET, "layer3"), (VIT, "patch_embed"), (VIT, "blocks.0")]
# Attack budgets that take a fraction of a second; each attack gets the options it has.
TINY_ATTACK = {
    "epochs": 1,
    "steps": 2,
    "channels": 8,
    "blocks": 0,
    "batch_size": 16,
    "gen_batch_size": 8,
    "latent": 8,
    "width": 8,
    "decoder_batch_size": 16,
    "decoder_channels": 8,
    "decoder_blocks": 0,
}


def needs_timm(model: str) -> None:
    if model.startswith("timm:"):
        pytest.importorskip("timm")


def model_args(model: str) -> list[str]:
    return VIT_ARGS if model == VIT else []


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> str:
    """A tiny image folder: 3 classes of 16 smooth 32x32 images (13 train / 3 test each)."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:32, 0:32] / 31.0
    for c in range(CLASSES):
        (root / f"class{c}").mkdir()
        for i in range(16):
            base = [np.sin((c + 1) * 3 * xx + i), np.cos((c + 1) * 2 * yy - i), xx * yy]
            img = np.stack(base, -1) * 0.4 + 0.5 + rng.normal(0, 0.05, (32, 32, 3))
            Image.fromarray((img.clip(0, 1) * 255).astype(np.uint8)).save(root / f"class{c}" / f"{i}.png")
    return f"folder:{root}"


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("results")


def train_args(folder: str, results: Path, model: str, cut: str, *extra: str) -> list[str]:
    return [
        "train",
        "--dataset",
        folder,
        "--model",
        model,
        *model_args(model),
        "--cut",
        cut,
        "--epochs",
        "1",
        "--batch-size",
        "16",
        "--results-dir",
        str(results),
        "--quiet",
        *extra,
    ]


# ------------------------------------------------------------------ train -> run folder -> attacks


@pytest.mark.parametrize("model,cut", RUNS)
def test_tiny_training_gives_a_run_the_attacks_accept(model, cut, folder, results, capsys):
    needs_timm(model)
    code, out, err = run_cli(train_args(folder, results, model, cut), capsys)
    assert code == 0, err
    run = Run.open(out.strip().splitlines()[-1])
    cfg = run.config()
    assert (cfg.model, cfg.cut) == (model, cut) and cfg.model_options == (VIT_OPTIONS if model == VIT else {})
    assert run.metrics()["num_classes"] == CLASSES
    code, out, err = run_cli(
        [
            "attack",
            str(run.path),
            "--attack",
            "decoder",
            "--attack",
            "optimization",
            "--epochs",
            "1",
            "--steps",
            "2",
            "--eval-images",
            "4",
            "--no-semantic",
            "--quiet",
            "-o",
            "decoder.channels=8",
            "-o",
            "decoder.blocks=0",
        ],
        capsys,
    )
    assert code == 0, err
    assert "decoder" in out and "optimization" in out
    assert len([p for p in run.attack_dirs() if (p / "grid.png").is_file()]) == 2


# ------------------------------------------------------------------ every attack on maps and tokens


@pytest.fixture(scope="module")
def split_models():
    """Untrained models, built on first use: a ResNet-18 cut at layer2 with a C4 bottleneck (z a
    map) and a ViT cut at blocks.0 (z tokens with a class token)."""
    builds = {
        "map": lambda: build_model(RESNET, num_classes=CLASSES, cut="layer2", bottleneck=4, noise_std=0.01),
        "tokens": lambda: build_model(VIT, num_classes=CLASSES, cut="blocks.0", options=VIT_OPTIONS),
    }
    built = {}

    def get(kind):
        if kind not in built:
            torch.manual_seed(0)
            built[kind] = builds[kind]()
        return built[kind]

    return get


@pytest.mark.parametrize("model,kind", [(RESNET, "map"), (VIT, "tokens")])
@pytest.mark.parametrize("name", registry.names("attack"))
def test_every_attack_fits_and_reconstructs(name, model, kind, split_models):
    needs_timm(model)
    target = make_target(split_models(kind), (3, 32, 32), torch.device("cpu"))
    cls = registry.get("attack", name)
    options = {k: v for k, v in TINY_ATTACK.items() if k in registry.option_defaults(cls)}
    attack = registry.create("attack", name, options)
    attack.progress = False
    torch.manual_seed(0)
    images, labels = torch.rand(16, 3, 32, 32), torch.arange(16) % CLASSES
    if takes_keyword(attack.fit, "labels"):
        attack.fit(target, images, labels=labels)
    else:
        attack.fit(target, images)
    recon = attack.reconstruct(target.query(images[:4]))
    assert recon.shape == (4, 3, 32, 32) and torch.isfinite(recon).all()


# ------------------------------------------------------------------ every defense on maps and tokens


@pytest.fixture(scope="module")
def folder_data(folder):
    return load_dataset(folder)


@pytest.mark.parametrize("model,cut,kind", [(RESNET, "layer1", "map"), (VIT, "blocks.0", "tokens")])
@pytest.mark.parametrize("name", registry.names("defense"))
def test_every_defense_trains_or_is_refused_in_one_line(name, model, cut, kind, folder, folder_data):
    needs_timm(model)
    cfg = TrainConfig.from_preset(
        "quick",
        dataset=folder,
        model=model,
        cut=cut,
        model_options=VIT_OPTIONS if model == VIT else None,
        defense=name,
        epochs=1,
        batch_size=16,
        noise=0.01,
        device="cpu",
        progress=False,
    )
    if kind not in registry.get("defense", name).z_kinds:
        with pytest.raises(UserError, match=f"defense {name} works on .* but this model's z is {kind}") as exc:
            train(cfg, data=folder_data, log=lambda _: None)
        assert "\n" not in str(exc.value)
        return
    result = train(cfg, data=folder_data, log=lambda _: None)
    assert 0 <= result.test_accuracy <= 1 and len(result.history) == 1


def test_a_stack_that_cannot_apply_exits_2_before_training(folder, results, capsys):
    pytest.importorskip("timm")
    code, out, err = run_cli(train_args(folder, results, VIT, "blocks.0", "--defense", "dropout+prune"), capsys)
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert "defense prune works on map and vector activations" in err and "epoch" not in out


# ------------------------------------------------------------------ privbench cuts


def test_cuts_lists_every_cut_point_in_order(capsys):
    code, out, err = run_cli(["cuts", RESNET, "--image-size", "32"], capsys)
    assert code == 0, err
    lines = out.splitlines()
    assert "18 valid" in lines[0] and lines[1].split()[:4] == ["#", "cut", "z", "kind"]
    names = [line.split()[1] if line[:3].strip().isdigit() else line.split()[0] for line in lines[2:-1]]
    assert names.index("conv1") < names.index("layer1") < names.index("layer2") < names.index("fc")
    layer2 = next(line for line in lines if line.split()[1:2] == ["layer2"])
    assert "128x4x4" in layer2 and "map" in layer2 and layer2.rstrip().endswith("valid")
    crossed = next(line for line in lines if line.startswith(" " * 4) and "layer1.0.conv1" in line)
    assert "invalid: a residual or skip branch crosses it" in crossed
    code, out, _ = run_cli(["cuts", "vgg11"], capsys)
    assert code == 0 and [line.split()[0] for line in out.splitlines()[2:15]] == [str(k) for k in range(1, 14)]


def test_cuts_of_a_vit_and_bad_input(capsys):
    pytest.importorskip("timm")
    code, out, err = run_cli(["cuts", VIT, *VIT_ARGS], capsys)
    assert code == 0, err
    assert any("blocks.0" in line and "65x192" in line and "tokens" in line for line in out.splitlines())
    code, _, err = run_cli(["cuts", VIT], capsys)  # built for 224 px, listed at 32
    assert code == 2 and err.count("\n") == 1 and "it takes 224x224 px images" in err


# ------------------------------------------------------------------ a researcher's own model


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    (tmp_path / "mymodels.py").write_text(
        textwrap.dedent("""
        from torch import nn

        def build(num_classes, width=8):
            return nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.ReLU(), nn.Conv2d(width, width, 3, 2, 1),
                                 nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, num_classes))

        def not_a_model(num_classes):
            return [num_classes]
    """)
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "mymodels"
    sys.modules.pop("mymodels", None)


def test_user_factory_trains_by_module_name_and_index(user_module, folder, results, capsys):
    code, out, err = run_cli(train_args(folder, results, "mymodels:build", "1", "-o", "model.width=4"), capsys)
    assert code == 0, err
    model = Run.open(out.strip().splitlines()[-1]).load_model(load_dataset(folder))
    assert tuple(model.encoder(torch.zeros(1, 3, 32, 32)).shape) == (1, 4, 32, 32)  # module "1": the first ReLU
    code, _, err = run_cli(train_args(folder, results, "mymodels:not_a_model", "1"), capsys)
    assert code == 2 and err.count("\n") == 1 and "returned list, not a torch.nn.Module" in err


@pytest.mark.parametrize(
    "model,cut,message",
    [
        ("torchvison:resnet18", "layer1", "unknown model family or module 'torchvison'"),
        (RESNET, "layer9", "unknown cut 'layer9'"),
        (RESNET, "layer1.0.conv1", "a residual or skip branch crosses it"),
        ("resnet20", "layer1", "its cuts are numbers"),
    ],
)
def test_bad_model_input_is_one_line_before_training(model, cut, message, folder, results, capsys):
    code, out, err = run_cli(train_args(folder, results, model, cut), capsys)
    assert code == 2 and err.count("\n") == 1 and message in err and "Traceback" not in err, err
    assert "epoch=" not in out


# ------------------------------------------------------------------ --weights and --epochs 0


def test_weights_round_trip_epochs_0_and_a_mismatch(folder, results, tmp_path, capsys):
    torch.manual_seed(5)
    state = torchvision.models.resnet18(num_classes=CLASSES).state_dict()
    weights = tmp_path / "resnet18.pt"
    torch.save(state, weights)
    code, out, err = run_cli(
        train_args(folder, results, RESNET, "layer2", "--weights", str(weights), "--epochs", "0"), capsys
    )
    assert code == 0, err
    run = Run.open(out.strip().splitlines()[-1])
    saved = json.loads((run.path / "config.json").read_text())["train"]
    assert saved["weights_digest"] == hashlib.sha256(weights.read_bytes()).hexdigest() and saved["epochs"] == 0
    assert "weights" not in run.config().identity()  # the file's content is the identity, not its path
    model = run.load_model(load_dataset(folder))
    assert torch.equal(model.encoder[1].conv1.weight, state["conv1.weight"])  # evaluated as it was given
    assert 0 <= run.metrics()["test_accuracy"] <= 1 and run.metrics()["history"] == []
    copy = tmp_path / "elsewhere.pt"
    shutil.copy(weights, copy)
    code, out, _ = run_cli(
        train_args(folder, results, RESNET, "layer2", "--weights", str(copy), "--epochs", "0"), capsys
    )
    assert code == 0 and "reused finished run" in out and out.strip().splitlines()[-1] == str(run.path)
    results_ = attack_run(
        run.path,
        ["decoder"],
        epochs=1,
        eval_images=4,
        semantic=False,
        progress=False,
        options={"decoder": {"channels": 8, "blocks": 0}},
        log=lambda _: None,
    )
    assert results_[0]["metrics"]["ssim"]["mean"] == results_[0]["metrics"]["ssim"]["mean"]  # a number, not NaN
    torch.save(torchvision.models.resnet18(num_classes=5).state_dict(), tmp_path / "five.pt")
    code, out, err = run_cli(
        train_args(folder, results, RESNET, "layer2", "--weights", str(tmp_path / "five.pt")), capsys
    )
    assert code == 2 and err.count("\n") == 1 and "key 'fc.weight' has shape [5, 512]" in err and "epoch=" not in out


# ------------------------------------------------------------------ data and identity


def test_image_size_resizes_the_embedded_set():
    data = load_dataset("embedded", n_train=100, image_size=48)
    native = load_dataset("embedded", n_train=100)
    assert data.image_shape == (3, 48, 48) and data.train.images.dtype == torch.uint8
    assert len(data.train) == len(native.train) and torch.equal(data.train.labels, native.train.labels)
    mean = data.train.images.float().mean().item()
    assert abs(mean - native.train.images.float().mean().item()) < 2  # a resize keeps the brightness


def test_new_fields_at_their_defaults_keep_the_old_hashes():
    old = TrainConfig.from_preset("quick")
    assert not {"image_size", "pretrained", "model_options", "weights", "weights_digest"} & set(old.identity())
    assert TrainConfig.from_preset("quick", cut="4").hash() == old.hash()  # "4" from a command line is 4
    for changed in (dict(image_size=48), dict(epochs=0), dict(model=RESNET, cut="layer2")):
        assert TrainConfig.from_preset("quick", **changed).hash() != old.hash()
    with pytest.raises(UserError, match="not the built-in vgg11"):
        TrainConfig.from_preset("quick", model_options={"width": 8})
