"""Measurement precision: grouped CIs, accuracy as an expectation, the stable quick preset's
training pieces (warm-up, weight averaging), the embedded set's tiles, and `privbench precision`."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_cli, tiny_config

from privbench import api
from privbench.analysis import precision
from privbench.engine.config import TrainConfig
from privbench.engine.data import EMBEDDED_VERSIONS, Split, embedded, embedded_crops
from privbench.engine.models import build_model
from privbench.engine.train import NOISE_DRAWS, WeightAverage, accuracy_stats, correct_rate, lr_at, predictions
from privbench.errors import UserError
from privbench.store.seeds import collect_seeds
from privbench.util import stats
from privbench.util.stats import grouped_mean_ci, mean_ci


def test_grouped_ci_by_hand():
    # 3 tiles of 2 crops: mean 0.5, group sums 2, 0, 1 -> sum of squared deviations 2;
    # Var = 3/2 * 2 / 6^2, t(0.975, 2 dof) = 4.302653.
    out = grouped_mean_ci([1, 1, 0, 0, 1, 0], [0, 0, 1, 1, 2, 2])
    assert out["mean"] == 0.5 and out["groups"] == 3
    assert out["ci95"] == pytest.approx(4.302653 * math.sqrt(3 / 2 * 2) / 6, rel=1e-6)


def test_grouped_ci_with_singleton_groups_is_the_plain_ci():
    values = [0.3, 0.9, 0.5, 0.7, 0.1]
    assert grouped_mean_ci(values, [4, 3, 2, 1, 0])["ci95"] == pytest.approx(mean_ci(values)["ci95"], rel=1e-12)
    assert grouped_mean_ci(values, None)["ci95"] == mean_ci(values)["ci95"]


def test_grouped_ci_is_wider_when_crops_of_a_tile_agree():
    # 20 tiles of 10 identical outcomes: really 20 samples, not 200.
    values = [float(t % 2) for t in range(20) for _ in range(10)]
    groups = [t for t in range(20) for _ in range(10)]
    assert grouped_mean_ci(values, groups)["ci95"] > 2.5 * mean_ci(values)["ci95"]


def _tiny_model(noise: float) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model("vgg11", num_classes=10, cut=2, bottleneck=4, noise_std=noise, width=0.125)


def test_accuracy_expectation_equals_plain_accuracy_without_noise():
    split = Split(torch.randint(0, 256, (50, 3, 32, 32), dtype=torch.uint8), torch.randint(0, 10, (50,)))
    model = _tiny_model(0.0).eval()
    with torch.no_grad():
        plain = (model(split.images.float() / 255).argmax(1) == split.labels).float()
    rate = correct_rate(model, split)
    assert torch.equal(rate, plain)
    stats = accuracy_stats(model, split)
    assert stats["test_accuracy"] == pytest.approx(plain.mean().item()) and stats["noise_draws"] == 1


def test_accuracy_under_noise_averages_draws():
    split = Split(torch.randint(0, 256, (40, 3, 32, 32), dtype=torch.uint8), torch.randint(0, 10, (40,)))
    model = _tiny_model(2.0)
    torch.manual_seed(1)
    rate = correct_rate(model, split)
    scaled = rate * NOISE_DRAWS
    assert torch.allclose(scaled, scaled.round())  # each image: hits out of NOISE_DRAWS draws
    # the same draws by hand: encoder once, channel + server per draw
    torch.manual_seed(1)
    with torch.no_grad():
        z = model.encoder(split.images.float() / 255)
        hits = sum((model.server(model.channel(z)).argmax(1) == split.labels).float() for _ in range(NOISE_DRAWS))
    assert torch.allclose(rate, hits / NOISE_DRAWS)
    # predictions: one row of predicted classes per draw, the same draws in the same order
    torch.manual_seed(1)
    pred = predictions(model, split)
    torch.manual_seed(1)
    with torch.no_grad():
        z = model.encoder(split.images.float() / 255)
        by_hand = torch.stack([model.server(model.channel(z)).argmax(1) for _ in range(NOISE_DRAWS)])
    assert pred.shape == (NOISE_DRAWS, 40) and torch.equal(pred, by_hand)
    assert predictions(_tiny_model(0.0), split).shape == (1, 40)  # no noise: one draw is exact
    split.groups = torch.arange(40) // 4
    assert accuracy_stats(model, split)["test_groups"] == 10


def test_warmup_ramps_linearly_then_follows_the_schedule():
    cfg = TrainConfig(epochs=10, lr=0.1, schedule="cosine", warmup_epochs=1)
    steps = 4
    ramp = [lr_at(cfg, 0, s, steps) for s in range(steps)]
    cosine = [0.1 * 0.5 * (1 + math.cos(math.pi * (s / steps) / 10)) for s in range(steps)]
    assert ramp == pytest.approx([c * (s + 1) / steps for s, c in enumerate(cosine)])
    assert lr_at(cfg, 1, 0, steps) == pytest.approx(0.1 * 0.5 * (1 + math.cos(math.pi / 10)))
    assert lr_at(TrainConfig(epochs=10, lr=0.1, warmup_epochs=0), 0, 0, steps) == 0.1  # no warm-up: full lr at once


def test_weight_average_follows_the_formula():
    model = torch.nn.BatchNorm1d(2)
    avg = WeightAverage(model, decay=0.9)
    start = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.fill_(3.0)
    model.num_batches_tracked.fill_(7)
    avg.update(model)  # decay ramp: min(0.9, 2/11)
    d = 2 / 11
    avg.copy_to(model)
    assert torch.allclose(model.weight, d * start + (1 - d) * 3.0)
    assert model.num_batches_tracked.item() == 7


def test_training_with_ema_keeps_the_averaged_model():
    cfg = tiny_config(ema=0.5, warmup_epochs=0.5, label_smoothing=0.1)
    from privbench.engine.train import train

    result = train(cfg, log=lambda m: None)
    assert result.accuracy["test_accuracy"] == result.test_accuracy
    assert result.accuracy["test_groups"] > 10 and result.accuracy["test_accuracy_ci95"] > 0


def test_embedded_v3_tiles_are_groups_and_crops_spread_evenly():
    geo = EMBEDDED_VERSIONS[3]
    crops = embedded_crops(0, {"train": 300, "aux": 100, "test": 400}, version=3)
    images, labels, boxes, tiles = crops["test"]
    t = geo["tile"]
    for label in range(10):
        own = tiles[labels == label]
        counts = np.unique(own, return_counts=True)[1]
        assert counts.max() - counts.min() <= 1  # crops dealt to the class's test tiles in turn
    # a crop lies inside its tile: every crop of one tile id shares the tile's corner
    corners = {}
    for (x0, y0, _, _), tile in zip(boxes, tiles):
        corner = (x0 // t, y0 // t)
        assert corners.setdefault(tile, corner) == corner
    assert not set(crops["train"][3]) & set(tiles)  # no tile in two splits


def test_embedded_default_has_many_test_tiles():
    d = embedded()
    assert len(d.test) == 2000 and d.test.groups is not None
    assert d.test.groups.unique().numel() >= 150  # version 2 had 38
    assert embedded(version=2).test.groups.unique().numel() < 50


def test_config_validation_and_old_run_folders():
    with pytest.raises(UserError, match="invalid seed -1"):
        TrainConfig(seed=-1)
    with pytest.raises(UserError, match="label_smoothing"):
        TrainConfig(label_smoothing=1.5)
    old = TrainConfig.from_dict({"defense": "none", "epochs": 10})  # a config.json from before
    assert old.data_version == 2 and old.ema == 0 and old.warmup_epochs == 0


def test_train_cli_rejects_a_negative_seed(capsys):
    from conftest import run_cli

    code, _, err = run_cli(["train", "--seed", "-3", "--epochs", "1"], capsys)
    assert code == 2 and "invalid seed -3" in err and "Traceback" not in err


def test_run_cli_rejects_zero_seeds(capsys, tmp_path):
    from conftest import run_cli

    code, _, err = run_cli(["run", "--seeds", "0", "--results-dir", str(tmp_path)], capsys)
    assert code == 2 and "seeds" in err and "Traceback" not in err


def _fake_run(root: Path, name: str, seed: int, acc: float, ssim: float, noise: float = 0.025) -> None:
    run = root / name
    (run / "attacks" / "decoder-x").mkdir(parents=True)
    train = TrainConfig(defense="none", bottleneck=8, noise=noise, seed=seed).to_dict()
    (run / "config.json").write_text(json.dumps({"train": train}))
    (run / "metrics.json").write_text(json.dumps({"test_accuracy": acc}))
    decoder = {"attack": "decoder", "metrics": {"ssim": {"mean": ssim}, "psnr": {"mean": 20.0}}}
    (run / "attacks" / "decoder-x" / "metrics.json").write_text(json.dumps(decoder))


def test_precision_report_sd_and_mdd_by_hand(tmp_path, capsys):
    accs, ssims = [0.80, 0.82, 0.84], [0.50, 0.51, 0.505]
    for seed, (a, s) in enumerate(zip(accs, ssims)):
        _fake_run(tmp_path, f"none-{seed}", seed, a, s)
    _fake_run(tmp_path, "none-other", 0, 0.5, 0.4, noise=0.1)  # another configuration, one seed
    rows = precision.summarize(collect_seeds(tmp_path))
    acc = next(r for r in rows if r["quantity"] == "accuracy" and r["n"] == 3)
    assert acc["configuration"] == "none@C8+0.025"
    assert acc["mean"] == pytest.approx(82.0) and acc["sd"] == pytest.approx(2.0)
    # MDD at 5 seeds per arm: (t_.975,8 + t_.8,8) * sd * sqrt(2/5) = (2.306004 + 0.888889) * 2 * 0.632456
    assert acc["mdd5"] == pytest.approx((2.306004 + 0.888889) * 2.0 * math.sqrt(2 / 5), rel=1e-4)
    assert acc["meets"] is False  # sd 2.0 > the 1.0 target
    ssim = next(r for r in rows if r["quantity"] == "decoder ssim" and r["n"] == 3)
    assert ssim["sd"] == pytest.approx(0.005) and ssim["meets"] is True
    code, out, _ = run_cli(["precision", str(tmp_path), "--summarize", "--json", str(tmp_path / "rows.json")], capsys)
    assert code == 0
    assert "| none@C8+0.025 | accuracy | 3 | 82.00 | 2.00 | 1.04..12.57 |" in out and "**missed**" in out
    # sd 2.0 over 3 seeds: its interval lies above the 1.0 target (resolved); SSIM's 0.005 spans 0.010
    assert acc["resolved"] is True and ssim["resolved"] is False
    assert "<= 0.01 met (CI spans it)" in out
    assert len(json.loads((tmp_path / "rows.json").read_text())) == len(rows)


def test_sd_interval_by_hand_and_against_scipy():
    # chi-square with 2 dof has quantile -2 ln(1-p): the interval of sd 2.0 over 3 values is
    # 2 sqrt(2 / 7.3778) .. 2 sqrt(2 / 0.050636)
    lo, hi = stats.sd_ci95([80.0, 82.0, 84.0])
    assert lo == pytest.approx(2 * math.sqrt(2 / (-2 * math.log(0.025))), rel=1e-6)
    assert hi == pytest.approx(2 * math.sqrt(2 / (-2 * math.log(0.975))), rel=1e-6)
    assert all(v != v for v in stats.sd_ci95([1.0]))  # NaN below two values
    chi2 = pytest.importorskip("scipy.stats").chi2
    for dof in (1, 2, 4, 9, 30):
        for p in (0.025, 0.975):
            assert stats._chi2_quantile_series(p, dof) == pytest.approx(chi2.ppf(p, dof), rel=1e-6)
    # five seeds bound an sd only to 0.60 .. 2.87 times the sample sd
    lo, hi = stats.sd_ci95([0.0, 1.0, 2.0, 3.0, 4.0])
    s = stats.sd([0.0, 1.0, 2.0, 3.0, 4.0])
    assert lo / s == pytest.approx(0.599, abs=0.001) and hi / s == pytest.approx(2.874, abs=0.001)


def test_paired_report_differences_seed_by_seed(tmp_path, capsys):
    # Two configurations sharing each seed's luck: B = A + (1, 2, 3) points at seeds 0, 1, 2.
    for seed, (a, b) in enumerate([(0.80, 0.81), (0.86, 0.88), (0.83, 0.86)]):
        _fake_run(tmp_path, f"none-a{seed}", seed, a, 0.5)
        _fake_run(tmp_path, f"none-b{seed}", seed, b, 0.5, noise=0.1)
    _fake_run(tmp_path, "none-b9", 9, 0.9, 0.5, noise=0.1)  # no partner seed: left out of the pairs
    rows = precision.paired(collect_seeds(tmp_path), "none@C8+0.025")
    acc = next(r for r in rows if r["quantity"] == "accuracy")
    assert acc["configuration"] == "none@C8+0.1 - none@C8+0.025" and acc["seeds"] == [0, 1, 2]
    assert acc["mean"] == pytest.approx(2.0) and acc["sd"] == pytest.approx(1.0)
    # paired MDD at 5 seeds: (t_.975,4 + t_.8,4) * sd / sqrt(5) = (2.776445 + 0.940965) / sqrt(5)
    assert acc["mdd5"] == pytest.approx((2.776445 + 0.940965) / math.sqrt(5), rel=1e-4)
    assert stats.paired_min_detectable_difference(1.0, 1) != stats.paired_min_detectable_difference(1.0, 1)  # NaN
    code, out, _ = run_cli(["precision", str(tmp_path), "--summarize", "--paired-with", "none@C8+0.025"], capsys)
    assert code == 0 and "| none@C8+0.1 - none@C8+0.025 | accuracy | 3 | 2.00 | 1.00 |" in out
    code, _, err = run_cli(["precision", str(tmp_path), "--summarize", "--paired-with", "gmm-cem@C8"], capsys)
    assert code == 2
    assert "--paired-with 'gmm-cem@C8' is no configuration here (known: none@C8+0.025, none@C8+0.1)" in err


def test_an_attack_at_two_budgets_is_two_quantities_not_one_overwritten(tmp_path):
    for seed in (0, 1):
        _fake_run(tmp_path, f"none-{seed}", seed, 0.8, 0.50 + seed / 100)
        longer = tmp_path / f"none-{seed}" / "attacks" / "decoder-y"
        longer.mkdir()
        result = {"attack": "decoder", "options": {"epochs": 6}, "metrics": {"ssim": {"mean": 0.6 + seed / 100}}}
        (longer / "metrics.json").write_text(json.dumps(result))
    (cell,) = collect_seeds(tmp_path).values()
    assert cell["values"]["decoder (budget not recorded) ssim"] == {0: 0.50, 1: 0.51}
    assert cell["values"]["decoder (epochs=6) ssim"] == {0: 0.60, 1: 0.61}


def test_precision_report_needs_two_seeds(tmp_path, capsys):
    code, _, err = run_cli(["precision", str(tmp_path), "--seeds", "1"], capsys)
    assert code == 2 and "at least 2 seeds" in err
    _fake_run(tmp_path, "none-0", 0, 0.8, 0.5)
    code, _, err = run_cli(["precision", str(tmp_path), "--summarize"], capsys)
    assert code == 2 and "one seed" in err


@pytest.mark.parametrize(
    "args,message",
    [
        (["--set", "epochs"], "invalid training setting: invalid option 'epochs'"),
        (["--set", "model.depth=3"], "invalid training setting 'model.depth'"),
        (["--resolve", "accuracy=-1"], "invalid --resolve 'accuracy=-1'"),
    ],
)
def test_precision_bad_input_exits_2_before_training(args, message, tmp_path, capsys):
    code, _, err = run_cli(["precision", str(tmp_path / "r"), *args], capsys)
    assert code == 2 and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "r").exists()


def test_precision_api_returns_the_rows_the_command_prints(tmp_path, capsys):
    for seed, (a, s) in enumerate(zip([0.80, 0.82, 0.84], [0.50, 0.51, 0.505])):
        _fake_run(tmp_path, f"none-{seed}", seed, a, s)
        _fake_run(tmp_path, f"noisy-{seed}", seed, a - [0.02, 0.02, 0.01][seed], s, noise=0.1)
    found = api.precision(tmp_path, summarize=True, resolve={"accuracy": 4}, paired_with="none@C8+0.025")
    acc = next(r for r in found["rows"] if r["quantity"] == "accuracy" and r["configuration"] == "none@C8+0.025")
    assert acc["sd"] == pytest.approx(2.0) and acc["n"] == 3
    # seed by seed, noise 0.1 lies 2, 2 and 1 points below: mean -5/3, sd sqrt(1/3)
    diff = next(r for r in found["pairs"] if r["quantity"] == "accuracy")
    assert diff["mean"] == pytest.approx(-5 / 3) and diff["sd"] == pytest.approx(math.sqrt(1 / 3))
    code, out, _ = run_cli(["precision", str(tmp_path), "--summarize", "--resolve", "accuracy=4"], capsys)
    assert code == 0 and "| none@C8+0.025 | accuracy | 3 | 82.00 | 2.00 |" in out


def interrupted(cfg, tmp_path, *, after_epoch: int):
    """(the run trained whole in tmp_path/a, the epoch checkpoint left in tmp_path/b by a training
    stopped after `after_epoch` epochs)."""
    from privbench.store.runs import run_name, train_run

    whole, _ = train_run(cfg, tmp_path / "a", log=lambda m: None)

    def interrupt(msg: str) -> None:
        if msg.startswith(f"epoch={after_epoch} "):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_run(cfg, tmp_path / "b", log=interrupt)
    return whole, tmp_path / "b" / f".{run_name(cfg)}.epoch.pt"


@pytest.mark.parametrize(
    "defense,options",
    # slot-cem with warmup 1 builds its module in epoch 2: the checkpoint holds it, and the
    # optimizer's parameter group for it, which a fresh start has not created yet
    [("none", {}), ("gmm-cem", {}), ("slot-cem", {}), ("slot-cem", {"warmup": 1})],
)
def test_interrupted_training_resumes_to_the_same_numbers(tmp_path, defense, options):
    from privbench.store.runs import run_name, train_run

    cfg = tiny_config(
        epochs=3, ema=0.9, warmup_epochs=0.5, defense=defense, bottleneck=4, noise=0.05, defense_options=options
    )
    whole, checkpoint = interrupted(cfg, tmp_path, after_epoch=2)
    assert checkpoint.is_file() and not (tmp_path / "b" / run_name(cfg)).exists()
    lines: list[str] = []
    resumed, built = train_run(cfg, tmp_path / "b", log=lines.append)
    assert built and any("after epoch 2" in line for line in lines)
    assert sum(line.startswith("epoch=") for line in lines) == 1  # only epoch 3 was trained again
    assert not checkpoint.exists()
    a = torch.load(whole.path / "checkpoint.pt", weights_only=True)["model"]
    b = torch.load(resumed.path / "checkpoint.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert whole.metrics()["test_accuracy"] == resumed.metrics()["test_accuracy"]
    assert len(resumed.metrics()["history"]) == 3


def test_a_damaged_epoch_checkpoint_is_ignored(tmp_path):
    from privbench.store.runs import run_name, train_run

    cfg = tiny_config()
    (tmp_path / f".{run_name(cfg)}.epoch.pt").write_bytes(b"not a checkpoint")
    lines: list[str] = []
    run, built = train_run(cfg, tmp_path, log=lines.append)
    assert built and any("ignoring the epoch checkpoint" in line for line in lines)


def test_a_checkpoint_whose_state_does_not_fit_trains_from_scratch_to_the_same_numbers(tmp_path):
    """A checkpoint of this configuration whose defense state fits but whose model state does not
    (loaded halfway, then refused): the run starts again from scratch, with nothing carried over."""
    from privbench.store.runs import train_run

    cfg = tiny_config(epochs=2, defense="slot-cem", defense_options={"warmup": 0}, bottleneck=4, noise=0.05)
    whole, checkpoint = interrupted(cfg, tmp_path, after_epoch=1)
    blob = torch.load(checkpoint, weights_only=True)
    blob["model"] = {k: v[..., :1] if v.ndim else v for k, v in blob["model"].items()}  # wrong shapes
    torch.save(blob, checkpoint)
    lines: list[str] = []
    again, _ = train_run(cfg, tmp_path / "b", log=lines.append)
    assert sum("ignoring the epoch checkpoint" in line for line in lines) == 1
    assert sum(line.startswith("epoch=") for line in lines) == 2  # both epochs trained again
    a = torch.load(whole.path / "checkpoint.pt", weights_only=True)
    b = torch.load(again.path / "checkpoint.pt", weights_only=True)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert all(torch.equal(x, y) for x, y in zip(a["defense"]["module"].values(), b["defense"]["module"].values()))


def test_seed_tile_components_by_hand():
    # rows (seeds) 1, 1/3; columns 1/2, 1/2, 1; residuals +-1/6, +-1/6, -+1/3: SS 1/3 over 2 df.
    comp = stats.seed_tile_components([[1, 1, 1], [0, 0, 1]])
    assert comp["total"] == pytest.approx(2 / 9) and comp["interaction"] == pytest.approx(1 / 6)
    assert comp["model"] == pytest.approx(2 / 9 - 1 / 18) and (comp["seeds"], comp["tiles"]) == (2, 3)
    with pytest.raises(ValueError, match="at least 2"):
        stats.seed_tile_components([[1, 0]])
    with pytest.raises(ValueError, match="full seeds x tiles"):
        stats.seed_tile_components([[1, 0], [1]])


def test_seed_tile_components_recover_known_variances():
    rng = np.random.default_rng(0)
    seeds, tiles, model_sd, inter_sd = 400, 300, 0.02, 0.1
    x = 0.8 + rng.normal(0, model_sd, (seeds, 1)) + rng.normal(0, 0.05, (1, tiles))
    x = x + rng.normal(0, inter_sd, (seeds, tiles))
    comp = stats.seed_tile_components(x.tolist())
    assert comp["interaction"] == pytest.approx(inter_sd**2, rel=0.02)
    assert comp["model"] == pytest.approx(model_sd**2, rel=0.2)
    assert comp["total"] == pytest.approx(np.var(x.mean(1), ddof=1))


def test_precision_labels_name_settings_off_the_preset(tmp_path):
    _fake_run(tmp_path, "none-now", 0, 0.9, 0.5)
    old = tmp_path / "none-old"
    (old / "attacks").mkdir(parents=True)
    train = TrainConfig(defense="none", bottleneck=8, noise=0.025, seed=0, epochs=7).to_dict()
    (old / "config.json").write_text(json.dumps({"train": train}))
    (old / "metrics.json").write_text(json.dumps({"test_accuracy": 0.5}))
    labels = sorted(c["label"] for c in collect_seeds(tmp_path).values())
    assert labels == ["none@C8+0.025", "none@C8+0.025 (epochs=7)"]  # not pooled into one configuration


def test_seeds_needed_by_hand_and_against_the_exact_power():
    # sd 1, a 2-point difference: MDD(5) = (2.306004 + 0.888889) * sqrt(2/5) = 2.02 > 2, MDD(6) =
    # (2.228139 + 0.879058) * sqrt(2/6) = 1.79; paired: (3.182446 + 0.978472) / 2 = 2.08 at 4 seeds,
    # (2.776445 + 0.940965) / sqrt(5) = 1.66 at 5.
    assert stats.seeds_needed(1.0, 2.0) == 6 and stats.seeds_needed(1.0, 2.0, paired=True) == 5
    assert stats.seeds_needed(float("nan"), 2.0) is None and stats.seeds_needed(100.0, 0.1) is None
    with pytest.raises(ValueError, match="difference must be positive"):
        stats.seeds_needed(1.0, 0.0)
    # Independently: the exact power of the t test (noncentral t) reaches 0.8 at n seeds, not at n-1.
    sps = pytest.importorskip("scipy.stats")

    def power(sd_value, diff, n, paired):
        dof, se = (n - 1, sd_value / math.sqrt(n)) if paired else (2 * n - 2, sd_value * math.sqrt(2 / n))
        crit = sps.t.ppf(0.975, dof)
        return sps.nct.sf(crit, dof, diff / se) + sps.nct.cdf(-crit, dof, diff / se)

    for sd_value, diff in [(1.0, 2.0), (2.0, 2.0), (1.31, 2.0), (0.008, 0.02), (3.0, 1.0)]:
        for paired in (False, True):
            n = stats.seeds_needed(sd_value, diff, paired=paired)
            assert power(sd_value, diff, n, paired) >= 0.8 > power(sd_value, diff, n - 1, paired)


def test_precision_report_says_how_many_seeds_resolve_a_difference(tmp_path, capsys):
    for seed, a in enumerate([0.80, 0.82, 0.84]):  # accuracy sd 2.0 points
        _fake_run(tmp_path, f"none-{seed}", seed, a, 0.5 + 0.01 * seed)  # SSIM sd 0.01
    code, out, _ = run_cli(["precision", str(tmp_path), "--summarize", "--json", str(tmp_path / "rows.json")], capsys)
    assert code == 0
    # sd 2 against 2 points needs 17 seeds; sd 0.01 against 0.02 SSIM is sd 1 against 2 points: 6
    assert "| <= 1 **missed** | 17 for 2 |" in out and "| 6 for 0.02 |" in out
    rows = json.loads((tmp_path / "rows.json").read_text())
    assert {(r["quantity"], r["resolve"], r["seeds_needed"]) for r in rows} >= {("accuracy", 2.0, 17)}
    code, out, _ = run_cli(["precision", str(tmp_path), "--summarize", "--resolve", "accuracy=4"], capsys)
    assert code == 0 and "| 6 for 4 |" in out  # sd 1 against 2 points, rescaled
    for bad in ("accuracy", "accuracy=-1", "accuracy=x", "=2"):
        code, _, err = run_cli(["precision", str(tmp_path), "--summarize", "--resolve", bad], capsys)
        assert code == 2
        assert err.startswith(f"error: invalid --resolve {bad!r}") and err.count("\n") == 1
