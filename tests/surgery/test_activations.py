"""A slot's activation: found in a fused module, an nn.Sequential or a declaration; held by a
choice that includes it (frn, evonorm_s0) and given back by one that does not; refused in one
line where none is known."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from autonorm import AutoNormError, ConfigError, apply_config, find_slots
from autonorm.norms import EvoNormS0, FilterResponseNorm
from autonorm.surgery import NormWithExtra
from autonorm.surgery._activations import HeldActivation
from tests.models import FusedNormNet


def _sequential() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.SiLU(), nn.Conv2d(8, 8, 1))


X = torch.randn(2, 3, 6, 6)


def test_sequential_activation_is_held_then_given_back():
    model = _sequential()
    silu = model[2]
    (slot,) = find_slots(model, X)
    assert (slot.activation, slot.activation_held) == ("2", False)
    apply_config(model, {"1": "frn"}, example_input=X)
    assert isinstance(model[1], FilterResponseNorm) and isinstance(model[2], HeldActivation)
    with torch.no_grad():  # the FRN's TLU is the only nonlinearity between the convs
        expected = model[3](model[1](model[0](X)))
        assert torch.equal(model(X), expected)
    (slot,) = find_slots(model, X)
    assert (slot.kind, slot.activation, slot.activation_held) == ("frn", "2", True)
    apply_config(model, {"1": "evonorm_s0(groups=2)"}, example_input=X)  # one held, still held
    assert isinstance(model[1], EvoNormS0) and model[2].original is silu
    apply_config(model, {"1": "batchnorm"}, example_input=X)
    assert model[2] is silu and isinstance(model[1], nn.BatchNorm2d)


def test_no_known_activation_is_refused_in_one_line():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8))
    (slot,) = find_slots(model, X)
    assert slot.activation is None
    (problem,) = slot.check("frn")
    assert problem == (
        "frn includes its activation and no activation is known after this slot (a fused "
        "norm-activation module, an activation right after it in an nn.Sequential, or one "
        "declared: find_slots(..., activations={'1': '<activation module>'}))"
    )
    with pytest.raises(ConfigError, match="evonorm_s0 includes its activation"):
        apply_config(model, {"1": "evonorm_s0"}, example_input=X)
    assert isinstance(model[1], nn.BatchNorm2d)  # nothing changed


def test_fused_norm_activation_module():
    model = FusedNormNet()
    x = torch.randn(2, 3, 6, 6)
    slots = {s.name: s for s in find_slots(model, x)}
    assert slots["bn_act"].activation == "bn_act.act"
    assert slots["doubled"].activation is None  # its extra step is no child module
    relu = model.bn_act.act
    apply_config(model, {"bn_act": "evonorm_s0(groups=2)"}, example_input=x, partial=True)
    assert isinstance(model.bn_act, NormWithExtra) and isinstance(model.bn_act.norm, EvoNormS0)
    assert isinstance(model.bn_act.act, HeldActivation)
    with torch.no_grad():
        h = model.conv1(x)
        assert torch.equal(model.bn_act(h), model.bn_act.norm(h))
    apply_config(model, {"bn_act": "groupnorm(groups=2)"}, example_input=x, partial=True)
    assert model.bn_act.act is relu and isinstance(model.bn_act.norm, nn.GroupNorm)


class SharedReLU(nn.Module):
    """One ReLU called after both norms (as torchvision's ResNet blocks do)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.bn1 = nn.BatchNorm2d(8)
        self.bn2 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU()
        self.block = nn.Sequential(self.bn2, self.relu)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(self.relu(self.bn1(self.conv(x))))


def test_an_activation_used_at_several_places_is_not_offered():
    model = SharedReLU()
    slots = {s.name: s for s in find_slots(model, X)}
    assert slots["bn1"].activation is None
    assert slots["bn2"].activation is None  # the Sequential's next module is the shared ReLU
    with pytest.raises(AutoNormError, match=r"slot 'bn1': 'relu' is used at 2 places"):
        find_slots(model, X, activations={"bn1": "relu"})


class Block(nn.Module):
    autonorm_activations = {"bn": "act"}

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.bn = nn.BatchNorm2d(8)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


def test_declared_activation_by_attribute_and_argument():
    model = Block()
    (slot,) = find_slots(model, X)
    assert slot.activation == "act"
    (slot,) = find_slots(model, X, activations={})
    assert slot.activation is None  # the argument wins over the attribute
    apply_config(model, {"bn": "frn"}, example_input=X)
    assert isinstance(model.act, HeldActivation)
    with pytest.raises(AutoNormError, match=r"'conv' is not a norm slot; slot 'bn': the model "):
        find_slots(model, X, activations={"conv": "act", "bn": "nope"})


def test_a_norm_that_includes_its_activation_without_holding_one_keeps_it():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), FilterResponseNorm(8), nn.Conv2d(8, 8, 1))
    (slot,) = find_slots(model, X)
    assert slot.kind == "frn" and slot.activation is None
    (problem,) = slot.check("batchnorm")
    assert problem == (
        "the slot's frn includes its activation and holds no original one to give back, so "
        "batchnorm would leave the slot without an activation"
    )
    assert slot.check("evonorm_s0(groups=2)")  # no activation known to hold either
