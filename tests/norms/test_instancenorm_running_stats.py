"""Instance norm with running statistics (``track_running_stats=True``) and ``momentum=None``:
for batch norms ``None`` means a cumulative average, but torch's ``instance_norm`` reads it as a
momentum of 0, so the running statistics never move and eval normalizes with mean 0 and
variance 1. The registry accepts the combination (``create_norm``, a config's
``instancenorm(momentum=null, track_running_stats=true)``): it must either update the statistics
or refuse the choice, not train a layer whose eval output is silently wrong: it refuses."""

from __future__ import annotations

import pytest
import torch

from autonorm import NormChoice
from autonorm.norms import create_norm

CONFIG = "instancenorm(momentum=null, track_running_stats=true)"
#: How a user gets the layer: create_norm with the input's rank (the native
#: nn.InstanceNorm2d), without it (autonorm's InstanceNormNd), channels last
#: (InstanceNormChannelsLast), or a config's choice.
BUILDS = {
    "native": dict(input_ndim=4),
    "any-rank": dict(input_ndim=None),
    "channels-last": dict(layout="channels_last", input_ndim=4),
    "config": dict(input_ndim=4, choice=CONFIG),
}


def _build(kwargs: dict) -> torch.nn.Module:
    kwargs = dict(kwargs)
    choice = kwargs.pop("choice", None)
    if choice is None:
        return create_norm("instancenorm", 3, track_running_stats=True, momentum=None, **kwargs)
    parsed = NormChoice.parse(choice)
    return create_norm(parsed.name, 3, **kwargs, **parsed.params)


def _batches(layout: str) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randn(4, 3, 5, 5, generator=gen) * 2 + 3 for _ in range(4)]
    return [x.movedim(1, -1) for x in batches] if layout == "channels_last" else batches


@pytest.mark.parametrize("build", list(BUILDS), ids=list(BUILDS))
def test_instancenorm_with_momentum_none_and_running_stats_is_refused_with_its_reason(build):
    with pytest.raises(ValueError, match=r"momentum=None with track_running_stats=True"):
        _build(BUILDS[build])


def test_instancenorm_with_a_numeric_momentum_tracks_its_statistics():
    """The same layer with a momentum builds and updates its statistics: the refusal is of
    ``None`` alone."""
    layer = create_norm("instancenorm", 3, track_running_stats=True, momentum=0.5, input_ndim=4)
    layer.train()
    with torch.no_grad():
        for x in _batches("channels_first"):
            layer(x)
    torch.testing.assert_close(layer.running_mean, torch.full((3,), 3.0), atol=0.5, rtol=0)
