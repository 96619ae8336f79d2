"""Contracts every registered plugin keeps: registering a plugin enrols it here.

Defenses: at strength zero a defense with a knob leaves z as `none` does (no transform, no
noise, no loss term), and the same seed gives the same training row. Attacks: an identity
encoder without noise is inverted almost perfectly (for attacks that query the encoder).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from privbench.attack.metrics import ssim
from privbench.engine.data import load_dataset, to_float
from privbench.engine.models import vgg11
from privbench.engine.train import train
from privbench.plugin import registry
from privbench.plugin.base import Target, TrainContext

DEFENSES = registry.names("defense")
ATTACKS = registry.names("attack")
# Small budgets that keep each attack to seconds on a CPU; an attack not named gets its
# `epochs` / `steps` options (where it has them) cut to these.
BUDGET = {
    "decoder": {"epochs": 6, "channels": 16, "blocks": 1, "batch_size": 32, "lr": 3e-3},
    "optimization": {"steps": 150},
    "likelihood": {"steps": 150},
}
DEFAULT_BUDGET = {"epochs": 4, "steps": 100}
# "Almost perfectly" is SSIM > 0.9 for attacks that optimise the image against the encoder; a
# decoder learns the identity at the small budget only to about 0.74 (0.89 at 10 epochs, width
# 32), and a generative prior bounds what gan-prior can draw (0.56 with a 64-dim latent): its
# contract is to beat the mean image (tests/test_attacks_priors.py).
IDENTITY_SSIM = {"decoder": 0.7}
PRIOR_BOUND = {"gan-prior"}


def zero_strength(name: str):
    """The defense at knob 0, or None where the knob has no zero (a rate that must be > 0...)."""
    cls = registry.get("defense", name)
    if not cls.knob or not cls.knob_zero_is_off:
        return None
    try:
        return registry.create("defense", name, {cls.knob: 0})
    except (ValueError, Exception):  # noqa: B014 (a plugin may refuse 0 with any error type)
        return None


@pytest.mark.parametrize("name", DEFENSES)
def test_strength_zero_behaves_as_none(name):
    defense = zero_strength(name)
    if defense is None:
        pytest.skip(f"{name} has no strength knob that can be 0")
    torch.manual_seed(0)
    z, y, x = torch.randn(16, 8, 4, 4), torch.arange(16) % 4, torch.rand(16, 3, 32, 32)
    cpu = torch.device("cpu")
    defense.build(tuple(z.shape[1:]), cpu)
    images = (torch.rand(16, 3, 32, 32) * 255).to(torch.uint8)
    defense.setup(
        TrainContext(
            model=vgg11(cut=2, width=0.125, bottleneck=8),
            train_images=images,
            train_labels=y,
            num_classes=4,
            noise_std=0.0,
            device=cpu,
            epochs=1,
            batch_size=16,
            steps_per_epoch=1,
            seed=0,
        )
    )
    for training in (False, True):
        assert torch.equal(defense.transform(z, training=training), z)
        assert torch.equal(defense.noise(z, training=training), z)
    loss = (
        defense.loss(z, y, epoch=1000, lr=0.01, x=x)
        if "x" in defense.loss.__code__.co_varnames
        else defense.loss(z, y, epoch=1000, lr=0.01)
    )
    assert loss is None or float(loss) == 0.0


@pytest.mark.parametrize("name", DEFENSES)
def test_same_seed_same_row(name, tiny):
    cfg = tiny(defense=name, n_train=64, epochs=1, seed=3)
    first, second = train(cfg, log=lambda _: None), train(cfg, log=lambda _: None)
    assert first.test_accuracy == second.test_accuracy
    timing = {"epoch_seconds", "refit_seconds"}  # wall clock, not results
    assert [{k: v for k, v in h.items() if k not in timing} for h in first.history] == [
        {k: v for k, v in h.items() if k not in timing} for h in second.history
    ]
    for a, b in zip(first.model.state_dict().values(), second.model.state_dict().values()):
        assert torch.equal(a, b)


@pytest.fixture(scope="module")
def images():
    d = load_dataset("embedded", n_train=300)
    spread = torch.arange(16) * (len(d.test) // 16)  # the test split is ordered by class
    return to_float(d.train.images[:256]), d.train.labels[:256], to_float(d.test.images[spread])


def budget(name: str) -> dict:
    if name in BUDGET:
        return BUDGET[name]
    defaults = registry.option_defaults(registry.get("attack", name))
    return {k: v for k, v in DEFAULT_BUDGET.items() if k in defaults}


@pytest.mark.parametrize("name", ATTACKS)
def test_identity_encoder_is_inverted_almost_perfectly(name, images):
    cls = registry.get("attack", name)
    if not cls.queries_encoder:
        pytest.skip(f"{name} never queries the encoder (its threat model denies it)")
    if name in PRIOR_BOUND:
        pytest.skip(f"{name}'s generative prior bounds its reconstructions")
    train_x, labels, test_x = images
    torch.manual_seed(0)
    target = Target(encoder=nn.Identity(), noise_std=0.0, image_shape=(3, 32, 32), device=torch.device("cpu"))
    attack = registry.create("attack", name, budget(name))
    attack.progress = False
    if "labels" in attack.fit.__code__.co_varnames:
        attack.fit(target, train_x, labels=labels)
    else:
        attack.fit(target, train_x)
    recon = attack.reconstruct(target.query(test_x))
    mean_image = train_x.mean(0, keepdim=True).expand_as(test_x)
    got, baseline = ssim(recon, test_x).mean().item(), ssim(mean_image, test_x).mean().item()
    why = f"{name}: SSIM {got:.3f} (mean image {baseline:.3f})"
    assert got > IDENTITY_SSIM.get(name, 0.9) and got > baseline + 0.25, why
