"""Rebuilding a slot's layer: what carries over (affine weights, running statistics, dtype,
device, train and frozen flags), a warning for what has no place, and fused norm subclasses
kept with their extra children or refused when they cannot be reproduced."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.testing import assert_close

from autonorm import ConfigError, NormConfig, apply_config, find_slots
from autonorm.norms import LayerNormChannelsFirst
from autonorm.surgery import NormWithExtra
from tests import models
from tests.models import build, randomize_norms

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


# -- fused subclasses --------------------------------------------------------------------------


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
