"""find_slots on realistic architectures (tests/models.py), no mocks: each slot's name, kind,
width and layout, what a slot records, the probe that leaves the model as it was, and the
include/exclude globs."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from autonorm import ConfigError, NormChoice, apply_config, find_slots
from tests import models
from tests.models import CF, CL, EXPECTED_SLOTS, MODELS, build, randomize_norms

# -- what find_slots reports -------------------------------------------------------------------


@pytest.mark.parametrize("name", MODELS)
def test_slots_names_kinds_layouts(name):
    model, x = build(name)
    slots = find_slots(model, x)
    got = [(s.name, s.kind, s.num_features, s.layout) for s in slots]
    assert got == EXPECTED_SLOTS[name]
    assert all(s.reached for s in slots)
    assert all(s.input_shape is not None and s.input_shape[0] == x.shape[0] for s in slots)


def test_batchnorm1d_on_features_and_sequences_is_channels_first():
    mlp_slots = find_slots(*build("mlp"))
    conv_slots = find_slots(*build("conv1d"))
    assert [(s.input_shape, s.layout) for s in mlp_slots] == [((6, 12), CF)] * 2
    assert [(s.input_shape, s.layout) for s in conv_slots] == [((4, 8, 20), CF), ((4, 16, 20), CF)]


def test_slot_records_class_aliases_and_keep_choice():
    model, x = build("shared")
    (slot,) = find_slots(model, x)
    assert slot.aliases == ("branch.1",)
    assert slot.names == ("bn", "branch.1")
    assert slot.module_class == "torch.nn.modules.batchnorm.BatchNorm2d"
    convnext = find_slots(*build("convnext"))
    assert convnext[0].module_class == "tests.models.LayerNorm2d"
    assert convnext[0].keep_choice() == NormChoice("layernorm", {"eps": 1e-6})
    unet = find_slots(*build("unet"))
    assert unet[0].keep_choice() == NormChoice("groupnorm", {"groups": 4})


def test_layernorm2d_layout_when_channels_equal_width():
    """(N, C, H, W) with W == C: the shape is ambiguous, the forward tells channels_first."""
    model = nn.Sequential(nn.Conv2d(3, 8, 1), models.LayerNorm2d(8))
    (slot,) = find_slots(model, torch.randn(2, 3, 5, 8))
    assert slot.input_shape == (2, 8, 5, 8)
    assert (slot.layout, slot.extra) == (CF, ())


def test_without_probe_custom_forwards_are_checked_on_synthetic_inputs():
    convnext, _ = build("convnext")
    layouts = {s.name: s.layout for s in find_slots(convnext, probe=False)}
    assert layouts == {name: layout for name, _, _, layout in EXPECTED_SLOTS["convnext"]}
    fused, _ = build("fused")
    slots = {s.name: s for s in find_slots(fused)}  # no example input
    assert slots["bn_act"].extra == ("act",)
    assert slots["doubled"].extra is None
    assert all(s.input_shape is None and s.reached is None for s in slots.values())
    with pytest.raises(ConfigError, match="slot 'doubled' cannot be rewritten"):
        apply_config(fused, {"bn_act": "groupnorm", "doubled": "groupnorm"})


# -- the probe ---------------------------------------------------------------------------------


def test_probe_leaves_train_flags_and_running_stats_as_they_were():
    model, x = build("resnet")
    randomize_norms(model)
    model.train()
    model.layer1.eval()
    model.layer2[0].bn1.momentum = None  # cumulative average: counts batches
    flags = [(n, m.training) for n, m in model.named_modules()]
    state = copy.deepcopy(model.state_dict())
    find_slots(model, x)
    assert [(n, m.training) for n, m in model.named_modules()] == flags
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_probe_restores_state_when_the_forward_fails():
    model, _ = build("resnet")
    model.train()
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(RuntimeError):
        find_slots(model, torch.randn(2, 5, 8, 8))  # wrong channel count
    assert all(m.training for m in model.modules())
    assert not model.bn1._forward_hooks
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key])


def test_unreached_slot_warns_and_takes_its_class_layout():
    model, x = build("conv1d")
    model.spare = nn.LayerNorm(8)  # never called in forward
    with pytest.warns(UserWarning, match=r"did not reach 1 norm slot\(s\): \['spare'\]"):
        slots = {s.name: s for s in find_slots(model, x)}
    assert slots["spare"].reached is False and slots["spare"].input_shape is None
    assert slots["spare"].layout == CL
    assert slots["bn1"].reached is True


def test_example_input_array_and_tuple_inputs():
    model, x = build("torch_encoder")
    model.example_input_array = x
    assert len(find_slots(model)) == 7
    mask = torch.zeros(3, 5, dtype=torch.bool)
    mask[0, 3:] = True
    model.eval()  # with a padding mask torch would take its nested-tensor path
    slots = find_slots(model, (x, mask))
    assert [s.input_shape for s in slots] == [(3, 5, 16)] * 7
    assert torch.backends.mha.get_fastpath_enabled()


# -- include / exclude -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("include", "exclude", "expected"),
    [
        ("layer2.*", None, ["layer2.0.bn1", "layer2.0.bn2", "layer2.0.downsample.1"]),
        (
            None,
            "*.downsample.*",
            ["bn1", "layer1.0.bn1", "layer1.0.bn2", "layer2.0.bn1", "layer2.0.bn2"],
        ),
        (["bn1", "layer1.*"], "*.bn2", ["bn1", "layer1.0.bn1"]),
        ("*.bn?", ["layer1.*", "layer2.0.bn1"], ["layer2.0.bn2"]),
        ("nothing.*", None, []),
    ],
)
def test_include_exclude_globs(include, exclude, expected):
    model, x = build("resnet")
    assert [s.name for s in find_slots(model, x, include=include, exclude=exclude)] == expected


def test_globs_match_aliases_of_shared_modules():
    model, x = build("shared")
    assert [s.name for s in find_slots(model, x, include="branch.*")] == ["bn"]
    assert find_slots(model, x, exclude="branch.*") == []
