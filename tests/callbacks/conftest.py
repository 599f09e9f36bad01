"""Fixtures of the callback tests."""

from __future__ import annotations

import pytest

from tests.lightning_models import TinyConvNet


@pytest.fixture
def counting_net():
    """A TinyConvNet class that records the batch size of every forward call, and that record
    (the probe runs the model on its ``example_input_array``, of batch size 4)."""
    calls: list[int] = []

    class CountingConvNet(TinyConvNet):
        def forward(self, x):
            calls.append(x.shape[0])
            return super().forward(x)

    return CountingConvNet, calls
