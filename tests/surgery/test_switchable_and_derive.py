"""The learned path: ``to_switchable`` turns slots into SwitchableNorm carrying their weights,
and ``derive_config`` maps each slot's strongest candidate back to a norm choice."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.testing import assert_close

from autonorm import (
    AutoNormError,
    ConfigError,
    NormChoice,
    apply_config,
    derive_config,
    find_slots,
    to_switchable,
)
from autonorm.norms import BatchNormChannelsLast, SwitchableNorm
from autonorm.surgery import switchable_layers
from tests.models import EXPECTED_SLOTS, build, randomize_norms


def set_logits(sn: SwitchableNorm, winner: str) -> None:
    with torch.no_grad():
        sn.mean_weight.zero_()
        sn.var_weight.zero_()
        sn.mean_weight[sn.candidates.index(winner)] = 4.0
        sn.var_weight[sn.candidates.index(winner)] = 2.0


# -- to_switchable -----------------------------------------------------------------------------


def test_to_switchable_carries_weights_and_running_stats():
    model, x = build("resnet")
    randomize_norms(model)
    old = copy.deepcopy(model.layer2[0].downsample[1])
    to_switchable(model, example_input=x)
    layers = switchable_layers(model)
    assert list(layers) == [name for name, *_ in EXPECTED_SLOTS["resnet"]]
    sn = layers["layer2.0.downsample.1"]
    for attr in ("weight", "bias", "running_mean", "running_var"):
        assert_close(getattr(sn, attr), getattr(old, attr), rtol=0, atol=0)
    assert sn.candidates == ("instance", "layer", "batch")


def test_to_switchable_subset_and_unknown_names():
    model, x = build("resnet")
    to_switchable(model, ["bn1", "layer2.0.bn2"], example_input=x)
    assert list(switchable_layers(model)) == ["bn1", "layer2.0.bn2"]
    assert type(model.layer1[0].bn1) is nn.BatchNorm2d
    with pytest.raises(ConfigError, match=r"\['nope'\] are not norm slots"):
        to_switchable(model, ["nope"], example_input=x)


def test_to_switchable_takes_found_slots_without_a_probe():
    model, x = build("resnet")
    slots = find_slots(model, x)
    calls = []
    model.register_forward_pre_hook(lambda *_: calls.append(1))
    to_switchable(model, [s for s in slots if s.name in ("bn1", "layer2.0.bn2")])
    assert calls == []  # the slots were found already: no probe pass
    assert list(switchable_layers(model)) == ["bn1", "layer2.0.bn2"]
    # the probe's findings come with the slots: (N, C) inputs leave out instance statistics
    model, x = build("mlp")
    to_switchable(model, find_slots(model, x))
    assert {sn.candidates for sn in switchable_layers(model).values()} == {("layer", "batch")}


def test_switchable_on_features_without_positions():
    model, x = build("mlp")
    to_switchable(model, example_input=x)  # instance statistics of (N, C) are undefined
    assert {sn.candidates for sn in switchable_layers(model).values()} == {("layer", "batch")}
    model, x = build("mlp")
    to_switchable(model, example_input=x, candidates=("instance", "layer", "batch"))
    for sn in switchable_layers(model).values():
        set_logits(sn, "instance")
    config = derive_config(model, example_input=x)  # passes over the invalid instancenorm
    assert set(config.choices.values()) == {NormChoice("groupnorm", {"groups": 1})}


# -- derive_config -----------------------------------------------------------------------------


def test_derive_config_maps_the_strongest_candidate():
    model, x = build("convnext")
    to_switchable(model, example_input=x)
    layers = switchable_layers(model)
    winners = {
        "stem.1": "instance",  # channels_first
        "stage1.0.norm": "layer",  # channels_last
        "downsample.0": "layer",  # channels_first
        "stage2.0.norm": "batch",
        "head_norm": "rms",
    }
    for name, winner in winners.items():
        set_logits(layers[name], winner)
    config = derive_config(model, example_input=x)
    assert config.choices == {
        "stem.1": NormChoice("instancenorm"),
        "stage1.0.norm": NormChoice("layernorm"),
        "downsample.0": NormChoice("groupnorm", {"groups": 1}),
        "stage2.0.norm": NormChoice("batchnorm"),
        "head_norm": NormChoice("rmsnorm"),
    }
    meta = config.metadata
    assert meta["source"] == "switchable" and meta["model_class"] == "tests.models.SmallConvNeXt"
    expected = torch.softmax(torch.tensor([4.0, 0.0, 0.0]), 0)[0].item()
    assert meta["weights"]["stem.1"]["mean"]["instance"] == pytest.approx(expected)
    assert set(meta["weights"]["head_norm"]["var"]) == {"layer", "rms", "batch"}
    weight = layers["stem.1"].weight.detach().clone()
    with pytest.warns(UserWarning, match=r"no place for 1 learned .*head_norm\.bias"):
        apply_config(model, config, example_input=x)  # RMSNorm has no bias
    assert type(model.stem[1]) is nn.InstanceNorm2d
    assert_close(model.stem[1].weight, weight, rtol=0, atol=0)
    assert type(model.downsample[0]) is nn.GroupNorm and model.downsample[0].num_groups == 1
    assert type(model.stage2[0].norm) is BatchNormChannelsLast


def test_derive_config_without_switchable_norms():
    model, x = build("mlp")
    with pytest.raises(AutoNormError, match="has no SwitchableNorm"):
        derive_config(model, example_input=x)
