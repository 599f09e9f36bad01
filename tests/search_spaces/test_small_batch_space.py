"""The small-batch family in the search space: offered where the budget's per-device batch is
under 16, frn/evonorm_s0 only where the slot's activation is known (and the log says why not)."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from autonorm import Budget, ConfigError, find_slots
from autonorm.search_spaces import SearchSpace


def _slot(*modules: nn.Module, x: torch.Tensor | None = None):
    model = nn.Sequential(*modules)
    return find_slots(model, torch.randn(2, 3, 8, 8) if x is None else x)[0]


def test_the_budget_turns_it_on_under_a_batch_of_16():
    space = SearchSpace("cnn")
    assert space.for_budget(Budget(batch_size=4)).small_batch
    assert space.for_budget(Budget(batch_size=15)).small_batch
    assert space.for_budget(Budget(batch_size=16)) is space
    assert space.for_budget(Budget()) is space  # batch unknown
    assert not space.small_batch


def test_channels_first_slot_with_an_activation_gets_all_three():
    slot = _slot(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU())
    labels = [c.label for c in SearchSpace("cnn", small_batch=True).choices_for(slot)]
    assert labels[:2] == ["batchnorm", "batchrenorm"]
    assert labels[-2:] == ["frn", "evonorm_s0"]
    plain = [c.label for c in SearchSpace("cnn").choices_for(slot)]
    assert not {"batchrenorm", "frn", "evonorm_s0"} & set(plain)


def test_without_an_activation_the_log_says_why_not(caplog):
    slot = _slot(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8))
    with caplog.at_level(logging.INFO, logger="autonorm.search_spaces._space"):
        labels = [c.label for c in SearchSpace("auto", small_batch=True).choices_for(slot)]
    assert "batchrenorm" in labels and "frn" not in labels and "evonorm_s0" not in labels
    assert "slot '1': frn is not offered: frn includes its activation and no activation" in (
        caplog.text
    )


def test_tokens_get_batch_renorm_only():
    slot = _slot(nn.Linear(3, 8), nn.LayerNorm(8), nn.GELU(), x=torch.randn(2, 5, 3))
    labels = [c.label for c in SearchSpace("auto", small_batch=True).choices_for(slot)]
    assert labels == ["layernorm", "rmsnorm", "dyt", "switchable", "batchnorm", "batchrenorm"]


def test_it_round_trips_and_is_validated():
    space = SearchSpace("cnn", small_batch=True)
    assert space.to_dict()["small_batch"] is True
    assert "small_batch" not in SearchSpace("cnn").to_dict()  # earlier descriptions unchanged
    assert SearchSpace.from_dict(space.to_dict()).to_dict() == space.to_dict()
    with pytest.raises(ConfigError, match="`small_batch` must be true or false, got 'yes'"):
        SearchSpace.from_dict({"small_batch": "yes"})
