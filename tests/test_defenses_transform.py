"""Base defenses dropout, topk, prune and vib: options, transforms, training, attack, checkpoints."""

from types import SimpleNamespace

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
NAMES = ("dropout", "topk", "prune", "vib")


def make(name: str, **options):
    return registry.create("defense", name, options)


# --------------------------------------------------------------------------- options


@pytest.mark.parametrize(
    "name,options,message",
    [
        ("dropout", {"rate": 1.0}, "rate"),
        ("dropout", {"rate": -0.1}, "rate"),
        ("topk", {"ratio": 0.0}, "ratio"),
        ("topk", {"ratio": 1.5}, "ratio"),
        ("prune", {"ratio": 0.0}, "ratio"),
        ("prune", {"ratio": 2.0}, "ratio"),
        ("prune", {"select": "taylor"}, "select"),
        ("prune", {"warmup": 0}, "warmup"),
        ("vib", {"beta": -1.0}, "beta"),
        ("vib", {"inference": "median"}, "inference"),
    ],
)
def test_bad_options_raise(name, options, message):
    cls = registry.get("defense", name)
    with pytest.raises(ValueError, match=message):
        cls(**options)
    with pytest.raises(UserError, match=f"defense {name!r}: invalid {message}"):
        registry.create("defense", name, options)


def test_strengths_and_stack_strength():
    assert make("dropout", rate=0.3).strength() == ("rate", 0.3)
    assert make("topk", ratio=0.25).strength() == ("ratio", 0.25)
    assert make("prune").strength() == ("ratio", 0.5)
    assert make("vib").strength() == ("beta", 1e-3)
    assert stack.create("topk+vib").strength() == ("vib.beta", 1e-3)


# --------------------------------------------------------------------------- transforms


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("shape", [(6, 20), (6, 4, 5, 5), (6, 3, 7)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_transform_keeps_shape_and_dtype(name, shape, dtype):
    d = make(name, select="random") if name == "prune" else make(name)
    d.build(shape[1:], CPU)
    d.setup(SimpleNamespace(seed=0, device=CPU, add_parameters=lambda p, **kw: None))
    z = torch.rand(shape).to(dtype)
    for training in (True, False):
        out = d.transform(z, training=training)
        assert out.shape == z.shape and out.dtype == dtype


def test_dropout_rate_and_inference_switch():
    z = torch.rand(64, 8, 8, 8) + 0.1
    on = make("dropout", rate=0.3)
    for training in (True, False):  # the reference keeps the unscaled mask on at inference
        out = on.transform(z, training=training)
        assert abs((out == 0).float().mean().item() - 0.3) < 0.02
        assert torch.equal(out[out != 0], z[out != 0])
    off = make("dropout", rate=0.3, at_inference=False)
    assert torch.equal(off.transform(z, training=False), z)
    out = off.transform(z, training=True)  # inverted dropout: same expectation as the identity
    assert torch.allclose(out[out != 0], z[out != 0] / 0.7)
    assert torch.equal(make("dropout", rate=0.0).transform(z, training=True), z)


def test_topk_keeps_exactly_the_largest_magnitudes_per_sample():
    z = torch.randn(5, 4, 3, 3)  # signed: magnitude decides, not the value
    out = make("topk", ratio=0.25).transform(z, training=True)
    k = round(0.25 * 36)
    flat, kept = z.flatten(1), out.flatten(1)
    assert ((kept != 0).sum(1) == k).all()
    top = flat.abs().topk(k, dim=1).indices
    assert torch.equal(kept.gather(1, top), flat.gather(1, top))
    assert torch.equal(make("topk", ratio=1.0).transform(z, training=True), z)
    tiny = make("topk", ratio=0.001).transform(z, training=True)  # never drops everything
    assert ((tiny.flatten(1) != 0).sum(1) == 1).all()


def test_prune_magnitude_mask_is_measured_in_warmup_then_fixed():
    d = make("prune", ratio=0.5, warmup=2)
    d.build((4, 2, 2), CPU)
    scale = torch.tensor([1.0, 4.0, 0.5, 3.0]).view(1, 4, 1, 1)
    ctx = SimpleNamespace(epochs=5, log=lambda m: None)
    z = torch.ones(3, 4, 2, 2)
    d.transform(-z * scale.flip(1), training=True)  # epoch 1: other channels large; forgotten
    assert d.epoch_end(0, ctx) == {} and d.mask is None
    assert torch.equal(d.transform(z * scale, training=True), z * scale)  # warm-up: identity
    d.transform(torch.zeros_like(z), training=False)  # eval calls do not count
    assert d.epoch_end(1, ctx) == {"prune_kept": 2.0}
    assert d.mask.tolist() == [0.0, 1.0, 0.0, 1.0]  # the two largest mean |z|
    assert torch.equal(d.transform(z, training=True), z * torch.tensor([0.0, 1, 0, 1]).view(1, 4, 1, 1))
    again = make("prune", ratio=0.5, warmup=2)
    again.build((4, 2, 2), CPU)
    again.load_state_dict(d.state_dict())
    assert torch.equal(again.mask, d.mask)
    with pytest.raises(UserError, match="3 channels"):
        wrong = make("prune")
        wrong.build((3,), CPU)
        wrong.load_state_dict(d.state_dict())


def test_prune_random_mask_is_seeded_and_flat_z_works():
    masks = []
    for seed in (0, 0, 1):
        d = make("prune", select="random", ratio=0.25)
        d.build((16,), CPU)
        d.setup(SimpleNamespace(seed=seed, device=CPU))
        masks.append(d.mask)
        assert d.mask.sum() == 4
    assert torch.equal(masks[0], masks[1]) and not torch.equal(masks[0], masks[2])
    z = torch.rand(3, 16)
    assert torch.equal(d.transform(z, training=False), z * masks[2])


def test_vib_kl_gradients_and_inference_modes():
    d = make("vib", beta=0.5)
    d.build((3, 4, 4), CPU)
    params = []
    d.setup(SimpleNamespace(device=CPU, add_parameters=lambda p, **kw: params.extend(p)))
    assert len(params) == 2  # the heads' weight and bias are in the optimizer
    z = torch.rand(5, 3, 4, 4)
    assert torch.allclose(make_mean(d).transform(z, training=False), z)  # identity start
    out = d.transform(z, training=True)
    mu, logvar, _ = d._stats
    loss = d.loss(out, torch.zeros(5, dtype=torch.long), epoch=0, lr=0.1)
    q = torch.distributions.Normal(mu, torch.exp(0.5 * logvar))
    p = torch.distributions.Normal(torch.zeros_like(mu), torch.ones_like(mu))
    kl = torch.distributions.kl_divergence(q, p).flatten(1).sum(1).mean()  # sum over z, mean over batch
    assert torch.allclose(loss, 0.5 * kl, rtol=1e-4)
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
    assert d.loss(out, torch.zeros(5), epoch=0, lr=0.1) is None  # no transform since: no stale term
    a, b = (d.noise(d.transform(z, training=False), training=False) for _ in range(2))
    assert not torch.equal(a, b)  # default: a fresh sample, as the server and the attacker see it
    mean = d.transform(z, training=False)
    assert torch.equal(mean, d.transform(z, training=False))  # the transform is the code's mean; noise() samples
    assert torch.equal(make_mean(d).noise(make_mean(d).transform(z, training=False), training=False), mean)
    assert d.epoch_end(0, SimpleNamespace())["vib_kl"] == pytest.approx(kl.item(), rel=1e-4)


def make_mean(sampler):
    d = make("vib", inference="mean")
    d.head = sampler.head
    return d


# --------------------------------------------------------------------------- train, attack, round trip


@pytest.mark.parametrize("name", NAMES)
def test_plugin_trains_is_attacked_and_changes_what_the_attacker_sees(name, runs, data):
    run = runs(name) if name == "prune" else runs(name, bottleneck=8)  # prune: the plain 16-channel ReLU z
    hist = run.metrics()["history"][0]
    assert hist["train_loss"] == hist["train_loss"]  # finite
    if name == "vib":
        assert hist["vib_kl"] > 0 and hist["defense_loss"] > 0
    (result,) = attack_run(
        run.path, ["decoder"], epochs=1, eval_images=16, progress=False, options={"decoder": TINY_DECODER}, **QUIET
    )
    assert 0 < result["metrics"]["ssim"]["mean"] < 1
    model = Run.open(run.path).load_model(data)
    x = torch.rand(8, 3, 32, 32)
    torch.manual_seed(0)
    on = make_target(model, data.image_shape, CPU).query(x)
    model.defense_transform = None
    off = make_target(model, data.image_shape, CPU).query(x)
    assert on.shape == off.shape and not torch.allclose(on, off)
    if name in ("topk", "prune", "dropout"):  # zeroing defenses: the attacker sees the zeros
        assert (on == 0).float().mean() > (off == 0).float().mean() + 0.1


def test_prune_checkpoint_mask_is_the_attacked_mask(runs, data):
    run = runs("prune")
    mask = torch.load(run.path / "checkpoint.pt", weights_only=True)["defense"]["mask"]
    assert mask.sum() == round(0.5 * len(mask))
    model = Run.open(run.path).load_model(data)
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        plain = model.encoder(x)
    assert torch.equal(make_target(model, data.image_shape, CPU).query(x), plain * mask.view(1, -1, 1, 1))


def test_topk_vib_stack_round_trips_through_the_checkpoint(runs, data):
    run = runs("topk+vib", defense_options={"vib.inference": "mean", "topk.ratio": 0.25}, bottleneck=8)
    state = torch.load(run.path / "checkpoint.pt", weights_only=True)["defense"]
    w, b = state["vib"]["weight"], state["vib"]["bias"]
    c = w.shape[1]
    assert not torch.equal(w[:c], torch.eye(c))  # the heads trained
    x = torch.rand(4, 3, 32, 32)
    first = make_target(Run.open(run.path).load_model(data), data.image_shape, CPU).query(x)
    model = Run.open(run.path).load_model(data)
    assert torch.equal(make_target(model, data.image_shape, CPU).query(x), first)  # deterministic after reload
    with torch.no_grad():  # by hand: top-k of the encoder output, then the saved mean head
        z = model.encoder(x)
        flat = z.flatten(1)
        keep = torch.zeros_like(flat).scatter_(1, flat.abs().topk(round(0.25 * flat.shape[1]), 1).indices, 1.0)
        expect = (torch.matmul(w[:c], (z * keep.view_as(z)).flatten(2)) + b[:c, None]).view_as(z)
    assert torch.allclose(first, expect, atol=1e-5)


def test_dropout_gmm_cem_stack_trains_and_loads(runs, data):
    run = runs("dropout+gmm-cem", defense_options={"rate": 0.3}, bottleneck=8)
    state = torch.load(run.path / "checkpoint.pt", weights_only=True)["defense"]
    assert set(state) == {"dropout", "gmm-cem"} and "centroids" in state["gmm-cem"]
    hist = run.metrics()["history"][0]
    assert "dropout_loss" in hist and "gmm-cem_loss" in hist
    model = Run.open(run.path).load_model(data)
    target = make_target(model, data.image_shape, CPU)
    x = torch.rand(16, 3, 32, 32)
    a, b = target.query(x), target.query(x)
    assert not torch.equal(a, b)  # the mask stays on in the attacker's view, fresh per query
    assert abs((a == 0).float().mean().item() - 0.3) < 0.03  # C8 Sigmoid output: zeros are the mask
    assert torch.equal(a[(a != 0) & (b != 0)], b[(a != 0) & (b != 0)])
