"""Search spaces: the ``choices`` of a space (Python keyword and file key), and the GroupNorm
group counts the presets offer, from the one rule in :mod:`autonorm.norms._groups`."""

from __future__ import annotations

import doctest

import pytest
import torch
from torch import nn

from autonorm import find_slots
from autonorm.norms import default_groups
from autonorm.search_spaces import PatternChoices, SearchSpace, resolve_space
from autonorm.search_spaces import _space as space


def _slot(channels: int, conv: bool = True):
    if conv:
        model = nn.Sequential(nn.Conv2d(3, channels, 3), nn.BatchNorm2d(channels))
        x = torch.zeros(2, 3, 6, 6)
    else:
        model = nn.Sequential(nn.Linear(3, channels), nn.BatchNorm1d(channels))
        x = torch.zeros(2, 3)
    (slot,) = find_slots(model, x)
    return slot


def _groups(labels):
    return [label for label in labels if label.startswith("groupnorm")]


@pytest.mark.parametrize(
    ("channels", "conv", "offered"),
    [
        (64, True, [16, 8, 4]),
        (256, True, [32, 16, 8]),
        (8, True, [2]),
        (3, True, [1]),
        (96, True, [24, 12, 6]),  # the default first, then group sizes a factor 2 apart
        (32, False, [4, 2]),  # (N, C): at least 8 channels a group
    ],
)
def test_presets_offer_the_rules_group_counts(channels, conv, offered):
    slot = _slot(channels, conv)
    labels = [c.label for c in SearchSpace("cnn", keep=False).unchecked_choices(slot)]
    assert _groups(labels) == [f"groupnorm(groups={g})" for g in offered]
    minimal = [c.label for c in SearchSpace("minimal").choices_for(slot)]
    ndim = len(slot.input_shape)
    assert _groups(minimal) == [f"groupnorm(groups={default_groups(channels, input_ndim=ndim)})"]
    assert offered[0] == default_groups(channels, input_ndim=ndim)


def test_choices_keyword_and_file_key_are_the_same_thing(tmp_path):
    built = SearchSpace("cnn", choices={"1": ["layernorm", "groupnorm(groups=4)"]})
    path = tmp_path / "space.yaml"
    path.write_text("preset: cnn\nchoices:\n  '1': [layernorm, {name: groupnorm, groups: 4}]\n")
    loaded = resolve_space(path)
    assert loaded.to_dict() == built.to_dict()
    assert loaded.to_dict()["choices"] == {"1": ["layernorm", {"name": "groupnorm", "groups": 4}]}
    slot = _slot(16)
    assert [c.label for c in loaded.choices_for(slot)] == [
        "layernorm",
        "groupnorm(groups=4)",
        "batchnorm",  # keep: the slot's own layer
    ]
    assert PatternChoices("1", ()).pattern == "1"


def test_a_bare_list_of_choices_applies_to_every_slot():
    space = SearchSpace.from_dict({"choices": ["layernorm"], "keep": False})
    assert space.to_dict()["choices"] == {"*": ["layernorm"]}
    assert [c.label for c in space.choices_for(_slot(16))] == ["layernorm"]


def test_docstring_examples_run():
    result = doctest.testmod(space, verbose=False)
    assert result.attempted > 0 and result.failed == 0


def test_a_bare_list_of_choices_is_every_slots_and_anything_else_is_refused():
    slot = _slot(8)
    listed = SearchSpace(choices=["batchnorm", "switchable"]).choices_for(slot)
    assert listed == SearchSpace(choices={"*": ["batchnorm", "switchable"]}).choices_for(slot)
    assert listed == SearchSpace.from_dict({"choices": ["batchnorm", "switchable"]}).choices_for(
        slot
    )
    with pytest.raises(Exception, match="`choices` must map slot patterns to lists of choices"):
        SearchSpace(choices="batchnorm")
    with pytest.raises(Exception, match="`choices` must map slot patterns"):
        SearchSpace.from_dict({"choices": 3})
