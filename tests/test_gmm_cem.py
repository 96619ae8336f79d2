"""gmm-cem: the batch loss against hand computations, the k-means refit, and short training runs."""

import io
import math

import pytest
import torch
from conftest import tiny_config
from torch import nn

from privbench.engine.models import SplitModel, build_model
from privbench.engine.train import load_data, train
from privbench.errors import UserError
from privbench.plugin import registry
from privbench.plugin.base import TrainContext

# A fixed mixture: 2 classes x 2 clusters in 2 dimensions, and a batch of 5 features.
MU = [[[0.0, 0.0], [1.0, 1.0]], [[2.0, 0.0], [0.0, 2.0]]]
VBAR = [[0.02, 0.05], [0.03, 0.01]]
VAR_DIAG = [[[0.01, 0.03], [0.04, 0.06]], [[0.02, 0.04], [0.005, 0.015]]]  # means are VBAR
PI = [[0.75, 0.25], [0.5, 0.5]]
COUNTS = [400, 200]  # training images per class
Z = [[0.1, 0.0], [0.0, 0.2], [0.9, 1.2], [2.0, 0.3], [1.9, 0.1]]
Y = [0, 0, 0, 1, 1]


def make_ctx(labels, *, num_classes, noise=0.025, images=None, encoder=None, seed=0):
    if images is None:
        images = torch.zeros(len(labels), 1, 1, 1, dtype=torch.uint8)
    model = SplitModel(encoder if encoder is not None else nn.Flatten(), nn.Identity(), noise)
    return TrainContext(
        model=model,
        train_images=images,
        train_labels=torch.as_tensor(labels),
        num_classes=num_classes,
        noise_std=noise,
        device=torch.device("cpu"),
        epochs=1,
        batch_size=128,
        steps_per_epoch=1,
        seed=seed,
        log=lambda m: None,
    )


def fixed_defense(noise=0.025, pi=PI, **options):
    d = registry.create("defense", "gmm-cem", {"clusters": 2, **options})
    d.setup(make_ctx([0] * COUNTS[0] + [1] * COUNTS[1], num_classes=2, noise=noise))
    d.load_state_dict(
        {
            "centroids": torch.tensor(MU),
            "vbar": torch.tensor(VBAR),
            "pi": torch.tensor(pi),
            "var_diag": torch.tensor(VAR_DIAG),
        }
    )
    return d


def members_by_cluster(c, pi=PI):
    """cluster -> list of the batch features of class c nearest to it (empty clusters skipped)."""
    out = {}
    for z, y in zip(Z, Y):
        if y != c:
            continue
        dists = [sum((z[i] - MU[c][j][i]) ** 2 for i in range(2)) if pi[c][j] > 0 else math.inf for j in range(2)]
        j = dists.index(min(dists))
        out.setdefault(j, []).append(z)
    return out


def hand_reference(sigma, tau=0.125, log_form=True, pi=PI):
    per_class = []
    for c in sorted(set(Y)):
        total = 0.0
        for j, zs in members_by_cluster(c, pi).items():
            n = len(zs)
            vhat = sum(sum((z[i] - MU[c][j][i]) ** 2 for i in range(2)) / 2 for z in zs) / n
            a = min(10 * n / (pi[c][j] * COUNTS[c]), 0.99)
            v = a * vhat + (1 - a) * VBAR[c][j]
            if log_form:
                total += pi[c][j] * max(0.0, math.log(v + 0.01) - math.log(tau * sigma**2 + 0.01))
            else:
                total += pi[c][j] * (v + 0.001)
        per_class.append(total)
    return sum(per_class) / len(per_class)


def hand_paper(sigma):
    per_class = []
    for c in sorted(set(Y)):
        groups = members_by_cluster(c)
        n_c = sum(len(zs) for zs in groups.values())
        b = min(10 * n_c / COUNTS[c], 0.99)
        h = 0.0
        for j in range(2):
            zs = groups.get(j, [])
            n = len(zs)
            a = min(10 * n / (PI[c][j] * COUNTS[c]), 0.99) if n else 0.0
            pi = b * n / n_c + (1 - b) * PI[c][j]
            half_logdet = 0.0
            for i in range(2):
                sig_hat = sum((z[i] - MU[c][j][i]) ** 2 for z in zs) / n if n else 0.0
                sig = a * sig_hat + (1 - a) * VAR_DIAG[c][j][i]
                half_logdet += 0.5 * math.log((sig + sigma**2) / sigma**2)
            h += (-pi * math.log(pi) if pi > 0 else 0.0) + pi * half_logdet
        per_class.append(h)
    return sum(per_class) / len(per_class)


def batch():
    return torch.tensor(Z).view(5, 2, 1, 1), torch.tensor(Y)


def test_reference_loss_matches_hand_computation():
    z, y = batch()
    d = fixed_defense(lam=1.0)
    got = d.loss(z, y, epoch=1, lr=1e-4).item()  # lr < 4.1e-4: no rescaling
    assert got == pytest.approx(hand_reference(0.025), rel=1e-5)
    assert got == pytest.approx(0.96191, abs=1e-4)  # worked out on paper (see the numbers above)
    # lam * 0.001 / lr above the pivot learning rate, as the reference
    assert d.loss(z, y, epoch=1, lr=0.02).item() == pytest.approx(0.05 * got, rel=1e-5)
    assert fixed_defense(lam=16.0).loss(z, y, epoch=1, lr=0.01).item() == pytest.approx(16 * 0.1 * got, rel=1e-5)


def test_linear_form_matches_hand_computation():
    z, y = batch()
    got = fixed_defense(lam=1.0, log_entropy=False).loss(z, y, epoch=1, lr=1e-4).item()
    assert got == pytest.approx(hand_reference(0.025, log_form=False), rel=1e-5)


def test_empty_cluster_takes_no_samples():
    pi = [[0.75, 0.25], [0.0, 1.0]]  # class 1, cluster 0 empty at the last refit
    z, y = batch()
    got = fixed_defense(lam=1.0, pi=pi).loss(z, y, epoch=1, lr=1e-4).item()
    assert got == pytest.approx(hand_reference(0.025, pi=pi), rel=1e-5)
    assert got != pytest.approx(hand_reference(0.025), rel=1e-3)


def test_paper_estimator_matches_hand_computation():
    z, y = batch()
    got = fixed_defense(noise=0.1, lam=1.0, estimator="paper").loss(z, y, epoch=1, lr=1e-4).item()
    assert got == pytest.approx(hand_paper(0.1), rel=1e-5)


def test_noise_zero_reference_is_defined_paper_refused():
    z, y = batch()
    got = fixed_defense(noise=0.0, lam=1.0).loss(z, y, epoch=1, lr=1e-4)
    assert torch.isfinite(got) and got.item() == pytest.approx(hand_reference(0.0), rel=1e-5)
    d = registry.create("defense", "gmm-cem", {"estimator": "paper"})
    with pytest.raises(UserError, match="needs --noise > 0"):
        d.setup(make_ctx([0, 1], num_classes=2, noise=0.0))


def test_bad_options_are_refused():
    for opts, msg in [({"clusters": 0}, "clusters"), ({"estimator": "em"}, "estimator"), ({"lam": -1}, "lam")]:
        with pytest.raises(UserError, match=msg):
            registry.create("defense", "gmm-cem", opts)


def test_warmup_and_missing_mixture_give_no_term():
    z, y = batch()
    d = registry.create("defense", "gmm-cem", {"clusters": 2})
    d.setup(make_ctx([0, 1], num_classes=2))
    assert d.loss(z, y, epoch=3, lr=0.01) is None  # no refit yet
    assert fixed_defense(warmup=2).loss(z, y, epoch=1, lr=0.01) is None
    assert fixed_defense(warmup=2).loss(z, y, epoch=2, lr=0.01) is not None


def random_ctx(seed=0, per_class=(30, 30, 30), num_classes=3):
    g = torch.Generator().manual_seed(123)
    labels = torch.cat([torch.full((n,), c) for c, n in enumerate(per_class)])
    images = torch.randint(0, 256, (len(labels), 3, 4, 4), dtype=torch.uint8, generator=g)
    return make_ctx(labels, num_classes=num_classes, images=images, seed=seed)


def refit(ctx, **options):
    d = registry.create("defense", "gmm-cem", {"clusters": 4, **options})
    d.setup(ctx)
    row = d.epoch_end(0, ctx)
    return d, row


def test_kmeans_refit_is_deterministic_and_a_lloyd_fixed_point():
    a, row = refit(random_ctx(seed=0))
    b, _ = refit(random_ctx(seed=0))
    c, _ = refit(random_ctx(seed=1))
    assert torch.equal(a.centroids, b.centroids) and torch.equal(a.pi, b.pi) and torch.equal(a.vbar, b.vbar)
    assert not torch.equal(a.centroids, c.centroids)
    assert a.centroids.shape == (3, 4, 48) and a.pi.shape == a.vbar.shape == (3, 4)
    assert row["kmeans_iters"] < 50 and row["empty_clusters"] == 0
    # Independent check, plain loops: each centroid is the mean of the features nearest to it.
    ctx = random_ctx()
    x = ctx.train_images.float().div(255).flatten(1)
    total_sq = 0.0
    for cls in range(3):
        feats = x[ctx.train_labels == cls]
        mu = a.centroids[cls]
        nearest = [int(torch.argmin(((f - mu) ** 2).sum(1))) for f in feats]
        for j in range(4):
            members = feats[[i for i, n in enumerate(nearest) if n == j]]
            assert torch.allclose(mu[j], members.mean(0), atol=1e-5)
            assert a.pi[cls, j].item() == pytest.approx(len(members) / len(feats))
            sq = ((members - mu[j]) ** 2).mean().item()
            assert a.vbar[cls, j].item() == pytest.approx(sq, rel=1e-4)
            total_sq += ((members - mu[j]) ** 2).sum().item()
    assert row["within_var"] == pytest.approx(total_sq / x.numel(), rel=1e-4)
    # Warm start: a second refit on the same features starts at the fixed point and stays.
    row2 = a.epoch_end(1, ctx)
    assert torch.allclose(a.centroids, b.centroids) and row2["kmeans_iters"] == 1


def test_empty_clusters_no_nan():
    # Class 0: 2 images for 5 clusters; class 1: 6 copies of one image; class 2: no image at all.
    ctx = random_ctx(per_class=(2, 6, 0))
    ctx.train_images[2:] = ctx.train_images[2]
    d, row = refit(ctx, clusters=5)
    for t in (d.centroids, d.vbar, d.pi):
        assert torch.isfinite(t).all()
    assert row["empty_clusters"] == 3 + 4 + 5
    assert d.pi.sum(1).tolist() == pytest.approx([1.0, 1.0, 0.0])
    assert (d.vbar[d.pi == 0] == 0).all()
    z = ctx.model.encoder(ctx.train_images.float() / 255 + 0.01)
    out = d.loss(z.requires_grad_(), ctx.train_labels, epoch=1, lr=0.01)
    assert torch.isfinite(out)
    out.backward()
    assert torch.isfinite(z.grad).all()


def test_cem_gradient_reaches_only_the_encoder():
    model = build_model("vgg11", num_classes=3, cut=4, bottleneck=8, noise_std=0.025, width=0.125)
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (60, 3, 32, 32), dtype=torch.uint8, generator=g)
    labels = torch.arange(60) % 3
    ctx = make_ctx(labels, num_classes=3, images=images)
    ctx.model = model
    d = registry.create("defense", "gmm-cem", {"clusters": 3})
    d.setup(ctx)
    model.train()
    d.epoch_end(0, ctx)
    assert model.encoder.training  # the refit pass restored train mode
    x = images[:32].float() / 255
    z = model.encoder(x)
    model.server(model.channel(z))  # the server is in the graph of the step, but not of the term
    d.loss(z, labels[:32], epoch=1, lr=0.01).backward()
    assert all(p.grad is None for p in model.server.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.encoder.parameters())


def test_state_dict_round_trip_weights_only():
    a, _ = refit(random_ctx(), estimator="paper")
    buf = io.BytesIO()
    torch.save({"defense": a.state_dict()}, buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)["defense"]
    b = registry.create("defense", "gmm-cem", {"clusters": 4, "estimator": "paper"})
    b.setup(random_ctx())
    b.load_state_dict(state)
    for k in ("centroids", "vbar", "pi", "var_diag"):
        assert torch.equal(getattr(a, k), getattr(b, k))


CHANNEL = dict(noise=0.025, bottleneck=8)


@pytest.fixture(scope="module")
def data():
    return load_data(tiny_config(), torch.device("cpu"))


def test_warmup_training_equals_none(data):
    # Epoch 1 runs the refit pass; epoch 2 is still warm-up: the model must match `none` exactly.
    base = train(tiny_config(epochs=2, **CHANNEL), data=data, log=lambda m: None)
    cem = train(
        tiny_config(epochs=2, defense="gmm-cem", defense_options={"warmup": 2}, **CHANNEL),
        data=data,
        log=lambda m: None,
    )
    a, b = base.model.state_dict(), cem.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert base.test_accuracy == cem.test_accuracy
    assert cem.history[0]["refit_seconds"] > 0 and cem.history[1]["defense_loss"] == 0


@pytest.mark.parametrize("noise", [0.025, 0.0])
def test_two_epoch_run_is_finite(data, noise):
    res = train(tiny_config(epochs=2, defense="gmm-cem", noise=noise, bottleneck=8), data=data, log=lambda m: None)
    first, second = res.history
    assert first["defense_loss"] == 0 and first["rob_loss"] == 0  # warm-up epoch
    assert second["defense_loss"] > 0 and second["rob_loss"] > 0
    for row in res.history:
        assert all(math.isfinite(v) for v in row.values()), row
    assert torch.isfinite(res.defense.centroids).all()
