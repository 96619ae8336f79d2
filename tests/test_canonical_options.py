"""Canonical option values: equal settings name the same run, wrong types are one-line errors."""

from dataclasses import asdict

import pytest
from conftest import run_cli

from privbench.attack.harness import resolve_attack
from privbench.engine.config import NON_IDENTITY, TrainConfig, config_hash
from privbench.errors import UserError

# ------------------------------------------------------------------------ canonical options


def test_equal_option_values_name_the_same_run():
    def cfg(opts):
        return TrainConfig.from_preset("quick", defense="gmm-cem", defense_options=opts)

    plain = cfg({}).hash()
    assert cfg({"lam": 16}).hash() == cfg({"lam": 16.0}).hash() == cfg({"lam": "16"}).hash() == plain
    assert cfg({"clusters": 5.0, "log_entropy": "true", "estimator": "reference"}).hash() == plain
    other = cfg({"lam": 8})
    assert other.hash() != plain and other.defense_options == {"lam": 8.0}
    assert cfg({"lam": 8.0}).hash() == other.hash() and cfg({"log_entropy": "false"}).defense_options == {
        "log_entropy": False
    }


def test_configs_without_options_keep_their_hash():
    cfg = TrainConfig.from_preset("quick", defense="slot-cem", bottleneck=8, noise=0.025)
    # Fields added later, left out of the identity while unset / off:
    new_fields = (
        "data_fingerprint",
        "noise_warmup",
        "image_size",
        "pretrained",
        "model_options",
        "weights_digest",
        "cpu_amp",
    )
    identity = {k: v for k, v in asdict(cfg).items() if k not in NON_IDENTITY and k not in new_fields}
    identity["milestones"] = list(cfg.milestones)
    assert cfg.hash() == config_hash(identity)  # the identity as it was before the new fields


def test_wrong_option_types_name_option_value_and_type(capsys):
    with pytest.raises(UserError, match="option clusters of defense gmm-cem expects an integer, got 2.5"):
        TrainConfig.from_preset("quick", defense="gmm-cem", defense_options={"clusters": 2.5})
    with pytest.raises(UserError, match="option log_entropy of defense gmm-cem expects true or false, got 'maybe'"):
        TrainConfig.from_preset("quick", defense="gmm-cem", defense_options={"log_entropy": "maybe"})
    code, _, err = run_cli(["train", "--defense", "gmm-cem", "-o", "lam=abc"], capsys)
    assert code == 2 and err.strip() == "error: option lam of defense gmm-cem expects a float, got 'abc'"


def test_attack_options_are_canonical_too():
    budget = {"epochs": 3, "steps": 5}
    _, a = resolve_attack("decoder", {"epochs": 2.0, "lr": 1}, budget, progress=False)
    _, b = resolve_attack("decoder", {"epochs": 2, "lr": 1.0}, budget, progress=False)
    assert a == b and type(a["epochs"]) is int and type(a["lr"]) is float
    with pytest.raises(UserError, match="option steps of attack optimization expects an integer, got 'many'"):
        resolve_attack("optimization", {"steps": "many"}, budget, progress=False)
