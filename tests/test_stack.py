"""Defense stacks (privbench.plugin.stack) and the transform hook: routing, identity, order, checkpoints."""

import json

import pytest
import torch
from conftest import run_cli, tiny_config

from privbench.attack.harness import make_target
from privbench.engine.config import TrainConfig
from privbench.engine.train import load_data, train
from privbench.errors import UserError
from privbench.plugin import registry, stack
from privbench.plugin.base import Defense
from privbench.store.attacks import attack_run
from privbench.store.runs import Run, train_run
from privbench.util.storage import load_checkpoint

QUIET = dict(log=lambda m: None)


class Scale(Defense):
    """A transform with a learned parameter: z * (1 + w), w saved in the checkpoint."""

    name = "test-scale"

    def __init__(self, *, start: float = 0.5):
        self.start = start

    def build(self, z_shape, device):
        self.w = torch.nn.Parameter(torch.full((), self.start, device=device))

    def setup(self, ctx):
        ctx.add_parameters([self.w])

    def transform(self, z, *, training):
        return z * (1 + self.w)

    def state_dict(self):
        return {"w": self.w.detach().clone()}

    def load_state_dict(self, state):
        self.w.data.copy_(state["w"])


class Shift(Defense):
    """A fixed transform z + shift and a loss that sees x (records that it got it)."""

    name = "test-shift"

    def __init__(self, *, shift: float = 1.0, lam: float = 0.0):
        self.shift, self.lam, self.saw_x = shift, lam, False

    def transform(self, z, *, training):
        return z + self.shift

    def loss(self, z, y, *, epoch, lr, x=None):
        self.saw_x = x is not None and x.dim() == 4
        return None


class Nan(Defense):
    """A transform that breaks in its second epoch."""

    name = "test-nan"

    def setup(self, ctx):
        self.calls, self.per_epoch = 0, ctx.steps_per_epoch

    def transform(self, z, *, training):
        if training:
            self.calls += 1
        return z * float("nan") if training and self.calls > self.per_epoch else z


class Offset(Defense):
    """Noise stand-in: adds 100 after every transform (a constant, so the test can see it)."""

    name = "test-offset"

    def noise(self, z, *, training):
        return z + 100.0


class Probe(Defense):
    """Records the largest |z| its loss saw."""

    name = "test-probe"
    seen = 0.0

    def loss(self, z, y, *, epoch, lr):
        Probe.seen = max(Probe.seen, z.detach().abs().max().item())
        return None


PLUGINS = (Scale, Shift, Nan, Offset, Probe)


@pytest.fixture(scope="module", autouse=True)
def _plugins():
    for cls in PLUGINS:
        registry.register(cls)
    yield
    for cls in PLUGINS:
        registry._REGISTRY["defense"].pop(cls.name, None)


def test_parts_and_labels():
    assert stack.parts("none+gmm-cem") == ["none", "gmm-cem"]
    assert stack.label("dropout+gmm-cem") == "dropout + gmm-cem"
    with pytest.raises(UserError, match=r"unknown defense 'nope' \(installed: .*gmm-cem"):
        stack.parts("nope+gmm-cem")
    with pytest.raises(UserError, match="'gmm-cem' appears twice"):
        stack.parts("gmm-cem+gmm-cem")
    with pytest.raises(UserError, match="invalid defense"):
        stack.parts("gmm-cem+")


def test_option_routing():
    names = ["test-scale", "gmm-cem"]
    assert stack.route_options(names, {"lam": 4}) == {"test-scale": {}, "gmm-cem": {"lam": 4}}
    assert stack.route_options(names, {"test-scale.start": 2}) == {"test-scale": {"start": 2}, "gmm-cem": {}}
    assert stack.route_options(names, {"gmm-cem": {"lam": 4}})["gmm-cem"] == {"lam": 4}
    with pytest.raises(UserError, match="'lam' is ambiguous in 'test-shift.gmm-cem': test-shift and gmm-cem both"):
        stack.route_options(["test-shift", "gmm-cem"], {"lam": 4})
    with pytest.raises(UserError, match="names 'slot-cem', which is not in the stack"):
        stack.route_options(names, {"slot-cem.lam": 4})
    with pytest.raises(UserError, match="no defense in the stack"):
        stack.route_options(names, {"nonsense": 1})


def test_identity_is_the_ordered_parts_with_canonical_options():
    a = TrainConfig.from_preset("quick", defense="test-scale+gmm-cem", defense_options={"lam": 4})
    b = TrainConfig.from_preset("quick", defense="test-scale+gmm-cem", defense_options={"gmm-cem.lam": 4.0})
    c = TrainConfig.from_preset("quick", defense="gmm-cem+test-scale", defense_options={"lam": 4})
    assert a.defense_options == {"gmm-cem": {"lam": 4.0}} and a.hash() == b.hash() != c.hash()
    # Defaults are dropped (gmm-cem's lam is 16), so they do not make a second folder.
    default = TrainConfig.from_preset("quick", defense="test-scale+gmm-cem", defense_options={"lam": 16})
    assert (
        default.defense_options == {}
        and default.hash() == TrainConfig.from_preset("quick", defense="test-scale+gmm-cem").hash()
    )
    # One part: the flat options of before stacks, so old run folders keep their names.
    single = TrainConfig.from_preset("quick", defense="gmm-cem", defense_options={"gmm-cem.lam": 4})
    assert single.defense_options == {"lam": 4.0}
    assert single.hash() == TrainConfig.from_preset("quick", defense="gmm-cem", defense_options={"lam": 4}).hash()


def test_transforms_compose_in_order_and_losses_see_x():
    s = stack.create("test-shift+test-scale", {"shift": 1.0, "start": 1.0})
    s.build((4,), torch.device("cpu"))
    z = torch.zeros(2, 4)
    assert torch.equal(s.transform(z, training=False), torch.full((2, 4), 2.0))  # (0 + 1) * 2
    s2 = stack.create("test-scale+test-shift", {"shift": 1.0, "start": 1.0})
    s2.build((4,), torch.device("cpu"))
    assert torch.equal(s2.transform(z, training=False), torch.full((2, 4), 1.0))  # 0 * 2 + 1
    s.loss(z, torch.zeros(2, dtype=torch.long), epoch=0, lr=0.1, x=torch.zeros(2, 3, 8, 8))
    assert s.members[0][1].saw_x


def test_stacked_run_round_trips_and_the_attacker_sees_the_transform(tmp_path):
    cfg = tiny_config(defense="test-scale+gmm-cem", defense_options={"test-scale.start": 0.5, "lam": 4}, bottleneck=8)
    run, _ = train_run(cfg, tmp_path, **QUIET)
    saved = json.loads((run.path / "config.json").read_text())
    assert saved["defense_options"]["gmm-cem"]["lam"] == 4.0 and saved["defense_options"]["test-scale"]["start"] == 0.5
    state = load_checkpoint(run.path / "checkpoint.pt")["defense"]
    w = state["test-scale"]["w"]
    assert w.item() != 0.5  # trained with the model
    assert "centroids" in str(state["gmm-cem"].keys()) or state["gmm-cem"]  # gmm-cem's own state, by part
    hist = run.metrics()["history"][0]
    assert "gmm-cem_loss" in hist and "test-scale_loss" in hist
    data = load_data(cfg, torch.device("cpu"))
    model = Run.open(run.path).load_model(data)
    x = torch.rand(4, 3, 32, 32)
    target = make_target(model, data.image_shape, torch.device("cpu"))
    with torch.no_grad():
        plain = model.encoder(x)
    assert torch.allclose(target.query(x), plain * (1 + w), atol=1e-6)
    model.defense_transform = None  # off: the attacker would see the raw encoder output
    assert torch.allclose(make_target(model, data.image_shape, torch.device("cpu")).query(x), plain)
    results = attack_run(
        run.path,
        ["decoder"],
        epochs=1,
        eval_images=8,
        progress=False,
        options={"decoder": {"channels": 8, "blocks": 1}},
        **QUIET,
    )
    assert 0 < results[0]["metrics"]["ssim"]["mean"] < 1


def test_losses_see_z_before_the_noise_hooks_and_the_server_and_attacker_after(tmp_path):
    s = stack.create("test-offset+test-scale")
    assert s.adds_noise and s.transforms and not stack.create("test-scale").adds_noise
    cfg = tiny_config(defense="test-offset+test-probe", epochs=1)
    Probe.seen = 0.0
    run, _ = train_run(cfg, tmp_path, **QUIET)
    assert 0 < Probe.seen < 100  # the probe's loss never saw the +100
    data = load_data(cfg, torch.device("cpu"))
    model = Run.open(run.path).load_model(data)
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        plain = model.encoder(x)
    target = make_target(model, data.image_shape, torch.device("cpu"))
    assert torch.allclose(target.query(x), plain + 100.0)  # the attacker sees the noise, as the server did
    assert torch.allclose(model.client_view()(x), plain)  # client_view: before any noise


def test_nan_transform_stops_the_run_naming_defense_and_epoch(tmp_path):
    cfg = tiny_config(defense="none+test-nan", epochs=3)
    with pytest.raises(UserError, match="defense test-nan: its transform produced NaN or Inf in epoch 2"):
        train_run(cfg, tmp_path, **QUIET)
    assert not [p for p in tmp_path.iterdir() if not p.name.startswith(".")]  # no run folder
    assert not list(tmp_path.glob(".*.tmp-*"))


def test_a_diverging_loss_stops_the_run_naming_the_epoch(tmp_path):
    class Diverge(Defense):
        name = "test-diverge"

        def loss(self, z, y, *, epoch, lr):
            return z.sum() * float("nan") if epoch == 1 else None

    registry.register(Diverge)
    try:
        with pytest.raises(UserError, match=r"training diverged in epoch 2 \(defense test-diverge, seed 0\)"):
            train_run(tiny_config(defense="test-diverge", epochs=3), tmp_path, **QUIET)
    finally:
        registry._REGISTRY["defense"].pop("test-diverge", None)
    assert not [p for p in tmp_path.iterdir() if not p.name.startswith(".")]  # no run folder


def test_plugin_without_x_keyword_still_trains():
    class Old(Defense):  # a plugin written before loss took x
        name = "test-old"

        def loss(self, z, y, *, epoch, lr):
            return z.pow(2).mean() * 0.0

    registry.register(Old)
    try:
        result = train(tiny_config(defense="test-old+test-shift"), **QUIET)
        assert result.defense.members[1][1].saw_x
    finally:
        registry._REGISTRY["defense"].pop("test-old", None)


def test_cli_errors(tmp_path, capsys):
    base = ["train", "--results-dir", str(tmp_path), "--epochs", "1", "--n-train", "300"]
    code, _, err = run_cli([*base, "--defense", "gmm-cem+nope"], capsys)
    assert code == 2 and "unknown defense 'nope'" in err and "installed:" in err and len(err.strip().splitlines()) == 1
    code, _, err = run_cli([*base, "--defense", "gmm-cem+gmm-cem"], capsys)
    assert code == 2 and "appears twice" in err
    code, _, err = run_cli([*base, "--defense", "gmm-cem+none", "-o", "slot-cem.lam=4"], capsys)
    assert code == 2 and "not in the stack" in err
    assert not list(tmp_path.iterdir())


def test_run_folder_from_before_stacks_still_attacks(tmp_path):
    cfg = tiny_config(defense="gmm-cem", defense_options={"lam": 4}, bottleneck=8, noise=0.05)
    run, _ = train_run(cfg, tmp_path, **QUIET)
    conf = json.loads((run.path / "config.json").read_text())
    for key in ("data_version", "label_smoothing", "warmup_epochs", "ema", "data_fingerprint"):
        conf["train"].pop(key)  # the earliest config.json files had none of these
    (run.path / "config.json").write_text(json.dumps(conf))
    results = attack_run(
        run.path,
        ["decoder"],
        epochs=1,
        eval_images=8,
        progress=False,
        options={"decoder": {"channels": 8, "blocks": 1}},
        **QUIET,
    )
    assert results[0]["metrics"]["ssim"]["mean"] > 0


def test_cem_layout_puts_bases_in_rows_and_tops_in_column_groups():
    import pandas as pd

    from privbench.report import table_cem

    def row(defense, options, acc, ssim):
        return {
            "defense": defense,
            "options": options,
            "channel": "C8 + noise 0.025",
            "accuracy_mean": acc,
            "accuracy_ci95": 0.01,
            "worst_ssim_mean": ssim,
            "worst_ssim_ci95": 0.005,
            "worst_attack": "decoder",
            "n_seeds": 3,
            "dataset": "embedded",
            "preset": "quick",
            "eval_images": "256",
            "attacker_data": "train",
        }

    table = pd.DataFrame(
        [
            row("none", "", 0.92, 0.60),
            row("gmm-cem", "", 0.91, 0.55),
            row("dropout", "rate=0.3", 0.90, 0.58),
            row("dropout + gmm-cem", "dropout.rate=0.3", 0.89, 0.50),
            row("dropout + slot-cem", "dropout.rate=0.3", 0.88, 0.57),
        ]
    )
    frame = table_cem.cem_frame(table)
    assert frame.attrs["groups"] == ["alone", "+ gmm-cem", "+ slot-cem"]
    by_base = {r["base"]: r for r in frame.to_dict("records")}
    assert set(by_base) == {"none", "dropout (rate=0.3)"}
    d = by_base["dropout (rate=0.3)"]
    assert d["+ gmm-cem|delta_worst_ssim"] == pytest.approx(0.50 - 0.58)
    assert d["+ slot-cem|delta_accuracy"] == pytest.approx(0.88 - 0.90)
    assert by_base["none"]["+ gmm-cem|worst_ssim_mean"] == 0.55 and pd.isna(
        by_base["none"]["+ slot-cem|worst_ssim_mean"]
    )
    md = table_cem.to_markdown(table)
    # Welch over 3 seeds each: se = 0.005 / t(0.975, 2) per cell, dof 4 -> 2.776 * sqrt(2) * se = 0.0046
    assert d["+ gmm-cem|delta_worst_ssim_ci95"] == pytest.approx(2.7764 * 2**0.5 * 0.005 / 4.3027, rel=1e-3)
    cells = "90.0 ± 1.0 | 0.580 ± 0.005 | 89.0 ± 1.0 | 0.500 ± 0.005 | -1.0 ± 0.9 / -0.080 ± 0.005"
    assert f"| dropout (rate=0.3) | C8 + noise 0.025 | {cells} |" in md


def test_the_transform_example_in_the_docs_trains_and_is_attacked(tmp_path):
    import re
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[1] / "docs" / "plugins.md").read_text()
    section = doc[doc.index("### A transform defense") :]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    (tmp_path / "gains.py").write_text(code)
    registry.load_plugin_file(tmp_path / "gains.py")
    try:
        cfg = tiny_config(defense="gains+gmm-cem", defense_options={"weight": 0.5}, bottleneck=8)
        run, _ = train_run(cfg, tmp_path / "runs", **QUIET)
        logits = load_checkpoint(run.path / "checkpoint.pt")["defense"]["gains"]["logits"]
        data = load_data(cfg, torch.device("cpu"))
        model = Run.open(run.path).load_model(data)
        x = torch.rand(2, 3, 32, 32)
        with torch.no_grad():
            expected = model.encoder(x) * torch.sigmoid(logits)
        assert torch.allclose(make_target(model, data.image_shape, torch.device("cpu")).query(x), expected)
    finally:
        registry._REGISTRY["defense"].pop("gains", None)


def test_knob_is_read_off_the_classes_without_building():
    assert stack.knob("gmm-cem") == "lam" and stack.knob("none") is None
    assert stack.knob("shredder+nopeek") == stack.create("shredder+nopeek").strength()[0] == "nopeek.weight"

    class Legacy(Defense):  # a plugin written before `knob`: it overrides strength()
        name = "legacy-knob"

        def __init__(self, *, power: float = 2.0):
            self.power = power

        def strength(self):
            return ("power", self.power)

    registry.register(Legacy)
    assert stack.knob("dropout+legacy-knob") == "legacy-knob.power"
