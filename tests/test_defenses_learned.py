"""Base defenses nopeek, adversarial, shredder and disco: options, losses, transforms, training, attack, checkpoints."""

import importlib
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from privbench.attack.harness import make_target
from privbench.errors import UserError
from privbench.plugin import registry, stack
from privbench.store.attacks import attack_run
from privbench.store.runs import Run

QUIET = dict(log=lambda m: None)
TINY_DECODER = {"channels": 8, "blocks": 1, "batch_size": 64}
CPU = torch.device("cpu")
NAMES = ("nopeek", "adversarial", "shredder", "disco")
distance_correlation = importlib.import_module("privbench.defenses.nopeek").distance_correlation


def make(name: str, **options):
    return registry.create("defense", name, options)


def ctx(params: list | None = None, images: torch.Tensor | None = None, noise: float = 0.0) -> SimpleNamespace:
    """The parts of a TrainContext the four plugins read."""
    add = (lambda p, **kw: params.extend(p)) if params is not None else (lambda p, **kw: None)
    images = images if images is not None else torch.zeros(4, 3, 32, 32, dtype=torch.uint8)
    return SimpleNamespace(device=CPU, add_parameters=add, train_images=images, noise_std=noise, seed=0)


# --------------------------------------------------------------------------- options


@pytest.mark.parametrize(
    "name,options,message",
    [
        ("nopeek", {"weight": -1.0}, "weight"),
        ("adversarial", {"weight": -0.1}, "weight"),
        ("adversarial", {"adv_steps": 0}, "adv_steps"),
        ("adversarial", {"width": 0}, "width"),
        ("adversarial", {"threshold": 1.0}, "threshold"),
        ("adversarial", {"adv_loss": "l1"}, "adv_loss"),
        ("shredder", {"weight": -1.0}, "weight"),
        ("shredder", {"init_scale": 0.0}, "init_scale"),
        ("shredder", {"distribution": "uniform"}, "distribution"),
        ("disco", {"ratio": 0.0}, "ratio"),
        ("disco", {"ratio": 1.5}, "ratio"),
        ("disco", {"hidden": 0}, "hidden"),
    ],
)
def test_bad_options_raise(name, options, message):
    with pytest.raises(ValueError, match=message):
        registry.get("defense", name)(**options)
    with pytest.raises(UserError, match=f"defense {name!r}: invalid {message}"):
        registry.create("defense", name, options)


def test_strengths():
    assert make("nopeek").strength() == ("weight", 0.3)
    assert make("adversarial", weight=1.0).strength() == ("weight", 1.0)
    assert make("shredder").strength() == ("weight", 0.1)
    assert make("disco", ratio=0.75).strength() == ("ratio", 0.75)
    assert stack.create("shredder+nopeek").strength() == ("nopeek.weight", 0.3)


# --------------------------------------------------------------------------- nopeek


def dcor_reference(x: np.ndarray, y: np.ndarray) -> float:
    """Distance correlation straight from the definition (Szekely et al. 2007), O(n^2) loops."""
    n = len(x)

    def centred(v):
        d = np.array([[np.linalg.norm(v[i] - v[j]) for j in range(n)] for i in range(n)])
        return d - d.mean(0, keepdims=True) - d.mean(1, keepdims=True) + d.mean()

    a, b = centred(x.reshape(n, -1)), centred(y.reshape(n, -1))
    dcov2, vx, vy = (a * b).mean(), (a * a).mean(), (b * b).mean()
    return float(np.sqrt(dcov2 / np.sqrt(vx * vy)))


def test_distance_correlation_matches_the_definition():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(12, 3, 4, 4, generator=g, dtype=torch.float64)
    z = torch.tanh(x.flatten(1)[:, :7] * 3) + 0.1 * torch.randn(12, 7, generator=g, dtype=torch.float64)
    got = distance_correlation(x, z).item()
    assert got == pytest.approx(dcor_reference(x.numpy(), z.numpy()), rel=1e-4)
    assert 0.3 < got < 1
    assert distance_correlation(x, x).item() == pytest.approx(1.0, abs=1e-5)
    assert distance_correlation(x, 3 * x + 2).item() == pytest.approx(1.0, abs=1e-4)  # similarity invariant
    a, b = torch.randn(1000, 1, generator=g), torch.randn(1000, 1, generator=g)
    assert distance_correlation(a, b).item() < 0.1  # independent: near 0 (the V-statistic's bias shrinks with n)
    assert distance_correlation(a, a**2).item() > 0.4  # uncorrelated but dependent: dCor sees it


def test_nopeek_loss_is_weighted_dcor_with_finite_gradients():
    d = make("nopeek", weight=2.0)
    d.setup(ctx())
    x = torch.rand(6, 3, 8, 8)
    z = torch.cat([x.flatten(1)[:3], x.flatten(1)[:3]]).clone().requires_grad_(True)  # duplicate rows
    loss = d.loss(z, torch.zeros(6), epoch=0, lr=0.1, x=torch.cat([x[:3], x[:3]]))
    assert loss.item() == pytest.approx(2.0, abs=1e-4)  # z = x: dCor 1
    loss.backward()
    assert torch.isfinite(z.grad).all()
    assert d.epoch_end(0, None)["dcor"] == pytest.approx(1.0, abs=1e-4)
    assert make("nopeek", weight=0).loss(z, None, epoch=0, lr=0.1, x=x) is None


# --------------------------------------------------------------------------- transforms


@pytest.mark.parametrize("name", ["shredder", "disco"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_transform_keeps_shape_and_dtype(name, dtype):
    d = make(name)
    d.build((6, 4, 4), CPU)
    d.setup(ctx())
    z = torch.rand(5, 6, 4, 4).to(dtype)
    for training in (True, False):
        out = d.transform(z, training=training)
        assert out.shape == z.shape and out.dtype == dtype


def test_shredder_noise_has_the_learned_scale_and_its_loss_grows_it():
    params = []
    d = make("shredder", weight=1.0, init_scale=0.5)
    d.build((4, 8, 8), CPU)
    d.setup(ctx(params))
    assert params == [d.log_scale]
    z = torch.zeros(256, 4, 8, 8)
    for training in (True, False):
        assert torch.equal(d.transform(z, training=training), z)  # the noise is a noise hook, not a transform
        noise = d.noise(z, training=training)
        assert noise.std().item() == pytest.approx(0.5, rel=0.05)  # unit-variance Laplace times the scale
        assert noise.abs().mean().item() == pytest.approx(0.5 / 2**0.5, rel=0.05)  # Laplace: E|e| = b
    assert not d.noise(z, training=False).requires_grad  # the attacker's view trains nothing
    opt = torch.optim.SGD(params, lr=1.0)
    for _ in range(3):
        opt.zero_grad()
        d.loss(z, None, epoch=0, lr=0.1).backward()
        opt.step()
    assert (d.scale() > 0.5).all()
    assert d.epoch_end(0, None)["noise_scale"] > 0.5


def test_disco_keeps_the_top_channels_per_sample_with_straight_through_gradients():
    params = []
    d = make("disco", ratio=0.75)
    d.build((8, 4, 4), CPU)
    d.setup(ctx(params))
    z = torch.rand(6, 8, 4, 4, requires_grad=True)
    out = d.transform(z, training=True)
    kept = out.detach().flatten(2).abs().sum(2) > 0  # [B, C]
    assert (kept.sum(1) == 2).all()  # round((1 - 0.75) * 8)
    scores = d.scorer(z.detach())
    assert torch.equal(kept, torch.zeros_like(kept).scatter_(1, scores.topk(2, 1).indices, True))
    assert torch.equal(out[kept], z[kept])  # kept channels pass unchanged
    out.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)  # the filter learns
    assert torch.equal(d.transform(z, training=False), out.detach())  # hard mask at inference too
    one = make("disco", ratio=1.0)
    one.build((8, 4, 4), CPU)
    assert one.mask(z, training=False).sum(1).eq(1).all()  # at least one channel is always kept


# --------------------------------------------------------------------------- adversarial


def test_adversarial_alternates_and_its_state_round_trips():
    images = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8)
    d = make("adversarial", weight=1.0, threshold=-1.0, adv_steps=2)
    d.build((4, 8, 8), CPU)
    d.setup(ctx(images=images, noise=0.1))
    x = images.float() / 255
    z = torch.nn.functional.avg_pool2d(x, 4)[:, :3].repeat(1, 2, 1, 1)[:, :4].requires_grad_(True)
    before = [p.detach().clone() for p in d.decoder.parameters()]
    loss = d.loss(z, None, epoch=0, lr=0.1, x=x)
    assert all(not torch.equal(a, p) for a, p in zip(before, d.decoder.parameters()))  # the decoder stepped
    assert d.optimizer.state_dict()["state"][0]["step"].item() == 2
    loss.backward()
    assert z.grad is not None and z.grad.abs().sum() > 0  # the encoder is charged through z
    assert all(p.grad is None for p in d.decoder.parameters())  # but not the decoder
    row = d.epoch_end(0, None)
    assert 0 < row["adv_fit_loss"] < 2 and -1 <= row["adv_ssim"] <= 1  # 1 - SSIM, then SSIM
    assert loss.item() == pytest.approx(row["adv_ssim"] + 1, abs=1e-5)  # weight 1, hinge at -1: 1 * (s + 1)
    state = d.state_dict()
    for order in ("setup first", "load first"):  # the loop's resume loads after setup; be safe either way
        again = make("adversarial", weight=1.0, threshold=-1.0, adv_steps=2)
        again.build((4, 8, 8), CPU)
        if order == "load first":
            again.load_state_dict(state)
        again.setup(ctx(images=images, noise=0.1))
        if order == "setup first":
            again.load_state_dict(state)
        for a, b in zip(d.decoder.state_dict().values(), again.decoder.state_dict().values()):
            assert torch.equal(a, b)
        opt_a, opt_b = d.optimizer.state_dict()["state"], again.optimizer.state_dict()["state"]
        assert torch.equal(opt_a[0]["exp_avg"], opt_b[0]["exp_avg"]) and opt_b[0]["step"].item() == 2
    hinge = make("adversarial", threshold=0.99)
    hinge.build((4, 8, 8), CPU)
    hinge.setup(ctx(images=images))
    assert hinge.loss(z, None, epoch=0, lr=0.1, x=x).item() == 0  # below the threshold: no pressure


# --------------------------------------------------------------------------- train, attack, round trip


LOGGED = {"nopeek": "dcor", "adversarial": "adv_ssim", "shredder": "noise_scale", "disco": "channel_usage_max"}


@pytest.mark.parametrize("name", NAMES)
def test_plugin_trains_and_is_attacked(name, runs, data):
    run = runs(name, bottleneck=8)
    hist = run.metrics()["history"][0]
    assert np.isfinite(hist["train_loss"]) and np.isfinite(hist[LOGGED[name]])
    (result,) = attack_run(
        run.path, ["decoder"], epochs=1, eval_images=16, progress=False, options={"decoder": TINY_DECODER}, **QUIET
    )
    assert 0 < result["metrics"]["ssim"]["mean"] < 1
    model = Run.open(run.path).load_model(data)
    x = torch.rand(8, 3, 32, 32)
    on = make_target(model, data.image_shape, CPU).query(x)
    had_transform = model.defense_transform is not None
    model.defense_transform = None
    off = make_target(model, data.image_shape, CPU).query(x)
    assert had_transform == (name in ("shredder", "disco"))
    assert on.shape == off.shape and torch.allclose(on, off) == (not had_transform)
    if name == "disco":  # the attacker sees half the channels of every sample zeroed
        assert ((on.flatten(2).abs().sum(2) == 0).sum(1) >= 4).all()


def test_shredder_gmm_cem_stack_round_trips_the_learned_noise(runs, data):
    run = runs("shredder+gmm-cem", bottleneck=8, noise=0.025, defense_options={"shredder.weight": 20.0})
    saved = torch.load(run.path / "checkpoint.pt", weights_only=True)["defense"]
    log_scale = saved["shredder"]["log_scale"]
    assert log_scale.shape == (8, 8, 8) and "centroids" in saved["gmm-cem"]
    assert (log_scale.exp() > 0.03).all()  # grown from 0.025 by the loss
    model = Run.open(run.path).load_model(data)
    shredder = model.defense_transform.__self__.members[0][1]
    assert torch.equal(shredder.scale(), log_scale.exp())
    z = torch.zeros(512, 8, 8, 8)
    assert torch.equal(model.transform(z), z)
    noise = model.defense_noise(z, training=False)  # the attacked noise
    assert noise.std(0).mean().item() == pytest.approx(log_scale.exp().mean().item(), rel=0.1)
