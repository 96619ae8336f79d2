"""Per-run diagnostics: curves.csv, the Eq. 3 bound, the CEM defenses' entropy hook, slot statistics, plots."""

import json
import math
import os
import stat

import pandas as pd
import pytest
import torch

from privbench.engine.diagnostics import (
    CURVE_COLUMNS,
    curves_frame,
    entropy_bound,
    gaussian_entropy,
    mixture_information,
    read_curves_csv,
    reconstruction_bound,
    slot_stats,
    write_curves_csv,
)
from privbench.errors import UserError
from privbench.plugin import registry, stack
from privbench.plugin.base import TrainContext
from privbench.report.plot_diagnostics import curves_figure, plot_curves, plot_slots

LOG_2PIE = math.log(2 * math.pi * math.e)

HISTORY = [
    {
        "epoch": 1,
        "lr": 0.0002,
        "train_loss": 1.9,
        "defense_loss": 0.0,
        "train_acc": 0.31,
        "epoch_seconds": 4.5,
        "z_intra_class_var": 0.021,
        "z_total_var": 0.09,
    },
    {
        "epoch": 2,
        "lr": 0.02,
        "train_loss": 1.4,
        "defense_loss": 0.7312345678901234,
        "train_acc": 0.55,
        "rob_loss": 0.1345,
        "within_var": 0.004,
        "z_intra_class_var": 0.011,
        "z_total_var": 0.08,
        "dropout_loss": 0.0,
        "epoch_seconds": 4.25,
    },
    {
        "epoch": 3,
        "lr": 0.015,
        "train_loss": 1.2,
        "defense_loss": 0.6,
        "train_acc": 0.7,
        "rob_loss": 0.07,
        "within_var": 0.002,
        "z_intra_class_var": 0.005,
        "z_total_var": 0.07,
        "dropout_loss": 0.0,
        "epoch_seconds": 1 / 3,
    },
]


# ------------------------------------------------------------------------------- curves


def test_curves_csv_round_trip_and_mode(tmp_path):
    old = os.umask(0o022)
    try:
        path = write_curves_csv(HISTORY, tmp_path)  # a run folder: RUN/curves.csv
    finally:
        os.umask(old)
    assert path == tmp_path / "curves.csv"
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert not [p for p in tmp_path.iterdir() if p.name != "curves.csv"]  # no temp file left
    back = read_curves_csv(tmp_path)
    assert list(back.columns) == list(curves_frame(HISTORY).columns)
    assert len(back) == len(HISTORY)
    for row, (_, got) in zip(HISTORY, back.iterrows()):
        for key in back.columns:
            if key in row:
                assert got[key] == row[key], key  # full precision
            else:
                assert math.isnan(got[key]), key  # rob_loss before CEM starts
    pd.testing.assert_frame_equal(back, curves_frame(HISTORY))


def test_curves_columns_are_stable():
    frame = curves_frame(HISTORY)
    cols = list(frame.columns)
    assert cols[:6] == ["epoch", "lr", "train_loss", "defense_loss", "train_acc", "z_intra_class_var"]
    assert cols[6:8] == ["z_total_var", "epoch_seconds"]
    assert cols[8:] == ["dropout_loss", "rob_loss", "within_var"]
    shuffled = [dict(reversed(list(r.items()))) for r in reversed(HISTORY)]
    assert list(curves_frame(shuffled).columns) == cols
    assert frame["epoch"].dtype == "int64"
    assert list(curves_frame([]).columns) == list(CURVE_COLUMNS)


# ------------------------------------------------------------------------------- the bound


@pytest.mark.parametrize("d", [1, 3072, 10**7])
@pytest.mark.parametrize("s2", [1e-6, 0.0123, 4.0])
def test_bound_of_a_gaussian_is_its_variance(d, s2):
    h = d / 2 * math.log(2 * math.pi * math.e * s2)  # entropy of N(0, s2 I_d)
    assert reconstruction_bound(h, d) == pytest.approx(s2, rel=1e-9)


def test_bound_edges():
    assert reconstruction_bound(-math.inf, 10) == 0.0
    assert reconstruction_bound(0.0, 3072) == pytest.approx(1 / (2 * math.pi * math.e))
    assert math.isfinite(reconstruction_bound(1e9, 2))  # no overflow
    assert reconstruction_bound(-1e9, 2) == 0.0
    with pytest.raises(ValueError):
        reconstruction_bound(1.0, 0)


def clusters(C=3, K=2, D=32, n=1800, s2=0.04, spread=4.0, seed=0):
    """z: K well separated Gaussian sub-clusters per class, each N(centre, s2 I); balanced."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % C
    sub = (torch.arange(n) // C) % K
    centres = torch.randn(C, K, D, generator=g) * spread
    return centres[y, sub] + s2**0.5 * torch.randn(n, D, generator=g), y, centres


def closed_form(C, K, D, s2, sigma):
    """I(x; z + eps) for z uniform over C*K Gaussian components, far apart: log(C K) + D/2 log(1 + s2/sigma^2)."""
    return math.log(C * K) + D / 2 * math.log1p(s2 / sigma**2)


def gmm(**options):
    return registry.create("defense", "gmm-cem", options)


def test_gmm_cem_entropy_matches_the_gaussian_closed_form():
    C, K, D, s2, sigma = 3, 2, 32, 0.04, 0.1
    z, y, centres = clusters(C, K, D, s2=s2)
    expect = -closed_form(C, K, D, s2, sigma)
    fresh = gmm(clusters=K).conditional_entropy(z, y, noise_std=sigma)  # k-means on z
    assert fresh == pytest.approx(expect, rel=0.01)
    loaded = gmm(clusters=K)  # as after load_state_dict: the fitted mixture, in any cluster order
    loaded.load_state_dict(
        {"centroids": centres.flip(1), "vbar": torch.full((C, K), s2), "pi": torch.full((C, K), 1 / K)}
    )
    assert loaded.conditional_entropy(z, y, noise_std=sigma) == pytest.approx(fresh, abs=1e-9)
    # more spread inside the clusters, relative to the noise: more information, lower H(x|z)
    wider, _, _ = clusters(C, K, D, s2=4 * s2)
    assert gmm(clusters=K).conditional_entropy(wider, y, noise_std=sigma) < fresh
    assert gmm(clusters=K).conditional_entropy(z, y, noise_std=2 * sigma) > fresh


def test_mixture_information_by_hand():
    z, y, _ = clusters(2, 1, 8, n=200)
    z = z.double()
    ones = torch.ones(len(y), 1)
    info = mixture_information(z, y, ones, 0.1)
    zc = z - torch.stack([z[y == c].mean(0) for c in (0, 1)])[y]
    var = torch.stack([zc[y == c].pow(2).mean(0) for c in (0, 1)])  # [C, D] ML variance
    expect = math.log(2) + 0.5 * torch.log1p(var / 0.01).sum(1).mean().item()
    assert info == pytest.approx(expect, rel=1e-9)
    assert mixture_information(z, y, ones, 0.0) == math.inf


def test_noise_comes_from_setup_or_argument():
    z, y, _ = clusters(2, 1, 8, n=100)
    d = gmm(clusters=1)
    assert d.conditional_entropy(z, y) is None  # never set up, no noise given: no estimate
    labels = torch.arange(10) % 2
    d.setup(ctx(labels, 2, noise=0.1))
    assert d.conditional_entropy(z, y) == d.conditional_entropy(z, y, noise_std=0.1)
    assert d.conditional_entropy(z, y, noise_std=0.0) == -math.inf


def ctx(labels, num_classes, noise=0.1):
    return TrainContext(
        model=torch.nn.Identity(),
        train_images=torch.zeros(len(labels), 3, 4, 4, dtype=torch.uint8),
        train_labels=labels,
        num_classes=num_classes,
        noise_std=noise,
        device=torch.device("cpu"),
        epochs=1,
        batch_size=8,
        steps_per_epoch=1,
        seed=0,
        log=lambda m: None,
    )


def slot_defense(num_classes, dim, noise=0.1, seed=0):
    d = registry.create("defense", "slot-cem", {"warmup": 0})
    d.setup(ctx(torch.arange(num_classes), num_classes, noise))
    torch.manual_seed(seed)
    d._build(dim, torch.device("cpu"))
    return d


def test_slot_cem_entropy_closed_form_and_consistency():
    C, D, sigma = 3, 32, 0.1
    d = slot_defense(C, D, sigma)
    K = d.num_slots
    previous = math.inf
    for s2 in (0.01, 0.04, 0.16):  # one Gaussian per class; soft slots spread over it
        z, y, _ = clusters(C, 1, D, n=900, s2=s2)
        h = d.conditional_entropy(z, y)
        assert h == pytest.approx(-closed_form(C, K, D, s2, sigma), rel=0.02)
        assert h < previous  # more intra-class variance: more information, lower H(x|z)
        previous = h
    untrained = registry.create("defense", "slot-cem", {})  # no module: per-class k-means with num_slots
    assert untrained.responsibilities(z, y) is None
    assert math.isfinite(untrained.conditional_entropy(z, y, noise_std=sigma))


def test_entropy_hooks_are_pure():
    z, y, _ = clusters(3, 2, 16, n=300)
    g = gmm(clusters=2)
    g.load_state_dict({"centroids": torch.randn(3, 2, 16), "vbar": torch.ones(3, 2), "pi": torch.full((3, 2), 0.5)})
    s = slot_defense(3, 16)
    for d in (g, s):
        before = {k: v.clone() for k, v in _flat(d.state_dict()).items()}
        rng = torch.get_rng_state()
        first = d.conditional_entropy(z, y, noise_std=0.1)
        stats = slot_stats(d, z, y)
        assert d.conditional_entropy(z, y, noise_std=0.1) == first  # same slots drawn every call
        assert slot_stats(d, z, y) == stats
        assert torch.equal(torch.get_rng_state(), rng)
        after = _flat(d.state_dict())
        assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def _flat(state, prefix=""):
    out = {}
    for k, v in state.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def test_entropy_bound_dict_through_a_stack():
    C, K, D, s2, sigma, d = 3, 2, 32, 0.04, 0.1, 3 * 8 * 8
    z, y, _ = clusters(C, K, D, s2=s2)
    defense = stack.create("dropout+gmm-cem", {"gmm-cem.clusters": K})
    out = entropy_bound(defense, z, y, x_dim=d, noise_std=sigma, h_x=-50.0)
    json.dumps(out, allow_nan=False)  # stored in metrics.json as is
    info = -gmm(clusters=K).conditional_entropy(z, y, noise_std=sigma)
    assert out["estimator"] == "gmm-cem" and out["dim"] == d and out["z_dim"] == D
    assert out["information_nats"] == pytest.approx(info)
    assert out["h_x_given_z"] == pytest.approx(-50.0 - info)
    assert out["mse_bound"] == pytest.approx(math.exp(2 * (-50.0 - info) / d) / (2 * math.pi * math.e))
    assert out["mse_bound_factor"] == pytest.approx(out["mse_bound"] / reconstruction_bound(-50.0, d))
    assert out["caveat"]
    plain = registry.create("defense", "none", {})
    assert entropy_bound(plain, z, y, x_dim=d, noise_std=sigma) is None
    fallback = entropy_bound(plain, z, y, x_dim=d, noise_std=sigma, fallback_clusters=K)
    assert fallback["estimator"].startswith("k-means") and fallback["information_nats"] == pytest.approx(info)
    noiseless = entropy_bound(defense, z, y, x_dim=d, noise_std=0.0)
    assert noiseless["mse_bound"] == 0.0 and noiseless["h_x_given_z"] is None
    json.dumps(noiseless, allow_nan=False)


def test_gaussian_entropy_closed_form():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(20000, 4, generator=g, dtype=torch.float64) * torch.tensor(
        [0.1, 0.2, 0.3, 0.4], dtype=torch.float64
    )
    expect = 0.5 * (4 * LOG_2PIE + math.log(0.01 * 0.04 * 0.09 * 0.16))
    assert gaussian_entropy(x, floor=0.0) == pytest.approx(expect, abs=0.05)


# ------------------------------------------------------------------------------- slots


def test_slot_stats_rows_sum_to_one():
    C, D = 4, 16
    z, y, _ = clusters(3, 1, D, n=300)  # class 3 absent from y
    d = slot_defense(C, D)
    st = slot_stats(d, z, y, noise_std=0.1, num_classes=C)
    json.dumps(st, allow_nan=False)
    K = d.num_slots
    assert st["num_classes"] == C and st["num_slots"] == K and st["class_counts"] == [100, 100, 100, 0]
    for c in range(3):
        assert sum(st["responsibility"][c]) == pytest.approx(1.0)
        assert sum(st["argmax_share"][c]) == pytest.approx(1.0)
        assert 1.0 <= st["effective_slots"][c] <= K + 1e-9
        assert 0.0 <= st["assignment_entropy"][c] <= math.log(K) + 1e-9
    assert st["responsibility"][3] == [0.0] * K
    assert sum(map(sum, st["mass"])) == pytest.approx(1.0)
    assert st["noise_var"] == pytest.approx(0.01)
    assert slot_stats(registry.create("defense", "slot-cem", {}), z, y) is None  # no module: nothing to show
    hard = slot_stats(gmm(clusters=2), z, y)  # gmm-cem's clusters: hard assignments
    assert hard["assignment_entropy"] == [0.0] * 3 and hard["responsibility"] == hard["argmax_share"]


# ------------------------------------------------------------------------------- plots


def test_plots_are_written(tmp_path):
    frame = curves_frame(HISTORY)
    fig = curves_figure(frame, noise_std=0.1)
    titles = [ax.get_title() for ax in fig.axes if ax.get_visible()]
    assert titles[:4] == ["train_loss", "defense_loss", "dropout_loss", "rob_loss"]
    assert "variance of z (mean per dimension)" in titles and "accuracy (%)" in titles
    path = plot_curves(frame, tmp_path / "curves", noise_std=0.1)
    assert path == tmp_path / "curves.png"
    z, y, _ = clusters(3, 1, 16, n=300)
    slots = plot_slots(slot_stats(slot_defense(3, 16), z, y, noise_std=0.1), tmp_path / "slots")
    for p in (path, slots):
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 1000
    with pytest.raises(UserError):
        plot_curves(curves_frame([]), tmp_path / "empty")
