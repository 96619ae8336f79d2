import csv
import json
import re
from pathlib import Path

import pytest
import torch
from conftest import run_cli
from PIL import Image

from privbench.attack.harness import (
    check_disjoint,
    folder_key,
    make_target,
    pick_eval,
    resolve_attack,
    split_attacker_eval,
)
from privbench.attack.metrics import ssim
from privbench.cli.commands import attack_options
from privbench.engine.config import config_hash
from privbench.engine.data import Dataset, Split, load_dataset, to_float
from privbench.engine.inverse import InverseNet
from privbench.engine.models import vgg11
from privbench.errors import UserError
from privbench.plugin import registry
from privbench.store.attacks import attack_run
from privbench.store.runs import train_run

# (imported by name: ruff's import sorter takes the package-dir mapped folder for a third party)

ROOT = Path(__file__).resolve().parents[1]
TINY_DECODER = {"channels": 8, "blocks": 1, "batch_size": 64}


@pytest.fixture(scope="module")
def images():
    """Real 32x32 crops (embedded data set): attacker images and disjoint evaluation images."""
    data = load_dataset("embedded", n_train=300)
    spread = torch.arange(24) * (len(data.test) // 24)  # the test split is ordered by class: take all classes
    return to_float(data.train.images[:256]), to_float(data.test.images[spread])


def shallow_target(noise_std: float = 0.0, cut: int = 1, bottleneck=None) -> torch.Tensor:
    torch.manual_seed(0)
    model = vgg11(cut=cut, bottleneck=bottleneck, width=0.125, noise_std=noise_std)
    return make_target(model, (3, 32, 32), torch.device("cpu"))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from privbench.engine.config import TrainConfig

    cfg = TrainConfig.from_preset("quick", epochs=1, n_train=300, width=0.125, progress=False, bottleneck=8)
    run, _ = train_run(cfg, tmp_path_factory.mktemp("runs"), log=lambda m: None)
    return run


# --------------------------------------------------------------------------- decoder shape


@pytest.mark.parametrize(
    "z_shape,image_shape",
    [
        ((8, 8, 8), (3, 32, 32)),  # reference C8 at cut 4
        ((64, 1, 1), (3, 32, 32)),  # deepest VGG cut
        ((16, 32, 32), (3, 32, 32)),  # cut 1: no upsampling
        ((4, 12, 12), (3, 32, 32)),  # ratio not a power of two
        ((8, 8, 8), (3, 64, 64)),  # 64px images
        ((8, 40, 40), (3, 32, 32)),  # z larger than the image
        ((512,), (3, 32, 32)),  # flat activation
    ],
)
def test_inverse_net_output_has_the_image_shape(z_shape, image_shape):
    net = InverseNet(z_shape, image_shape, channels=8, blocks=1).eval()
    out = net(torch.rand(2, *z_shape))
    assert out.shape == (2, *image_shape)
    assert out.min() >= 0 and out.max() <= 1


def test_inverse_net_reference_architecture():
    net = InverseNet((8, 8, 8), (3, 32, 32), channels=64, blocks=8)
    ups = [m for m in net.modules() if isinstance(m, torch.nn.ConvTranspose2d)]
    assert len(ups) == 2 and all(m.stride == (2, 2) and m.out_channels == 64 for m in ups)
    assert not net.needs_resize
    assert len([m for m in net.body if type(m).__name__ == "ResBlock"]) == 9  # in-block + 8


@pytest.mark.parametrize("cut,bottleneck", [(1, None), (2, None), (4, 8), (6, None), (13, 4)])
def test_decoder_fits_every_cut(cut, bottleneck, images):
    target = shallow_target(cut=cut, bottleneck=bottleneck)
    attack = registry.create("attack", "decoder", {"epochs": 1, **TINY_DECODER})
    attack.progress = False
    attack.fit(target, images[0][:64])
    out = attack.reconstruct(target.query(images[1]))
    assert out.shape == images[1].shape and out.min() >= 0 and out.max() <= 1


def test_decoder_queries_fresh_noise_every_epoch(images):
    target = shallow_target(noise_std=0.1)
    seen = []
    real_query = target.query

    def spy(x, batch_size=512):
        z = real_query(x, batch_size)
        seen.append((x[:1].clone(), z[:1] - target.encoder(x[:1])))
        return z

    target.query = spy
    attack = registry.create("attack", "decoder", {"epochs": 3, **TINY_DECODER})
    attack.progress = False
    attack.fit(target, images[0][:128])
    assert len(seen) == 3 * 2  # every batch of every epoch is queried anew
    assert all(noise.abs().mean() > 0.05 for _, noise in seen)  # noise is applied
    assert len({tuple(n.flatten()[:4].tolist()) for _, n in seen}) == 6  # and fresh each time
    assert len(attack.history) == 3


# ---------------------------------------------------------------- every registered attack


@pytest.mark.parametrize("name", registry.names("attack"))
def test_attack_contract(name, images):
    """Any registered attack returns images of the input shape in [0,1] (registering enrols)."""
    target = shallow_target(noise_std=0.05, cut=4, bottleneck=8)
    attack = registry.create("attack", name, {"epochs": 1, "steps": 3}, strict=False)
    attack.progress = False
    attack.fit(target, images[0][:64])
    out = attack.reconstruct(target.query(images[1][:5]))
    assert out.shape == (5, 3, 32, 32) and out.min() >= 0 and out.max() <= 1


# ------------------------------------------------------------------- leakage and noise


def test_shallow_encoder_is_inverted_far_above_baseline(images):
    attacker, evals = images
    target = shallow_target()
    baseline = ssim(attacker.mean(0, keepdim=True).expand_as(evals), evals).mean().item()
    opt = registry.create("attack", "optimization", {"steps": 100})
    opt.progress = False
    opt.fit(target, attacker)
    got_opt = ssim(opt.reconstruct(target.query(evals)), evals).mean().item()
    dec = registry.create("attack", "decoder", {"epochs": 8, **TINY_DECODER, "batch_size": 32})
    dec.progress = False
    dec.fit(target, attacker)
    got_dec = ssim(dec.reconstruct(target.query(evals)), evals).mean().item()
    assert got_opt > 0.75 and got_opt > baseline + 0.3  # embedded v3, all classes: see the decoder line
    assert got_dec > baseline + 0.1  # measured on embedded v3: 0.55 after 8 tiny epochs vs baseline 0.40


def test_reconstruction_degrades_as_noise_grows(images):
    attacker, evals = images
    scores = []
    for noise in (0.0, 0.5, 2.0):
        target = shallow_target(noise_std=noise)
        opt = registry.create("attack", "optimization", {"steps": 60})
        opt.progress = False
        opt.fit(target, attacker)
        torch.manual_seed(1)
        scores.append(ssim(opt.reconstruct(target.query(evals)), evals).mean().item())
    assert scores[0] > scores[1] + 0.05 > scores[2] + 0.1, scores


# ------------------------------------------------------------------- attacker data


def test_overlap_check_refuses_shared_images():
    a = torch.randint(0, 256, (10, 3, 8, 8), dtype=torch.uint8)
    b = torch.randint(0, 256, (5, 3, 8, 8), dtype=torch.uint8)
    check_disjoint(a, b)
    with pytest.raises(UserError, match="1 evaluation image"):
        check_disjoint(a, torch.cat([b, a[3:4]]))


def test_eval_pool_drops_duplicates_and_is_seeded():
    a = torch.randint(0, 256, (10, 3, 8, 8), dtype=torch.uint8)
    pool = torch.cat([torch.randint(0, 256, (20, 3, 8, 8), dtype=torch.uint8), a[:2]])
    chosen, dropped = pick_eval(pool, a, 100, seed=0)
    assert dropped == 2 and len(chosen) == 20
    first, _ = pick_eval(pool, a, 5, seed=3)
    again, _ = pick_eval(pool, a, 5, seed=3)
    other, _ = pick_eval(pool, a, 5, seed=4)
    assert torch.equal(first, again) and not torch.equal(first, other)
    with pytest.raises(UserError, match="evaluation images"):
        pick_eval(pool, a, 0, seed=0)


def test_aux_without_aux_split_uses_disjoint_test_halves():
    imgs = torch.randint(0, 256, (9, 3, 8, 8), dtype=torch.uint8)
    split = Split(imgs, torch.zeros(9, dtype=torch.long))
    data = Dataset("x", ["a"], split, Split(imgs[:7], torch.zeros(7, dtype=torch.long)))
    attacker, pool, a_name, e_name = split_attacker_eval(data, "aux")
    assert torch.equal(attacker, imgs[:3]) and torch.equal(pool, imgs[3:7])
    assert (a_name, e_name) == ("test[:half]", "test[half:]")
    attacker, pool, a_name, _ = split_attacker_eval(data, "train")
    assert a_name == "train" and len(attacker) == 9
    with pytest.raises(UserError, match="train or aux"):
        split_attacker_eval(data, "test")


def test_attack_options_per_attack():
    both = ["decoder", "optimization"]
    assert attack_options(("decoder.epochs=3", "optimization.tv-weight=0.1"), both) == {
        "decoder": {"epochs": 3},
        "optimization": {"tv_weight": 0.1},
    }
    assert attack_options(("steps=3",), ["optimization"]) == {"optimization": {"steps": 3}}
    with pytest.raises(UserError, match="ambiguous"):
        attack_options(("steps=3",), both)
    with pytest.raises(UserError, match="names 'ridge', which is not in the attacks run"):
        attack_options(("ridge.x=3",), ["decoder"])


# ------------------------------------------------------------------ harness and CLI


def parse_table(out: str) -> dict[str, list[float]]:
    """attack -> [ssim, psnr, mse] means as printed; baselines under '<attack>/baseline'."""
    rows, last = {}, None
    for line in out.splitlines():
        m = re.match(r"^(\s*)(\S.*?)\s+([-\d.]+) ± \S+\s+([-\d.]+) ± \S+\s+([-\d.]+) ± \S+\s+(missing|[-\d.]+)", line)
        if m:
            name = f"{last}/baseline" if m.group(1) else m.group(2)
            last = last if m.group(1) else m.group(2)
            rows[name] = [float(m.group(i)) for i in (3, 4, 5)]
    return rows


def test_cli_attack_writes_results_and_prints_them(tiny_run, capsys):
    # Runs first in this file: the run's attacks/ folder holds only what this call writes.
    args = [
        "attack",
        str(tiny_run.path),
        "--attack",
        "decoder",
        "--attack",
        "optimization",
        "--epochs",
        "1",
        "--steps",
        "5",
        "--eval-images",
        "20",
        "-o",
        "decoder.channels=8",
        "-o",
        "decoder.blocks=1",
        "--quiet",
    ]
    code, out, err = run_cli(args, capsys)
    assert code == 0, err
    table = parse_table(out)
    folders = sorted((tiny_run.path / "attacks").glob("*-*"))
    assert [f.name.split("-")[0] for f in folders] == ["decoder", "optimization"]
    for folder in folders:
        result = json.loads((folder / "metrics.json").read_text())
        name = result["attack"]
        assert result["attacker_data"] == "train" and result["attacker_images"] == 300
        assert result["eval_images"] == 20 and result["eval_split"] == "test" and result["run"] == tiny_run.name
        assert "white-box" in result["threat_model"] and "train split" in result["threat_model"]
        assert "missing" in result["metrics"]["lpips"] or result["metrics"]["lpips"]["n"] == 20
        assert result["options"]["epochs" if name == "decoder" else "steps"] == (1 if name == "decoder" else 5)
        printed = [round(result["metrics"][m]["mean"], d) for m, d in (("ssim", 4), ("psnr", 2), ("mse", 5))]
        assert table[name] == pytest.approx(printed, abs=1e-9)
        base = [round(result["baseline"][m]["mean"], d) for m, d in (("ssim", 4), ("psnr", 2), ("mse", 5))]
        assert table[f"{name}/baseline"] == pytest.approx(base, abs=1e-9)
        with open(folder / "per_image.csv") as f:
            rows = list(csv.DictReader(f))
        assert len(rows) == 20 and list(rows[0]) == ["index", "ssim", "psnr", "mse", "lpips"]
        mean_ssim = sum(float(r["ssim"]) for r in rows) / 20
        assert mean_ssim == pytest.approx(result["metrics"]["ssim"]["mean"])
        with Image.open(folder / "grid.png") as im:
            assert im.format == "PNG" and im.height == 2 * (2 + 2 * 34)  # two rows of 32px, 2px gaps, x2
    with Image.open(tiny_run.path / "attacks" / "grid.png") as im:
        assert im.height == 2 * (2 + 4 * 34)  # originals, two attacks, mean image
    # The same request again reuses the finished folders.
    code, out2, _ = run_cli(args, capsys)
    assert code == 0 and out2.count("reusing finished") == 2 and parse_table(out2) == table


def test_attacker_data_aux_is_recorded(tiny_run):
    (result,) = attack_run(
        tiny_run.path, ["optimization"], attacker_data="aux", steps=2, eval_images=8, progress=False, log=lambda m: None
    )
    assert result["attacker_data"] == "aux" and result["attacker_split"] == "aux"
    assert result["attacker_images"] == 1000 and "aux split" in result["threat_model"]


def test_docs_example_is_the_tested_plugin_and_runs_in_the_harness(tiny_run):
    doc = (ROOT / "docs" / "plugins.md").read_text()
    code = re.search(r"```python\n(\"\"\"Ridge inversion.*?)```", doc, re.S).group(1)
    example = ROOT / "tests" / "example_attack.py"
    assert code == example.read_text()
    assert len(code.splitlines()) <= 45
    (cls,) = registry.load_plugin_file(example)
    assert registry.get("attack", "ridge") is cls
    (result,) = attack_run(tiny_run.path, ["ridge"], eval_images=64, progress=False, log=lambda m: None)
    m, b = result["metrics"], result["baseline"]
    assert result["options"] == {"ridge": 0.01}
    assert m["mse"]["mean"] < b["mse"]["mean"]  # a linear map already leaks more than the mean image
    assert (Path(result["path"]) / "grid.png").is_file()


def test_readme_attack_runs_as_a_plugin_through_the_command_line(tiny_run, tmp_path, capsys):
    readme = (ROOT / "README.md").read_text()
    code = re.search(r"```python\n(import torch\nfrom privbench.plugins import Attack, Target\n.*?)```", readme, re.S)
    plugin = tmp_path / "my_attack.py"
    plugin.write_text(code.group(1))
    args = ["attack", str(tiny_run.path), "--plugin", str(plugin), "--attack", "nearest", "--eval-images", "32"]
    exit_code, out, err = run_cli(args, capsys)
    assert exit_code == 0, err
    folder = next(tiny_run.path.glob("attacks/nearest-*"))
    result = json.loads((folder / "metrics.json").read_text())
    assert result["metrics"]["mse"]["mean"] < result["baseline"]["mse"]["mean"]  # it beats the mean image


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--attack", "nope"], "unknown attack 'nope'"),
        (["--attack", "decoder", "-o", "decoder.depth=3"], "has no option 'depth'"),
        (["--attacker-data", "test"], "Invalid value for '--attacker-data'"),
        (["--eval-images", "0"], "invalid number of evaluation images"),
    ],
)
def test_cli_bad_input_exit_2(extra, message, tiny_run, capsys):
    before = sorted(p.name for p in (tiny_run.path / "attacks").glob("*"))
    code, _, err = run_cli(["attack", str(tiny_run.path), "--steps", "1", "--epochs", "1", *extra], capsys)
    assert code == 2 and err.count("\n") == 1 and message in err and "Traceback" not in err
    after = sorted(p.name for p in (tiny_run.path / "attacks").glob("*"))
    assert after == before  # nothing written


def test_cli_not_a_run_and_mismatched_checkpoint(tiny_run, tmp_path, capsys):
    code, _, err = run_cli(["attack", str(tmp_path)], capsys)
    assert code == 2 and "is not a privbench run folder" in err and err.count("\n") == 1
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_run.path, broken, ignore=shutil.ignore_patterns("attacks"))
    cfg = json.loads((broken / "config.json").read_text())
    cfg["train"]["width"] = 0.25
    (broken / "config.json").write_text(json.dumps(cfg))
    code, _, err = run_cli(["attack", str(broken), "--attack", "optimization"], capsys)
    assert code == 2 and "does not match its config.json" in err and err.count("\n") == 1


def test_decoder_ensemble_averages_its_members(images):
    target = shallow_target(noise_std=0.1)
    attack = registry.create("attack", "decoder", {"epochs": 1, "ensemble": 3, **TINY_DECODER})
    attack.progress = False
    attack.fit(target, images[0][:64])
    assert len(attack.nets) == 3 and attack.net is attack.nets[0] and len(attack.history) == 3
    first, second = (
        p.detach().flatten()[:20] for p in (next(attack.nets[0].parameters()), next(attack.nets[1].parameters()))
    )
    assert not torch.equal(first, second)  # independent initialisations
    z = target.query(images[1])
    with torch.no_grad():
        by_hand = torch.stack([net(z) for net in attack.nets]).mean(0)
    assert torch.allclose(attack.reconstruct(z), by_hand, atol=1e-6)
    with pytest.raises(UserError, match="ensemble must be >= 1"):
        registry.create("attack", "decoder", {"ensemble": 0})


def test_decoder_ensemble_one_keeps_the_folder_of_older_results():
    keys = {}
    for label, opts in (("absent", {}), ("one", {"ensemble": 1}), ("two", {"ensemble": 2})):
        attack, resolved = resolve_attack("decoder", opts, {"epochs": 1}, False)
        keys[label] = folder_key("decoder", attack, resolved, "train", 20, 0)
    # the hash an older privbench wrote: the options without `ensemble`
    attack, resolved = resolve_attack("decoder", {}, {"epochs": 1}, False)
    legacy = {k: v for k, v in resolved.items() if k != "ensemble"}
    old = config_hash({"attack": "decoder", "options": legacy, "attacker_data": "train", "eval_images": 20, "seed": 0})
    assert keys["absent"] == keys["one"] == old != keys["two"]
