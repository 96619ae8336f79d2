"""The attack pack: likelihood (rMLE at sigma 0), gan-prior (cached VAE prior), shadow (query-free)."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from privbench.attack.harness import make_target
from privbench.attack.metrics import ssim
from privbench.engine.data import cache_dir, load_dataset, to_float
from privbench.engine.models import vgg11
from privbench.errors import UserError
from privbench.plugin import registry

TINY = {  # budgets that clear the mean-image baseline on the tiny model in seconds
    "likelihood": {"steps": 60},
    "gan-prior": {"epochs": 20, "steps": 60, "latent": 32, "width": 16, "gen_batch_size": 16, "lr": 0.1},
    "shadow": {
        "epochs": 8,
        "channels": 8,
        "blocks": 1,
        "batch_size": 32,
        "decoder_batch_size": 16,
        "lr": 3e-3,
        "shadow_lr": 3e-3,
    },
}


@pytest.fixture(scope="module")
def data():
    """Attacker images with labels, and disjoint evaluation images of every class (embedded)."""
    d = load_dataset("embedded", n_train=300)
    spread = torch.arange(24) * (len(d.test) // 24)  # the test split is ordered by class
    return to_float(d.train.images[:256]), d.train.labels[:256], to_float(d.test.images[spread])


@pytest.fixture(scope="module")
def plain_model(data):
    """A tiny undefended VGG (cut 2, no bottleneck, no noise) trained for a few seconds."""
    x, y, _ = data
    torch.manual_seed(0)
    model = vgg11(cut=2, width=0.125)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(4):
        perm = torch.randperm(len(x))  # the split is ordered by class
        for i in range(0, len(x), 32):
            loss = F.cross_entropy(model(x[perm[i : i + 32]]), y[perm[i : i + 32]])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


def target_of(model):
    return make_target(model, (3, 32, 32), torch.device("cpu"))


def create(name, **options):
    attack = registry.create("attack", name, {**TINY[name], **options})
    attack.progress = False
    return attack


@pytest.mark.parametrize("name", ["likelihood", "gan-prior", "shadow"])
def test_attack_beats_mean_image_on_plain_model(name, data, plain_model):
    x, y, evals = data
    target = target_of(plain_model)
    baseline = ssim(x.mean(0, keepdim=True).expand_as(evals), evals).mean().item()
    torch.manual_seed(0)
    attack = create(name)
    if name == "shadow":
        attack.fit(target, x, labels=y)
    else:
        attack.fit(target, x)
    got = ssim(attack.reconstruct(target.query(evals)), evals).mean().item()
    assert got > baseline + 0.03, (got, baseline)


def test_likelihood_with_noise_differs_from_rmle(data):
    x, _, evals = data
    torch.manual_seed(0)
    target = target_of(vgg11(cut=2, width=0.125, noise_std=0.1))
    z = target.query(evals[:8])
    out = {}
    for sigma in (0.0, None):  # None: the target's sigma 0.1
        attack = create("likelihood", steps=20, sigma=sigma)
        attack.fit(target, x)
        out[sigma] = attack.reconstruct(z)
        assert attack.info["sigma"] == (0.0 if sigma == 0.0 else 0.1)
        assert ("reduces_to" in attack.info) == (sigma == 0.0)
    assert out[0.0].shape == out[None].shape == evals[:8].shape
    assert (out[0.0] - out[None]).abs().mean() > 1e-3


class CountingEncoder(nn.Module):
    """Wraps the target encoder and counts its calls (a deep copy counts its own, separately)."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.inner, self.calls = encoder, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.inner(x)


def test_shadow_never_calls_the_target_encoder(data, plain_model):
    x, y, evals = data
    real = target_of(plain_model)
    z = real.query(evals)  # the activations the curious server observes, made before the attack
    spy = CountingEncoder(plain_model.encoder)
    target = make_target(plain_model, (3, 32, 32), torch.device("cpu"))
    target.encoder = spy

    def refuse(*args, **kwargs):
        raise AssertionError("the query-free attack queried the target")

    target.forward = target.query = target.z_shape = refuse
    attack = create("shadow", epochs=1)
    attack.fit(target, x[:64], labels=y[:64])
    out = attack.reconstruct(z)
    assert spy.calls == 0
    assert out.shape == evals.shape
    assert attack.info["query_free"] is True and "never queries" in attack.info["threat_model"]
    trained = dict(plain_model.encoder.named_parameters())
    for name, p in attack.shadow.inner.named_parameters():  # re-initialised, then trained: no weight kept
        assert not torch.equal(p, trained[name]), name


def test_shadow_without_labels_uses_information_maximisation(data, plain_model):
    x, _, evals = data
    target = target_of(plain_model)
    attack = create("shadow", epochs=1)
    attack.fit(target, x[:64])
    assert attack.info["shadow_objective"] == "information maximisation"
    assert attack.reconstruct(target.query(evals[:4])).shape == (4, 3, 32, 32)


@pytest.mark.parametrize(
    "name,options,message",
    [
        ("likelihood", {"tv_weight": -1.0}, "prior weights must be >= 0"),
        ("likelihood", {"l2_weight": -0.5}, "prior weights must be >= 0"),
        ("likelihood", {"sigma": -0.1}, "sigma must be >= 0"),
        ("likelihood", {"init": "random"}, "init must be one of mean, decoder"),
        ("likelihood", {"steps": 0}, "must be >= 1"),
        ("gan-prior", {"latent": 0}, "latent must be >= 1"),
        ("gan-prior", {"beta": -1.0}, "prior weights must be >= 0"),
        ("gan-prior", {"latent_weight": -1.0}, "prior weights must be >= 0"),
        ("gan-prior", {"gen_lr": 0.0}, "must be > 0"),
        ("shadow", {"epochs": 0}, "must be >= 1"),
        ("shadow", {"shadow_lr": -1.0}, "must be > 0"),
    ],
)
def test_bad_options_raise_one_line(name, options, message):
    with pytest.raises(UserError, match=message) as exc:
        registry.create("attack", name, options)
    assert "\n" not in str(exc.value)


def test_gan_prior_refuses_fewer_images_than_its_batch(data):
    x, _, _ = data
    attack = create("gan-prior", gen_batch_size=64)  # 10 images
    with pytest.raises(UserError, match="fewer than the generator's batch"):
        attack.fit(target_of(vgg11(cut=2, width=0.125).eval()), x[:10])


def test_gan_prior_generator_is_cached_and_reused(data, monkeypatch):
    x, _, evals = data
    target = target_of(vgg11(cut=2, width=0.125).eval())
    options = {"epochs": 1, "steps": 3}
    torch.manual_seed(5)
    first = create("gan-prior", **options)
    first.fit(target, x[:64])
    path = first.info["generator_file"]
    assert not first.info["generator_cached"] and first.history
    assert str(cache_dir()) in path and path.endswith(".pt")

    def no_training(self, *args, **kwargs):
        raise AssertionError("the cached generator was retrained")

    monkeypatch.setattr(type(first), "train_generator", no_training)
    torch.manual_seed(5)
    second = create("gan-prior", **options)
    second.fit(target, x[:64])
    assert second.info["generator_cached"] and second.info["generator_file"] == path
    for a, b in zip(first.vae.state_dict().values(), second.vae.state_dict().values()):
        assert torch.equal(a, b)
    torch.manual_seed(1)
    r1 = first.reconstruct(target.query(evals[:4]))
    torch.manual_seed(1)
    r2 = second.reconstruct(target.query(evals[:4]))
    assert torch.equal(r1, r2)  # a cached generator reconstructs exactly as a fresh one
    # Other attacker images (another split or data set) or another seed: a new generator.
    torch.manual_seed(6)
    monkeypatch.undo()
    third = create("gan-prior", **options)
    third.fit(target, x[:64])
    assert not third.info["generator_cached"] and third.info["generator_file"] != path


def test_an_attack_that_returns_nan_fails_its_cell_with_the_reason_and_keeps_no_folder(tmp_path):
    from conftest import tiny_config

    from privbench.plugin.base import Attack
    from privbench.store.attacks import attack_run
    from privbench.store.runs import train_run

    class Diverged(Attack):
        name = "test-nan"

        def fit(self, target, images, labels=None):
            self.shape = target.image_shape

        def reconstruct(self, z):
            return torch.full((len(z), *self.shape), float("nan"))

    registry.register(Diverged)
    try:
        run, _ = train_run(tiny_config(), tmp_path, log=lambda m: None)
        with pytest.raises(UserError, match="attack 'test-nan' returned non-finite values"):
            attack_run(run.path, ["test-nan"], eval_images=8, progress=False, log=lambda m: None)
        assert not [p for p in (run.path / "attacks").glob("*") if "test-nan" in p.name]  # nothing half-written
    finally:
        registry._REGISTRY["attack"].pop("test-nan", None)


def test_shadow_batch_norm_prior_gap_matches_hand_computation_and_is_optional():
    from privbench.attacks.shadow import _stat_gap

    bn = nn.BatchNorm1d(2).eval()
    bn.running_mean.copy_(torch.tensor([0.0, 1.0]))
    bn.running_var.copy_(torch.tensor([1.0, 4.0]))
    h = torch.tensor([[0.0, 1.0], [2.0, 1.0]])  # batch mean (1, 1), biased var (1, 0)
    gaps: list = []
    handle = bn.register_forward_hook(_stat_gap(gaps))
    bn(h)
    handle.remove()
    eps = bn.eps
    shift = (1 / (1 + eps) + 0) / 2
    spread = (math.log((1 + eps) / (1 + eps)) ** 2 + math.log(eps / (4 + eps)) ** 2) / 2
    assert gaps[0].item() == pytest.approx(shift + spread, rel=1e-5)
    with pytest.raises(UserError, match="bn_weight >= 0"):
        create("shadow", bn_weight=-1)


def test_shadow_matches_every_server_batch_norm_unless_turned_off(data, plain_model):
    x, y, _ = data
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in plain_model.server.modules())
    for weight, expected in ((1.0, n_bn), (0.0, 0)):
        torch.manual_seed(0)
        attack = create("shadow", epochs=1, bn_weight=weight)
        attack.fit(target_of(plain_model), x[:64], labels=y[:64])
        assert attack.info["bn_layers_matched"] == expected and attack.info["bn_weight"] == weight
    assert n_bn > 0
