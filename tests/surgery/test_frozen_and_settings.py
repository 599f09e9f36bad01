"""Frozen batch norms as slots, and rewrites that keep a layer's settings."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.testing import assert_close

from autonorm import NormChoice, apply_config, derive_config, find_slots, to_switchable
from autonorm.norms import FrozenBatchNorm, SwitchableNorm


class FrozenBatchNorm2d(nn.Module):
    """A look-alike of torchvision.ops.misc.FrozenBatchNorm2d (torchvision does not install
    on this torch): the same buffers, eps attribute, state_dict hook and forward."""

    def __init__(self, num_features: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def _load_from_state_dict(self, state_dict, prefix, *args):
        state_dict.pop(prefix + "num_batches_tracked", None)
        super()._load_from_state_dict(state_dict, prefix, *args)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.reshape(1, -1, 1, 1)
        b = self.bias.reshape(1, -1, 1, 1)
        rv = self.running_var.reshape(1, -1, 1, 1)
        rm = self.running_mean.reshape(1, -1, 1, 1)
        scale = w * (rv + self.eps).rsqrt()
        bias = b - rm * scale
        return x * scale + bias


def frozen_net(eps: float = 1e-5) -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, bias=False), FrozenBatchNorm2d(8, eps), nn.ReLU(), nn.Conv2d(8, 4, 1)
    )
    generator = torch.Generator().manual_seed(0)
    for buffer in model[1].buffers():
        buffer.copy_(torch.rand(8, generator=generator) + 0.5)
    return model


X = torch.randn(2, 3, 8, 8)


@pytest.mark.parametrize("example", [X, None], ids=["probe", "no-probe"])
def test_frozen_batchnorm_is_a_slot_kept_exactly(example):
    model = frozen_net(eps=1e-3).eval()
    (slot,) = find_slots(model, example)
    assert (slot.name, slot.kind, slot.num_features, slot.layout) == (
        "1",
        "frozenbatchnorm",
        8,
        "channels_first",
    )
    assert slot.keep_choice() == NormChoice("frozenbatchnorm", {"eps": 1e-3})
    expected = model(X)
    apply_config(model, {"1": "frozenbatchnorm(eps=0.001, affine=true)"}, example_input=example)
    assert type(model[1]) is FrozenBatchNorm
    assert list(model[1].parameters()) == []  # still frozen: nothing to train
    assert_close(model(X), expected, rtol=1e-6, atol=1e-6)


def test_frozen_batchnorm_converts_for_fine_tuning():
    reference = frozen_net().eval()
    expected = reference(X)
    model = frozen_net()
    apply_config(model, {"1": "batchnorm"}, example_input=X)
    bn = model[1]
    assert type(bn) is nn.BatchNorm2d and bn.weight.requires_grad  # unfrozen: trainable
    assert_close(bn.running_var, reference[1].running_var)
    assert_close(model.eval()(X), expected)  # eval: the frozen statistics, as before
    model = frozen_net()
    apply_config(model, {"1": "groupnorm"}, example_input=X)
    assert_close(model[1].weight.detach(), reference[1].weight)
    model = frozen_net()
    to_switchable(model, example_input=X)
    sn = model[1]
    assert isinstance(sn, SwitchableNorm)
    assert_close(sn.running_mean, reference[1].running_mean)
    out = model.train()(X)
    out.square().mean().backward()
    assert torch.isfinite(sn.weight.grad).all()


def test_batchnorm_freezes_with_its_statistics():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8, eps=1e-3), nn.ReLU())
    model.train()
    for _ in range(3):
        model(torch.randn(4, 3, 8, 8) * 2 + 1)
    model.eval()
    expected = model(X)
    apply_config(model, {"1": "frozenbatchnorm"}, example_input=X)
    assert type(model[1]) is FrozenBatchNorm and model[1].eps == 1e-3  # same family: eps kept
    model.train()  # frozen: train mode normalizes with the fixed statistics too
    assert_close(model(X), expected)


def test_same_family_rewrites_keep_the_layers_settings():
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3),
        nn.BatchNorm2d(8, eps=1e-3, momentum=0.01),
        nn.Conv2d(8, 16, 1),
        nn.GroupNorm(8, 16, eps=1e-4),
        nn.Conv2d(16, 8, 1),
        nn.BatchNorm2d(8, track_running_stats=False, affine=False),
    )
    slots = find_slots(model, X)
    gn = model[3]
    apply_config(
        model,
        {"1": "syncbatchnorm", "3": "groupnorm", "5": "batchnorm(eps=0.01)"},
        slots=slots,
    )
    assert model[3] is gn  # a kind-only choice on GroupNorm(8) keeps its 8 groups: unchanged
    assert (model[1].eps, model[1].momentum) == (1e-3, 0.01)
    assert model[5].eps == 0.01 and not model[5].track_running_stats and not model[5].affine


def test_cross_family_rewrites_keep_a_non_default_eps():
    model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8, eps=1e-12), nn.Linear(8, 8))
    model.append(nn.LayerNorm(8))
    with pytest.warns(UserWarning, match="no place for 2 learned parameter"):  # the biases
        apply_config(model, {"1": "rmsnorm", "3": "rmsnorm"}, example_input=torch.randn(2, 5, 4))
    assert model[1].eps == 1e-12  # ViT's eps stays
    assert model[3].eps is None  # a default eps gives way to the new layer's default
    model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8, eps=1e-12))
    with pytest.warns(UserWarning, match="no place"):
        apply_config(model, {"1": "rmsnorm(eps=1e-06)"}, example_input=torch.randn(2, 5, 4))
    assert model[1].eps == 1e-6  # unless the config says otherwise


@pytest.mark.parametrize("tracking", [True, False])
def test_learn_derive_finalize_keeps_batchnorm_settings(tracking):
    bn = nn.BatchNorm2d(8, eps=1e-3, momentum=0.01, track_running_stats=tracking)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), bn)
    to_switchable(model, example_input=X, candidates=["batch"])
    assert (model[1].eps, model[1].momentum) == (1e-3, 0.01)
    assert model[1].track_running_stats is tracking
    config = derive_config(model, example_input=X)
    assert config["1"].name == "batchnorm"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        apply_config(model, config, example_input=X)
    assert type(model[1]) is nn.BatchNorm2d
    assert (model[1].eps, model[1].momentum) == (1e-3, 0.01)
    assert model[1].track_running_stats is tracking
