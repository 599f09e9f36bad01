"""apply_config on realistic architectures (tests/models.py), no mocks: a keep config changes
nothing, every norm applies to every slot it fits, a config is checked whole before any change,
and shared modules and the root module are rewritten once."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.testing import assert_close

from autonorm import (
    NORM_NAMES,
    ConfigError,
    NormConfig,
    apply_config,
    find_slots,
    to_switchable,
)
from autonorm.norms import (
    BatchNormChannelsLast,
    BatchRenorm,
    DyT,
    EvoNormS0,
    FilterResponseNorm,
    FrozenBatchNorm,
    GroupNormChannelsLast,
    IdentityNorm,
    InstanceNormChannelsLast,
    LayerNormChannelsFirst,
    RMSNormChannelsFirst,
    SwitchableNorm,
    SyncBatchNorm,
    get_spec,
)
from autonorm.surgery import NormWithExtra
from autonorm.surgery._rebuild import settled_choice
from tests.models import CF, MODELS, assert_trains, build, call, randomize_norms


def modules_of(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return list(model.named_modules(remove_duplicate=False))


# -- keep round trip and uniform conversions ---------------------------------------------------


@pytest.mark.parametrize("name", MODELS)
def test_keep_config_leaves_model_and_outputs_identical(name):
    model, x = build(name)
    randomize_norms(model)
    model.eval()
    with torch.no_grad():
        before = model(x)
    modules = modules_of(model)
    slots = find_slots(model, x)
    config = NormConfig({s.name: s.keep_choice() for s in slots})
    assert apply_config(model, config, example_input=x) is model
    assert all(a[1] is b[1] for a, b in zip(modules, modules_of(model), strict=True))
    with torch.no_grad():
        assert_close(model(x), before, rtol=0, atol=0)


def expected_type(norm: str, layout: str, ndim: int) -> type[nn.Module]:
    native_cf = {
        "batchnorm": {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d}[ndim],
        "syncbatchnorm": SyncBatchNorm,
        "groupnorm": nn.GroupNorm,
        "instancenorm": {3: nn.InstanceNorm1d, 4: nn.InstanceNorm2d}.get(ndim),
        "layernorm": LayerNormChannelsFirst,
        "rmsnorm": RMSNormChannelsFirst,
    }
    native_cl = {
        "batchnorm": BatchNormChannelsLast,
        "syncbatchnorm": SyncBatchNorm,
        "groupnorm": GroupNormChannelsLast,
        "instancenorm": InstanceNormChannelsLast,
        "layernorm": nn.LayerNorm,
        "rmsnorm": nn.RMSNorm,
    }
    ours = {
        "switchable": SwitchableNorm,
        "dyt": DyT,
        "identity": IdentityNorm,
        "frozenbatchnorm": FrozenBatchNorm,
        "batchrenorm": BatchRenorm,
        "frn": FilterResponseNorm,
        "evonorm_s0": EvoNormS0,
    }
    if norm in ours:
        return ours[norm]
    return (native_cf if layout == CF else native_cl)[norm]


#: (model, norm) pairs that must be refused, with a phrase of the message.
INVALID = {
    ("convnext", "instancenorm"): "slot 'head_norm'",
    ("mlp", "instancenorm"): "needs more than one position",
    ("mlp", "frn"): "needs more than one position",
    **{
        ("fused", norm): "slot 'doubled' cannot be rewritten"
        for norm in NORM_NAMES
        if norm != "batchnorm"
    },
}


@pytest.mark.parametrize("norm", NORM_NAMES)
@pytest.mark.parametrize("name", MODELS)
def test_uniform_conversion(name, norm):
    model, x = build(name)
    slots = find_slots(model, x)
    config = NormConfig.uniform(slots, norm)
    invalid = INVALID.get((name, norm))
    if get_spec(norm).activation and any(s.activation is None for s in slots):
        invalid = f"{norm} includes its activation and no activation is known"
    if invalid is not None:
        modules = modules_of(model)
        with pytest.raises(ConfigError, match=invalid):
            apply_config(model, config, slots=slots)
        assert all(a[1] is b[1] for a, b in zip(modules, modules_of(model), strict=True))
        return
    originals = {s.name: model.get_submodule(s.name) for s in slots}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # rmsnorm/identity drop biases: tested below
        model = apply_config(model, config, slots=slots)
    for slot in slots:
        layer = model.get_submodule(slot.name)
        if settled_choice(config[slot.name], slot.keep_choice()) == slot.keep_choice():
            assert layer is originals[slot.name]  # a kind-only choice keeps eps: LayerNorm2d
            continue
        if slot.extra:
            assert type(layer) is NormWithExtra
            layer = layer.norm
        assert type(layer) is expected_type(norm, slot.layout, len(slot.input_shape))
        if norm in ("switchable", "dyt", "identity", "batchrenorm", "frn", "evonorm_s0"):
            assert layer.layout == slot.layout
    assert_trains(model, x)
    model.eval()
    with torch.no_grad():
        assert torch.isfinite(call(model, x)).all()
    again = find_slots(model, x)
    assert [s.name for s in again] == [s.name for s in slots]
    assert {s.kind for s in again} == ({"batchnorm"} if name == "fused" else {norm})


def test_groups_must_divide_channels():
    model, x = build("unet")
    with pytest.raises(ConfigError, match=r"`groups` must divide num_features, got groups=3"):
        apply_config(model, NormConfig.uniform(find_slots(model, x), "groupnorm", groups=3))


# -- validation before any change --------------------------------------------------------------


def test_all_problems_in_one_message_and_model_unchanged():
    model, x = build("resnet")
    state = copy.deepcopy(model.state_dict())
    modules = modules_of(model)
    config = {
        "bn1": "groupnorm(groups=3)",  # 3 does not divide 8
        "layer1.0.bn1": "layernorm",
        "layer1.0.bn2": "switchable(candidates=[instance, nope])",  # refused when built
        "layer2.0.bn1": {"name": "groupnorm", "groups": 5},  # 5 does not divide 16
        "layer2.0.bn2": "dyt",
        "layer2.0.downsample.1": "instancenorm",
        "layer9.bn": "batchnorm",  # no such slot
    }
    with pytest.raises(ConfigError) as info:
        apply_config(model, config, example_input=x)
    message = str(info.value)
    assert "groups=3, num_features=8 (slot 'bn1')" in message
    assert "groups=5, num_features=16 (slot 'layer2.0.bn1')" in message
    assert "['layer9.bn'] are not norm slots of SmallResNet" in message
    assert "its slots are: bn1, layer1.0.bn1" in message
    assert all(a[1] is b[1] for a, b in zip(modules, modules_of(model), strict=True))
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key])
    # with the slot errors fixed, the build error of the switchable choice is still reported
    config.update({"bn1": "groupnorm", "layer2.0.bn1": "groupnorm"})
    del config["layer9.bn"]
    with pytest.raises(ConfigError, match=r"`candidates` .*\(slot 'layer1.0.bn2'\)"):
        apply_config(model, config, example_input=x)
    assert all(a[1] is b[1] for a, b in zip(modules, modules_of(model), strict=True))


def test_missing_slots_need_partial():
    model, x = build("resnet")
    with pytest.raises(ConfigError, match=r"no choice for slots \['layer1.0.bn1', .*partial=True"):
        apply_config(model, {"bn1": "groupnorm"}, example_input=x)
    assert type(model.bn1) is nn.BatchNorm2d
    original = model.layer1[0].bn1
    apply_config(model, {"bn1": "groupnorm"}, example_input=x, partial=True)
    assert type(model.bn1) is nn.GroupNorm
    assert model.layer1[0].bn1 is original


def test_unknown_slot_refused_even_with_partial():
    model, x = build("mlp")
    with pytest.raises(ConfigError, match=r"\['net.2'\] are not norm slots of MLP"):
        apply_config(model, {"net.2": "layernorm"}, example_input=x, partial=True)


def test_alias_given_twice_with_different_choices():
    model, x = build("shared")
    with pytest.raises(ConfigError, match="'bn' is given twice"):
        apply_config(model, {"bn": "groupnorm", "branch.1": "layernorm"}, example_input=x)
    apply_config(model, {"branch.1": "layernorm"}, example_input=x)
    assert type(model.bn) is LayerNormChannelsFirst


# -- shared modules, root slot, found slots ----------------------------------------------------


def test_shared_module_replaced_once_at_both_places():
    model, x = build("shared")
    randomize_norms(model)
    weight = model.bn.weight.detach().clone()
    apply_config(model, {"bn": "groupnorm(groups=2)"}, example_input=x)
    assert type(model.bn) is nn.GroupNorm and model.branch[1] is model.bn
    assert_close(model.bn.weight, weight, rtol=0, atol=0)
    names = [n for n, _ in model.named_parameters()]
    assert names.count("bn.weight") == 1 and "branch.1.weight" not in names
    model(x).sum().backward()
    assert model.bn.weight.grad is not None


def test_root_module_is_a_slot():
    root = nn.BatchNorm1d(6)
    x = torch.randn(4, 6)
    (slot,) = find_slots(root, x)
    assert (slot.name, slot.kind, slot.layout) == ("", "batchnorm", CF)
    new = apply_config(root, {"": "layernorm"}, example_input=x)
    assert new is not root and type(new) is LayerNormChannelsFirst
    assert type(root) is nn.BatchNorm1d  # the old root is left as it was
    assert_close(new(x), F.layer_norm(x, (6,)))
    sn = to_switchable(nn.GroupNorm(2, 4), example_input=torch.randn(2, 4, 3))
    assert type(sn) is SwitchableNorm and sn.layout == CF


def test_apply_config_takes_found_slots_without_a_probe():
    model, x = build("resnet")
    slots = find_slots(model, x)
    calls = []
    model.register_forward_pre_hook(lambda *_: calls.append(1))
    apply_config(model, NormConfig.uniform(slots, "groupnorm"), slots=slots)
    assert calls == [] and type(model.bn1) is nn.GroupNorm
