"""A defense's state (the `saved` attributes, privbench.plugin.base.Defense) survives a checkpoint.

Every registered defense, trained a little on random images, is saved, written with torch.save,
read back with weights_only=True and loaded into a fresh one: in the attacker's order (build,
load), the resume order (build, setup, load) and with the state loaded before setup. The fresh
defense must transform, add noise and take a training step exactly as the trained one. States
in the formats the plugins wrote before `saved` existed (stored run folders hold them) load too.
"""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

from privbench.engine.models import SplitModel
from privbench.errors import UserError
from privbench.plugin import registry, stack
from privbench.plugin.base import Defense, TrainContext, takes_keyword

CPU = torch.device("cpu")
DEFENSES = registry.names("defense")
Z_SHAPE = (8, 4, 4)
CLASSES = 4
# Small, and in force from the first epoch: the state is trained by the end of `trained`.
OPTIONS = {
    "adversarial": {"threshold": -1.0},
    "gmm-cem": {"clusters": 2, "warmup": 0, "estimator": "paper"},
    "slot-cem": {"warmup": 0, "num_slots": 2, "hidden": 8, "num_iterations": 1},
    "prune": {"warmup": 1},
    "shredder": {"weight": 1.0},
    "vib": {"beta": 0.01},
}
OLD_FORMATS = ["adversarial", "disco", "gmm-cem", "prune", "shredder", "slot-cem", "vib"]


def encoder() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, Z_SHAPE[0], 8, stride=8), nn.Sigmoid())  # 32x32 -> [8, 4, 4]


def batch(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(uint8 images [16, 3, 32, 32], labels, z of those images)."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8, generator=g)
    with torch.no_grad():
        z = encoder()(images.float() / 255)
    return images, torch.arange(16) % CLASSES, z


def context(params: list) -> TrainContext:
    images, labels, _ = batch(0)
    enc = encoder()
    return TrainContext(
        model=SplitModel(enc, nn.Identity(), 0.05),
        train_images=images,
        train_labels=labels,
        num_classes=CLASSES,
        noise_std=0.05,
        device=CPU,
        epochs=2,
        batch_size=16,
        steps_per_epoch=2,
        seed=0,
        add_parameters=lambda new, **kw: params.extend(new),
        log=lambda m: None,
        client=enc,
    )


def create(name: str) -> Defense:
    return registry.create("defense", name, OPTIONS.get(name, {}))


def step(d: Defense, seed: int = 7, epoch: int = 1) -> list[torch.Tensor | None]:
    """One training step's outputs (transform, noise, loss term) on a fixed batch, seeded."""
    images, y, z = batch()
    torch.manual_seed(seed)
    zt = d.transform(z, training=True) if d.transforms else z
    zn = d.noise(zt, training=True)
    kw = {"x": images.float() / 255} if takes_keyword(d.loss, "x") else {}
    return [zt, zn, d.loss(zt, y, epoch=epoch, lr=0.01, **kw)]


def trained(name: str) -> Defense:
    """Built, set up, then two epochs of two steps: its own losses and a stand-in task loss, with
    the parameters it registers stepped by plain SGD."""
    params: list[torch.nn.Parameter] = []
    d = create(name)
    d.build(Z_SHAPE, CPU)
    ctx = context(params)
    d.setup(ctx)
    for epoch in range(2):
        for seed in (1, 2):
            images, y, z = batch(seed)
            z = z.clone().requires_grad_(True)
            zt = d.transform(z, training=True) if d.transforms else z
            kw = {"x": images.float() / 255} if takes_keyword(d.loss, "x") else {}
            term = d.loss(zt, y, epoch=epoch, lr=0.01, **kw)
            total = d.noise(zt, training=True).square().mean() + (0 if term is None else term)
            total.backward()
            with torch.no_grad():
                for p in params:
                    if p.grad is not None:
                        p -= 0.5 * p.grad
                        p.grad = None
        d.epoch_end(epoch, ctx)
    return d


def through_a_file(state: dict) -> dict:
    buf = io.BytesIO()
    torch.save({"defense": state}, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)["defense"]


def restored(name: str, state: dict, order: str) -> Defense:
    fresh = create(name)
    fresh.build(Z_SHAPE, CPU)
    if order == "resume":  # the training loop: setup, then the epoch checkpoint
        fresh.setup(context([]))
    fresh.load_state_dict(state)
    if order == "load first":
        fresh.setup(context([]))
    return fresh


def same(a, b) -> bool:
    """Equal nested states: dicts, lists, tuples, tensors (torch.equal) and plain values."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


def eval_outputs(d: Defense) -> list[torch.Tensor]:
    """What the attacker sees of a fixed z: the transform, then the noise under a fixed seed."""
    _, _, z = batch()
    torch.manual_seed(3)  # dropout drops at inference too
    with torch.no_grad():
        zt = d.transform(z, training=False)
        return [zt, d.noise(zt, training=False)]


def check_restores(name: str, original: Defense, state: dict) -> None:
    expected_eval = eval_outputs(original)
    expected_state = original.state_dict()
    expected_step = step(original)  # after the snapshot: a restored defense takes the same step
    for order in ("attack", "resume", "load first"):
        fresh = restored(name, through_a_file(state), order)
        assert same(fresh.state_dict(), expected_state), order
        assert same(eval_outputs(fresh), expected_eval), order
        if order != "attack":  # training needs setup
            assert same(step(fresh), expected_step), order


@pytest.mark.parametrize("name", DEFENSES)
def test_state_round_trips_through_a_weights_only_file(name):
    d = trained(name)
    state = d.state_dict()
    if type(d).saved:  # a defense with state has trained some by now
        assert state, f"{name} saved nothing after training"
    else:
        assert state == {}
    check_restores(name, d, state)


def to_cpu(obj):
    """adversarial's old helper: every tensor of a nested state detached, on the CPU, cloned."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu().clone()
    if isinstance(obj, dict):
        return {k: to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(to_cpu(v) for v in obj)
    return obj


def old_format(name: str, d) -> dict:
    """The state as the plugin's own state_dict wrote it before `saved` existed (copied by hand)."""
    cpu = {k: v.detach().cpu().clone() for k, v in d.__dict__.items() if isinstance(v, torch.Tensor)}
    if name == "disco":
        return {k: v.detach().cpu().clone() for k, v in d.scorer.state_dict().items()}
    if name == "vib":
        return {k: v.detach().cpu() for k, v in d.head.state_dict().items()}
    if name == "prune":
        return {"mask": cpu["mask"]}
    if name == "shredder":
        return {"log_scale": cpu["log_scale"]}
    if name == "gmm-cem":
        return {k: cpu[k] for k in ("centroids", "vbar", "pi", "var_diag")}
    if name == "slot-cem":
        m = d.module
        return {
            "shape": torch.tensor([m.dim, m.num_classes, m.num_slots, m.hidden, m.num_iterations]),
            "module": {k: v.detach().cpu() for k, v in m.state_dict().items()},
        }
    if name == "adversarial":
        return {"decoder": to_cpu(d.decoder.state_dict()), "optimizer": to_cpu(d.optimizer.state_dict())}
    raise AssertionError(name)


@pytest.mark.parametrize("name", OLD_FORMATS)
def test_states_in_the_old_formats_still_load(name):
    d = trained(name)
    check_restores(name, d, old_format(name, d))


def test_stacked_states_keep_their_per_part_form():
    parts = stack.create("disco+shredder")
    parts.build(Z_SHAPE, CPU)
    disco, shredder = (d for _, d in parts.members)
    with torch.no_grad():
        shredder.log_scale.fill_(-1.0)
    scorer = {k: v.clone() for k, v in disco.scorer.state_dict().items()}
    old = {"disco": scorer, "shredder": {"log_scale": shredder.log_scale.detach().clone()}}
    assert same(parts.state_dict(), old)
    again = stack.create("disco+shredder")
    again.build(Z_SHAPE, CPU)
    again.load_state_dict(through_a_file(old))
    assert same(eval_outputs(again), eval_outputs(parts))


# --------------------------------------------------------------------------- errors


def test_a_tensor_of_another_shape_is_one_line():
    d = create("shredder")
    d.build(Z_SHAPE, CPU)
    with pytest.raises(UserError) as err:
        d.load_state_dict({"log_scale": torch.zeros(3, 4, 4)})
    assert str(err.value) == "shredder state: 'log_scale' has shape (3, 4, 4), z gives (8, 4, 4)"


@pytest.mark.parametrize(
    ("name", "state", "lacks"),
    [
        ("shredder", {"scale": torch.zeros(Z_SHAPE)}, "log_scale"),
        ("prune", {"kept": torch.ones(8)}, "mask"),
        ("gmm-cem", {"centroids": torch.zeros(CLASSES, 2, 128), "pi": torch.ones(CLASSES, 2)}, "vbar"),
        ("adversarial", {"decoder": {}}, "optimizer"),
        ("slot-cem", {"shape": torch.tensor([128, CLASSES, 2, 8, 1])}, "module"),
    ],
)
def test_a_missing_entry_is_named(name, state, lacks):
    d = create(name)
    d.build(Z_SHAPE, CPU)
    with pytest.raises(UserError) as err:
        d.load_state_dict(state)
    assert str(err.value) == f"{name} state lacks {lacks!r}"


def test_a_module_that_does_not_fit_is_one_line():
    small = create("disco")
    small.build((4, 4, 4), CPU)
    d = create("disco")
    d.build(Z_SHAPE, CPU)
    with pytest.raises(UserError) as err:
        d.load_state_dict(small.state_dict())
    message = str(err.value)
    assert message.startswith("disco state does not fit 'scorer': ") and "ChannelScorer" in message
    assert "\n" not in message


def test_an_empty_state_changes_nothing():
    d = create("shredder")
    d.build(Z_SHAPE, CPU)
    before = d.state_dict()
    for empty in ({}, None):
        d.load_state_dict(empty)
    assert same(d.state_dict(), before)


# --------------------------------------------------------------------------- the base class


class Toy(Defense):
    """A module built in setup (whose state waits), a tensor fixed late, plain values."""

    name = "toy"
    saved = ("net", "mask", "count", "history")
    saved_optional = ("history",)

    def __init__(self):
        self.net: nn.Module | None = None
        self.mask: torch.Tensor | None = None
        self.count = 0
        self.history: list | None = None

    def setup(self, ctx) -> None:
        self.net = nn.Linear(3, 2)  # no restore_pending here: the stack calls it after setup


def test_the_base_saves_every_kind_and_waits_for_a_module_built_in_setup():
    a = Toy()
    assert a.state_dict() == {"count": 0}  # attributes still None are left out
    a.setup(None)
    a.mask, a.count, a.history = torch.tensor([1.0, 0.0]), 3, [torch.ones(2), 0.5]
    state = through_a_file(a.state_dict())
    assert set(state) == {"net", "mask", "count", "history"} and state["mask"].device == CPU
    b = stack.Stack("toy", [("toy", Toy())])
    b.load_state_dict(state)  # before setup: the net's state waits
    toy = b.members[0][1]
    assert toy.net is None and toy.count == 3 and torch.equal(toy.mask, a.mask)
    assert same(b.state_dict(), state)  # what waits is still saved
    b.setup(context([]))
    assert same(toy.net.state_dict(), a.net.state_dict())
    del state["history"]  # optional
    c = Toy()
    c.load_state_dict(state)
    assert c.history is None
