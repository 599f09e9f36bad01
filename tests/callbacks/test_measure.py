"""The training-step recorder: saved activations, peak memory, step time."""

from __future__ import annotations

import torch
from torch import nn

from autonorm import _trial_keys as keys
from autonorm.callbacks._measure import SavedTensorCounter, TrainingStepRecorder


def test_saved_tensor_counter_counts_activations_not_parameters():
    layer = nn.Linear(4, 4)
    with SavedTensorCounter(exclude=layer.parameters()) as counter:
        _ = layer(torch.randn(2, 4, requires_grad=True)).sum()
    assert counter.nbytes == 32


def test_recorder_summary_uses_the_trial_attribute_names():
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    opt = torch.optim.Adam(model.parameters())
    recorder = TrainingStepRecorder()
    assert recorder.summary() == {keys.N_PARAMS: 0, keys.MEMORY_METHOD: "cpu-estimate"}
    for _ in range(3):
        recorder.batch_start(model)
        loss = model(torch.randn(8, 4)).sum()
        recorder.forward_done()
        loss.backward()
        opt.step()
        recorder.batch_end(model, [opt])
    summary = recorder.summary()
    assert summary[keys.N_PARAMS] == 28
    assert summary[keys.PEAK_MEMORY] > summary["activation_bytes"] > 0
    assert summary[keys.STEP_TIME] > 0
