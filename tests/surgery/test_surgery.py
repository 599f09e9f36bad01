"""find_slots and model surgery on realistic architectures (tests/models.py), no mocks."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.profiler import ProfilerActivity, profile
from torch.testing import assert_close

import autonorm.surgery._slots
from autonorm import (
    NORM_NAMES,
    AutoNormError,
    ConfigError,
    NormChoice,
    NormConfig,
    apply_config,
    derive_config,
    find_slots,
    register_slot_type,
    to_switchable,
)
from autonorm.norms import (
    BatchNormChannelsLast,
    DyT,
    FrozenBatchNorm,
    GroupNormChannelsLast,
    IdentityNorm,
    InstanceNormChannelsLast,
    LayerNormChannelsFirst,
    RMSNormChannelsFirst,
    SwitchableNorm,
    SyncBatchNorm,
)
from autonorm.surgery import NormWithExtra, switchable_layers
from autonorm.surgery._rebuild import build_replacement, settled_choice
from tests import models
from tests.models import MODELS

CF, CL = "channels_first", "channels_last"

#: model -> [(slot name, kind, num_features, layout)], in named_modules() order.
EXPECTED_SLOTS = {
    "resnet": [
        ("bn1", "batchnorm", 8, CF),
        ("layer1.0.bn1", "batchnorm", 8, CF),
        ("layer1.0.bn2", "batchnorm", 8, CF),
        ("layer2.0.bn1", "batchnorm", 16, CF),
        ("layer2.0.bn2", "batchnorm", 16, CF),
        ("layer2.0.downsample.1", "batchnorm", 16, CF),
    ],
    "convnext": [
        ("stem.1", "layernorm", 8, CF),  # LayerNorm2d: permutes internally
        ("stage1.0.norm", "layernorm", 8, CL),  # nn.LayerNorm on (N, H, W, C)
        ("downsample.0", "layernorm", 8, CF),
        ("stage2.0.norm", "layernorm", 16, CL),
        ("head_norm", "layernorm", 16, CL),
    ],
    "unet": [
        ("down1.1", "groupnorm", 8, CF),
        ("down1.4", "groupnorm", 8, CF),
        ("down2.1", "groupnorm", 16, CF),
        ("down2.4", "groupnorm", 16, CF),
        ("up1.1", "groupnorm", 8, CF),
        ("up1.4", "groupnorm", 8, CF),
    ],
    "pre_ln_transformer": [
        ("blocks.0.ln_1", "layernorm", 16, CL),
        ("blocks.0.ln_2", "layernorm", 16, CL),
        ("blocks.1.ln_1", "layernorm", 16, CL),
        ("blocks.1.ln_2", "layernorm", 16, CL),
        ("ln_f", "rmsnorm", 16, CL),
    ],
    "torch_encoder": [
        *[(f"encoder.layers.{i}.norm{j}", "layernorm", 16, CL) for i in range(3) for j in (1, 2)],
        ("encoder.norm", "layernorm", 16, CL),
    ],
    "mlp": [("net.1", "batchnorm", 12, CF), ("net.4", "batchnorm", 12, CF)],
    "conv1d": [("bn1", "batchnorm", 8, CF), ("bn2", "batchnorm", 16, CF)],
    "shared": [("bn", "batchnorm", 8, CF)],
    "fused": [("bn_act", "batchnorm", 8, CF), ("doubled", "batchnorm", 8, CF)],
}


def build(name: str) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    return MODELS[name]()


def randomize_norms(model: nn.Module) -> None:
    """Non-trivial affine weights and running statistics, so that carrying them over shows."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in model.modules():
            for attr in ("weight", "bias", "running_mean"):
                tensor = getattr(module, attr, None)
                if isinstance(tensor, torch.Tensor) and tensor.dim() == 1:
                    tensor.copy_(torch.randn(tensor.shape, generator=g))
            if isinstance(getattr(module, "running_var", None), torch.Tensor):
                module.running_var.copy_(torch.rand(module.running_var.shape, generator=g) + 0.5)


def modules_of(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return list(model.named_modules(remove_duplicate=False))


def call(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model(*x) if isinstance(x, tuple) else model(x)


# -- find_slots --------------------------------------------------------------------------------


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
    }
    if norm in ours:
        return ours[norm]
    return (native_cf if layout == CF else native_cl)[norm]


#: (model, norm) pairs that must be refused, with a phrase of the message.
INVALID = {
    ("convnext", "instancenorm"): "slot 'head_norm'",
    ("mlp", "instancenorm"): "needs more than one position",
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
    if (name, norm) in INVALID:
        modules = modules_of(model)
        with pytest.raises(ConfigError, match=INVALID[name, norm]):
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
        if norm in ("switchable", "dyt", "identity"):
            assert layer.layout == slot.layout
    model.train()
    out = call(model, x)
    out.float().square().mean().backward()
    assert torch.isfinite(out).all()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
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


# -- what carries over -------------------------------------------------------------------------


def test_affine_weights_and_running_stats_carry_over():
    model, x = build("resnet")
    randomize_norms(model)
    old = {s.name: copy.deepcopy(model.get_submodule(s.name)) for s in find_slots(model, x)}
    config = {
        "bn1": "groupnorm(groups=2)",
        "layer1.0.bn1": "batchnorm(momentum=0.01)",
        "layer1.0.bn2": "switchable",
        "layer2.0.bn1": "layernorm",
        "layer2.0.bn2": "dyt",
        "layer2.0.downsample.1": "instancenorm",
    }
    apply_config(model, config, example_input=x)
    for name, before in old.items():
        after = model.get_submodule(name)
        assert_close(after.weight, before.weight, rtol=0, atol=0)
        assert_close(after.bias, before.bias, rtol=0, atol=0)
    bn = model.layer1[0].bn1
    assert type(bn) is nn.BatchNorm2d and bn.momentum == 0.01
    for attr in ("running_mean", "running_var"):
        assert_close(getattr(bn, attr), getattr(old["layer1.0.bn1"], attr), rtol=0, atol=0)
        sn = model.layer1[0].bn2
        assert_close(getattr(sn, attr), getattr(old["layer1.0.bn2"], attr), rtol=0, atol=0)


def test_dtype_training_flags_and_frozen_slots_preserved():
    model, x = build("resnet")
    model.double().train()
    model.layer1[0].bn2.eval()  # one slot in eval mode while the model trains
    model.bn1.requires_grad_(False)  # a frozen slot
    x = x.double()
    apply_config(model, NormConfig.uniform(find_slots(model, x), "groupnorm", groups=4))
    for name, module in model.named_modules():
        for tensor in (*module.parameters(recurse=False), *module.buffers(recurse=False)):
            if tensor.is_floating_point():
                assert tensor.dtype == torch.float64, name
    assert model.training and model.bn1.training and not model.layer1[0].bn2.training
    assert type(model.bn1) is nn.GroupNorm
    assert not any(p.requires_grad for p in model.bn1.parameters())
    assert all(p.requires_grad for p in model.layer1[0].bn1.parameters())
    model(x).sum().backward()
    assert model.bn1.weight.grad is None and model.layer1[0].bn1.weight.grad is not None


def test_layer_without_tensors_takes_the_models_dtype():
    model = nn.Sequential(nn.Conv1d(2, 4, 3), nn.BatchNorm1d(4)).double()
    x = torch.randn(3, 2, 9, dtype=torch.float64)
    with pytest.warns(UserWarning, match="no place for 2 learned parameter"):
        apply_config(model, {"1": "identity"}, example_input=x)
    apply_config(model, {"1": "batchnorm"}, example_input=x)  # IdentityNorm has no tensors
    assert type(model[1]) is nn.BatchNorm1d and model[1].weight.dtype == torch.float64
    assert model(x).dtype == torch.float64


def test_device_preserved_on_meta_model():
    model, _ = build("resnet")
    model = model.to("meta")
    slots = find_slots(model, probe=False)
    apply_config(model, NormConfig.uniform(slots, "switchable"), slots=slots)
    assert all(p.device.type == "meta" for p in model.parameters())
    assert all(b.device.type == "meta" for b in model.buffers())


def test_warns_when_target_lacks_affine_parameters():
    model, x = build("pre_ln_transformer")
    slots = find_slots(model, x)
    with pytest.warns(
        UserWarning, match=r"no place for 4 learned parameter\(s\).*blocks.0.ln_1.bias"
    ):
        apply_config(model, NormConfig.uniform(slots, "rmsnorm"), slots=slots)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # rmsnorm -> layernorm drops nothing
        apply_config(model, NormConfig.uniform(slots, "layernorm"), example_input=x)


# -- shared modules, fused subclasses, root slot -----------------------------------------------


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


def test_fused_subclass_keeps_its_activation():
    model, x = build("fused")
    randomize_norms(model)
    act = model.bn_act.act
    apply_config(model, {"bn_act": "groupnorm(groups=2)", "doubled": "batchnorm"}, example_input=x)
    layer = model.bn_act
    assert type(layer) is NormWithExtra and type(layer.norm) is nn.GroupNorm
    assert layer.act is act and layer.extra_names == ("act",)
    manual = nn.GroupNorm(2, 8)
    manual.load_state_dict(layer.norm.state_dict())
    h = torch.randn(4, 8, 6, 6)
    assert_close(layer(h), F.relu(manual(h)))
    assert (layer(h) >= 0).all()
    # the rewritten slot is still a slot with its extra, and can be rewritten again
    slots = {s.name: s for s in find_slots(model, x)}
    assert (slots["bn_act"].kind, slots["bn_act"].extra) == ("groupnorm", ("act",))
    apply_config(model, {"bn_act": "layernorm", "doubled": "batchnorm"}, example_input=x)
    assert type(model.bn_act.norm) is LayerNormChannelsFirst and model.bn_act.act is act
    assert set(model.state_dict()) >= {"bn_act.norm.weight", "bn_act.norm.bias"}


def test_unreproducible_subclass_refused_unless_kept():
    model, x = build("fused")
    slots = {s.name: s for s in find_slots(model, x)}
    assert slots["doubled"].extra is None
    with pytest.raises(ConfigError) as info:
        apply_config(model, {"bn_act": "batchnorm", "doubled": "batchnorm(momentum=0.2)"})
    message = str(info.value)
    assert "slot 'doubled' cannot be rewritten" in message
    assert "DoubledBatchNorm2d" in message and "register_slot_type" in message
    assert type(model.doubled) is models.DoubledBatchNorm2d
    apply_config(model, {"bn_act": "batchnorm", "doubled": "batchnorm"}, example_input=x)
    assert type(model.doubled) is models.DoubledBatchNorm2d


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


# -- torch's fused transformer path ------------------------------------------------------------


def aten_ops(model: nn.Module, *args: torch.Tensor) -> set[str]:
    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU]) as prof:
        model(*args)
    return {event.name for event in prof.events()}


def slow_path_output(model: nn.Module, *args: torch.Tensor) -> torch.Tensor:
    """The module-by-module output: torch's fused inference paths switched off."""
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with torch.no_grad():
            return model(*args)
    finally:
        torch.backends.mha.set_fastpath_enabled(True)


@pytest.mark.parametrize("norm", ["rmsnorm", "groupnorm", "batchnorm", "dyt", "switchable"])
def test_transformer_encoder_does_not_use_fused_layernorm_after_rewrite(norm):
    model, x = build("torch_encoder")
    slots = find_slots(model, x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        apply_config(model, NormConfig.uniform(slots, norm), slots=slots)
    randomize_norms(model)  # a LayerNorm with these weights would differ clearly
    model.eval()
    mask = torch.zeros(3, 5, dtype=torch.bool)
    mask[1, 2:] = True
    with torch.no_grad():
        out, masked = model(x), model(x, mask)
    assert_close(out, slow_path_output(model, x))
    assert_close(masked, slow_path_output(model, x, mask))
    if norm == "groupnorm":
        assert "aten::_transformer_encoder_layer_fwd" not in aten_ops(model, x)
        # the fused kernel would apply LayerNorm with the GroupNorm's weights: a different result
        for layer in model.encoder.layers:
            layer.activation_relu_or_gelu = 1
        with torch.no_grad():
            assert not torch.allclose(model(x), out, atol=1e-3)


def test_transformer_encoder_keep_config_keeps_fast_path():
    model, x = build("torch_encoder")
    model.eval()
    slots = find_slots(model, x)
    apply_config(model, NormConfig({s.name: s.keep_choice() for s in slots}), slots=slots)
    assert "aten::_transformer_encoder_layer_fwd" in aten_ops(model, x)
    # a round trip through another norm and back turns it on again
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        apply_config(model, NormConfig.uniform(slots, "rmsnorm"), slots=slots)
    assert "aten::_transformer_encoder_layer_fwd" not in aten_ops(model, x)
    assert not model.encoder.use_nested_tensor
    apply_config(model, NormConfig.uniform(find_slots(model, x), "layernorm"), example_input=x)
    assert model.encoder.use_nested_tensor
    assert "aten::_transformer_encoder_layer_fwd" in aten_ops(model, x)
    assert_close(model(x), slow_path_output(model, x), rtol=1e-4, atol=1e-5)


# -- learned path: to_switchable and derive_config ---------------------------------------------


def set_logits(sn: SwitchableNorm, winner: str) -> None:
    with torch.no_grad():
        sn.mean_weight.zero_()
        sn.var_weight.zero_()
        sn.mean_weight[sn.candidates.index(winner)] = 4.0
        sn.var_weight[sn.candidates.index(winner)] = 2.0


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


def test_derive_config_without_switchable_norms():
    model, x = build("mlp")
    with pytest.raises(AutoNormError, match="has no SwitchableNorm"):
        derive_config(model, example_input=x)


# -- user slot types ---------------------------------------------------------------------------


class ChannelRMSNorm(nn.Module):
    """A user's own RMSNorm over the last dim, not a torch norm subclass."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.dim, self.eps = dim, eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.square().mean(-1, keepdim=True) + self.eps) * self.weight


class ScaledChannelRMSNorm(ChannelRMSNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * 3


@pytest.fixture
def user_types(monkeypatch):
    monkeypatch.setattr(autonorm.surgery._slots, "_USER_TYPES", {})


def tokens_model(norm: nn.Module) -> nn.Module:
    return nn.Sequential(nn.Linear(4, 6), norm, nn.Linear(6, 2))


class Rescale(nn.Module):
    """RMSNorm computing ``x * (1 + w)`` with its eps under a name that says nothing: found
    only when registered."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim, self.tiny = dim, 1e-3
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.square().mean(-1, keepdim=True) + self.tiny) * (1 + self.weight)


def test_register_slot_type_for_a_user_class(user_types):
    model = tokens_model(Rescale(6))
    x = torch.randn(2, 5, 4) * 0.01  # small: the eps shows
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # not norm-like: skipped without a near-miss warning
        assert find_slots(model, x) == []
    register_slot_type(
        Rescale, kind="rmsnorm", layout=CL, num_features="dim", eps="tiny", weight_offset=1
    )
    (slot,) = find_slots(model, x)
    assert (slot.name, slot.kind, slot.num_features, slot.layout) == ("1", "rmsnorm", 6, CL)
    assert slot.keep_choice() == NormChoice("rmsnorm", {"eps": 1e-3})
    assert slot.weight_offset == 1.0
    with torch.no_grad():
        model[1].weight.uniform_(-0.5, 0.5)
        expected = model(x)
    apply_config(model, {"1": "rmsnorm(eps=0.0001)"}, example_input=x)
    apply_config(model, {"1": "rmsnorm(eps=0.001)"}, example_input=x)
    assert type(model[1]) is nn.RMSNorm
    assert_close(model(x), expected)  # rebuilt exactly: weight 1 + w, the module's eps


def test_register_slot_type_reads_eps_with_a_function(user_types):
    register_slot_type(Rescale, kind="rmsnorm", layout=CL, num_features="dim", eps=lambda m: 0.5)
    (slot,) = find_slots(tokens_model(Rescale(6)))
    assert slot.keep_choice() == NormChoice("rmsnorm", {"eps": 0.5})
    with pytest.raises(ValueError, match="`weight_offset` must be a number"):
        register_slot_type(Rescale, kind="rmsnorm", weight_offset="1")


class LlamaLikeRMSNorm(nn.Module):
    """Hugging Face's LlamaRMSNorm: eps in ``variance_epsilon``, float32 inside."""

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(dtype)


class GemmaLikeRMSNorm(nn.Module):
    """Gemma's RMSNorm: ``x * (1 + w)`` with a zero-initialized weight."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        return (out * (1.0 + self.weight.float())).type_as(x)


class EpsilonLayerNorm(nn.Module):
    """A LayerNorm written out, eps under ``epsilon``, normalizing C of ``(N, C, H, W)``."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.epsilon = 1e-12
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(1, keepdim=True)
        var = (x - mean).square().mean(1, keepdim=True)
        out = (x - mean) / torch.sqrt(var + self.epsilon)
        return out * self.weight[:, None, None] + self.bias[:, None, None]


class TwiceNorm(LlamaLikeRMSNorm):
    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return super().forward(hidden_states) * 2


class NotEvenANorm(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.eps = 1e-5
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight


@pytest.mark.parametrize(
    ("norm", "kind", "layout", "eps", "offset"),
    [
        (LlamaLikeRMSNorm(6), "rmsnorm", CL, 1e-6, 0.0),
        (GemmaLikeRMSNorm(6), "rmsnorm", CL, 1e-6, 1.0),
        (ChannelRMSNorm(6), "rmsnorm", CL, 1e-6, 0.0),
        (EpsilonLayerNorm(6), "layernorm", CF, 1e-12, 0.0),
    ],
    ids=["llama", "gemma", "channel-rms", "epsilon-layernorm-cf"],
)
def test_library_norms_are_found_by_what_they_compute(norm, kind, layout, eps, offset):
    if layout == CL:
        model, x = tokens_model(norm), torch.randn(2, 5, 4)
    else:
        model, x = (
            nn.Sequential(nn.Conv2d(3, 6, 1), norm, nn.Conv2d(6, 2, 1)),
            torch.randn(2, 3, 4, 4),
        )
    with torch.no_grad():
        norm.weight.uniform_(-1, 1)
    for example in (x, None):  # the same slot with and without a probe
        (slot,) = find_slots(model, example)
        assert (slot.name, slot.kind, slot.layout) == ("1", kind, layout)
        assert slot.keep_choice() == NormChoice(kind, {"eps": eps})
        assert slot.weight_offset == offset
    model.eval()
    with torch.no_grad():
        small = x * 1e-4  # where eps matters
        expected, expected_small = model(x), model(small)
    rebuilt = copy.deepcopy(model)
    rebuilt[1] = build_replacement(
        norm,
        slot.keep_choice(),
        layout=layout,
        input_ndim=4,
        extra=(),
        weight_offset=offset,
        num_features=6,
    )
    with torch.no_grad():
        assert_close(rebuilt(x), expected, rtol=1e-5, atol=1e-5)
        assert_close(rebuilt(small), expected_small, rtol=1e-5, atol=1e-5)
    apply_config(model, {"1": "dyt"}, example_input=x)  # a rewrite carries weight + offset
    assert_close(model[1].weight.detach(), norm.weight.detach() + offset)


def test_near_misses_are_listed_in_one_warning():
    model = nn.Sequential(
        nn.Linear(4, 6), TwiceNorm(6), NotEvenANorm(6), LlamaLikeRMSNorm(6), nn.Linear(6, 2)
    )
    with pytest.warns(UserWarning) as record:
        slots = find_slots(model, torch.randn(2, 5, 4))
    assert [s.name for s in slots] == ["3"]
    (message,) = [str(w.message) for w in record]
    assert "2 module(s) look like norms" in message
    assert "1 (TwiceNorm)" in message and "2 (NotEvenANorm)" in message
    assert "register_slot_type" in message


def test_registered_subclass_with_its_own_forward_is_checked(user_types):
    register_slot_type(
        ChannelRMSNorm, kind="rmsnorm", layout=CL, num_features=lambda m: m.dim, extra=None
    )
    x = torch.randn(2, 5, 4)
    ok = tokens_model(ChannelRMSNorm(6))
    assert find_slots(ok, x)[0].extra == ()  # the check reproduces it with nn.RMSNorm
    scaled = tokens_model(ScaledChannelRMSNorm(6))
    (slot,) = find_slots(scaled, x)
    assert slot.extra is None
    with pytest.raises(ConfigError, match="ScaledChannelRMSNorm"):
        apply_config(scaled, {"1": "layernorm"}, example_input=x)


def test_register_slot_type_rejects_bad_arguments(user_types):
    with pytest.raises(ValueError, match="unknown norm 'fancy'"):
        register_slot_type(ChannelRMSNorm, kind="fancy")
    with pytest.raises(ValueError, match="`layout` must be one of"):
        register_slot_type(ChannelRMSNorm, kind="rmsnorm", layout="nhwc")
    with pytest.raises(ValueError, match="nn.Module subclass"):
        register_slot_type(object, kind="rmsnorm")


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


def test_apply_config_takes_found_slots_without_a_probe():
    model, x = build("resnet")
    slots = find_slots(model, x)
    calls = []
    model.register_forward_pre_hook(lambda *_: calls.append(1))
    apply_config(model, NormConfig.uniform(slots, "groupnorm"), slots=slots)
    assert calls == [] and type(model.bn1) is nn.GroupNorm
