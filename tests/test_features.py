import pytest
import torch
from conftest import tiny_config

from privbench.engine.features import encoder_features, intra_class_mse, z_spread
from privbench.store.runs import train_run


def test_intra_class_mse_by_hand():
    z = torch.tensor([[0.0, 2.0], [2.0, 4.0], [5.0, 5.0]])
    y = torch.tensor([0, 0, 1])
    # class 0 mean (1, 3): squared deviations 1,1 and 1,1 -> 1 per dim; class 1 alone -> 0
    assert intra_class_mse(z, y, 2).item() == pytest.approx((1 + 1 + 0) / 3)
    assert intra_class_mse(z, y, 2, per_class=True).tolist() == [1.0, 0.0]


def test_encoder_features_restore_mode_and_spread():
    enc = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Dropout(0.5))
    enc.train()
    images = torch.tensor([[[[0, 255]]], [[[255, 255]]]], dtype=torch.uint8)
    feats = encoder_features(enc, images)
    assert enc.training and torch.equal(feats, torch.tensor([[0.0, 1.0], [1.0, 1.0]]))  # eval: no dropout
    s = z_spread(enc, images, torch.tensor([0, 0]), 1)
    assert s["z_intra_class_var"] == s["z_total_var"] == (0.25 + 0.25 + 0 + 0) / 4


def test_run_records_spread(tmp_path):
    run, _ = train_run(tiny_config(bottleneck=8), tmp_path, log=lambda m: None)
    m = run.metrics()
    assert 0 < m["z_intra_class_var"] <= m["z_total_var"]
