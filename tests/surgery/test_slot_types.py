"""Norm classes torch does not ship: a user's class registered with ``register_slot_type``,
library norms (Llama's and Gemma's RMSNorm, a written-out LayerNorm) found by what they
compute, and near misses named in one warning."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn
from torch.testing import assert_close

import autonorm.surgery._slot_types
from autonorm import ConfigError, NormChoice, apply_config, find_slots, register_slot_type
from autonorm.surgery._rebuild import build_replacement
from tests.models import CF, CL

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
    monkeypatch.setattr(autonorm.surgery._slot_types, "_USER_TYPES", {})


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


# -- library norms found by what they compute --------------------------------------------------


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
