import pytest
import torch
from conftest import tiny_config

from privbench.engine.config import TrainConfig
from privbench.engine.train import lr_at, train


def test_tiny_training_ends_well_above_chance():
    cfg = tiny_config(epochs=8, n_train=1000, width=0.25, lr=0.02)
    result = train(cfg, log=lambda m: None)
    assert result.test_accuracy > 0.35, result.test_accuracy  # chance is 0.10
    assert len(result.history) == 8 and result.history[-1]["train_loss"] < result.history[0]["train_loss"]


def test_same_seed_same_model():
    a = train(tiny_config(seed=5), log=lambda m: None).model.state_dict()
    b = train(tiny_config(seed=5), log=lambda m: None).model.state_dict()
    c = train(tiny_config(seed=6), log=lambda m: None).model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


@pytest.mark.parametrize("schedule", ["cosine", "multistep"])
def test_no_epoch_with_lr_zero(schedule):
    cfg = TrainConfig(epochs=240, lr=0.05, schedule=schedule, milestones=(60, 120, 180, 210))
    lrs = [lr_at(cfg, e) for e in range(cfg.epochs)]
    assert min(lrs) > 0 and lrs[0] == 0.05
    if schedule == "multistep":
        assert lrs[59] == 0.05 and lrs[60] == pytest.approx(0.01) and lrs[239] == pytest.approx(0.05 * 0.2**4)


def test_paper_preset_is_reference_schedule():
    cfg = TrainConfig.from_preset("paper")
    assert (cfg.epochs, cfg.batch_size, cfg.lr, cfg.schedule, cfg.width) == (240, 128, 0.05, "multistep", 1.0)
    assert cfg.momentum == 0.9 and cfg.weight_decay == 5e-4


def test_defense_parameter_group_gets_its_lr_scale():
    from privbench.plugin.base import Defense

    class Probe(Defense):
        name = "probe-lr"

        def setup(self, ctx):
            self.w = torch.nn.Parameter(torch.zeros(()))
            ctx.add_parameters([self.w], lr_scale=10.0)

        def loss(self, z, y, *, epoch, lr):
            return (self.w - 1).pow(2)

    from privbench.plugin import registry

    registry.register(Probe)
    cfg = tiny_config(defense="probe-lr", lr=0.01, epochs=1)
    result = train(cfg, log=lambda m: None)
    # 3 SGD steps (300 images, batch 128) at lr 0.1 with momentum reach w ~ 0.94; at the
    # unscaled lr 0.01 they would reach only ~0.12.
    assert 0.3 < result.defense.w.item() < 1.0


class _LayoutProbe:
    """Records the dtype and memory format of z that the loop hands to the defense."""

    @staticmethod
    def register():
        from privbench.plugin import registry
        from privbench.plugin.base import Defense

        class Probe(Defense):
            name = "probe-layout"
            seen: list = []

            def loss(self, z, y, *, epoch, lr):
                Probe.seen.append((z.dtype, z.is_contiguous(memory_format=torch.channels_last)))
                return None

        registry.register(Probe)
        return Probe


def test_gpu_fast_path_runs_on_cpu_when_enabled(monkeypatch):
    # The bf16 + channels-last branches are CUDA-only in use; forcing them on CPU runs that exact code.
    import privbench.engine.train as train_mod

    probe = _LayoutProbe.register()
    train(tiny_config(defense="probe-layout", device="cpu"), log=lambda m: None)
    assert set(probe.seen) == {(torch.float32, False)}  # CPU default: fp32, contiguous
    probe.seen.clear()
    monkeypatch.setattr(train_mod, "FAST_PATH_DEVICES", ("cuda", "cpu"))
    result = train(tiny_config(defense="probe-layout", device="cpu"), log=lambda m: None)
    assert set(probe.seen) == {(torch.bfloat16, True)}
    # The kept model is back in the default layout, so checkpoints and attacks see plain tensors.
    assert all(p.is_contiguous() for p in result.model.parameters())
    probe.seen.clear()
    train(tiny_config(defense="probe-layout", device="cpu", amp=False, channels_last=False), log=lambda m: None)
    assert set(probe.seen) == {(torch.float32, False)}


def test_cpu_amp_takes_the_fast_path_on_cpu_and_is_its_own_run():
    """`cpu_amp` runs the bf16 + channels-last loop on a CPU; it changes the numbers, so it is part
    of the identity (and left out at its default, so earlier runs keep their hashes)."""
    probe = _LayoutProbe.register()
    cfg = tiny_config(defense="probe-layout", device="cpu", cpu_amp=True)
    a = train(cfg, log=lambda m: None)
    assert set(probe.seen) == {(torch.bfloat16, True)}
    b = train(cfg, log=lambda m: None)
    fp32 = train(tiny_config(defense="probe-layout", device="cpu"), log=lambda m: None)
    same = [torch.equal(a.model.state_dict()[k], b.model.state_dict()[k]) for k in a.model.state_dict()]
    differ = [torch.equal(a.model.state_dict()[k], fp32.model.state_dict()[k]) for k in a.model.state_dict()]
    assert all(same) and not all(differ)
    assert cfg.hash() != tiny_config(defense="probe-layout", device="cpu").hash()
    assert "cpu_amp" not in TrainConfig().identity() and TrainConfig(cpu_amp=True).identity()["cpu_amp"] is True


@pytest.mark.parametrize("defense", ["gmm-cem", "slot-cem"])
def test_defenses_train_under_bf16_channels_last(monkeypatch, defense):
    import math

    import privbench.engine.train as train_mod

    monkeypatch.setattr(train_mod, "FAST_PATH_DEVICES", ("cuda", "cpu"))
    cfg = tiny_config(defense=defense, defense_options={"warmup": 1}, epochs=2, bottleneck=8, noise=0.025)
    result = train(cfg, log=lambda m: None)
    last = result.history[-1]
    assert last["defense_loss"] > 0 and math.isfinite(last["defense_loss"]) and math.isfinite(last["train_loss"])


@pytest.mark.parametrize("defense,graphs", [("none", 4), ("gmm-cem", 6), ("slot-cem", 6)])
def test_compiled_loop_trains_the_same_parameters(monkeypatch, defense, graphs):
    # aot_eager traces through dynamo and AOT autograd like inductor but runs eager kernels, so the
    # compiled loop must reproduce the eager one; inductor itself needs minutes of C++ builds on CPU.
    from torch._dynamo.utils import counters

    import privbench.engine.train as train_mod

    monkeypatch.setattr(train_mod, "COMPILE_BACKEND", "aot_eager")
    kw = dict(epochs=2, bottleneck=8, noise=0.025, defense=defense)
    kw["defense_options"] = {"warmup": 1} if defense != "none" else {}
    eager = train(tiny_config(**kw), log=lambda m: None).model.state_dict()
    torch._dynamo.reset()
    counters.clear()  # process-wide: other tests compile too
    compiled = train(tiny_config(**kw, compile="reduce-overhead"), log=lambda m: None)
    # Two halves x two batch shapes (300 images: 2 full batches of 128 and one of 44), plus
    # the defense's hot path (gmm-cem's rob_loss, slot-cem's forward) at both shapes.
    assert counters["stats"]["unique_graphs"] == graphs
    state = compiled.model.state_dict()
    assert list(state) == list(eager)  # no "_orig_mod." prefixes in checkpoints
    changed = [k for k in eager if eager[k].is_floating_point() and not torch.allclose(state[k], eager[k], atol=1e-5)]
    assert not changed, changed


def test_compile_option_values():
    from privbench.errors import UserError

    assert TrainConfig(compile=True).compile_mode == "default"
    assert TrainConfig(compile=False).compile_mode is None
    assert TrainConfig(compile="reduce-overhead").compile_mode == "reduce-overhead"
    with pytest.raises(UserError, match="invalid compile mode 'fast'"):
        TrainConfig(compile="fast")
    # How a run executes is not what it computes: the same run folder either way.
    assert TrainConfig(compile="max-autotune", channels_last=False).hash() == TrainConfig().hash()
    assert TrainConfig(amp=False).hash() != TrainConfig().hash()  # fp32 vs bf16 changes the numbers
