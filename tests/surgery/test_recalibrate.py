"""BatchNorm recalibration without Lightning."""

from __future__ import annotations

import torch
from torch import nn

from autonorm.surgery._recalibrate import default_calibration_forward, recalibrate_batchnorm


def test_recalibration_averages_the_given_batches_and_restores_the_model():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Dropout(0.5))
    model.train()
    model[1].eval()
    batches = [(torch.randn(8, 3) + i, torch.zeros(8)) for i in range(5)]
    used = recalibrate_batchnorm(model, batches, num_batches=3)
    assert used == 3
    assert int(model[1].num_batches_tracked) == 3
    assert model[1].momentum == 0.1
    assert model.training and model[2].training and not model[1].training
    with torch.no_grad():  # the cumulative average of the three batch means
        means = torch.stack([model[0](x).mean(0) for x, _ in batches[:3]]).mean(0)
    torch.testing.assert_close(model[1].running_mean, means)


def test_nothing_to_recalibrate():
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4))
    assert recalibrate_batchnorm(model, [torch.zeros(2, 3)]) == 0


def test_default_calibration_forward_reads_tuple_dict_and_plain_batches():
    seen = []

    def record(x):
        seen.append(x)

    module = nn.Module()
    module.forward = record  # type: ignore[method-assign]
    x = torch.zeros(1)
    default_calibration_forward(module, (x, 1))
    default_calibration_forward(module, {"inputs": x, "y": 1})
    default_calibration_forward(module, x)
    assert all(s is x for s in seen) and len(seen) == 3
