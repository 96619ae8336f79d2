import math

import pytest
import torch
from conftest import tiny_config
from privbench.defenses.slot_cem import GATE_FLOOR, KAPPA, SlotEstimator, loo_statistics
from slot_cem_reference import ReferenceEstimator, reference_forward

from privbench.engine.data import to_float
from privbench.engine.features import intra_class_mse
from privbench.engine.models import vgg11
from privbench.engine.train import load_data, pick_device, train
from privbench.errors import UserError
from privbench.plugin import registry
from privbench.plugin.base import TrainContext


def make_defense(num_classes: int, noise: float = 0.025, params: list | None = None, **options):
    defense = registry.create("defense", "slot-cem", {"warmup": 0, **options})
    ctx = TrainContext(
        model=torch.nn.Identity(),
        train_images=torch.zeros(1, 3, 32, 32, dtype=torch.uint8),
        train_labels=torch.zeros(1, dtype=torch.long),
        num_classes=num_classes,
        noise_std=noise,
        device=torch.device("cpu"),
        epochs=1,
        batch_size=64,
        steps_per_epoch=1,
        seed=0,
        log=lambda m: None,
    )
    if params is not None:
        ctx.add_parameters = lambda new, **group: params.extend(new)
    defense.setup(ctx)
    return defense, ctx


def clustered_features(num_classes: int, n: int, dim: int = 512, seed: int = 0):
    """Sigmoid features (like a C8 bottleneck) with 3 sub-clusters per class."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % num_classes
    sub = torch.randint(0, 3, (n,), generator=g)
    centres = torch.randn(num_classes, 3, dim, generator=g) * 0.8
    return torch.sigmoid(centres[y, sub] + 0.5 * torch.randn(n, dim, generator=g)), y


def one_hot(y, num_classes, like):
    return torch.nn.functional.one_hot(y, num_classes).to(like.dtype)


def direct_loo(z, y, r, num_classes):
    """The leave-one-out statistics written out literally, sample by sample and slot by slot."""
    n, D = z.shape
    K = r.shape[1]
    e2 = torch.zeros(n, K, D, dtype=z.dtype)
    for m in range(n):
        mates = [j for j in range(n) if y[j] == y[m] and j != m]
        zl = z[mates].mean(0) if mates else torch.zeros(D, dtype=z.dtype)
        for k in range(K):
            num = sum((r[j, k] * z[j] for j in mates), torch.zeros(D, dtype=z.dtype)) + KAPPA * zl
            den = sum((r[j, k] for j in mates), torch.zeros((), dtype=z.dtype)) + KAPPA
            e2[m, k] = (z[m] - num / den) ** 2
    v = torch.zeros(num_classes, K, D, dtype=z.dtype)
    for c in range(num_classes):
        members = (y == c).nonzero().flatten()
        for k in range(K):
            w = r[members, k]
            if len(members):
                v[c, k] = (w[:, None] * e2[members, k]).sum(0) / w.sum()
    return e2, v


def test_leave_one_out_statistics_match_the_direct_loop():
    g = torch.Generator().manual_seed(1)
    z = torch.rand(11, 6, generator=g, dtype=torch.float64)
    y = torch.tensor([0, 0, 1, 2, 0, 1, 1, 0, 2, 2, 0])  # class 3 absent
    r = torch.softmax(torch.randn(11, 4, generator=g, dtype=torch.float64) * 2, 1)
    e2, v_ref = direct_loo(z, y, r, 4)
    v, mu, mass, counts, e2_mean, *_ = loo_statistics(z, y, one_hot(y, 4, z), r)
    assert torch.allclose(v, v_ref, atol=1e-10)
    assert torch.allclose(e2_mean, e2.mean(-1), atol=1e-10)
    assert counts.tolist() == [5, 3, 3, 0]
    assert torch.allclose(mass[:3].sum(1), torch.ones(3, dtype=torch.float64))
    w = r[y == 1]
    assert torch.allclose(mu[1], (w.T @ z[y == 1]) / w.sum(0)[:, None])


def test_a_slot_owning_one_sample_does_not_read_as_tight():
    # Hard responsibilities: sample 0 alone in slot 0, the rest in slot 1. A plain within-slot
    # variance would give 0 for slot 0; the leave-one-out one is its distance to the classmates.
    z = torch.tensor([[1.0], [0.0], [0.2], [0.4]])
    y = torch.zeros(4, dtype=torch.long)
    r = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [0.0, 1.0]])
    v, *_ = loo_statistics(z, y, one_hot(y, 1, z), r)
    assert v[0, 0, 0].item() == pytest.approx((1.0 - 0.2) ** 2)  # centre = mean of the classmates
    # Slot 1, sample 1: centre (0.2 + 0.4 + KAPPA * 0.533..) / (2 + KAPPA) with KAPPA = 1.
    c1 = (0.6 + KAPPA * (1.6 / 3)) / (2 + KAPPA)
    c2 = (0.4 + KAPPA * (1.4 / 3)) / (2 + KAPPA)
    c3 = (0.2 + KAPPA * (1.2 / 3)) / (2 + KAPPA)
    expected = ((0.0 - c1) ** 2 + (0.2 - c2) ** 2 + (0.4 - c3) ** 2) / 3
    assert v[0, 1, 0].item() == pytest.approx(expected)


@pytest.mark.parametrize("num_classes,n", [(3, 7), (5, 32), (10, 128)])
def test_shapes_through_each_stage(num_classes, n):
    D, K, H = 40, 5, 16
    g = torch.Generator().manual_seed(n)
    z = torch.rand(n, D, generator=g)
    y = torch.arange(n) % (num_classes - 1)
    y[-1] = num_classes - 1  # the last class has a single sample
    module = SlotEstimator(D, num_classes, num_slots=K, hidden=H, num_iterations=2)
    u = module.embed(z)
    onehot = one_hot(y, num_classes, z)
    slots = module.slot_attention(u, onehot.T)
    assert u.shape == (n, H) and slots.shape == (num_classes, K, H)
    assert module.cross(u, slots, onehot).shape == (n, H)
    r = module(z, onehot)
    assert r.shape == (n, K) and torch.allclose(r.sum(1), torch.ones(n))
    v, mu, mass, counts, *_ = loo_statistics(z, y, onehot, r)
    assert v.shape == mu.shape == (num_classes, K, D) and mass.shape == (num_classes, K)
    assert bool(torch.isfinite(v).all()) and counts[-1] == 1

    defense, _ = make_defense(num_classes, num_slots=K, hidden=H, num_iterations=2)
    term = defense.loss(z, y, epoch=0, lr=0.02)
    assert term.shape == () and torch.isfinite(term)
    out = defense.last
    assert out["rob_loss"] > 0 and out["class_gate"] < 1  # the one-sample class is gated off
    # The one-sample class adds nothing: dropping it only renormalizes the class weights.
    keep = y != num_classes - 1
    torch.manual_seed(0)
    full = defense.forward(z, y)["rob_loss"]
    torch.manual_seed(0)
    part = defense.forward(z[keep], y[keep])["rob_loss"]
    assert full.item() == pytest.approx(part.item() * (n - 1) / n, rel=1e-4)


@pytest.mark.parametrize(
    "dtype,C,n,D,K,H",
    [(torch.float64, 10, 128, 512, 8, 64), (torch.float64, 4, 11, 6, 3, 8), (torch.float32, 10, 128, 512, 8, 64)],
)
def test_losses_and_gradients_match_the_reference_formulas(dtype, C, n, D, K, H):
    # slot_cem_reference.py is the code before the speed-up (per-sample copies of the slots, two
    # leave-one-out passes, five-moment expansion): same values and the same gradient of each
    # loss to z and to every module parameter, within 1e-5 (relative; absolute for gradients,
    # relative to the largest component of the loss's gradient).
    tol = 1e-5
    torch.manual_seed(0)
    defense, _ = make_defense(C, num_slots=K, hidden=H)
    defense._build(D, torch.device("cpu"))
    module = defense.module.to(dtype)
    with torch.no_grad():  # away from the initial values (slot power 1, gates at their init)
        for p in module.parameters():
            p.add_(0.2 * torch.randn_like(p))
    reference = ReferenceEstimator(D, C, num_slots=K, hidden=H).to(dtype)
    reference.load_state_dict(module.state_dict())
    z0, y = clustered_features(C - 1, n, dim=D)
    y[-1] = C - 1  # a class with a single sample
    results = []
    for mod, forward in (
        (module, defense.forward),
        (reference, lambda z, y: reference_forward(defense, reference, z, y)),
    ):
        z = z0.to(dtype).requires_grad_()
        torch.manual_seed(1)  # the slots' initial draw
        out = forward(z, y)
        inputs = [z, *mod.parameters()]
        grads = [
            torch.autograd.grad(out[k], inputs, retain_graph=True, allow_unused=True)
            for k in ("rob_loss", "module_loss")
        ]
        results.append((out, grads))
    (out, grads), (ref_out, ref_grads) = results
    for k in ("rob_loss", "module_loss", "intra_mse", "dim_gate", "snr_gate", "class_gate"):
        assert out[k].item() == pytest.approx(ref_out[k].item(), rel=tol), k
    names = ["z"] + [name for name, _ in module.named_parameters()]
    for loss, got, want in zip(("rob_loss", "module_loss"), grads, ref_grads):
        want = [torch.zeros_like(t) if g is None else g for t, g in zip([z0, *module.parameters()], want)]
        got = [torch.zeros_like(w) if g is None else g for w, g in zip(want, got)]
        scale = max(w.abs().max().item() for w in want)
        bad = [nm for nm, a, b in zip(names, got, want) if not torch.allclose(a, b, rtol=tol, atol=tol * scale)]
        assert not bad, (loss, bad)
    assert ref_grads[0][0].abs().sum() > 0 and all(g is None for g in grads[0][1:])  # rob_loss: z only
    assert grads[1][0] is None  # module_loss: the module only


def test_gradient_reaches_the_encoder_not_the_server_and_rob_loss_not_the_module():
    torch.manual_seed(0)
    model = vgg11(num_classes=4, bottleneck=8, noise_std=0.025, width=0.125)
    params: list = []
    defense, _ = make_defense(4, params=params)
    x, y = torch.rand(16, 3, 32, 32), torch.arange(16) % 4
    z = model.encoder(x)
    term = defense.loss(z, y, epoch=0, lr=0.02)
    assert defense.module is not None and params == list(defense.module.parameters())  # joined the optimizer
    term.backward()
    enc = [p.grad for p in model.encoder.parameters()]
    assert all(g is not None for g in enc) and sum(g.abs().sum() for g in enc) > 0
    assert all(p.grad is None for p in model.server.parameters())
    assert sum(p.grad is not None and p.grad.abs().sum() > 0 for p in params) >= len(params) - 2
    # rob_loss alone: no gradient to any module parameter (the hazard's first guard).
    z = model.encoder(x)
    rob = defense.forward(z.flatten(1), y)["rob_loss"]
    grads = torch.autograd.grad(rob, params, allow_unused=True)
    assert all(g is None or g.abs().sum() == 0 for g in grads)
    assert torch.autograd.grad(rob, z)[0].abs().sum() > 0


def test_same_seed_builds_the_same_module_as_the_reference():
    # Same parameters, names and random draws at construction: a seed trains the same module.
    torch.manual_seed(3)
    new = SlotEstimator(40, 5).state_dict()
    torch.manual_seed(3)
    old = ReferenceEstimator(40, 5).state_dict()
    assert list(new) == list(old) and all(torch.equal(new[k], old[k]) for k in new)


def test_cpu_step_runs_on_one_thread_and_gives_the_threads_back():
    # The defense's forward and backward run on one thread; the server's and encoder's backward,
    # which follow it, run on all of them again.
    torch.set_num_threads(2)  # conftest's setting, restated: the test needs more than one
    torch.manual_seed(0)
    model = vgg11(num_classes=4, bottleneck=8, noise_std=0.025, width=0.125)
    defense, _ = make_defense(4)
    x, y = torch.rand(16, 3, 32, 32), torch.arange(16) % 4
    seen: dict[str, list[int]] = {"module": [], "server": [], "encoder": []}

    def record(key):
        return lambda g: seen[key].append(torch.get_num_threads())

    z = model.encoder(x)
    logits = model.server(model.channel(z))
    loss = torch.nn.functional.cross_entropy(logits, y) + defense.loss(z, y, epoch=0, lr=0.02)
    assert torch.get_num_threads() == 2  # forward done: back to two
    for p in defense.module.parameters():
        p.register_hook(record("module"))
    logits.register_hook(record("server"))
    z.register_hook(record("encoder"))
    loss.backward()
    assert set(seen["module"]) == {1} and seen["server"] == [2] and seen["encoder"] == [2]
    assert torch.get_num_threads() == 2
    # A backward that stops short of z (the module's gradient only) leaves one thread; the next
    # step or epoch end gives the threads back.
    term = defense.loss(model.encoder(x), y, epoch=0, lr=0.02)
    torch.autograd.grad(term, list(defense.module.parameters()))
    assert torch.get_num_threads() == 1
    defense.epoch_end(0, defense.ctx)
    assert torch.get_num_threads() == 2


def test_encoder_gradient_is_lam_times_lr_scale_times_rob_loss():
    # The module's own loss is computed on z.detach(): z's gradient is lam * s * d rob_loss / dz.
    z, y = clustered_features(3, 24, dim=32)
    defense, _ = make_defense(3, lam=16.0)
    defense.loss(z, y, epoch=0, lr=0.02)  # builds the module (its init draws random numbers)
    for lr, s in [(0.02, 0.001 / 0.02), (1e-4, 1.0)]:
        za, zb = z.clone().requires_grad_(), z.clone().requires_grad_()
        torch.manual_seed(0)
        defense.loss(za, y, epoch=0, lr=lr).backward()
        torch.manual_seed(0)
        (16.0 * s * defense.forward(zb, y)["rob_loss"]).backward()
        assert za.grad.abs().sum() > 0 and torch.allclose(za.grad, zb.grad, rtol=1e-5, atol=1e-10)


def test_gates_start_open():
    z, y = clustered_features(4, 64)
    defense, ctx = make_defense(4)
    defense.loss(z, y, epoch=0, lr=0.02)
    assert defense.last["dim_gate"] > 0.9 and defense.last["class_gate"] > 0.99
    assert defense.last["snr_gate"] > 0.75
    row = defense.epoch_end(0, ctx)
    assert row["dim_gate"] > 0.9 and row["cem_active"] == 1.0 and row["nan_count"] == 0
    assert math.isclose(row["rob_loss"], defense.last["rob_loss"].item(), rel_tol=1e-6)


def test_warmup_returns_none_and_the_loop_still_trains():
    z, y = clustered_features(3, 30)
    defense, ctx = make_defense(3, warmup=2)
    assert defense.loss(z, y, epoch=1, lr=0.02) is None and defense.module is None
    row = defense.epoch_end(1, ctx)
    assert row["cem_active"] == 0.0 and row["intra_mse"] > 0  # intra_mse is logged in warm-up too
    assert defense.loss(z, y, epoch=2, lr=0.02) is not None and defense.module is not None
    assert registry.create("defense", "slot-cem", {"lam": 0}).options()["lam"] == 0


def test_lam_zero_trains_exactly_like_none():
    a = train(tiny_config(seed=3), log=lambda m: None).model.state_dict()
    b = train(tiny_config(seed=3, defense="slot-cem", defense_options={"lam": 0, "warmup": 0}), log=lambda m: None)
    assert all(torch.equal(a[k], b.model.state_dict()[k]) for k in a)
    assert b.history[0]["cem_active"] == 0.0 and b.history[0]["defense_loss"] == 0.0


def test_nan_input_gives_zero_loss_and_is_counted():
    z, y = clustered_features(3, 30, dim=64)
    defense, ctx = make_defense(3)
    z = z.clone()
    z[4, 7] = float("nan")
    z = z.requires_grad_()
    term = defense.loss(z, y, epoch=0, lr=0.02)
    assert term.item() == 0.0
    term.backward()
    assert bool(torch.isfinite(z.grad).all()) and z.grad.abs().sum() == 0
    assert all(p.grad is None or bool(torch.isfinite(p.grad).all()) for p in defense.module.parameters())
    z2, _ = clustered_features(3, 30, dim=64, seed=1)
    assert defense.loss(z2, y, epoch=0, lr=0.02).item() > 0  # a clean batch is unaffected
    row = defense.epoch_end(0, ctx)
    assert row["nan_count"] == 1.0 and math.isfinite(row["rob_loss"]) and math.isfinite(row["intra_mse"])


def test_a_non_finite_step_sends_no_nan_gradient_to_the_encoder_or_the_module():
    # Finite z, but the step's losses go non-finite inside (an infinite local derivative): the
    # masked term is 0, and its backward must not carry 0 * inf = NaN into the encoder or the module.
    z, y = clustered_features(3, 30, dim=64)
    defense, ctx = make_defense(3)
    real = defense.forward

    def poisoned(zf, yy):
        out = dict(real(zf, yy))
        p = next(defense.module.parameters())
        out["rob_loss"] = out["rob_loss"] + torch.sqrt(zf.sum() * 0 - 1)  # NaN value, NaN gradient
        out["module_loss"] = out["module_loss"] + torch.sqrt(p.sum() * 0 - 1)
        out["bad"] = ~(torch.isfinite(out["rob_loss"]) & torch.isfinite(out["module_loss"]))
        return out

    defense.loss(z, y, epoch=0, lr=0.02)  # builds the module
    defense.forward = poisoned
    z = z.clone().requires_grad_()
    term = defense.loss(z, y, epoch=0, lr=0.02)
    assert term.item() == 0.0
    term.backward()
    assert bool(torch.isfinite(z.grad).all()) and z.grad.abs().sum() == 0
    grads = [p.grad for p in defense.module.parameters() if p.grad is not None]
    assert grads and all(bool(torch.isfinite(g).all()) and g.abs().sum() == 0 for g in grads)
    defense.forward = real  # the next, finite step's gradient passes unchanged
    z2 = clustered_features(3, 30, dim=64, seed=1)[0].requires_grad_()
    defense.loss(z2, y, epoch=0, lr=0.02).backward()
    assert bool(torch.isfinite(z2.grad).all()) and z2.grad.abs().sum() > 0


@pytest.fixture
def one_thread():
    """Hundreds of small steps: one thread avoids thread hand-offs on a busy 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_hazard_module_alone_cannot_make_rob_loss_vanish(one_thread):
    # Encoder frozen (z fixed). Train only the module, with its own objective, harder than the
    # loop would (Adam, 250 steps, batch 48): rob_loss must stay well above half its start and the gates
    # open; shrinking z itself must lower rob_loss.
    torch.manual_seed(0)
    z_all, y_all = clustered_features(4, 400, dim=128)
    params: list = []
    defense, ctx = make_defense(4, params=params)
    g = torch.Generator().manual_seed(0)
    robs, opt = [], None
    for _ in range(250):
        idx = torch.randint(0, 400, (48,), generator=g)
        term = defense.loss(z_all[idx], y_all[idx], epoch=0, lr=0.02)
        opt = opt or torch.optim.Adam(params, lr=3e-3)
        opt.zero_grad()
        term.backward()
        opt.step()
        robs.append(defense.last["rob_loss"].item())
    start, end = sum(robs[:20]) / 20, sum(robs[-20:]) / 20
    assert end > 0.6 * start, (start, end)
    assert defense.last["dim_gate"] > 0.9 and defense.last["snr_gate"] > 0.75
    assert min(defense.last["dim_gate"], defense.last["snr_gate"]) >= GATE_FLOOR
    row = defense.epoch_end(0, ctx)
    assert row["module_loss"] < 1.0  # the module did learn its own fit (sub-clusters)
    z, y = z_all[:64], y_all[:64]
    means = torch.stack([z[y == c].mean(0) for c in range(4)])
    rob = []
    for f in (1.0, 0.5, 0.25):
        torch.manual_seed(0)
        rob.append(defense.forward(means[y] + f * (z - means[y]), y)["rob_loss"].item())
    assert rob[0] > 1.5 * rob[1] > 2.0 * rob[2]


def test_state_dict_round_trip_with_weights_only(tmp_path):
    z, y = clustered_features(3, 30, dim=64)
    defense, _ = make_defense(3, num_slots=4, hidden=8)
    assert defense.state_dict() == {}
    defense.loss(z, y, epoch=0, lr=0.02)
    torch.save({"defense": defense.state_dict()}, tmp_path / "c.pt")
    state = torch.load(tmp_path / "c.pt", weights_only=True)["defense"]
    other, _ = make_defense(3, num_slots=4, hidden=8)
    other.load_state_dict(state)
    torch.manual_seed(5)
    a = defense.forward(z, y)
    torch.manual_seed(5)
    b = other.forward(z, y)
    assert torch.equal(a["rob_loss"], b["rob_loss"]) and torch.equal(a["module_loss"], b["module_loss"])
    with pytest.raises(UserError, match="slot-cem state"):
        other.load_state_dict({"shape": state["shape"], "module": {}})
    wrong, _ = make_defense(3)
    wrong.load_state_dict(state)
    with pytest.raises(UserError, match="classes"):
        wrong.setup(make_defense(5)[1])


@pytest.mark.parametrize("opts", [{"num_slots": 0}, {"lam": -1}, {"warmup": 1.5}, {"lambda": 3}])
def test_bad_options_are_user_errors(opts):
    with pytest.raises(UserError):
        registry.create("defense", "slot-cem", opts)


def test_short_training_shrinks_intra_class_spread_compared_with_none():
    def spread(defense: str, opts: dict) -> float:
        cfg = tiny_config(
            epochs=3, n_train=500, width=0.125, bottleneck=8, noise=0.025, defense=defense, defense_options=opts
        )
        data = load_data(cfg, pick_device(cfg.device))
        enc = train(cfg, data=data, log=lambda m: None).model.encoder.eval()
        with torch.no_grad():
            z = enc(to_float(data.train.images)).flatten(1)
        return intra_class_mse(z, data.train.labels, data.num_classes).item()

    base, cem = spread("none", {}), spread("slot-cem", {"warmup": 1})
    assert cem < 0.85 * base, (cem, base)
