"""The channel-noise ramp (`noise_warmup`): its schedule, the noise each training step really
uses, the deployed noise afterwards, and its place in the run hash."""

import pytest
from conftest import tiny_config

from privbench.engine.config import PRESETS, TrainConfig
from privbench.engine.models import SplitModel
from privbench.engine.train import noise_at, train
from privbench.errors import UserError
from privbench.store.seeds import configuration_key, configuration_label


def test_noise_ramps_linearly_over_its_fraction_of_the_steps():
    cfg = TrainConfig(epochs=5, noise=0.1, noise_warmup=0.2)  # 0.2 of 5 epochs x 10 steps: 10 steps
    ramp = [noise_at(cfg, e, s, 10) for e in range(2) for s in range(10)]
    assert ramp[:10] == pytest.approx([0.01 * (k + 1) for k in range(10)])
    assert ramp[10:] == [0.1] * 10
    off = TrainConfig(epochs=5, noise=0.1, noise_warmup=0.0)
    assert noise_at(off, 0, 0, 10) == 0.1  # off: full noise from the first step


def test_training_steps_see_the_ramp_and_the_kept_model_the_full_noise(monkeypatch):
    seen = []
    channel = SplitModel.channel

    def record(self, z):
        if self.encoder.training:
            seen.append(self.noise_std)
        return channel(self, z)

    monkeypatch.setattr(SplitModel, "channel", record)
    cfg = tiny_config(bottleneck=8, noise=0.2, noise_warmup=0.5, epochs=2)  # 300 crops, batch 64: 5 steps
    res = train(cfg, log=lambda m: None)
    assert seen == pytest.approx([0.2 * min(1.0, (k + 1) / 5) for k in range(10)])
    assert res.model.noise_std == 0.2  # evaluated and attacked under the deployed noise
    assert [row["channel_noise"] for row in res.history] == pytest.approx([0.2, 0.2])


def test_the_ramp_joins_the_run_hash_only_where_it_changes_training():
    plain = TrainConfig(noise=0.1, noise_warmup=0.0)
    assert "noise_warmup" not in plain.identity()  # the hashes of runs made before the field existed hold
    assert TrainConfig(noise=0.1, noise_warmup=0.2).hash() != plain.hash()
    clean = TrainConfig(noise=0.0, noise_warmup=0.0)
    assert TrainConfig(noise=0.0, noise_warmup=0.2).hash() == clean.hash()  # nothing to ramp
    old = plain.to_dict()
    del old["noise_warmup"]
    assert TrainConfig.from_dict(old).noise_warmup == 0.0  # an old run folder trained without it
    with pytest.raises(UserError, match=r"invalid noise_warmup 1.0: a fraction of training in \[0, 1\)"):
        TrainConfig(noise=0.1, noise_warmup=1.0)


def test_precision_labels_tell_runs_with_and_without_the_ramp_apart(monkeypatch):
    monkeypatch.setitem(PRESETS["quick"], "noise_warmup", 0.2)
    for noise, label in ((0.1, "none@C8+0.1"), (0.0, "none@C8")):
        new = TrainConfig(bottleneck=8, noise=noise, noise_warmup=0.2).to_dict()
        old = {k: v for k, v in new.items() if k != "noise_warmup"}  # a folder from before the field
        assert configuration_label(new) == label
        if noise:  # trained without the ramp: another configuration, named so
            assert configuration_label(old) == f"{label} (noise_warmup=0.0)"
            assert configuration_key(old) != configuration_key(new)
        else:  # nothing to ramp: the same configuration under one label
            assert configuration_label(old) == label
            assert configuration_key(old) == configuration_key(new)
